"""The local-learning methods (layerwise/methods/): PredSim and InfoPro. Their pieces against answers worked out
by hand (the decoder's reconstruction loss, the supervised contrastive loss, the lambda schedule, PredSim's
pooling and similarity term, parameter counts), no gradient across a module boundary, a resumed run equal to an
uninterrupted one, and the CLI's refusals where a method cannot work."""

import math

import pytest
import torch
from conftest import tiny_overrides, whole_and_resumed
from torch.nn import functional as F

from layerwise.config import ModelConfig, RunConfig, TrainConfig, parse_assignment
from layerwise.errors import LayerwiseError
from layerwise.losses import Seen, local_losses
from layerwise.methods.infopro import RELEASED, Decoder, InfoProAux, InfoProLoss, interpolated, supervised_contrastive
from layerwise.methods.predsim import PredSimHead, PredSimLoss, predsim_pool
from layerwise.models import build_model
from layerwise.presets import resolve_config
from layerwise.rundir import RunDir
from layerwise.stages import plan_stages
from layerwise.train import train
from layerwise.train.stage import freeze_for

METHODS = ["predsim", "infopro_softmax", "infopro_contrast", "auglocal"]


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_decoder_gives_an_image_and_its_bce_on_a_constant_image_by_hand():
    """A decoder whose last conv has zero weights and bias ln 3 outputs sigmoid(ln 3) = 3/4 at every pixel. Against
    an image of 1/2 everywhere (after un-normalising) the binary cross-entropy is -(1/2 ln 3/4 + 1/2 ln 1/4) =
    0.836988; with lambda1 = 2 and no task loss the local loss is twice that."""
    decoder = Decoder(16, image_channels=3)
    assert decoder(torch.randn(2, 16, 8, 8), (32, 32)).shape == (2, 3, 32, 32)
    last = decoder.layers[3]
    torch.nn.init.zeros_(last.weight)
    torch.nn.init.constant_(last.bias, math.log(3.0))
    head = InfoProAux(16, 3, 10, task=False, contrast=False)
    head.decoder = decoder
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.5)
    image = torch.stack([torch.full((32, 32), (0.5 - m) / s) for m, s in zip(mean, std, strict=True)])[None]
    image = image.expand(2, 3, 32, 32)  # (2, 3, 32, 32), normalised
    expected = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert expected == pytest.approx(0.836988, abs=1e-6)
    loss = InfoProLoss(2.0, 0.0, mean, std)
    seen = Seen(head(torch.randn(2, 16, 8, 8)), torch.tensor([0, 1]), torch.randn(2, 16, 8, 8), head, image)
    assert seen.output.shape == (2, 0) and not head.classifies  # no task head where lambda2 = 0
    assert loss(seen).item() == pytest.approx(2 * expected, rel=1e-5)


def test_the_supervised_contrastive_loss_of_three_points_by_hand():
    """a = (1, 0), b = (0, 1), c = (-1, 0) with labels 0, 0, 1 at temperature 1. Anchor a: its positive b scores
    0 against c's -1: log softmax -ln(1 + e^-1) = -0.313262. Anchor b: a and c both score 0: -ln 2 = -0.693147.
    Anchor c has no positive: 0. Loss: (0.313262 + 0.693147 + 0) / 3 = 0.335470 (times temperature / base = 1)."""
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    by_hand = (math.log(1 + math.exp(-1)) + math.log(2)) / 3
    assert by_hand == pytest.approx(0.335470, abs=1e-6)
    assert supervised_contrastive(z, labels, temperature=1.0, base=1.0).item() == pytest.approx(by_hand, rel=1e-6)
    # InfoPro's: temperature 0.07 over base 0.07; halving the temperature doubles every score
    half = -(0.5 / 1.0) * ((-math.log(1 + math.exp(-2))) + (-math.log(2))) / 3
    assert supervised_contrastive(z, labels, temperature=0.5, base=1.0).item() == pytest.approx(half, rel=1e-6)
    assert supervised_contrastive(z[:1], labels[:1], 0.07).item() == 0.0  # a batch of one: nothing to contrast


