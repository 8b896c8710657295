"""The library's auxiliary heads of a fixed form (model.head: infopro, dgl, linear): their layouts and parameter
counts against the released code, the config's checks, split ResNets with each, and decoupled training with
each."""

import re

import pytest
import torch
from conftest import tiny_overrides

from layerwise.config import HEADS, METHOD_HEADS, ModelConfig, parse_assignment
from layerwise.errors import LayerwiseError
from layerwise.models import build_model
from layerwise.models.heads import (
    FIXED_HEADS,
    DGLHead,
    HeadSpec,
    InfoProHead,
    LinearHead,
    QuarterAvgPool,
    head_kinds,
    make_head,
)
from layerwise.models.staged import classifies
from layerwise.presets import resolve_config
from layerwise.rundir import RunDir
from layerwise.train import train

NEW = ["dgl", "linear"]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_every_kind_the_config_names_is_registered_and_built():
    """The library's kinds are the registered ones; each builds a head for a first module of two whose output is
    (2, 10) scores, or for a head that does not classify (InfoPro Contrast's projection) 128 features."""
    from layerwise.models.heads import LayerList
    from layerwise.models.resnet import BasicBlock

    assert set(HEADS) == set(head_kinds()) == {"paper", *FIXED_HEADS, *METHOD_HEADS, "auglocal"}
    layers = LayerList((16, 16, 32, 64), (8, 8, 4, 2), (1, 2, 3, 4), BasicBlock)  # AugLocal copies (others ignore)
    for kind in HEADS:
        cfg = ModelConfig(head=kind, head_lambdas=[1, 1, 1, 1] if kind.startswith("infopro_") else [], aux_depth=1)
        head = make_head(HeadSpec(16, 10, cfg, side=8, index=0, modules=2, layers=layers))
        assert head(torch.randn(2, 16, 8, 8)).shape == (2, 10 if classifies(head) else 128)


def test_an_unknown_head_kind_is_one_line_when_the_network_is_built():
    with pytest.raises(
        LayerwiseError, match=r"^bad config: model.head must be one of auglocal, dgl, infopro, .* \(got 'nope'\)$"
    ):
        build_model(ModelConfig(head="nope"), 10)


@pytest.mark.parametrize("kind", sorted(FIXED_HEADS))
@pytest.mark.parametrize("channels", [3, 16, 64])
@pytest.mark.parametrize("size", [1, 2, 5, 8, 32])
def test_fixed_heads_give_batch_by_classes(kind, channels, size):
    head = FIXED_HEADS[kind](channels, 7)
    assert head(torch.randn(3, channels, size, size)).shape == (3, 7)
    assert head.eval()(torch.randn(1, channels, size, size + 3)).shape == (1, 7)


def test_the_dgl_head_has_the_released_widths():
    """eugenium/DGL auxiliary_nets_study/models.py, 'mlp-sr' (n_lin=3, mlp_layers=3), for C channels and n classes:
    three 1x1 convs C -> C without bias:        3 * C^2
    their three BatchNorm2d (weight, bias):     3 * 2C
    three linear 4C -> 4C with bias:            3 * (16C^2 + 4C)
    their three BatchNorm1d:                    3 * 2 * 4C
    the last linear 4C -> n with bias:          4C * n + n
    together 51 C^2 + 42 C + 4 C n + n. The released module also holds a BatchNorm2d(C) that its forward never
    uses with these settings (2C more); this one leaves it out."""
    assert count(DGLHead(16, 10)) == 51 * 16**2 + 42 * 16 + 4 * 16 * 10 + 10 == 14378
    assert count(DGLHead(64, 10)) == 51 * 64**2 + 42 * 64 + 4 * 64 * 10 + 10 == 214154
    head = DGLHead(32, 10)
    convs = [m for m in head if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels, m.kernel_size, m.bias) for m in convs] == [(32, 32, (1, 1), None)] * 3
    linears = [(m.in_features, m.out_features, m.bias is not None) for m in head if isinstance(m, torch.nn.Linear)]
    assert linears == [(128, 128, True)] * 3 + [(128, 10, True)]
    assert sum(isinstance(m, torch.nn.BatchNorm1d) for m in head) == 3


@pytest.mark.parametrize(
    "size, quarter", [((32, 32), (8, 8)), ((16, 16), (4, 4)), ((7, 7), (2, 2)), ((4, 4), (1, 1)), ((9, 5), (3, 2))]
)
def test_the_dgl_heads_first_pool_averages_to_a_quarter_rounded_up(size, quarter):
    """DGL pools to ceil(s/4), s the size of the map the head takes; here read from the map itself."""
    x = torch.randn(2, 3, *size)
    assert QuarterAvgPool()(x).shape[-2:] == quarter
    assert torch.allclose(QuarterAvgPool()(torch.ones(1, 1, *size)), torch.ones(1, 1, *quarter))


def test_the_dgl_head_averages_to_exactly_two_by_two():
    """A 1x1 map after the first pool is repeated to 2x2 (DGL's adaptive pooling to (2, 2)), not left at 1x1."""
    head = DGLHead(8, 10)
    x = torch.randn(2, 8, 3, 3)
    trunk = torch.nn.Sequential(*list(head)[:11])(x)  # the quarter pool, three conv units, the 2x2 pool
    assert trunk.shape == (2, 8, 2, 2) and torch.equal(trunk, trunk[..., :1, :1].expand(-1, -1, 2, 2))


