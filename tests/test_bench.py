"""`layerwise bench` and the speed paths: they run on the CPU and never change results silently."""

import copy
import json

import pytest
import torch

from layerwise.bench import format_report
from layerwise.cli import main
from layerwise.config import ModelConfig, RunConfig, TrainConfig
from layerwise.device import Precision
from layerwise.models import build_model
from layerwise.stages import plan_stages
from layerwise.train.loop import StageTraining
from layerwise.train.optim import load_optimizer_state, make_optimizer
from layerwise.train.stage import StageModule

CPU = torch.device("cpu")


def test_bench_quick_mode_reports_every_block(capsys):
    code = main(["bench", "--preset", "demo", "--quick", "--steps", "1", "--json", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    model, inputs = report["model"], report["input"]
    assert [r["block"] for r in model["blocks"]] == [0, 1, 2]
    assert "cached" not in model["blocks"][0] and model["blocks"][2]["cached"]["images_per_s"] > 0
    assert model["e2e"]["images_per_s"] > 0
    assert model["checkpoint"]["block"] == 2 and model["checkpoint"]["bytes"] > 0
    assert model["evaluation"]["block"] == 2 and model["evaluation"]["reused_images_per_s"] > 0
    assert model["checkpoint"]["inline_s"] > 0 and model["checkpoint"]["background_s"] > 0
    assert inputs["memory_loader_epoch_s"] > 0 and inputs["pil_dataloader_epoch_s"] > 0


def test_bench_of_block_0_alone_has_no_frozen_heads_to_reuse(capsys):
    assert (
        main(["bench", "--preset", "demo", "--quick", "--steps", "1", "--no-input", "--blocks", "0", "--device", "cpu"])
        == 0
    )
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("evaluation"))
    assert "block 0's" in line and "reusing" not in line


def test_bench_rejects_an_image_size_the_heads_cannot_take(capsys):
    assert main(["bench", "--preset", "imagenet_vgg11_k3", "--image-size", "64", "--no-input"]) == 2
    assert "use a larger --image-size" in capsys.readouterr().err


def few_steps(channels_last: bool, bf16: bool, compile_mode: str = "none") -> list[float]:
    return few_steps_on(CPU, bf16, channels_last, compile_mode)


def few_steps_on(device: torch.device, bf16: bool, channels_last: bool = False, compile_mode: str = "none"):
    """The losses of four steps of greedy block 1 of a small network, the same weights and batch on any device."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(k=2, widths=[8, 16], downsample_at=[1]), num_classes=4).to(device)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    stage = plan_stages(net.J, "greedy")[1]
    training = StageTraining(
        net, stage, RunConfig(train=TrainConfig(lr=0.05, compile=compile_mode)), Precision(device, bf16)
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)
    return [training.step(x.to(device), y.to(device))[0].item() for _ in range(4)]


def test_fast_path_matches_plain_path():
    """channels_last + bf16 autocast (the GPU path), run on the CPU, against plain fp32."""
    plain = few_steps(False, False)
    assert few_steps(True, False) == pytest.approx(plain, rel=1e-5)
    bf16 = few_steps(True, True)
    assert bf16 == pytest.approx(plain, rel=3e-2)
    assert plain[-1] < plain[0]  # it does train


def test_fused_sgd_matches_plain_sgd():
    """make_optimizer's fused SGD (momentum, weight decay; the GPU default) against the for-loop update (the CPU
    default): the same weights after a few steps, up to rounding."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(k=2, widths=[8, 16], downsample_at=[1]), num_classes=4)
    stage = plan_stages(net.J, "greedy")[1]
    cfg = TrainConfig(lr=0.05)
    fused_net = copy.deepcopy(net)
    start = next(net.heads[1].parameters()).detach().clone()
    fused = make_optimizer(StageModule(fused_net, stage).parameters(), cfg, fused=True)  # a GPU's default
    options = {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay, "foreach": False}
    plain = torch.optim.SGD(StageModule(net, stage).parameters(), **options)
    assert fused.param_groups[0]["fused"] and not plain.param_groups[0]["fused"]
    assert not make_optimizer(StageModule(net, stage).parameters(), cfg).param_groups[0]["fused"]  # CPU
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(4)]
    for model, optimizer in ((net, plain), (fused_net, fused)):
        training = StageTraining(model, stage, RunConfig(train=cfg), Precision(CPU, False))
        training.optimizer = optimizer
        for x, y in batches:
            training.step(x, y)
    for (name, a), b in zip(net.state_dict().items(), fused_net.state_dict().values(), strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7), name
    assert not torch.equal(next(net.heads[1].parameters()), start)  # it did train


def test_a_resumed_optimizer_keeps_its_own_implementation():
    """A GPU run's fused SGD state, resumed on the CPU, goes on with the CPU's for-loop update, and the reverse."""
    params = [torch.nn.Parameter(torch.zeros(3))]
    for saved_fused, own_fused in ((True, False), (False, True)):
        saved = make_optimizer(params, TrainConfig(), fused=saved_fused).state_dict()
        resumed = make_optimizer(params, TrainConfig(), fused=own_fused)
        load_optimizer_state(resumed, saved)
        assert bool(resumed.param_groups[0]["fused"]) == own_fused
    saved = torch.optim.SGD(params, lr=0.1, foreach=True).state_dict()  # foreach: a choice of the saving machine
    resumed = make_optimizer(params, TrainConfig())
    load_optimizer_state(resumed, saved)
    assert resumed.param_groups[0]["foreach"] is None and resumed.param_groups[0]["lr"] == 0.1