def test_the_lambdas_interpolate_from_the_first_module_to_module_k_minus_1():
    """ResNet-32, K = 4: (6, 0) -> (1, 2) over modules 0, 1, 2 (ratios 0, 1/2, 1). K = 16: (5, 0.05) -> (0.2, 0.5)
    over 15 modules, ratio i / 14: module 7 is halfway, (2.6, 0.275). K = 2: the first pair alone."""
    assert interpolated(RELEASED[(32, 4)], 4) == [(6.0, 0.0), (3.5, 1.0), (1.0, 2.0)]
    sixteen = interpolated(RELEASED[(32, 16)], 16)
    assert len(sixteen) == 15 and sixteen[0] == (5.0, 0.05)
    assert sixteen[7] == pytest.approx((2.6, 0.275)) and sixteen[14] == pytest.approx((0.2, 0.5))
    assert sixteen[1] == pytest.approx((5 - 4.8 / 14, 0.05 + 0.45 / 14))
    assert interpolated(RELEASED[(110, 2)], 2) == [(5.0, 0.5)]


def test_predsim_pools_to_at_most_4096_features():
    """16 x 32 x 32 = 16384: a 2x2 kernel gives 16 x 16 x 16 = 4096. 32 x 16 x 16 = 8192: halving the height alone
    gives 32 x 8 x 16 = 4096. 64 x 8 x 8 = 4096 needs none. 64 x 7 x 7 = 3136: none. 128 x 8 x 8 = 8192: 2 x 1
    gives 128 x 4 x 8 = 4096. 3 x 63 x 63 = 11907: 2 x 2 with padding to ceil(63 / 2) = 32: 3 x 32 x 32 = 3072."""
    assert predsim_pool(16, 32) == ((2, 2), (0, 0), 4096)
    assert predsim_pool(32, 16) == ((2, 1), (0, 0), 4096)
    assert predsim_pool(64, 8)[2] == 4096 and predsim_pool(64, 8)[0] == (1, 1)
    assert predsim_pool(64, 7) == ((1, 1), (0, 0), 3136)
    assert predsim_pool(128, 8) == ((2, 1), (0, 0), 4096)
    kernel, _, features = predsim_pool(3, 63)
    assert kernel == (2, 2) and features == 3072
    head = PredSimHead(3, 63, 10)
    assert head(torch.randn(2, 3, 63, 63)).shape == (2, 10) and head.pred.in_features == 3072


def test_the_predsim_loss_of_two_small_maps_by_hand():
    """Two images of two channels, 2x2 maps; the sim conv is the identity (centre tap 1). A channel's standard
    deviation over the positions (a, a, b, b) (unbiased) is |a - b| / sqrt 3: image 0 has channels (1, 1, 0, 0) and
    (3, 3, 3, 3) -> (1 / sqrt 3, 0); image 1 (0, 0, 2, 2) and (1, 1, 1, 1) -> (2 / sqrt 3, 0). Centred, both point
    along (1, -1): cosine 1. Labels 0 and 1 one-hot over 3 classes, centred: (2, -1, -1) / 3 and (-1, 2, -1) / 3,
    cosine -1/2. The similarity loss is the mean of (0, 1.5^2, 1.5^2, 0) = 1.125. The pred weights are zero and its
    bias set to 0: uniform scores over 3 classes, cross-entropy ln 3. beta = 0.99: 0.01 ln 3 + 0.99 x 1.125."""
    head = PredSimHead(2, 2, 3)
    torch.nn.init.zeros_(head.pred.bias)
    with torch.no_grad():
        head.sim.weight.zero_()
        head.sim.weight[0, 0, 1, 1] = head.sim.weight[1, 1, 1, 1] = 1.0
    x = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]], [[3.0, 3.0], [3.0, 3.0]]],
                      [[[0.0, 0.0], [2.0, 2.0]], [[1.0, 1.0], [1.0, 1.0]]]])  # fmt: skip
    y = torch.tensor([0, 1])
    seen = Seen(head(x), y, x, head)
    assert seen.output.tolist() == [[0.0] * 3] * 2
    assert PredSimLoss(0.99)(seen).item() == pytest.approx(0.01 * math.log(3) + 0.99 * 1.125, rel=1e-5)
    assert PredSimLoss(0.0)(seen).item() == pytest.approx(math.log(3), rel=1e-6)


