"""Config validation: wrong types, out-of-range values and unknown keys are one-line errors."""

import re

import pytest

from layerwise.config import config_from_dict, parse_assignment
from layerwise.errors import LayerwiseError
from layerwise.presets import resolve_config


@pytest.mark.parametrize(
    "values, message",
    [
        ({"train": {"lr": "fast"}}, "train.lr must be float"),
        ({"train": {"batch_size": 0}}, "train.batch_size must be >= 1"),
        ({"train": {"epochs_per_block": 2.5}}, "train.epochs_per_block must be int"),
        ({"model": {"k": 4}}, "model.k must be 1, 2 or 3"),
        ({"model": {"widths": [8, "x"]}}, r"model.widths\[1\] must be int"),
        ({"model": {"downsample_at": [5]}}, "downsample_at"),
        ({"train": {"lr_rate": 0.1}}, "unknown key train.lr_rate"),
        ({"model": {"batchnorm": 1}}, "model.batchnorm must be bool"),
        ({"train": {"mode": "asynchronous"}}, "train.mode must be greedy, e2e, decoupled"),
        ({"train": {"sync_bn": True, "block_chunks": 4}}, "train.sync_bn and train.block_chunks"),
        ({"train": {"replay": 2, "mode": "decoupled"}}, "train.replay keeps batches for a pipeline process"),
        ({"train": {"pipeline_processes": 2}}, "train.pipeline_processes"),
        ({"train": {"placement": "pipeline", "mode": "decoupled", "sync_bn": True}}, "train.sync_bn and train.pla"),
        ({"train": {"compile": "fast"}}, "train.compile must be one of none, default"),
        ({"train": {"precision": "fp16"}}, "train.precision must be auto, fp32, bf16"),
        ({"train": {"compile": "default", "recompute_activations": True}}, "cannot be combined"),
    ],
)
def test_bad_values_are_one_line_errors(values, message):
    with pytest.raises(LayerwiseError, match=message) as info:
        config_from_dict(values)
    assert "\n" not in str(info.value)


def test_unknown_preset():
    with pytest.raises(LayerwiseError, match="unknown preset 'nope'"):
        resolve_config("nope")


def test_overrides_apply_in_order(tmp_path):
    file = tmp_path / "c.yaml"
    file.write_text("preset: cifar10_simcnn_k2\ntrain:\n  lr: 0.05\n")
    cfg = resolve_config(None, file, [parse_assignment("train.lr_step=4")])
    assert cfg.preset == "cifar10_simcnn_k2" and cfg.model.k == 2
    assert cfg.train.lr == 0.05 and cfg.train.lr_step == 4


def test_assignment_reads_yaml_values():
    assert parse_assignment("model.widths=[8, 16]") == {"model": {"widths": [8, 16]}}
    with pytest.raises(LayerwiseError, match=r"SECTION\.KEY=VALUE"):
        parse_assignment("train.lr")


def test_cache_none_survives_yaml_parsing():
    cfg = resolve_config("demo", None, [parse_assignment("train.cache=none")])
    assert cfg.train.cache == "none"


def test_yaml_exponent_without_dot_is_a_float():
    cfg = resolve_config("demo", None, [parse_assignment("train.weight_decay=5e-4")])
    assert cfg.train.weight_decay == 5e-4


@pytest.mark.parametrize(
    "assignment, message",
    [
        ("model.widths=[1,2", "not valid YAML"),
        ("data.val_size=.inf", "data.val_size must be float"),
        ("train.seed=2147483648", "train.seed must be in"),
        ("train.seed=99999999999999999999", "train.seed must be an int of at most 63 bits"),
    ],
)
def test_more_bad_values(assignment, message):
    with pytest.raises(LayerwiseError, match=message):
        resolve_config("demo", None, [parse_assignment(assignment)])


@pytest.mark.parametrize(
    "assignments, message",
    [
        (["train.ema=1"], r"train\.ema must be in \[0, 1\)"),
        (["train.mode=decoupled", "train.placement=pipeline", "train.ema=0.99"], "cannot be combined with train.pla"),
        (["train.sim_loss=-1"], "train.sim_loss must be >= 0"),
        (["train.sim_loss=1", "train.block_chunks=2"], "train.block_chunks never forms"),
        (["data.mix=blend"], "data.mix must be none, mixup or cutmix"),
        (["data.mix=mixup", "data.augment=imagenet"], "data.mix goes with data.augment=cifar"),
        (["data.mix_alpha=0"], "data.mix_alpha must be > 0"),
        (["train.block_epochs=[2, 0, 1]"], "train.block_epochs must all be >= 1"),
        (["train.cache=host", "data.augment=imagenet"], r"train\.cache needs in-memory data"),
    ],
)
def test_the_recipe_settings_refuse_bad_values_in_one_line(assignments, message):
    with pytest.raises(LayerwiseError, match=message):
        resolve_config("demo", None, [parse_assignment(a) for a in assignments])


def test_block_epochs_of_the_wrong_length_are_refused_before_any_file_is_written(tmp_path, image_folder):
    from test_train import tiny_config

    from layerwise.train import train

    with pytest.raises(LayerwiseError, match=r"train\.block_epochs has 2 numbers for a network of 3 blocks"):
        train(tiny_config(train={"block_epochs": [1, 2]}), tmp_path / "run", image_folder)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "sets, message",
    [
        (["train.schedule=cosine", "train.lr_step=4"], "train.lr_step has no effect here (train.schedule=cosine"),
        (["train.schedule=triangle", "train.reset_momentum_at_decay=false"], "train.reset_momentum_at_decay has no"),
        (["train.schedule=cosine", "train.block_epochs=[1,2,3]", "train.epochs_per_block=2"], "train.epochs_per_block"),
        (["data.workers=2"], "data.workers has no effect here (data.augment=cifar keeps the images in memory"),
        (["data.mix_alpha=0.4"], "data.mix_alpha has no effect here (data.mix is none)"),
        (["train.cache_views=2"], "train.cache_views has no effect here (train.cache is none)"),
        (["model.head=infopro", "model.k=2"], "model.k has no effect here (model.head=infopro"),
    ],
)
def test_a_setting_that_does_nothing_is_refused_when_the_user_gives_it(sets, message):
    with pytest.raises(LayerwiseError, match=re.escape(message)):
        resolve_config("demo", None, [parse_assignment(s) for s in sets])


def test_what_a_preset_or_a_saved_run_holds_is_never_refused_as_idle():
    """A preset's own settings made idle by an override cannot be removed by the user, and a saved config.yaml
    records every field: neither is refused. Every preset alone uses all it sets."""
    from layerwise.config import given_keys, idle_settings
    from layerwise.presets import list_presets, preset_dict, resolve

    for name in list_presets():
        assert not given_keys(preset_dict(name)) & idle_settings(resolve_config(name)).keys(), name
    cfg = resolve_config("demo", None, [parse_assignment("model.head=infopro")])  # demo sets model.k: kept
    assert cfg.model.head == "infopro" and cfg.model.k == 2
    saved = resolve_config("demo_plus").to_dict()  # every field, lr_step and epochs_per_block included
    assert "lr_step" in saved["train"] and saved["train"]["schedule"] == "triangle"
    resumed, _ = resolve(None, None, [parse_assignment("train.seed=3")], saved)
    assert resumed.train.seed == 3