def test_max_batch_needs_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert main(["bench", "--preset", "demo", "--max-batch", "--device", "cpu"]) == 2
    assert "CUDA" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_max_batch_on_gpu():
    from layerwise.bench import BenchSpec, max_batch

    result = max_batch(BenchSpec("demo", device="cuda"), limit=256)
    assert result["greedy"] >= 1 and result["e2e"] >= 1


def test_compiled_step_matches_plain_step():
    """train.compile on the CPU (about 30 s of compiling): the same losses as the eager step."""
    from torch._dynamo.utils import counters

    compiled = few_steps(False, False, "default")
    assert counters["stats"]["unique_graphs"] > 0  # it did compile, rather than fall back to eager
    assert compiled == pytest.approx(few_steps(False, False), rel=1e-4)


def test_max_batch_refuses_options_it_would_ignore(capsys):
    assert main(["bench", "--max-batch", "--compile", "default"]) == 2
    assert "drop --compile" in capsys.readouterr().err


def test_bench_refuses_compile_with_recomputation(capsys):
    args = ["bench", "--preset", "demo", "--quick", "--no-input", "--compile", "default", "--recompute-activations"]
    assert main(args) == 2
    assert "cannot be combined" in capsys.readouterr().err


def test_bench_recomputing_activations_in_bf16_on_the_cpu(capsys):
    args = ["bench", "--preset", "demo", "--quick", "--steps", "1", "--no-input", "--blocks", "0,2", "--device", "cpu"]
    assert main([*args, "--recompute-activations", "--precision", "bf16", "--json"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["recompute_activations"] and model["precision"] == "bf16 autocast"
    assert [b["activations_recomputed"]["images_per_s"] > 0 for b in model["blocks"]] == [True, True]
    assert model["e2e"]["activations_recomputed"]["images_per_s"] > 0
    report = format_report(model, None)
    assert "activations recomputed" in report and "bf16 autocast" in report
    lines = {line.split()[0]: line for line in report.splitlines()}
    assert len(lines["2"].split()) == 8  # block 2: uncached, cached, speed-up, MiB x2, recomputed x2
    first, e2e = model["blocks"][0], model["e2e"]
    assert first["uncached"]["weights_bytes"] < e2e["weights_bytes"]  # block 0 and head 0 against every block
    recomputed = first["activations_recomputed"]
    with_weights = (recomputed["step_bytes"] + recomputed["weights_bytes"]) / (e2e["step_bytes"] + e2e["weights_bytes"])
    weights_line = next(line for line in report.splitlines() if "step + the stage's weights" in line)
    assert weights_line.endswith(f"= {with_weights:.2f}x")  # recomputed block 0 / plain e2e, weights counted
    assert "peak (weights" not in report  # the CPU's process peak holds far more than the step
    gpu = format_report({**model, "device": "cuda:0"}, None)  # the GPU-only line, fed the CPU's figures
    peak_line = next(line for line in gpu.splitlines() if "peak (weights" in line)
    assert peak_line.endswith(f"= {recomputed['peak_bytes'] / e2e['peak_bytes']:.2f}x")


def test_bench_rejects_an_unknown_precision(capsys):
    assert main(["bench", "--preset", "demo", "--quick", "--no-input", "--precision", "fp8"]) == 2
    assert "--precision must be auto, fp32, bf16" in capsys.readouterr().err


@pytest.mark.parametrize(
    "device, precision, bf16, channels_last",
    [
        ("cpu", "auto", False, False),
        ("cpu", "fp32", False, False),
        ("cpu", "bf16", True, True),
        ("cuda", "fp32", False, True),
        ("cuda", "auto", True, True),
    ],
)
def test_precision_autocasts_where_asked(device, precision, bf16, channels_last):
    from layerwise.device import precision_for

    chosen = precision_for(torch.device(device), precision)  # deciding needs no GPU
    assert (chosen.bf16, chosen.channels_last) == (bf16, channels_last)
    assert chosen.dtype == (torch.bfloat16 if bf16 else torch.float32)
    context = chosen.autocast()
    if bf16:
        assert isinstance(context, torch.autocast) and context.device == device
        assert context.fast_dtype == torch.bfloat16
    else:
        assert not isinstance(context, torch.autocast)


def test_precision_rejects_an_unknown_name():
    from layerwise.device import precision_for
    from layerwise.errors import LayerwiseError

    with pytest.raises(LayerwiseError, match="precision must be auto, fp32, bf16"):
        precision_for(torch.device("cpu"), "fp16")


def test_bench_scaling_in_one_process(capsys):
    assert main(["bench", "--preset", "demo", "--quick", "--steps", "1", "--scaling", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["processes"] == 1 and [r["allreduce_ms"] for r in result["stages"]] == [0.0] * 4
    from layerwise.presets import load_preset

    net = build_model(load_preset("demo").model, 10)
    trained = [net.blocks[1], net.heads[1]]  # greedy block 1 trains block 1 and head 1 alone
    assert result["stages"][1]["gradient_bytes"] == 4 * sum(p.numel() for m in trained for p in m.parameters())