def test_each_methods_head_has_the_parameters_counted_by_hand():
    """PredSim, 16 channels at 32 px, 10 classes: pred 4096 x 10 + 10 = 40970, sim 16 x 16 x 9 = 2304. InfoPro, 16
    channels, 3 image channels: decoder 16 x 12 x 9 + 12 = 1740, BN 24, 12 x 3 x 9 + 3 = 327 (2091); '1c2f' 16 ->
    32 conv 4608, BN 64, 32 -> 128 linear 4224, then 128 -> 10 (1290, Softmax) or 128 -> 128 (16512, Contrast)."""
    assert count(PredSimHead(16, 32, 10)) == 40970 + 2304
    assert count(PredSimHead(16, 32, 10, sim=False)) == 40970
    decoder = 1740 + 24 + 327
    assert count(InfoProAux(16, 3, 10, task=True, contrast=False)) == decoder + 4608 + 64 + 4224 + 1290 == 12277
    assert count(InfoProAux(16, 3, 128, task=True, contrast=True)) == decoder + 4608 + 64 + 4224 + 16512 == 27499
    assert count(InfoProAux(16, 3, 10, task=False, contrast=False)) == decoder
    # ResNet-32 in K = 4 with InfoPro Softmax: module 1 (lambda2 = 0) has its decoder alone; modules 2 and 3 read
    # 32 and 64 channels (32: decoder 3456 + 12 + 24 + 327, head 18432 + 128 + 8320 + 1290; 64: decoder 6912 +
    # 12 + 24 + 327, head 36864 + 128 + 8320 + 1290)
    net = build_model(ModelConfig(arch="cifar_resnet", depth=32, split=4, head="infopro_softmax"), 10)
    expected = [decoder, 3819 + 28170, 7275 + 46602]
    assert [count(h) for h in net.heads[:3]] == expected
    assert net.final_parameters() == 466_906  # the delivered ResNet-32, as with any head
    assert net.classifying == [1, 2, 3]


def small(head: str, **model) -> RunConfig:
    """ResNet-8 (a stem and 3 blocks) in 4 modules; AugLocal with d = 1: 3, the last two layers together."""
    lambdas = [6.0, 0.0, 1.0, 2.0] if head.startswith("infopro_") else []
    split, depth = (3, 1) if head == "auglocal" else (4, 2)
    model = {"arch": "cifar_resnet", "depth": 8, "split": split, "head": head, "head_lambdas": lambdas,
             "aux_depth": depth, **model}  # fmt: skip
    return RunConfig(model=ModelConfig(**model), train=TrainConfig(mode="decoupled"))


@pytest.mark.parametrize("head", METHODS)
def test_no_gradient_crosses_a_module_boundary(head):
    """ResNet-8 in its 4 units (AugLocal: 3 modules), every module with the method's head, trained at once: each
    module's local loss reaches its own block and head and nothing else (the image that InfoPro reconstructs
    carries no weights; AugLocal's copies of later layers are the head's own)."""
    torch.manual_seed(0)
    cfg = small(head)
    net = build_model(cfg.model, 10)
    stage = plan_stages(net.J, "decoupled")[0]
    module = freeze_for(net, stage, local_losses(cfg, net.J))
    losses, _ = module(torch.randn(8, 3, 32, 32), torch.tensor([0, 1, 2, 3] * 2))
    assert losses.shape == (net.J,)
    for j in range(net.J):
        mine = {id(p) for p in (*net.blocks[j].parameters(), *net.heads[j].parameters())}
        params = [p for p in net.parameters() if p.requires_grad]
        grads = torch.autograd.grad(losses[j], params, retain_graph=True, allow_unused=True)
        reached = {id(p) for p, g in zip(params, grads, strict=True) if g is not None and g.abs().sum() > 0}
        assert reached and reached <= mine, (head, j)
        assert {id(p) for p in net.blocks[j].parameters()} <= reached | {
            id(p) for p in net.blocks[j].parameters() if p.numel() == 0
        }


def tiny(head: str, epochs: int = 3):
    items = [*tiny_overrides(epochs), "model.depth=8", f"model.head={head}", "train.mode=decoupled"]
    if head.startswith("infopro_"):
        items.append("model.head_lambdas=[6, 0, 1, 2]")
    if head == "auglocal":
        items += ["model.split=3", "model.aux_depth=1"]
    return resolve_config("cifar10_resnet32_k4", None, [parse_assignment(a) for a in items])


@pytest.mark.parametrize("head", ["predsim", "infopro_contrast", "auglocal"])
def test_a_resumed_method_run_ends_where_an_uninterrupted_one_does(tmp_path, image_folder, head):
    cfg = tiny(head)
    full, resumed, a, b = whole_and_resumed(cfg, tmp_path, image_folder)  # momentum in every optimizer
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final"] == full["final"]
    assert any(k.startswith("heads.0.") for k in a)  # the methods' own networks are saved and resumed


