"""Property-based tests of the config parser and `--set`: any text gives a valid config or a one-line error,
never a traceback (a received config file, or a value pasted into a command line, can be anything)."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerwise.config import parse_assignment
from layerwise.errors import LayerwiseError
from layerwise.presets import read_config_file, resolve_config

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

KEYS = ["model.widths", "model.k", "model.downsample_at", "data.val_size", "data.mean", "train.lr", "train.mode",
        "train.batch_size", "train.divergence_factor", "train", "model", "preset", "paper", "train.lr.x", "a..b",
        ""]  # fmt: skip
YAMLISH = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=string.printable, max_size=40),
    st.sampled_from([2, 50, 3000]).map(lambda n: "[" * n + "]" * n),  # deeply nested: RecursionError, not YAMLError
    st.sampled_from([2, 50, 3000]).map(lambda n: "{a: " * n + "1" + "}" * n),
    st.sampled_from(["&a [*a]", "!!python/object:os.system x", "1e400", "-.inf", ".nan", "[1, 2", "null", "~"]),
)


def valid_or_one_line(make) -> None:
    try:
        make()
    except LayerwiseError as e:
        assert "\n" not in str(e) and str(e), repr(e)


@SETTINGS
@given(key=st.one_of(st.sampled_from(KEYS), st.text(max_size=20)), value=YAMLISH)
def test_any_set_gives_a_config_or_one_line(key, value):
    valid_or_one_line(lambda: resolve_config("demo", None, [parse_assignment(f"{key}={value}")]))


@SETTINGS
@given(text=st.one_of(YAMLISH, st.text(max_size=200)))
def test_any_assignment_text_gives_a_config_or_one_line(text):
    valid_or_one_line(lambda: resolve_config("demo", None, [parse_assignment(text)]))


@SETTINGS
@given(text=st.one_of(YAMLISH, st.builds(lambda k, v: f"preset: demo\n{k}: {v}\n", st.sampled_from(KEYS), YAMLISH)))
def test_any_config_file_gives_a_config_or_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(text)
    valid_or_one_line(lambda: resolve_config(None, path, []))
    valid_or_one_line(lambda: read_config_file(path))


# Random YAML with anchors (&a) and aliases (*a), defined or not, anywhere in a value: flow lists and mappings
# nested a few levels, so that most documents parse and the alias is met where the config is composed.
NAMES = st.sampled_from(["a", "b", "c"])
LEAVES = st.one_of(st.sampled_from(["1", "0.5", "x", "null", "[]", "{}", "true", "'s'", "8"]), NAMES.map("*{}".format))
ANCHORED = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(st.sampled_from(["k", "lr", "widths", "arch", "<<"]), children), max_size=3).map(
            lambda kv: "{" + ", ".join(f"{k}: {v}" for k, v in kv) + "}"
        ),
        st.tuples(NAMES, children).map(lambda t: f"&{t[0]} {t[1]}"),
    ),
    max_leaves=12,
)


def refused_if_aliased(text: str, make) -> None:
    """A config or one line; and a document with an alias is never a config."""
    try:
        make()
    except LayerwiseError as e:
        assert "\n" not in str(e) and str(e), repr(e)
    else:
        assert "*" not in text, text


@SETTINGS
@given(key=st.sampled_from(KEYS), value=ANCHORED)
def test_any_set_with_anchors_and_aliases_gives_a_config_or_one_line(key, value):
    refused_if_aliased(value, lambda: resolve_config("demo", None, [parse_assignment(f"{key}={value}")]))


@SETTINGS
@given(
    text=st.one_of(
        st.builds("preset: demo\n{}: {}\n".format, st.sampled_from(["model", "data", "train", "paper"]), ANCHORED),
        st.builds("base: &a {}\npreset: demo\ntrain: {}\n".format, ANCHORED, ANCHORED),
        ANCHORED.map("model: {{arch: custom, builder: 'tests.custom_nets:good', builder_args: {}}}\n".format),
    )
)
def test_any_config_file_with_anchors_and_aliases_gives_a_config_or_one_line(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "config.yaml"
    path.write_text(text)
    refused_if_aliased(text, lambda: resolve_config(None, path, [], trust_code=True))
