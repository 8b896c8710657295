"""Config files from others: a builder a file names is imported only with --trust-code, a dry run shows it
without importing it, and YAML aliases (a few hundred bytes describing billions of nodes) are refused wherever
layerwise reads YAML: --config, --set, presets and a run's config.yaml, for every command that reads one."""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_overrides, write_folder

from layerwise.cli import main
from layerwise.config import config_from_dict, dump_yaml, load_yaml, parse_assignment
from layerwise.errors import LayerwiseError, brief
from layerwise.presets import resolve_config
from layerwise.train import train

PACKAGE = Path(__file__).resolve().parents[1] / "layerwise"
SECURITY = Path(__file__).resolve().parents[1] / "docs" / "security.md"


def error_of(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err  # one line, never a traceback
    return err[0]


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """A folder, made the current one, holding a module whose import leaves a mark and whose builder would leave
    another: the config file someone sent names it. The module's name is unique to the test, so no earlier
    import of it is cached."""
    name = f"hostile_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(
        "from pathlib import Path\n"
        "Path('IMPORTED').write_text('the module ran')\n"
        "def build(**kwargs):\n"
        "    Path('CALLED').write_text(repr(kwargs))\n"
        "    raise SystemExit('the builder ran')\n"
    )
    (tmp_path / "shared.yaml").write_text(
        f"model:\n  arch: custom\n  builder: {name}:build\n  builder_args: {{command: touch PWNED}}\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LAYERWISE_TRUST_CODE", raising=False)
    yield tmp_path, name
    sys.modules.pop(name, None)


def test_a_config_file_naming_code_is_refused_before_anything_is_imported(hostile, capsys):
    folder, name = hostile
    assert main(["-q", "train", "--config", "shared.yaml", "--out", "run"]) == 2
    line = error_of(capsys)
    assert line.startswith("error: config file shared.yaml names code to run: loading it would import " + name)
    assert f"call {name}:build with {{'command': 'touch PWNED'}}" in line and "pass --trust-code" in line
    assert "a config file's builder needs it since 2026-12" in line  # says what changed
    assert not (folder / "IMPORTED").exists() and not (folder / "CALLED").exists() and not (folder / "run").exists()
    with pytest.raises(LayerwiseError, match="names code to run"):  # the library refuses it too
        resolve_config(None, "shared.yaml")
    assert not (folder / "IMPORTED").exists()


def test_with_trust_code_the_config_files_builder_is_imported_and_called(hostile, capsys):
    folder, name = hostile
    assert main(["-q", "train", "--config", "shared.yaml", "--out", "run", "--trust-code"]) == 2
    assert f"model.builder {name}:build raised SystemExit: the builder ran" in error_of(capsys)
    assert (folder / "CALLED").read_text() == "{'command': 'touch PWNED'}"


def test_a_builder_given_on_the_command_line_or_from_python_needs_no_trust(hostile, capsys):
    folder, name = hostile
    assert main(["-q", "train", "--config", "shared.yaml", "--set", f"model.builder={name}:build", "--out", "run"]) == 2
    assert "the builder ran" in error_of(capsys) and (folder / "CALLED").exists()
    cfg = resolve_config(None, "shared.yaml", trust_code=True)  # Python: the caller's own decision
    assert cfg.model.builder == f"{name}:build"