def test_infopro_contrast_scores_only_the_heads_that_classify(tmp_path, image_folder):
    """Modules 1 to 3 give projections, not scores: training figures, validation, the summary and eval leave
    them out and say so; the delivered network is ResNet-8 with its own classifier."""
    from layerwise.delivered import evaluate_run

    summary = train(tiny("infopro_contrast", epochs=1), tmp_path / "run", image_folder)
    blocks = summary["blocks"]
    assert [("val_top1" in b) for b in blocks] == [False, False, False, True]
    assert [b["train_top1"] is None for b in blocks] == [True, True, True, False]
    (row,) = RunDir(tmp_path / "run").read_metrics()
    assert [("val" in b) for b in row["blocks"]] == [False, False, False, True]
    result = evaluate_run(tmp_path / "run", image_folder, device="cpu")
    assert list(result["blocks"]) == [3] and result["not_classifying"] == [0, 1, 2]


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["model.head=infopro_softmax"], r"compares each module's output with the image.*train\.mode=decoupled"),
        (["model.head=infopro_contrast", "train.mode=decoupled", "data.mix=mixup"], "contrasts images by their one"),
        (["model.head=predsim", "train.sim_loss=1"], "brings PredSim's own local loss"),
        (["model.head=paper", "model.head_beta=0.5"], r"model\.head_beta has no effect here"),
        (["model.head=predsim", "model.head_temperature=0.1"], r"model\.head_temperature has no effect here"),
        (["model.head=infopro_softmax", "train.mode=decoupled", "model.head_lambdas=[1, 2]"], "four numbers"),
    ],
)
def test_a_method_where_it_cannot_work_is_one_line(items, message):
    with pytest.raises(LayerwiseError, match=message) as info:
        resolve_config("demo", None, [parse_assignment(a) for a in items])
    assert "\n" not in str(info.value)


def test_infopro_on_a_network_without_released_lambdas_asks_for_them():
    with pytest.raises(LayerwiseError, match=r"released its lambdas for ResNet-32 K=2, .* set model\.head_lambdas"):
        build_model(ModelConfig(arch="cifar_resnet", depth=20, split=4, head="infopro_contrast"), 10)
    net = build_model(ModelConfig(arch="cifar_resnet", depth=20, split=4, head="infopro_contrast",
                                  head_lambdas=[1, 0, 1, 1]), 10)  # fmt: skip
    assert net.classifying == [3]


def test_reflect_padding_mirrors_the_image_about_its_edge():
    """The row (1, 2, 3) padded by 2 with reflection reads (3, 2, 1, 2, 3, 2, 1); the crop at offset 0 of a 3x3
    image padded by 1 starts with the reflected row and column: [[5, 4, 5], [2, 1, 2], [5, 4, 5]] for the image
    1..9 in rows. uint8 images keep their type."""
    from layerwise.data.augment import crop, reflected

    image = torch.arange(1, 10, dtype=torch.uint8).view(1, 1, 3, 3)
    assert reflected(image, 2)[0, 0, 2].tolist() == [3, 2, 1, 2, 3, 2, 1]  # the image's first row, widened
    out = crop(image, 1, torch.tensor([0]), torch.tensor([0]), mode="reflect")
    assert out.dtype == torch.uint8 and out[0, 0].tolist() == [[5, 4, 5], [2, 1, 2], [5, 4, 5]]
    zeros = crop(image, 1, torch.tensor([0]), torch.tensor([0]))
    assert zeros[0, 0].tolist() == [[0, 0, 0], [0, 1, 2], [0, 4, 5]]
    reference = F.pad(image.float(), (1, 1, 1, 1), mode="reflect")  # torch's, on floats
    assert torch.equal(reflected(image, 1).float(), reference)


def test_the_warm_up_starts_from_warmup_from():
    """cosine, lr 0.8, 10 epochs of 1 step with 5 of warm-up from 0.01: step t < 5 is 0.01 + 0.79 (t + 1) / 5;
    without warmup_from, 0.8 (t + 1) / 5 as before."""
    from layerwise.train.schedule import lr_at_step

    cfg = TrainConfig(lr=0.8, schedule="cosine", epochs_per_block=10, warmup_epochs=5, warmup_from=0.01)
    assert [lr_at_step(cfg, e, 0, 1) for e in range(5)] == pytest.approx([0.01 + 0.79 * (t + 1) / 5 for t in range(5)])
    plain = TrainConfig(lr=0.8, schedule="cosine", epochs_per_block=10, warmup_epochs=5)
    assert [lr_at_step(plain, e, 0, 1) for e in range(5)] == [0.8 * (t + 1) / 5 for t in range(5)]


