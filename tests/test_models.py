"""Models: P and its inverse, blocks, heads, the staged network and every registered preset."""

import pytest
import torch

from layerwise.config import ModelConfig
from layerwise.models import AuxClassifier, Block, SpaceToDepth, build_model
from layerwise.presets import list_presets, load_preset


def test_space_to_depth_is_invertible_and_preserves_norm():
    x = torch.randn(2, 3, 8, 6)
    y = SpaceToDepth()(x)
    assert y.shape == (2, 12, 4, 3)
    assert torch.equal(SpaceToDepth.inverse(y), x)
    assert torch.allclose(y.norm(), x.norm())


def test_space_to_depth_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        SpaceToDepth()(torch.randn(1, 3, 5, 4))


def test_block_doubles_width_at_p():
    block = Block(16, 32, "s2d", batchnorm=True, bias=False)
    assert block(torch.randn(2, 16, 8, 8)).shape == (2, 32, 4, 4)
    assert block[1].in_channels == 64 and block[1].bias is None
    assert isinstance(block[2], torch.nn.BatchNorm2d)


def test_block_without_bn_has_a_bias():
    block = Block(3, 8, None, batchnorm=False, bias=True)
    assert block[0].bias is not None
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in block)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_aux_head_has_k_minus_1_convs(k):
    head = AuxClassifier(16, 24, k, num_classes=10)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == k - 1
    assert head(torch.randn(2, 16, 8, 8)).shape == (2, 10)
    assert head[-1].in_features == (24 if k > 1 else 16) * 4  # averaged to 2x2


def test_a_block_refuses_an_unknown_downsampling_by_name():
    with pytest.raises(ValueError, match="unknown downsample 'avgpool'"):
        Block(3, 8, "avgpool", batchnorm=True, bias=False)


@pytest.mark.parametrize("head_batchnorm", [True, False])
def test_head_convs_have_a_bn_or_else_a_bias(head_batchnorm):
    """Each head conv is conv -> BN -> ReLU with no bias, or, with head_batchnorm off, a biased conv -> ReLU (a
    k = 2 or 3 network without BN in its heads; no preset has one)."""
    cfg = ModelConfig(k=3, widths=[8, 8], downsample_at=[], head_batchnorm=head_batchnorm)
    for head in build_model(cfg, 10).heads:
        layers = [type(m).__name__ for m in head.modules() if not isinstance(m, torch.nn.Sequential)]
        conv_unit = ["Conv2d", "BatchNorm2d", "ReLU"] if head_batchnorm else ["Conv2d", "ReLU"]
        tail = ["AdaptiveAvgPool2d", *(["BatchNorm2d"] if head_batchnorm else []), "Flatten", "Linear"]
        assert layers == conv_unit * 2 + tail
        assert all((m.bias is None) == head_batchnorm for m in head.modules() if isinstance(m, torch.nn.Conv2d))


def test_the_paper_head_has_bn_unless_told_otherwise():
    head = AuxClassifier(16, 24, 2, num_classes=10)
    assert [type(m).__name__ for m in head[0]] == ["Conv2d", "BatchNorm2d", "ReLU"] and head[0][0].bias is None


@pytest.mark.parametrize("size, half", [((7, 5), (3, 2)), ((3, 2), (1, 1)), ((2, 3), (1, 1)), ((1, 1), (1, 1))])
def test_the_vgg_heads_first_pool_averages_to_half_size_and_never_below_one(size, half):
    from layerwise.models.heads import HalfAvgPool

    x = torch.arange(2 * 4 * size[0] * size[1], dtype=torch.float32).view(2, 4, *size)
    y = HalfAvgPool()(x)
    assert y.shape == (2, 4, *half)
    if half == (1, 1):  # the mean of the whole map
        assert torch.allclose(y[..., 0, 0], x.mean((-2, -1)))


def test_vggs_own_classifier_defaults_to_the_released_greedy_code_without_dropout():
    from layerwise.models.heads import VGGClassifier

    head = VGGClassifier(8, 10, hidden=16)
    assert [m.p for m in head if isinstance(m, torch.nn.Dropout)] == [0.0, 0.0]
    assert [m.out_features for m in head if isinstance(m, torch.nn.Linear)] == [16, 16, 10]


