"""Frozen-prefix caching: the cached path trains like the plain path, and a cache that cannot fit is refused."""

import pytest
import torch
from test_train import tiny_config

from layerwise.errors import LayerwiseError
from layerwise.rundir import RunDir, load_checkpoint
from layerwise.train import train


def final_weights(path):
    return load_checkpoint(RunDir(path).final)[1]


@pytest.mark.parametrize("where", ["host", "disk"])
def test_cached_prefix_matches_uncached_prefix(tmp_path, image_folder, where):
    plain = train(tiny_config(epochs=2), tmp_path / "plain", image_folder)
    cached = train(tiny_config(epochs=2, train={"cache": where, "cache_views": 2}), tmp_path / "cached", image_folder)
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "cached")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=1e-4) for k in a)
    for p, c in zip(plain["blocks"], cached["blocks"], strict=False):
        assert p["train_loss"] == pytest.approx(c["train_loss"], abs=1e-4)
    assert not (tmp_path / "cached" / "cache" / "prefix1.bin").exists()  # the disk cache is removed after its stage


def test_cache_in_bf16_on_the_cpu_matches_the_uncached_bf16_run(tmp_path, image_folder):
    """train.precision=bf16 runs the GPU's autocast on the CPU; the cache then stores bf16, as on a GPU."""
    bf16 = {"precision": "bf16"}
    plain = train(tiny_config(epochs=2, train=bf16), tmp_path / "plain", image_folder)
    cached = train(
        tiny_config(epochs=2, train={**bf16, "cache": "disk", "cache_views": 2}), tmp_path / "c", image_folder
    )
    for p, c in zip(plain["blocks"], cached["blocks"], strict=True):
        assert p["train_loss"] == pytest.approx(c["train_loss"], abs=1e-4)
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "c")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=1e-4) for k in a)
    fp32 = train(tiny_config(epochs=2), tmp_path / "fp32", image_folder)
    assert fp32["blocks"][-1]["train_loss"] != plain["blocks"][-1]["train_loss"]  # bf16 did run


def test_fewer_views_than_epochs_reuse_augmentations(tmp_path, image_folder):
    summary = train(tiny_config(epochs=3, train={"cache": "device", "cache_views": 1}), tmp_path / "r", image_folder)
    assert len(summary["blocks"]) == 3


def test_cache_that_cannot_fit_is_refused_before_work(tmp_path, image_folder, monkeypatch):
    from layerwise.train import cache

    monkeypatch.setattr(cache, "free_bytes", lambda *a: 1000)
    with pytest.raises(
        LayerwiseError, match=r"train.cache=host needs 5.0 MiB for block 1's input .* 1000 B is free"
    ) as info:
        train(tiny_config(epochs=4, train={"cache": "host", "cache_views": 4}), tmp_path / "run", image_folder)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "run").exists()


def test_cache_needs_in_memory_data():
    """Refused when the config is read: data.augment alone decides whether the data is held in memory."""
    with pytest.raises(LayerwiseError, match="in-memory data"):
        tiny_config(train={"cache": "host"}, data={"augment": "imagenet", "image_size": 32, "resize_size": 40})


@pytest.mark.parametrize(
    "data", [{"cutout": 8}, {"mix": "mixup"}, {"mix": "cutmix", "mix_alpha": 0.5}, {"flip": "alternate"}]
)
def test_with_cutout_or_mixing_the_cached_prefix_trains_like_the_plain_path(tmp_path, image_folder, data):
    """data.cutout and data.mix belong to the epoch plan: a cached view holds the same cut-out or mixed images the
    plain path trains on, and their targets (and a run with them differs from one without)."""
    plain = train(tiny_config(epochs=2, data=data), tmp_path / "plain", image_folder)
    cached = train(tiny_config(epochs=2, train={"cache": "host", "cache_views": 2}, data=data), tmp_path / "cached",
                   image_folder)  # fmt: skip
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "cached")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=1e-4) for k in a)
    for p, c in zip(plain["blocks"], cached["blocks"], strict=True):
        assert p["train_loss"] == pytest.approx(c["train_loss"], abs=1e-4)
    train(tiny_config(epochs=2), tmp_path / "uncut", image_folder)
    assert not torch.equal(final_weights(tmp_path / "uncut")["blocks.0.0.weight"], a["blocks.0.0.weight"])
