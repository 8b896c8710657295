"""Split networks: InfoPro's cut points, FLOP-balanced cuts of torchvision's ResNets and VGG, and the delivered
ResNet-18 back in torchvision's own class with the same outputs."""

import pytest
import torch
import torchvision
from torch import nn

from layerwise.config import ModelConfig
from layerwise.errors import LayerwiseError
from layerwise.models import build_model
from layerwise.models.custom import InfoProHead
from layerwise.models.partition import balanced_cut
from layerwise.models.resnet import torchvision_state_dict


def split(arch: str, depth: int, k: int, classes: int = 10, size: int = 32, **model):
    return build_model(ModelConfig(arch=arch, depth=depth, split=k, head="infopro", **model), classes, size)


def test_balanced_cuts_minimise_the_costliest_module():
    assert balanced_cut([1, 1, 1, 1], 2) == [2, 4]
    assert balanced_cut([5, 1, 1, 1, 1, 1], 2) == [1, 6]  # 5 | 5
    ends = balanced_cut([1, 1, 1, 1, 1, 5], 3)  # 2 | 3 | 5 or 3 | 2 | 5: nothing beats the 5
    assert ends[1:] == [5, 6] and ends[0] in (2, 3)
    assert balanced_cut([9, 1, 1, 1], 2, first=2) == [2, 4]  # the stem (9) never stands alone


@pytest.mark.parametrize(
    "depth, k, blocks",
    [
        (32, 2, [8, 8]),
        (32, 8, [2] * 8),
        (110, 4, [13, 14, 14, 14]),
        (32, 16, [1] * 16),
        (20, 3, [4, 3, 3]),
        (20, 10, [1] * 10),
    ],
)
def test_cifar_resnets_are_cut_where_infopro_cuts(depth, k, blocks):
    """InfoPro's configs.py, as PEERS.md reports it: ResNet-32 K=2 after stage 2 block 1 (stem + 5 + 2 blocks);
    K=8 [1,0] [1,2] [1,4] [2,1] [2,3] [3,0] [3,2] (two units each); ResNet-110 K=4 [1,11] [2,7] [3,3] (stem +
    12 blocks, 14, 14, 14); K=16 one unit each, the stem alone first. ResNet-20 is not in InfoPro's table: its 9
    blocks split evenly, the stem with the first 3; at K=10 every unit is a module of its own."""
    net = split("cifar_resnet", depth, k)
    assert [len(b) for b in net.blocks] == blocks
    assert sum(len(b) for b in net.blocks) == 1 + (depth - 2) // 2


def test_resnet18_splits_at_residual_blocks_balanced_by_flops():
    by_k = {k: [list(b._modules) for b in split("resnet", 18, k, stem="cifar").blocks] for k in (2, 4, 8)}
    assert by_k[4] == [["conv1", "bn1", "relu", "maxpool", "layer1_0", "layer1_1"], ["layer2_0", "layer2_1"],
                       ["layer3_0", "layer3_1"], ["layer4_0", "layer4_1"]]  # fmt: skip
    assert by_k[8][0] == ["conv1", "bn1", "relu", "maxpool", "layer1_0"] and len(by_k[8]) == 8
    assert len(by_k[2]) == 2


def test_the_imagenet_stem_builds_at_any_size_it_can_run():
    net = split("resnet", 18, 2, size=32)  # layer4 is 1x1 at 32 px: the FLOP count must not need two images
    assert net.J == 2 and net(torch.randn(2, 3, 32, 32))[-1].shape == (2, 10)


def test_resnet50_and_vgg_split_too():
    net = split("resnet", 50, 4, classes=7, size=64)
    assert net.J == 4 and net(torch.randn(1, 3, 64, 64))[-1].shape == (1, 7)
    vgg = split("vgg", 11, 3, classes=5, size=32)
    assert vgg.J == 3 and all(isinstance(b[-1], nn.MaxPool2d) for b in vgg.blocks)  # cut at pooling layers


@pytest.mark.parametrize(
    "arch, depth, k, most", [("cifar_resnet", 32, 17, 16), ("resnet", 18, 9, 8), ("vgg", 11, 6, 5)]
)
def test_more_modules_than_split_points_is_refused(arch, depth, k, most):
    with pytest.raises(LayerwiseError, match=f"model.split={k} must be between 1 and {most}"):
        split(arch, depth, k)


@pytest.mark.parametrize("k", [2, 4])
def test_the_delivered_resnet18_is_torchvisions_with_the_same_outputs(k):
    torch.manual_seed(0)
    net = split("resnet", 18, k, stem="cifar")
    for m in net.modules():  # statistics that are not the defaults, so eval mode uses something real
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    reference = torchvision.models.resnet18(num_classes=10)
    reference.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    reference.maxpool = nn.Identity()
    reference.load_state_dict(torchvision_state_dict(net))  # strict: every key, nothing extra
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(reference.eval()(x), net.eval()(x)[-1], atol=1e-5)


def test_any_sequence_of_units_splits_by_measured_flops():
    from layerwise.models.resnet import split_modules

    # 3x3 convs at 8 channels: A at 16 px, A/4 at 8 px (the pool costs nothing). Cut in two, 16 | 16 pool 8 8
    # costs max(A, 1.5 A) and 16 16 | pool 8 8 costs 2A: the first cut is the only best one
    units = [nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.MaxPool2d(2)]
    units += [nn.Conv2d(8, 8, 3, padding=1) for _ in range(2)]
    modules = split_modules(units, 2, (8, 16, 16))
    assert [len(m) for m in modules] == [1, 4]
    with pytest.raises(LayerwiseError, match="cannot cut 5 units into 8 modules"):
        split_modules(units, 8, (8, 16, 16))


def test_a_timm_models_stem_and_stages_train_as_modules():
    timm = pytest.importorskip("timm", reason="timm is an optional extra that CI does not install")
    from layerwise.models.custom import staged_from_stages
    from layerwise.models.resnet import split_modules

    model = timm.create_model("convnext_atto", num_classes=10, pretrained=False).eval()
    stages = split_modules([model.stem, *model.stages], 2, (3, 64, 64))
    heads = [InfoProHead(stages[0](torch.zeros(1, 3, 64, 64)).shape[1], 10), model.head]
    net = staged_from_stages(stages, heads, ModelConfig(), 10, 64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(net(x)[-1], model(x), atol=1e-5)
