"""train.block_chunks: a VGG block that feeds only its head's half pooling, run a chunk of the batch at a time,
trains exactly as the plain block does (float64), and keeps no full-resolution tensor for the backward pass."""

import copy

import pytest
import torch

from layerwise.config import RunConfig, TrainConfig
from layerwise.device import Precision
from layerwise.models import build_model
from layerwise.models.blocks import set_recompute
from layerwise.presets import load_preset
from layerwise.stages import plan_stages
from layerwise.train.loop import StageTraining
from layerwise.train.stage import freeze_for


def small_vgg() -> torch.nn.Module:
    cfg = load_preset("imagenet_vgg11_k3").model
    cfg.widths = [8, 16, 16, 32, 32, 32, 32, 32]
    torch.manual_seed(0)
    return build_model(cfg, 10, 64).double()


@pytest.mark.parametrize(("block", "chunks"), [(0, 4), (1, 4), (0, 1), (1, 32)])
def test_a_chunked_block_gives_the_plain_blocks_loss_gradients_and_statistics(block, chunks):
    """Block 0 (conv with bias, BN, ReLU) and block 1 (a max-pool first); 6 images in chunks of 2, 2, 1, 1 (and
    one chunk, and more chunks than images)."""
    net = small_vgg()
    stage = plan_stages(net.J, "greedy")[block]
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(6, 3, 64, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (6,), generator=g)
    with torch.no_grad():
        for j in range(block):
            x = net.blocks[j].eval()(x)
    plain, chunked = copy.deepcopy(net), copy.deepcopy(net)
    a, b = freeze_for(plain, stage), freeze_for(chunked, stage, block_chunks=chunks)
    assert b.poolable
    (loss_a, logits_a), (loss_b, logits_b) = a(x, y), b(x, y)
    loss_a.backward()
    loss_b.backward()
    assert torch.allclose(logits_a, logits_b, rtol=0, atol=1e-12)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-12), name
    for (name, p), q in zip(plain.blocks[block].named_buffers(), chunked.blocks[block].buffers(), strict=True):
        assert torch.allclose(p.double(), q.double(), rtol=0, atol=1e-12), name


def test_the_input_gets_its_gradient_when_it_needs_one():
    net = small_vgg()
    unit = net.blocks[1].train()
    x = torch.randn(4, 8, 64, 64, dtype=torch.float64, requires_grad=True)
    from layerwise.models.pooled import pooled_unit

    plain = torch.nn.functional.avg_pool2d(copy.deepcopy(unit)(x), 2)
    (dx_plain,) = torch.autograd.grad(plain.square().sum(), x)
    (dx,) = torch.autograd.grad(pooled_unit(unit, x, 3).square().sum(), x)
    assert torch.allclose(dx, dx_plain, rtol=0, atol=1e-12)


def test_no_full_resolution_tensor_is_kept_for_the_backward_pass():
    """What autograd keeps during greedy block 0's step: plain, the block's 64x64 maps (its BN's input, its
    ReLU's output, the pooling's input); chunked, none at that size: the block's input (3 channels) and smaller."""
    net = small_vgg().float()
    x, y = torch.randn(6, 3, 64, 64), torch.randint(0, 10, (6,))

    def kept(chunks: int, recompute: bool) -> list[tuple[int, ...]]:
        model = copy.deepcopy(net)
        set_recompute(model, recompute)
        module = freeze_for(model, plan_stages(model.J, "greedy")[0], block_chunks=chunks)
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
            module(x, y)
        return shapes

    full = (6, 8, 64, 64)  # block 0's output
    assert full in kept(0, False) and full in kept(0, True)  # recomputation still keeps the pooling's input
    assert all(s != full for s in kept(4, False) + kept(4, True))


def test_training_steps_with_chunks_end_where_plain_ones_do():
    """Three SGD steps of greedy block 0 through StageTraining (momentum, weight decay), float64."""
    net = small_vgg()
    stage = plan_stages(net.J, "greedy")[0]
    cpu = Precision(torch.device("cpu"), bf16=False)
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 3, 64, 64, generator=g, dtype=torch.float64), torch.randint(0, 10, (5,), generator=g))
               for _ in range(3)]  # fmt: skip
    ends = []
    for chunks in (0, 2):
        model = copy.deepcopy(net)
        training = StageTraining(model, stage, RunConfig(train=TrainConfig(lr=0.05, block_chunks=chunks)), cpu)
        for x, y in batches:
            training.step(x, y)
        ends.append(model.state_dict())
    for key in ends[0]:
        assert torch.allclose(ends[0][key].double(), ends[1][key].double(), rtol=0, atol=1e-10), key


@pytest.mark.parametrize("options", [{"padding": "same"}, {"padding": 1, "padding_mode": "reflect"}])
def test_a_conv_the_chunked_function_cannot_run_is_left_to_the_plain_path(options):
    from layerwise.models.pooled import poolable

    unit = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, **options), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    assert not poolable(unit)
    assert poolable(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()))