def test_auglocal_samples_the_layers_and_depths_of_their_code():
    """From ChenxiangMA/AugLocal (networks/resnet.py, auxiliary_nets.py), worked through by hand for the README's
    settings. ResNet-32 (16 layers, the stem counted), d = 2, c = 0.5: K = 16 - 2 - 2 = 12, every d_l is 2 (layer
    12: round(2 x 0.5 + 0.5) = round(1.5) = 2, half to even); layer l copies round(l + (15 - l) / 2), and 15.
    ResNet-110 (55 layers), d = 3: K = 50, d_l = round(3 - l / 50): 3 up to layer 24, then 2 (layer 25: 2.5 rounds
    to 2); layer 0 copies 18, 36, 54; layer 24: 34, 44, 54; layer 25: 40, 54; layer 50: 52, 54."""
    from layerwise.methods.auglocal import depths, sampled, strides

    assert depths(16, 2, 0.5) == [2] * 13
    by_hand = [[8, 15], [8, 15], [8, 15], [9, 15], [10, 15], [10, 15], [10, 15], [11, 15], [12, 15], [12, 15],
               [12, 15], [13, 15], [14, 15]]  # fmt: skip
    assert [sampled(layer, 16, 2) for layer in range(13)] == by_hand
    deep = depths(55, 3, 0.5)
    assert len(deep) == 51 and deep[:25] == [3] * 25 and deep[25:] == [2] * 26
    assert sampled(0, 55, 3) == [18, 36, 54] and sampled(24, 55, 3) == [34, 44, 54]
    assert sampled(25, 55, 3 - 1) == [40, 54] and sampled(50, 55, 2) == [52, 54]
    assert sampled(13, 16, 5) == [14, 15]  # more depth than later layers: all of them
    # strides follow the sides: 32 -> 16 -> 8 halves twice; 32 -> 8 at once owes two, paid one per copy
    assert strides([16, 8], 32) == [2, 2] and strides([8, 8], 32) == [2, 2] and strides([16, 8], 16) == [1, 2]
    assert strides([32, 16, 8], 32) == [1, 2, 2] and strides([4], 32) == [2]  # owes three, pays one


def test_auglocal_heads_have_the_parameters_counted_by_hand():
    """ResNet-32, d = 2: layer 0 (16 channels) copies layers 8 (16 -> 32, stride 2: 4608 + 64 + 9216 + 64 + a
    1x1 shortcut 512 + 64 = 14528) and 15 (32 -> 64, stride 2: 18432 + 128 + 36864 + 128 + 2048 + 128 = 57728),
    then a linear 64 x 10 + 10: 72906. Layer 11 (64 channels) copies 13 and 15, each 2 x 36864 + 256 = 73984:
    148618. 14 modules: 13 layers alone, then the last three with ResNet-32's classifier."""
    net = build_model(ModelConfig(arch="cifar_resnet", depth=32, split=14, head="auglocal"), 10)
    assert [len(b) for b in net.blocks] == [1] * 13 + [3]
    assert count(net.heads[0]) == 14528 + 57728 + 650 == 72906
    assert count(net.heads[11]) == 2 * 73984 + 650 == 148618
    assert net.final_parameters() == 466_906
    with torch.device("meta"):  # ResNet-110, d = 3: 52 modules, the last of 4 layers; layer 0 copies 18, 36, 54
        deep = build_model(ModelConfig(arch="cifar_resnet", depth=110, split=52, head="auglocal", aux_depth=3), 10)
    assert [len(b) for b in deep.blocks] == [1] * 51 + [4]
    assert [type(m).__name__ for m in deep.heads[0]][:3] == ["BasicBlock"] * 3 and len(deep.heads[25]) == 5
    with pytest.raises(LayerwiseError, match=r"set model\.split=14"):
        build_model(ModelConfig(arch="cifar_resnet", depth=32, split=16, head="auglocal"), 10)
    with pytest.raises(LayerwiseError, match=r"model\.aux_depth must be below 1"):
        build_model(ModelConfig(widths=[8, 8], downsample_at=[], head="auglocal"), 10)


