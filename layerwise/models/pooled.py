"""A trained conv -> BN -> ReLU unit whose only reader is a 2x2 average pool (a VGG head's first step), run in
batch chunks so that no tensor at the unit's full resolution exists for the whole batch (train.block_chunks).

In greedy training of VGG-11's block j, the block's output feeds nothing but head j, which first averages it to
half its size: the step needs the block's output only through that pooled map, 4x smaller. This function keeps
the unit's input (and BN's per-channel statistics) and computes everything at full resolution one chunk of the
batch at a time, in the forward pass and again in the backward pass:

forward   pass 1: z = conv(x) per chunk; BN's batch mean and variance over the whole batch, summed per channel
          pass 2: z again; pooled = avgpool2(relu(bn(z))) per chunk; BN's running statistics updated once
backward  pass 1: z again; g_a = upsample2(g) / 4 masked by the ReLU; BN's two per-channel gradient sums
          pass 2: z again; g_z from BN's gradient formula with those sums; the conv's weight (and bias) gradient,
          and the input's gradient when it needs one, accumulated chunk by chunk

The numbers are plain BatchNorm's (batch statistics over the whole batch, biased variance to normalise, unbiased
for the running variance, `momentum`), so training is the same as the unfused unit's up to float rounding; the
conv runs three more times per step (the cheapest layer of the step at VGG-11's block 0: 3 input channels).
Under autocast the convs run in the autocast dtype and BN's arithmetic in float32, as autocast's BatchNorm does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F


def poolable(unit: nn.Module) -> bool:
    """Whether `unit` is a conv -> BN -> ReLU sequence (after parameter-free layers) this function can run: a
    BatchNorm2d in training with affine weights, running statistics and a momentum."""
    layers = list(unit.children()) if isinstance(unit, nn.Sequential) else []
    convs = [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)]
    if len(convs) != 1 or len(layers) != convs[0] + 3:
        return False
    conv, bn, relu = layers[convs[0] :]
    pre = layers[: convs[0]]
    return (
        all(not list(m.parameters()) for m in pre)
        and conv.groups == 1
        and isinstance(conv.padding, tuple)
        and conv.padding_mode == "zeros"
        and isinstance(bn, nn.BatchNorm2d)
        and bn.affine
        and bn.track_running_stats
        and bn.momentum is not None
        and isinstance(relu, nn.ReLU)
    )


def chunkable(block: nn.Module, head: nn.Module) -> bool:
    """Whether train.block_chunks applies to a stage training `block` alone with `head`: the block is poolable and
    the head opens with the VGG heads' half pooling."""
    from layerwise.models.heads import HalfAvgPool

    return isinstance(head, nn.Sequential) and len(head) > 1 and isinstance(head[0], HalfAvgPool) and poolable(block)


def pooled_block_and_head(block: nn.Module, head: nn.Sequential, x: torch.Tensor, chunks: int) -> torch.Tensor | None:
    """head(block(x)) for a `chunkable` pair, with the block's output formed a chunk at a time and pooled at once
    (pooled_unit), then the head's layers after its half pooling; None where pooled_unit cannot (an odd side)."""
    pooled = pooled_unit(block, x, chunks)
    if pooled is None:
        return None
    for layer in list(head)[1:]:  # the head after its half pooling
        pooled = layer(pooled)
    return pooled


def pooled_unit(unit: nn.Sequential, x: torch.Tensor, chunks: int) -> torch.Tensor | None:
    """avgpool2(unit(x)) with the unit in training (see the module's docstring), or None when the unit's output
    has an odd side (a VGG head's half pooling then has windows of other sizes). `poolable(unit)` must hold.
    Parameter-free leading layers (a max-pool) run first, on the whole batch."""
    layers = list(unit.children())
    while not isinstance(layers[0], nn.Conv2d):
        x = layers.pop(0)(x)
    conv, bn, _ = layers
    h, w = ((n + 2 * p - d * (k - 1) - 1) // s + 1 for n, p, d, k, s in
            zip(x.shape[-2:], conv.padding, conv.dilation, conv.kernel_size, conv.stride, strict=True))  # fmt: skip
    if h % 2 or w % 2:
        return None
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else None
    with torch.autocast(x.device.type, enabled=False):
        return _PooledUnit.apply(x, conv.weight, conv.bias, bn.weight, bn.bias, bn, conv, chunks, dtype)


def _conv(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias, dtype) -> torch.Tensor:
    if dtype is not None:
        x, weight = x.to(dtype), weight.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation)


