"""Activation recomputation (train.recompute_activations): same training as the plain path, less saved for backward."""

import copy

import pytest
import torch
from test_cache import final_weights
from test_train import tiny_config
from torch.utils.checkpoint import checkpoint

from layerwise.config import ModelConfig, RunConfig, TrainConfig
from layerwise.device import Precision
from layerwise.models import build_model
from layerwise.models.blocks import set_recompute
from layerwise.stages import plan_stages
from layerwise.train import train
from layerwise.train.loop import StageTraining
from layerwise.train.stage import freeze_for

MODELS = {
    "simcnn": ModelConfig(k=3, widths=[8, 8, 16], downsample_at=[0, 2]),
    "vgg11": ModelConfig(arch="vgg11", k=3, widths=[8, 16, 16], downsample_at=[1, 2], conv_bias=True),
}


def steps(net, stage, batches, bf16=False):
    device = next(net.parameters()).device
    training = StageTraining(net, stage, RunConfig(train=TrainConfig(lr=0.05)), Precision(device, bf16))
    torch.manual_seed(1)  # the same dropout masks in VGG's classifier
    return [training.step(x, y)[0].item() for x, y in batches]


def assert_same_training(plain, stage, batches, bf16=False, rtol=1e-4, atol=1e-6):
    """A copy of `plain` with recomputation trains like `plain`: losses, weights and every BN buffer."""
    lean = copy.deepcopy(plain)
    set_recompute(lean, True)
    assert steps(lean, stage, batches, bf16) == pytest.approx(steps(plain, stage, batches, bf16), rel=rtol)
    for (name, a), b in zip(plain.state_dict().items(), lean.state_dict().values(), strict=True):
        if name.endswith("num_batches_tracked"):  # the recomputation must not count a batch twice
            assert torch.equal(a, b), name
        else:
            assert torch.allclose(a.float(), b.float(), rtol=rtol, atol=atol), name


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("mode,which", [("greedy", 0), ("greedy", 2), ("e2e", 0)])
def test_recompute_trains_exactly_like_the_plain_path(arch, mode, which):
    torch.manual_seed(0)
    plain = build_model(MODELS[arch], num_classes=4)
    batches = [(torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))) for _ in range(3)]
    assert_same_training(plain, plan_stages(plain.J, mode)[which], batches)


def test_recompute_under_bf16_autocast_and_channels_last():
    """The GPU's fast path, run on the CPU: the recomputation must run under the forward's autocast."""
    torch.manual_seed(0)
    plain = build_model(MODELS["vgg11"], num_classes=4).to(memory_format=torch.channels_last)
    batches = [(torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))) for _ in range(3)]
    assert_same_training(plain, plan_stages(plain.J, "e2e")[0], batches, bf16=True, rtol=1e-3, atol=1e-4)


def test_a_graph_can_be_recomputed_twice():
    torch.manual_seed(0)
    net = build_model(MODELS["simcnn"], num_classes=4)
    set_recompute(net, True)
    stage = plan_stages(net.J, "greedy")[0]
    freeze_for(net, stage)
    loss = net.heads[0](net.blocks[0](torch.randn(4, 3, 16, 16))).sum()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    loss.backward(retain_graph=True)
    loss.backward()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def saved_bytes(net, stage, x) -> int:
    """Activation bytes the autograd graph keeps for the backward pass after one forward of the stage."""
    total = 0
    weights = {p.data_ptr() for p in net.parameters()}

    def pack(t):
        nonlocal total
        if t.data_ptr() not in weights:
            total += t.numel() * t.element_size()
        return t

    freeze_for(net, stage)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net.heads[stage.block](net.forward_features(x, stage.first, stage.block + 1)).sum().backward()
    return total


@pytest.mark.parametrize("mode", ["greedy", "e2e"])
def test_recompute_keeps_less_for_the_backward_pass(mode):
    torch.manual_seed(0)
    net = build_model(MODELS["vgg11"], num_classes=4)
    stage = plan_stages(net.J, mode)[0]
    x = torch.randn(4, 3, 32, 32)
    plain = saved_bytes(net, stage, x)
    set_recompute(net, True)
    lean = saved_bytes(net, stage, x)
    assert lean < 0.6 * plain


def test_recompute_is_off_outside_training(monkeypatch):
    from layerwise.models import blocks

    monkeypatch.setattr(blocks, "checkpoint", lambda *a, **kw: pytest.fail("recomputed outside training"))
    net = build_model(MODELS["simcnn"], num_classes=4)
    set_recompute(net, True)
    x = torch.randn(2, 3, 16, 16)
    net.eval()(x)  # frozen (eval-mode) blocks
    with torch.no_grad():
        net.train()(x)  # no backward pass to save for


def test_a_run_with_recomputation_ends_like_a_plain_run_and_may_resume_without_it(tmp_path, image_folder, monkeypatch):
    from layerwise.models import blocks

    calls = []
    monkeypatch.setattr(blocks, "checkpoint", lambda *a, **kw: calls.append(1) or checkpoint(*a, **kw))
    train(tiny_config(epochs=2), tmp_path / "plain", image_folder)
    assert not calls
    train(tiny_config(epochs=2, train={"recompute_activations": True}), tmp_path / "lean", image_folder)
    assert calls
    a, b = final_weights(tmp_path / "plain"), final_weights(tmp_path / "lean")
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=1e-4) for k in a)
    train(tiny_config(epochs=2), tmp_path / "lean", image_folder, resume=True)  # a memory setting, not a new run