def test_auglocal_on_torchvision_resnet_vgg_and_simcnn_has_the_heads_counted_by_hand():
    """Layer 0's auxiliary network, by hand (d = 2, c = 0.5 unless said; every depth rounds to 2 here).
    ResNet-18 (CIFAR stem, 32 px): 9 layers (the stem, 8 blocks), 7 modules; layer 0 (64 ch, 32 px) copies layers
    4 (128 ch, 16 px: BasicBlock stride 2, 73728 + 256 + 147456 + 256 + shortcut 8192 + 256 = 230144) and 8 (512 ch,
    4 px, owes 2, pays 1: 589824 + 1024 + 2359296 + 1024 + 65536 + 1024 = 3017728), a linear 512 x 10 + 10: 3253002.
    VGG-11-BN: 8 conv layers ([pool] conv BN ReLU), 6 modules; layer 0 (64 ch, 32 px) copies 4 (512 ch, 4 px: pool,
    conv 294912 + 512, BN 1024) and 7 (512 ch, 2 px: 2359296 + 512 + 1024), + 5130: 2662410.
    SimCNN 8-16-16-32, P at 1 and 3, d = 1: 3 modules, the last two blocks together; layer 0 (8 ch, 32 px) copies
    layer 3 (32 ch, 8 px: P then conv 9 x 32 x 32 = 9216, BN 64), depth 1 adds BatchNorm1d(32) (64), + 330: 9674."""
    resnet18 = ModelConfig(arch="resnet", depth=18, split=7, stem="cifar", head="auglocal")
    net = build_model(resnet18, 10, image_size=32)
    assert [len(b) for b in net.blocks] == [4, 1, 1, 1, 1, 1, 3]  # the stem's four units, a block each, the last 3
    assert count(net.heads[0]) == 230144 + 3017728 + 5130 == 3253002
    assert [type(m).__name__ for m in net.heads[0]][:2] == ["BasicBlock", "BasicBlock"]
    vgg = build_model(ModelConfig(arch="vgg", depth=11, split=6, head="auglocal"), 10, image_size=32)
    assert [len(b) for b in vgg.blocks] == [3, 4, 4, 3, 4, 11]  # the pool before a conv starts its module
    assert count(vgg.heads[0]) == 296448 + 2360832 + 5130 == 2662410
    sim = build_model(ModelConfig(widths=[8, 16, 16, 32], downsample_at=[1, 3], head="auglocal", aux_depth=1), 10)
    assert [type(b).__name__ for b in sim.blocks] == ["Block", "Block", "Sequential"] and len(sim.blocks[2]) == 2
    assert count(sim.heads[0]) == 9216 + 64 + 64 + 330 == 9674
    with pytest.raises(LayerwiseError, match=r"set model\.split=7"):
        build_model(ModelConfig(arch="resnet", depth=18, split=4, head="auglocal"), 10, image_size=32)
    torch.manual_seed(0)  # a decoupled step on ResNet-18: every module's loss, no gradient lost
    cfg = RunConfig(model=resnet18, train=TrainConfig(mode="decoupled"))
    module = freeze_for(net, plan_stages(net.J, "decoupled")[0], local_losses(cfg, net.J))
    losses, logits = module(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    losses.sum().backward()
    assert len(losses) == 7 and torch.isfinite(losses).all() and logits.shape == (7, 2, 10)
    assert all(p.grad is not None for p in net.parameters())


def test_auglocal_on_a_users_stages_is_one_line():
    """model.arch=custom cannot list its layers for copying: refused when the network is built."""
    from custom_nets import good

    import layerwise

    cfg = layerwise.config_for(good, model={"head": "auglocal"})
    with pytest.raises(LayerwiseError, match=r"cuts the network between its layers") as info:
        build_model(cfg.model, 10)
    assert "\n" not in str(info.value)


def batch_of_eight() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])