class _PooledUnit(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, gamma, beta, bn: nn.BatchNorm2d, conv: nn.Conv2d, chunks: int, dtype):
        parts = x.tensor_split(max(1, min(chunks, len(x))))
        acc = torch.promote_types(dtype or x.dtype, torch.float32)  # BN's arithmetic: float32 at least
        count, mean, m2 = 0, None, None
        with torch.no_grad():
            for part in parts:  # pass 1: the batch's statistics, each chunk's combined as Chan et al. do
                z = _conv(conv, part, weight, bias, dtype).to(acc)
                var_c, mean_c = torch.var_mean(z, dim=(0, 2, 3), correction=0)
                n = z.numel() // z.shape[1]
                del z
                if mean is None:
                    count, mean, m2 = n, mean_c.double(), var_c.double() * n
                else:
                    delta = mean_c.double() - mean
                    total = count + n
                    mean = mean + delta * n / total
                    m2 = m2 + var_c.double() * n + delta * delta * count * n / total
                    count = total
            var = m2 / count
            invstd = (var + bn.eps).rsqrt().to(acc)
            mean = mean.to(acc)
            out = []
            for part in parts:  # pass 2: the pooled output
                a = _normalized(_conv(conv, part, weight, bias, dtype), mean, invstd, gamma, beta).relu()
                out.append(F.avg_pool2d(a.to(dtype or x.dtype), 2))
            bn.num_batches_tracked += 1
            m = bn.momentum
            bn.running_mean.mul_(1 - m).add_(mean.to(bn.running_mean.dtype), alpha=m)
            unbiased = var * count / max(count - 1, 1)
            bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
        ctx.save_for_backward(x, weight, bias, gamma, beta, mean, invstd)
        ctx.conv, ctx.chunks, ctx.dtype, ctx.count = conv, len(parts), dtype, count
        return torch.cat(out)

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, gamma, beta, mean, invstd = ctx.saved_tensors
        conv, dtype, count = ctx.conv, ctx.dtype, ctx.count
        unit = _Unit(conv, weight, bias, gamma, beta, mean, invstd, dtype)
        parts, grads = x.tensor_split(ctx.chunks), g.tensor_split(ctx.chunks)
        sum_g, sum_g_xhat = torch.zeros_like(mean), torch.zeros_like(mean)
        with torch.no_grad():
            for part, gp in zip(parts, grads, strict=True):  # pass 1: BN's gradient sums
                xhat, g_a = _masked(unit, part, gp)
                sum_g += g_a.sum((0, 2, 3))
                sum_g_xhat += (g_a * xhat).sum((0, 2, 3))
            acc = mean.dtype
            scale = (gamma.to(acc) * invstd)[None, :, None, None]
            w_grad = torch.zeros_like(weight, dtype=acc)
            b_grad = torch.zeros_like(bias, dtype=acc) if bias is not None else None
            x_grads = []
            for part, gp in zip(parts, grads, strict=True):  # pass 2: the conv's gradients
                xhat, g_a = _masked(unit, part, gp)
                g_a.sub_((sum_g / count)[None, :, None, None]).addcmul_(
                    xhat, -(sum_g_xhat / count)[None, :, None, None]
                )
                del xhat
                g_z = g_a.mul_(scale)
                inp, w = (part.to(dtype), weight.to(dtype)) if dtype is not None else (part, weight)
                g_z = g_z.to(inp.dtype)
                options = (conv.stride, conv.padding, conv.dilation)
                w_grad += torch.nn.grad.conv2d_weight(inp, w.shape, g_z, *options).to(acc)
                if b_grad is not None:
                    b_grad += g_z.to(acc).sum((0, 2, 3))
                if ctx.needs_input_grad[0]:
                    x_grads.append(torch.nn.grad.conv2d_input(part.shape, w, g_z, *options).to(x.dtype))
        x_grad = torch.cat(x_grads) if x_grads else None
        b_grad = b_grad.to(bias.dtype) if b_grad is not None else None
        return (x_grad, w_grad.to(weight.dtype), b_grad, sum_g_xhat.to(gamma.dtype), sum_g.to(beta.dtype),
                None, None, None, None)  # fmt: skip


def _normalized(z, mean, invstd, gamma, beta) -> torch.Tensor:
    """BN's output before the ReLU, in mean's dtype (float32 at least): (z - mean) * invstd * gamma + beta."""
    shape, acc = (1, -1, 1, 1), mean.dtype
    xhat = (z.to(acc) - mean.view(shape)) * invstd.view(shape)
    return xhat * gamma.to(acc).view(shape) + beta.to(acc).view(shape)


class _Unit(NamedTuple):
    """The conv unit's pieces the backward pass recomputes each chunk from, and the batch's BN statistics."""

    conv: nn.Conv2d
    weight: torch.Tensor
    bias: torch.Tensor | None
    gamma: torch.Tensor
    beta: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    dtype: torch.dtype | None


def _masked(unit: _Unit, part: torch.Tensor, gp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xhat, the gradient at BN's output) of one chunk: the pooled gradient gp spread over each 2x2 window, / 4,
    where the ReLU passed its input."""
    shape, acc = (1, -1, 1, 1), unit.mean.dtype
    z = _conv(unit.conv, part, unit.weight, unit.bias, unit.dtype)
    xhat = z.to(acc).sub_(unit.mean.view(shape)).mul_(unit.invstd.view(shape))
    passed = (xhat * unit.gamma.to(acc).view(shape)).add_(unit.beta.to(acc).view(shape)) > 0  # where the ReLU passed
    g_a = F.interpolate(gp.to(acc), scale_factor=2, mode="nearest").div_(4).mul_(passed)
    return xhat, g_a