def test_a_dry_run_shows_the_config_and_its_code_and_imports_nothing(hostile, capsys):
    folder, name = hostile
    assert main(["-q", "train", "--config", "shared.yaml", "--out", "run", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert config_from_dict(load_yaml(out, "the dry run")).model.builder == f"{name}:build"  # the config itself
    assert f"# code: import {name} (running its top-level code) and call {name}:build with" in out
    assert "config file shared.yaml names it, so training needs --trust-code" in out
    assert sorted(p.name for p in folder.iterdir()) == sorted([f"{name}.py", "shared.yaml"])  # nothing written
    assert main(["-q", "train", "--dry-run"]) == 0
    assert "# code: none (simcnn is a library architecture: nothing is imported)" in capsys.readouterr().out


def alias_bomb(levels: int = 8, fan: int = 9) -> str:
    """'Billion laughs' under model.builder_args: level i is a list of `fan` aliases of level i-1."""
    lines = ["model:", "  arch: custom", "  builder: tests.custom_nets:good", "  builder_args:"]
    lines.append("    a0: &a0 [" + ", ".join(["lol"] * fan) + "]")
    for i in range(1, levels + 1):
        lines.append(f"    a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * fan) + "]")
    return "\n".join(lines) + "\n"


def expanded_nodes(text: str) -> int:
    """The nodes a YAML document stands for once every alias is expanded, counted from the parser's events (which
    expand nothing): an alias counts the nodes of what it names."""
    sizes, open_nodes, total = {}, [], 0
    for event in yaml.parse(text):
        if isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
            size = sizes[event.anchor] if isinstance(event, yaml.AliasEvent) else 1
            if isinstance(event, yaml.ScalarEvent) and event.anchor:
                sizes[event.anchor] = 1
            if open_nodes:
                open_nodes[-1][1] += size
            else:
                total += size
        elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            open_nodes.append([event.anchor, 1])
        elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
            anchor, size = open_nodes.pop()
            if anchor:
                sizes[anchor] = size
            if open_nodes:
                open_nodes[-1][1] += size
            else:
                total += size
    return total


def test_the_alias_bomb_is_one_and_small():
    text = alias_bomb()
    assert len(text.encode()) < 600 and expanded_nodes(text) > 9**9  # over 387 million nodes
    # counted by hand: the mapping, key a, [1, 2] (3 nodes), key b, and [*x, *x] (itself and two copies of 3)
    assert expanded_nodes("a: &x [1, 2]\nb: [*x, *x]\n") == 1 + 1 + 3 + 1 + (1 + 3 + 3)


REFUSED = "uses a YAML alias (*a0 at line 6); configs take no anchors or aliases: write the value out"


def test_an_alias_in_a_config_file_or_a_set_value_is_refused_where_it_is_composed(tmp_path, capsys):
    (tmp_path / "bomb.yaml").write_text(alias_bomb())
    assert main(["-q", "train", "--config", str(tmp_path / "bomb.yaml"), "--dry-run"]) == 2
    assert error_of(capsys) == f"error: config file {tmp_path / 'bomb.yaml'} {REFUSED}"
    value = "[" + ", ".join(["*a"] * 9) + "]"
    assert main(["-q", "train", "--dry-run", "--set", f"model.widths=[&a [8, 8], {value}]"]) == 2
    assert "the value uses a YAML alias (*a at line 1)" in error_of(capsys)
    with pytest.raises(LayerwiseError, match=r"merge keys|uses a YAML alias \(\*base at line 2\)"):
        load_yaml("train: &base {lr: 0.1}\ndata: {<<: *base}\n", "a config")


@pytest.fixture(scope="module")
def received_run(tmp_path_factory) -> Path:
    """One tiny finished greedy run (2 blocks, an epoch each), whose config.yaml each test replaces."""
    root = tmp_path_factory.mktemp("received")
    data = write_folder(root / "data", per_class=8)
    overrides = [parse_assignment(a) for a in tiny_overrides(1)]
    overrides.append({"model": {"widths": [8, 8], "downsample_at": [1], "k": 1}})
    train(resolve_config("demo", None, overrides), root / "run", data=data)
    return root / "run"


@pytest.mark.parametrize(
    "command",
    [
        ["eval", "RUN", "--data", "DATA"],
        ["eval", "RUN", "--data", "DATA", "--early-exit"],
        ["report", "RUN"],
        ["report", "RUN", "--table"],
        ["export", "RUN", "--format", "pt2"],
        ["predict", "RUN", "IMAGE"],
        ["train", "--out", "RUN", "--resume"],
        ["train", "--out", "RUN", "--resume", "--dry-run"],
    ],
)
def test_a_received_run_whose_config_holds_the_bomb_is_refused_by_every_command(
    received_run, tmp_path, capsys, command
):
    run = tmp_path / "run"
    shutil.copytree(received_run, run)
    (run / "config.yaml").write_text(alias_bomb())
    data = received_run.parent / "data"
    image = next((data / "c0").iterdir()) if (data / "c0").is_dir() else next(data.rglob("*.jpg"))
    args = [{"RUN": str(run), "DATA": str(data), "IMAGE": str(image)}.get(a, a) for a in command]
    assert main(args) == 2
    assert error_of(capsys) == f"error: {run / 'config.yaml'} {REFUSED}"


def test_values_python_cannot_hold_are_one_line_errors(capsys):
    digits = "1" * 5000  # past Python's limit on int digits: yaml raises ValueError, not a YAMLError
    for value in (digits, "2026-13-45", "1" * 400):
        assert main(["-q", "train", "--dry-run", "--set", f"train.lr={value}"]) == 2
        line = error_of(capsys)
        assert len(line) < 400 and ("cannot read" in line or "train.lr must be float" in line), line
    assert main(["-q", "train", "--dry-run", "--set", f"train.batch_size={'9' * 30}"]) == 2
    assert "train.batch_size must be an int of at most 63 bits" in error_of(capsys)


def test_error_messages_show_a_bounded_part_of_a_huge_value():
    shared = [0] * 10
    for _ in range(30):  # 10^30 elements as shared references: a full repr would never finish
        shared = [shared] * 10
    text = brief({"builder_args": shared, "long": "x" * 10**6})
    assert len(text) <= 120 and text.startswith("{'builder_args': [[...], [...],")
    with pytest.raises(LayerwiseError) as refused:
        config_from_dict({"train": {"lr": shared}})
    assert len(str(refused.value)) < 250


def test_a_saved_config_never_holds_aliases_and_reads_back():
    """A value referenced twice (as Python may build builder_args) is written out twice, which load_yaml reads."""
    cfg = config_from_dict({"model": {"arch": "custom", "builder": "tests.custom_nets:good"}})
    twice = [1, 2]
    cfg.model.builder_args = {"a": twice, "b": twice}
    text = dump_yaml({"model": {"builder_args": cfg.model.builder_args}})
    assert "&" not in text and "*" not in text
    assert load_yaml(text, "saved") == {"model": {"builder_args": {"a": [1, 2], "b": [1, 2]}}}


# Every place where a string that a file may hold can reach an import or name a Python object to call, with
# what guards it. docs/security.md lists the same places; a new one fails this test until it is listed there.
IMPORT_SITES = {
    ("models/custom.py", "import_builder", "import_module"): "model.builder",
    ("train/__init__.py", "__getattr__", "import_module"): "a fixed table of layerwise's own modules",
    ("data/cifar.py", "CifarUnpickler.find_class", "find_class"): "CIFAR-10 pickles",
}
ALLOWED_LOADS = {
    ("rundir.py", "read_checkpoint", "torch.load"),  # weights_only=True, asserted below
    ("models/timm_models.py", "read_weights", "torch.load"),  # model.weights: weights_only=True, asserted below
    ("data/cifar.py", "load_batch", "load"),  # CifarUnpickler(...).load(): the allow-list above
    ("config.py", "load_yaml", "yaml.load"),  # Loader=_ConfigLoader, asserted below: safe, and no aliases
}


def import_sites() -> tuple[set, set]:
    """(import or unpickling sites, other load calls) found in the package's source: file, enclosing function
    (Class.method for methods) and the call."""
    imports, loads = set(), set()
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        where = str(path.relative_to(PACKAGE))
        for scope in ast.walk(tree):
            if not isinstance(scope, (ast.FunctionDef, ast.ClassDef)):
                continue
            for node in ast.walk(scope):
                if isinstance(node, ast.FunctionDef) and node.name == "find_class" and isinstance(scope, ast.ClassDef):
                    imports.add((where, f"{scope.name}.find_class", "find_class"))
                if not isinstance(node, ast.Call) or not isinstance(scope, ast.FunctionDef):
                    continue
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
                if name in ("import_module", "__import__", "exec", "eval", "compile", "locate", "find_spec") and (
                    isinstance(func, ast.Name) or owner in ("importlib", "pydoc", "util", "builtins")
                ):
                    imports.add((where, scope.name, name))
                elif name in ("load", "loads", "unsafe_load", "full_load", "run_module", "run_path") and (
                    owner in ("pickle", "yaml", "marshal", "torch", "runpy") or isinstance(func.value, ast.Call)
                ):
                    loads.add((where, scope.name, f"{owner}.{name}" if owner else name))
                    keywords = {k.arg: k.value for k in node.keywords}
                    if owner == "torch":
                        assert isinstance(keywords.get("weights_only"), ast.Constant), (where, scope.name)
                        assert keywords["weights_only"].value is True, (where, scope.name)
                    if owner == "yaml":
                        assert getattr(keywords.get("Loader"), "id", None) == "_ConfigLoader", (where, scope.name)
    return imports, loads


def test_every_import_of_a_name_a_file_may_hold_is_known_and_documented():
    imports, loads = import_sites()
    assert imports == set(IMPORT_SITES), "a new import site: guard it, then list it here and in docs/security.md"
    assert loads == ALLOWED_LOADS, "a new loader of objects: make it safe, then list it here and in docs/security.md"
    text = SECURITY.read_text()
    for (where, function, _), _guard in IMPORT_SITES.items():
        assert f"`{where}`" in text and f"`{function.split('.')[-1]}`" in text, (where, function)


def test_the_config_loader_is_a_safe_loader():
    from layerwise.config import _ConfigLoader

    assert issubclass(_ConfigLoader, yaml.SafeLoader)
    with pytest.raises(LayerwiseError, match="not valid YAML"):
        load_yaml("!!python/object/apply:os.system [touch PWNED]", "a config")


def test_the_scan_finds_what_it_looks_for(tmp_path, monkeypatch):
    """The scan above would see a new import: a planted module with one is found."""
    import test_untrusted_configs as me

    (tmp_path / "sneaky.py").write_text(
        "import importlib\nimport pickle\ndef f(name):\n    importlib.import_module(name)\n"
        "def g(data):\n    return pickle.loads(data)\n"
    )
    monkeypatch.setattr(me, "PACKAGE", tmp_path)
    assert me.import_sites() == ({("sneaky.py", "f", "import_module")}, {("sneaky.py", "g", "pickle.loads")})