@pytest.mark.parametrize("head", ["predsim", "infopro_contrast"])
def test_under_ddp_each_process_takes_its_own_share_of_the_batch_level_terms(tmp_path, head):
    """The similarity and contrastive terms compare the images of a batch with each other. Under DDP each process
    computes them over its own share (as the per-process losses of InfoPro's and PredSim's code would), and DDP
    averages the gradients: two gloo processes, one step on halves of 8 images, give the weights of one process
    stepping on the mean of the two halves' losses, each half's forward pass (BatchNorm too) on its own."""
    import subprocess
    import sys
    from pathlib import Path

    from layerwise.device import precision_for
    from layerwise.train.loop import StageTraining

    tests = Path(__file__).parent
    out = tmp_path / "ddp.pt"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(tests / "methods_ddp_worker.py"), str(out), head]  # fmt: skip
    job = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=tests)
    assert job.returncode == 0, job.stderr[-3000:]
    torch.manual_seed(0)
    cfg = small(head)
    net = build_model(cfg.model, 4)
    cpu = torch.device("cpu")
    training = StageTraining(net, plan_stages(net.J, "decoupled")[0], cfg, precision_for(cpu, "fp32"))
    training.start_epoch(0, 0, 1)
    x, y = batch_of_eight()
    training.optimizer.zero_grad(set_to_none=True)
    for half in (slice(0, 4), slice(4, 8)):
        losses, _ = training.model(x[half], y[half])
        (losses.sum() / 2).backward()  # DDP's mean of the two processes' gradients
    training.optimizer.step()
    ddp = torch.load(out)
    one = dict(net.named_parameters())
    assert ddp.keys() == one.keys()
    for k in one:
        assert torch.allclose(ddp[k], one[k], rtol=1e-4, atol=1e-6), k
    whole = copy_of_first_step(cfg, x, y)  # the whole batch in one forward pass differs: the terms are per share
    assert any(not torch.allclose(whole[k], one[k], rtol=1e-4, atol=1e-6) for k in one)


def copy_of_first_step(cfg: RunConfig, x: torch.Tensor, y: torch.Tensor) -> dict:
    from layerwise.device import precision_for
    from layerwise.train.loop import StageTraining

    torch.manual_seed(0)
    net = build_model(cfg.model, 4)
    cpu = torch.device("cpu")
    training = StageTraining(net, plan_stages(net.J, "decoupled")[0], cfg, precision_for(cpu, "fp32"))
    training.start_epoch(0, 0, 1)
    training.step(x, y)
    return dict(net.named_parameters())


