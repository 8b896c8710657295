"""GPU smoke tests: the CUDA path (GPU-resident data, bf16, channels_last, device cache). Skipped without a GPU."""

import functools

import pytest
import torch
from test_train import tiny_config

from layerwise.train import train
from layerwise.train.checkpoint import RunDir, load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize(
    "options",
    [
        {"cache": "none"},
        {"cache": "device"},
        {"cache": "host"},
        {"recompute_activations": True},
    ],
    ids=["plain", "cache-device", "cache-host", "recompute"],
)
def test_trains_on_the_gpu(tmp_path, image_folder, options):
    cfg = tiny_config(epochs=2, train={"device": "cuda", **options})
    summary = train(cfg, tmp_path / "run", image_folder)
    assert summary["device"].startswith("cuda")
    assert all(0 <= b["val_top1"] <= 100 for b in summary["blocks"])
    _, state, _ = load_checkpoint(RunDir(tmp_path / "run").final)
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_gpu_run_resumes_on_the_cpu(tmp_path, image_folder):
    """Epoch plans are drawn on the CPU, so a run can move between devices."""

    class Stop(Exception):
        pass

    def stop(row):
        raise Stop

    with pytest.raises(Stop):
        train(tiny_config(epochs=2, train={"device": "cuda"}), tmp_path / "run", image_folder, on_epoch_end=stop)
    summary = train(tiny_config(epochs=2, train={"device": "cpu"}), tmp_path / "run", image_folder, resume=True)
    assert len(summary["blocks"]) == 3


def test_recomputed_activations_match_on_the_gpu():
    """bf16 autocast and channels_last on CUDA: losses, weights and BN buffers as without recomputation."""
    from test_recompute import MODELS, assert_same_training

    from layerwise.models import build_model
    from layerwise.train.loop import plan_stages

    torch.manual_seed(0)
    plain = build_model(MODELS["vgg11"], num_classes=4).cuda().to(memory_format=torch.channels_last)
    batches = [(torch.randn(6, 3, 16, 16, device="cuda"), torch.randint(0, 4, (6,), device="cuda")) for _ in range(3)]
    autocast = functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    for mode in ("greedy", "e2e"):
        assert_same_training(plain, plan_stages(plain.J, mode)[0], batches, autocast, rtol=1e-3, atol=1e-4)
