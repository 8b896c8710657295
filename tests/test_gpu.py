"""GPU smoke tests: the CUDA path (GPU-resident data, bf16, channels_last, device cache). Skipped without a GPU."""

import pytest
import torch
from test_train import tiny_config

from layerwise.train import train
from layerwise.train.checkpoint import RunDir, load_checkpoint

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("cache", ["none", "device", "host"])
def test_trains_on_the_gpu(tmp_path, image_folder, cache):
    cfg = tiny_config(epochs=2, train={"device": "cuda", "cache": cache})
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