def test_the_decoder_runs_in_float32_under_bf16_autocast():
    """A decoder whose last conv gives the logit 6.3 everywhere: sigmoid 0.99816 in float32, but exactly 1.0 in
    bf16, where the BCE against 0.98 would read -0.98 ln 0.99816 - 0.02 ln(1 - 1.0), clamped to 0.02 x 100 = 2.0
    instead of 0.128. Under bf16 autocast the loss is float32's."""
    head = InfoProAux(4, 3, 10, task=False, contrast=False)
    torch.nn.init.zeros_(head.decoder.layers[3].weight)
    torch.nn.init.constant_(head.decoder.layers[3].bias, 6.3)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    image = torch.full((2, 3, 8, 8), (0.98 - 0.5) / 0.25)
    seen = Seen(head(torch.zeros(2, 4, 4, 4)), torch.tensor([0, 1]), torch.randn(2, 4, 4, 4), head, image)
    q = 1 / (1 + math.exp(-6.3))
    by_hand = -(0.98 * math.log(q) + 0.02 * math.log(1 - q))
    assert by_hand == pytest.approx(0.1279, abs=1e-3)
    loss = InfoProLoss(1.0, 0.0, mean, std)
    assert loss(seen).item() == pytest.approx(by_hand, rel=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert loss(seen).item() == pytest.approx(by_hand, rel=1e-4)


@pytest.mark.parametrize("head", METHODS)
def test_each_method_steps_under_bf16_autocast_with_finite_losses(head):
    """bf16 on the CPU (as on a GPU): the reconstruction, contrastive and similarity terms run in float32 inside
    autocast (BCE refuses bf16 on CUDA), so every module's loss is a finite float32."""
    from layerwise.device import Precision
    from layerwise.train.loop import StageTraining

    torch.manual_seed(0)
    cfg = small(head)
    net = build_model(cfg.model, 4)
    training = StageTraining(net, plan_stages(net.J, "decoupled")[0], cfg, Precision(torch.device("cpu"), True))
    training.start_epoch(0, 0, 1)
    x, y = batch_of_eight()
    losses, logits = training.step(x, y)
    assert losses.dtype == torch.float32 and torch.isfinite(losses).all() and len(losses) == net.J
    assert logits.shape == (len(net.classifying), 8, 4)


@pytest.mark.parametrize("head", ["predsim", "infopro_softmax"])
def test_a_users_stages_train_with_a_method_from_python(tmp_path, image_folder, head, monkeypatch):
    """model.arch=custom: the method's heads sized from each stage's output, trained decoupled through `fit`;
    the delivered network holds no auxiliary part (export's state has no decoder or sim conv)."""
    from custom_nets import good

    import layerwise

    model = {"head": head, **({"head_lambdas": [1, 1, 0.5, 1]} if head.startswith("infopro_") else {})}
    cfg = layerwise.config_for(good, model=model, data={"val_size": 8},
                               train={"mode": "decoupled", "epochs_per_block": 1, "batch_size": 16})  # fmt: skip
    summary = layerwise.fit(cfg, tmp_path / "run", data=image_folder)
    assert [b["block"] for b in summary["blocks"]] == [0, 1, 2]
    from layerwise.delivered import load_delivered
    from layerwise.device import precision_for
    from layerwise.export import Deployable

    monkeypatch.setenv("LAYERWISE_TRUST_CODE", "1")  # the run names this test's own network code
    got = load_delivered(tmp_path / "run", precision_for(torch.device("cpu"), "fp32"))
    names = list(Deployable(got.net, got.heads, got.cfg).state_dict())
    assert names and not any("decoder" in n or ".sim." in n for n in names)
    assert any(".sim." in n or "decoder" in n for n in got.net.state_dict())  # the run trained them


@pytest.mark.parametrize("head", ["predsim", "infopro_contrast"])
def test_torchvision_resnet18_in_two_modules_steps_with_a_method(head):
    """torchvision's ResNet-18 with the CIFAR stem at 32 px in K = 2: the method's head on module 1 (256
    channels at 4 px for PredSim: 4096 features, no pooling), a decoupled step on two images."""
    torch.manual_seed(0)
    lambdas = [5, 1, 0, 0] if head.startswith("infopro_") else []
    cfg = RunConfig(model=ModelConfig(arch="resnet", depth=18, split=2, stem="cifar", head=head, head_lambdas=lambdas),
                    train=TrainConfig(mode="decoupled"))  # fmt: skip
    net = build_model(cfg.model, 10)
    module = freeze_for(net, plan_stages(net.J, "decoupled")[0], local_losses(cfg, net.J))
    losses, logits = module(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    losses.sum().backward()
    assert torch.isfinite(losses).all() and logits.shape[-1] == 10
    if head == "predsim":
        assert net.heads[0].pred.in_features <= 4096


def test_a_head_that_does_not_classify_outside_one_decoupled_pipeline_is_one_line(tmp_path, image_folder, monkeypatch):
    """A head kind registered from Python whose heads give 8-d projections (all but the last): greedy training
    would score them as classes, so the run is refused before anything is written; decoupled it trains."""
    from custom_nets import good

    import layerwise
    from layerwise import losses as loss_module
    from layerwise.losses import CrossEntropy, register_losses
    from layerwise.models import LinearHead, heads, register_head

    for registry in (heads._MAKERS, loss_module._LOSSES):  # registered for this test only
        monkeypatch.setattr(registry, "entries", dict(registry.entries))

    class Projection(torch.nn.Sequential):
        classifies = False

    @register_head("projection_for_test")
    def projection(spec):
        if spec.last:
            return LinearHead(spec.channels, spec.num_classes)
        return Projection(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(spec.channels, 8))

    @register_losses("projection_for_test")
    def losses(cfg, heads):
        return [lambda seen: seen.output.pow(2).mean()] * (heads - 1) + [CrossEntropy()]

    def config(mode):
        return layerwise.config_for(good, model={"head": "projection_for_test"}, data={"val_size": 8},
                                    train={"mode": mode, "epochs_per_block": 1, "batch_size": 16})  # fmt: skip

    with pytest.raises(
        LayerwiseError, match=r"the heads of blocks 0, 1 give no class scores .*\(train\.mode=decoupled"
    ):
        layerwise.fit(config("greedy"), tmp_path / "greedy", data=image_folder)
    assert not (tmp_path / "greedy" / "checkpoints").exists()
    summary = layerwise.fit(config("decoupled"), tmp_path / "decoupled", data=image_folder)
    assert [("val_top1" in b) for b in summary["blocks"]] == [False, False, True]
