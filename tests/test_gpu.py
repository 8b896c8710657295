"""GPU smoke tests: the CUDA path (GPU-resident data, bf16, channels_last, device cache). Skipped without a GPU."""

import gc

import pytest
import torch
from test_train import tiny_config

from layerwise.rundir import RunDir, load_checkpoint
from layerwise.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def weights(path):
    return load_checkpoint(RunDir(path).final)[1]


def close(a: dict, b: dict, tol: float) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=tol, rtol=tol) for k in a)


@pytest.fixture(scope="module")
def plain_gpu_run(tmp_path_factory):
    """The reference: a plain fp32 GPU run (fp32, so that other paths compare within float tolerance)."""
    from conftest import write_folder

    root = tmp_path_factory.mktemp("gpu")
    data = write_folder(root / "data", per_class=16)
    train(tiny_config(epochs=2, train={"device": "cuda", "precision": "fp32"}), root / "plain", data)
    return root, data


@pytest.mark.parametrize(
    "options",
    [{"cache": "device", "cache_views": 2}, {"cache": "host", "cache_views": 2}, {"recompute_activations": True}],
    ids=["cache-device", "cache-host", "recompute"],
)
def test_gpu_paths_train_like_the_plain_gpu_run(tmp_path, plain_gpu_run, options):
    """A view per epoch: the cached runs see the plain run's batches; recomputation changes memory, not results."""
    root, data = plain_gpu_run
    cfg = tiny_config(epochs=2, train={"device": "cuda", "precision": "fp32", **options})
    summary = train(cfg, tmp_path / "run", data)
    assert summary["device"].startswith("cuda")
    assert close(weights(tmp_path / "run"), weights(root / "plain"), 1e-3)


def test_a_gpu_step_matches_the_cpu_within_bf16_tolerance():
    from test_bench import few_steps_on

    cpu = few_steps_on(torch.device("cpu"), bf16=False)
    gpu = few_steps_on(torch.device("cuda"), bf16=True)
    assert gpu == pytest.approx(cpu, rel=3e-2)


def test_a_resumed_gpu_run_ends_where_an_uninterrupted_one_does(tmp_path, plain_gpu_run):
    root, data = plain_gpu_run

    class Stop(Exception):
        pass

    def stop_in_block_1(row):
        if row["stage"] == 1:
            raise Stop

    cfg = tiny_config(epochs=2, train={"device": "cuda", "precision": "fp32"})
    with pytest.raises(Stop):
        train(cfg, tmp_path / "run", data, on_epoch_end=stop_in_block_1)
    train(cfg, tmp_path / "run", data, resume=True)
    assert close(weights(tmp_path / "run"), weights(root / "plain"), 1e-4)


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
    from layerwise.stages import plan_stages

    torch.manual_seed(0)
    plain = build_model(MODELS["vgg11"], num_classes=4).cuda().to(memory_format=torch.channels_last)
    batches = [(torch.randn(6, 3, 16, 16, device="cuda"), torch.randint(0, 4, (6,), device="cuda")) for _ in range(3)]
    for mode in ("greedy", "e2e"):
        assert_same_training(plain, plan_stages(plain.J, mode)[0], batches, bf16=True, rtol=1e-3, atol=1e-4)


def test_a_greedy_stage_holds_only_its_own_weights_on_the_gpu():
    """Training places each stage's modules on the GPU and keeps later blocks and heads on the CPU."""
    from test_train import devices

    from layerwise.device import precision_for
    from layerwise.network import checked_model
    from layerwise.stages import place_for, plan_stages, resident_modules

    cfg = tiny_config(train={"device": "cuda"})
    stages = plan_stages(len(cfg.model.widths), "greedy")
    gc.collect()  # so that no earlier test's tensors are freed during the measurement
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    net = checked_model(cfg, 3, precision_for(torch.device("cuda")), mode="greedy")
    held = torch.cuda.memory_allocated() - before
    assert allocated(resident_modules(net, stages[0])) <= held < allocated(net)
    assert [devices(h) for h in net.heads] == [{"cuda"}, {"cpu"}, {"cpu"}]
    place_for(net, stages[2], torch.device("cuda"))
    assert all(devices(m) == {"cuda"} for m in (*net.blocks, *net.heads))


def test_a_greedy_run_resumed_on_the_gpu_places_the_later_stages(tmp_path, image_folder):
    class Stop(Exception):
        pass

    def stop_in_block_1(row):  # after its first epoch: the optimizer state moves back onto the GPU
        if row["stage"] == 1:
            raise Stop

    cfg = tiny_config(epochs=2, train={"device": "cuda"})
    with pytest.raises(Stop):
        train(cfg, tmp_path / "run", image_folder, on_epoch_end=stop_in_block_1)
    summary = train(cfg, tmp_path / "run", image_folder, resume=True)
    assert [b["block"] for b in summary["blocks"]] == [0, 1, 2]


def allocated(module) -> int:
    """Bytes of the module's tensors as the CUDA caching allocator counts them (in blocks of 512)."""
    return sum(-(-t.nbytes // 512) * 512 for t in (*module.parameters(), *module.buffers()))


def test_the_optimizer_is_fused_on_the_gpu():
    from layerwise.config import TrainConfig
    from layerwise.train.optim import make_optimizer

    assert make_optimizer([torch.nn.Parameter(torch.zeros(3, device="cuda"))], TrainConfig()).param_groups[0]["fused"]
    assert not make_optimizer([torch.nn.Parameter(torch.zeros(3))], TrainConfig()).param_groups[0]["fused"]