def test_the_linear_head_is_infopros_greedy_sl():
    """InfoPro-Pytorch networks/auxiliary_nets.py '0c1f': global average pooling, Linear(C, n) with bias: C n + n."""
    head = LinearHead(16, 10)
    assert count(head) == 16 * 10 + 10 == 170
    x = torch.randn(2, 16, 5, 5)
    assert torch.allclose(head(x), x.mean((2, 3)) @ head[-1].weight.T + head[-1].bias)


def test_infopros_head_still_imports_from_where_it_was():
    from layerwise.models.custom import InfoProHead as Old

    assert Old is InfoProHead


@pytest.mark.parametrize("kind", NEW)
def test_simcnn_takes_the_new_heads_and_vgg11_refuses_them(kind):
    net = build_model(ModelConfig(widths=[16, 64], downsample_at=[1], head=kind), 10)
    assert all(isinstance(h, FIXED_HEADS[kind]) for h in net.heads)
    assert [z.shape for z in net(torch.randn(2, 3, 32, 32))] == [(2, 10), (2, 10)]
    with pytest.raises(LayerwiseError, match=rf"model\.head={kind} is not for vgg11"):
        ModelConfig(arch="vgg11", widths=[64] * 8, downsample_at=[], head=kind)


def test_a_head_kind_that_cannot_be_a_name_is_refused_by_the_config():
    with pytest.raises(LayerwiseError, match=r"model\.head must be one of paper, infopro, dgl, linear, predsim"):
        ModelConfig(head="m l p")


@pytest.mark.parametrize("kind", NEW)
@pytest.mark.parametrize(
    "setting", ["model.k=2", "model.aux_width=32", "model.aux_width_factor=2", "model.head_pool=1",
                "model.head_batchnorm=false"],
)  # fmt: skip
def test_the_paper_heads_settings_are_refused_under_a_fixed_head(kind, setting):
    key = setting.split("=")[0]
    message = f"{key} has no effect here (model.head={kind} builds heads of a fixed form)"
    with pytest.raises(LayerwiseError, match=re.escape(message)):
        resolve_config("demo", None, [parse_assignment(f"model.head={kind}"), parse_assignment(setting)])


@pytest.mark.parametrize("kind", sorted(FIXED_HEADS))
def test_resnet32_in_four_modules_builds_with_each_head(kind):
    """InfoPro's K=4 cut of ResNet-32: modules end on 16, 32 and 64 channel maps (32, 16, 8 px); the last module
    keeps the network's own classifier."""
    net = build_model(ModelConfig(arch="cifar_resnet", depth=32, split=4, head=kind), 10, 32)
    assert net.J == 4 and all(isinstance(h, FIXED_HEADS[kind]) for h in net.heads[:3])
    assert not isinstance(net.heads[3], FIXED_HEADS[kind])
    assert [z.shape for z in net(torch.randn(2, 3, 32, 32))] == [(2, 10)] * 4
    if kind == "dgl":  # 51 C^2 + 42 C + 4 C n + n for C = 16, 32, 64
        assert [count(h) for h in net.heads[:3]] == [14378, 54858, 214154]
    if kind == "linear":
        assert [count(h) for h in net.heads[:3]] == [170, 330, 650]


@pytest.mark.parametrize("kind", NEW)
def test_decoupled_training_runs_with_each_new_head(tmp_path, image_folder, kind):
    """One epoch of DGL's simultaneous training of a tiny SimCNN, every block from its own head of this kind."""
    overrides = [parse_assignment(a) for a in tiny_overrides(1)]
    overrides.append({"model": {"widths": [8, 8, 16], "downsample_at": [2], "head": kind}})
    overrides.append({"train": {"mode": "decoupled"}})
    cfg = resolve_config("demo", None, overrides)
    summary = train(cfg, tmp_path / "run", image_folder)
    (row,) = RunDir(tmp_path / "run").read_metrics()
    assert summary["mode"] == "decoupled" and [b["block"] for b in summary["blocks"]] == [0, 1, 2]
    assert all(torch.isfinite(torch.tensor(b["loss"])) for b in row["blocks"])
    # 3 classes; dgl: 51 C^2 + 42 C + 4 C n + n, linear: C n + n, for C = 8, 8, 16
    heads = {"dgl": [3699, 3699, 13923], "linear": [27, 27, 51]}[kind]
    assert summary["parameters"]["heads"] == heads


def test_a_head_kind_taken_twice_is_refused_unless_it_is_the_same_function_again():
    """A script that registers its head runs as __main__ and is imported again by its name when the run is
    loaded: the same source is accepted, another function under a taken name refused."""
    from layerwise.models import register_head
    from layerwise.registering import Registry

    with pytest.raises(ValueError, match="a head kind named 'dgl' is registered already"):
        register_head("dgl")(lambda spec: None)
    registry = Registry("a thing")
    source = "def make(spec):\n    return spec\n"
    first, again = {}, {}
    exec(compile(source, "/somewhere/mine.py", "exec"), first)
    exec(compile(source, "/somewhere/mine.py", "exec"), again)
    registry.register("mine")(first["make"])
    registry.register("mine")(again["make"])  # the script imported again: accepted
    assert registry.entries["mine"] is again["make"]
    with pytest.raises(ValueError, match="a thing named 'mine' is registered already"):
        registry.register("mine")(lambda spec: spec)