def test_staged_forward_returns_each_heads_logits():
    net = build_model(ModelConfig(k=2, widths=[8, 8, 16], downsample_at=[2]), num_classes=5)
    logits = net(torch.randn(3, 3, 16, 16))
    assert [z.shape for z in logits] == [(3, 5)] * 3
    assert len(net(torch.randn(3, 3, 16, 16), upto=1)) == 2
    assert len(net(torch.randn(3, 3, 16, 16), heads=[2])) == 1
    # forward up to a block equals running the blocks one by one
    x = torch.randn(2, 3, 16, 16)
    net.eval()
    assert torch.allclose(net(x, upto=1)[-1], net.heads[1](net.forward_features(x, 0, 2)))


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_builds(name):
    cfg = load_preset(name)
    classes = cfg.model.num_classes
    with torch.device("meta"):
        net = build_model(cfg.model, classes, cfg.data.image_size)
        size = cfg.data.image_size
        logits = net(torch.empty(2, 3, size, size))
    assert len(net.blocks) == len(net.heads) == net.J
    assert all(z.shape == (2, classes) for j, z in enumerate(logits) if j in net.classifying)


@pytest.mark.parametrize(
    "name, millions",
    [
        ("imagenet_simcnn_k2", 64),
        ("imagenet_simcnn_k3", 102),
        ("imagenet_simcnn_k3_mf512", 46),
        ("imagenet_simcnn_k1", 96),
    ],
)
def test_presets_reproduce_table7_counts(name, millions):
    cfg = load_preset(name)
    with torch.device("meta"):
        net = build_model(cfg.model, 1000)
    assert abs(net.final_parameters() / 1e6 - millions) < 1.0
    assert cfg.paper["params_m"] == millions


def test_vgg11_matches_torchvision_vgg11_bn():
    from torchvision.models import vgg11_bn

    cfg = load_preset("imagenet_vgg11_k3")
    with torch.device("meta"):
        net = build_model(cfg.model, 1000)
        ref = vgg11_bn()
    assert net.final_parameters() == sum(p.numel() for p in ref.parameters())


def modules_of(preset: str, kind: type) -> list[torch.nn.Module]:
    with torch.device("meta"):
        net = build_model(load_preset(preset).model, 1000 if "imagenet" in preset else 10)
    return [m for m in net.modules() if isinstance(m, kind)]


@pytest.mark.parametrize("preset", ["cifar10_simcnn_k1", "imagenet_simcnn_k1"])
def test_k1_presets_have_no_batchnorm_anywhere(preset):
    """The paper: BN is absent for k = 1; the released k = 1 scripts (--bn 0) build it in neither blocks nor heads."""
    assert modules_of(preset, torch.nn.BatchNorm2d) == []
    just_average_and_linear = [torch.nn.AdaptiveAvgPool2d, torch.nn.Flatten, torch.nn.Linear]
    heads = modules_of(preset, AuxClassifier)
    assert heads and all([type(m) for m in head] == just_average_and_linear for head in heads)


def test_only_the_end_to_end_vgg11_has_dropout():
    """The released greedy VGG-11 has no dropout; torchvision's vgg11_bn (the e2e baseline) has two Dropout(0.5)."""
    assert [m.p for m in modules_of("imagenet_vgg11_k3", torch.nn.Dropout)] == [0.0, 0.0]
    assert [m.p for m in modules_of("imagenet_vgg11_e2e", torch.nn.Dropout)] == [0.5, 0.5]


def test_old_batchnorm_initialisation_is_uniform_and_off_by_default():
    torch.manual_seed(0)
    weights = [m.weight for m in build_model(ModelConfig(), 10).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(w, torch.ones_like(w)) for w in weights)
    net = build_model(ModelConfig(bn_weight_init="uniform"), 10)
    norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    values = torch.cat([m.weight.detach() for m in norms])
    assert len(norms) == len(weights) and values.min() >= 0 and values.max() < 1
    assert 0.4 < values.mean() < 0.6  # U[0, 1): mean 1/2 over ~2,000 values
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"arch": "vgg11", "bn_weight_init": "uniform", "conv_bias": True}, "VGG-11 keeps torchvision"),
        ({"classifier_dropout": 0.5}, "VGG-11's classifier only"),
        ({"bn_weight_init": "normal"}, "'ones' or 'uniform'"),
    ],
)
def test_model_settings_that_do_not_apply_are_refused(values, message):
    from layerwise.errors import LayerwiseError

    with pytest.raises(LayerwiseError, match=message):
        ModelConfig(**values)


def test_simcnn_takes_infopros_heads_and_vgg11_refuses_them():
    from layerwise.errors import LayerwiseError
    from layerwise.models.custom import InfoProHead

    net = build_model(ModelConfig(widths=[16, 64], downsample_at=[1], head="infopro"), 10)
    assert all(isinstance(h, InfoProHead) for h in net.heads)
    assert [h[0].out_channels for h in net.heads] == [32, 64]  # a narrow map doubled at stride 2, a wide one kept
    assert [z.shape for z in net(torch.randn(2, 3, 32, 32))] == [(2, 10), (2, 10)]
    with pytest.raises(LayerwiseError, match=r"model\.head=infopro is not for vgg11"):
        ModelConfig(arch="vgg11", widths=[64] * 8, downsample_at=[], head="infopro")
