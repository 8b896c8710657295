"""timm CNNs cut into K modules (model.arch=timm): every listed model trains greedily and decoupled for a step at
32 px and hands back timm's own state_dict; local weights files; one-line refusals."""

import pytest
import torch

from layerwise.config import ModelConfig, RunConfig, TrainConfig
from layerwise.errors import LayerwiseError
from layerwise.losses import local_losses
from layerwise.models import build_model
from layerwise.stages import plan_stages
from layerwise.train.stage import freeze_for

timm = pytest.importorskip("timm", reason="timm is an optional extra (layerwise[timm]); .ci/run installs it")

from layerwise.models.timm_models import cifar_stem, feature_units, timm_state_dict  # noqa: E402

MODELS = ["resnet18", "resnet50", "resnet26d", "resnext26ts", "regnety_002", "efficientnet_b0",
          "mobilenetv3_small_100", "convnext_atto", "densenet121"]  # fmt: skip


def step(net, mode: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """One step of every stage of `mode`: each stage's loss reaches exactly its own blocks' and heads' parameters."""
    cfg = RunConfig(model=ModelConfig(arch="timm", name="resnet18", split=net.J), train=TrainConfig(mode=mode))
    for stage in plan_stages(net.J, mode):
        net.zero_grad(set_to_none=True)
        module = freeze_for(net, stage, local_losses(cfg, net.J))
        with torch.no_grad():  # the frozen blocks before the stage give its input
            given = x
            for block in net.blocks[: stage.first]:
                given = block(given)
        losses, _ = module(given, y)
        losses.sum().backward()
        assert torch.isfinite(losses).all()
        for j in range(net.J):
            trained = stage.first <= j <= stage.block
            grads = [p.grad for p in [*net.blocks[j].parameters(), *net.heads[j].parameters()]]
            assert all((g is not None) == trained for g in grads), (mode, j)


@pytest.mark.parametrize(
    ("name", "stem"), [*((name, "imagenet") for name in MODELS), ("resnet18", "cifar"), ("convnext_atto", "cifar")]
)
def test_a_timm_model_trains_in_two_modules_and_gives_back_timms_state_dict(name, stem):
    """At 32 px, K = 2: a greedy and a decoupled step, then the delivered network's state_dict loads into
    timm.create_model(name) (with the same stem change) and answers exactly as it does. timm's own stems take most
    of these to 1 px by the end, where the heads still work; the CIFAR stem (ResNet's max-pool, ConvNeXt's 4x4
    patches at stride 1) keeps more."""
    torch.manual_seed(0)
    net = build_model(ModelConfig(arch="timm", name=name, split=2, stem=stem), 10, image_size=32)
    assert net.J == 2
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    step(net, "greedy", x, y)
    step(net, "decoupled", x, y)
    fresh = timm.create_model(name, num_classes=10)
    if stem == "cifar":
        cifar_stem(fresh, feature_units(fresh, (3, 32, 32)))
    fresh.load_state_dict(timm_state_dict(net))  # strict: every key, and nothing of the first module's head
    net.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x), net(x)[-1], atol=1e-5)


def test_the_cut_points_are_block_boundaries():
    """ResNet-18's units are its stem's four layers and its eight BasicBlocks; DenseNet-121's dense blocks stay
    whole (their layers concatenate); ConvNeXt's stages open into their downsampling and blocks."""
    units = lambda name: [p for p, _ in feature_units(timm.create_model(name, num_classes=10), (3, 32, 32))]  # noqa: E731
    assert units("resnet18") == [
        "conv1",
        "bn1",
        "act1",
        "maxpool",
        *(f"layer{s}.{b}" for s in range(1, 5) for b in (0, 1)),
    ]
    dense = units("densenet121")
    assert "features.denseblock1" in dense and not any(p.startswith("features.denseblock1.") for p in dense)
    convnext = units("convnext_atto")
    assert convnext[:4] == ["stem", "stages.0.downsample", "stages.0.blocks.0", "stages.0.blocks.1"]


def test_the_cifar_stem_keeps_the_image_size_to_the_first_block():
    """timm's ResNet-18 halves 32 px twice before layer1 (conv1 stride 2, max-pool); the CIFAR stem keeps 32 px."""
    plain = build_model(ModelConfig(arch="timm", name="resnet18", split=2), 10, image_size=32)
    cifar = build_model(ModelConfig(arch="timm", name="resnet18", split=2, stem="cifar"), 10, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    assert plain.blocks[0](x).shape[-1] == 4 and cifar.blocks[0](x).shape[-1] == 16  # after layer2: /8 and /2


def test_a_weights_file_loads_before_the_cut(tmp_path):
    """A safetensors file and a torch file of timm's resnet18 for 5 classes: every tensor lands in the split
    network, but the classifier, sized for 5, which keeps its initialisation for 10."""
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", num_classes=5)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, tmp_path / "w.safetensors")
    torch.save(state, tmp_path / "w.pt")
    for file in ("w.safetensors", "w.pt"):
        cfg = ModelConfig(arch="timm", name="resnet18", split=2, weights=str(tmp_path / file))
        got = timm_state_dict(build_model(cfg, 10, image_size=32))
        assert all(torch.equal(got[k], v) for k, v in state.items() if not k.startswith("fc."))
        assert got["fc.weight"].shape == (10, 512)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (lambda p: torch.save({"conv1.weight": torch.zeros(1)}, p), r"does not fit timm's resnet18: \d+ keys missing"),
        (lambda p: p.write_bytes(b"not a weights file"), r"is unreadable"),
        (lambda p: torch.save({"x": [1, 2]}, p), r"holds no state_dict of tensors"),
    ],
)
def test_a_weights_file_that_does_not_fit_is_one_line(tmp_path, write, message):
    write(tmp_path / "w.pt")
    cfg = ModelConfig(arch="timm", name="resnet18", split=2, weights=str(tmp_path / "w.pt"))
    with pytest.raises(LayerwiseError, match=message) as info:
        build_model(cfg, 10, image_size=32)
    assert "\n" not in str(info.value)


def test_a_weights_file_over_the_cap_is_refused(tmp_path, monkeypatch):
    torch.save(timm.create_model("resnet18", num_classes=10).state_dict(), tmp_path / "w.pt")
    monkeypatch.setenv("LAYERWISE_MAX_WEIGHTS_BYTES", "1M")
    with pytest.raises(LayerwiseError, match=r"more than LAYERWISE_MAX_WEIGHTS_BYTES=1\.0 MiB"):
        build_model(ModelConfig(arch="timm", name="resnet18", split=2, weights=str(tmp_path / "w.pt")), 10, 32)


@pytest.mark.parametrize(
    ("model", "size", "message"),
    [
        (
            {"name": "vit_tiny_patch16_224"},
            224,
            r"vit_tiny_patch16_224 cannot be cut into modules: its forward_features",
        ),
        ({"name": "no_such_net"}, 32, r"model\.name='no_such_net': timm cannot build it"),
        ({"name": "resnet18", "split": 13}, 32, r"model\.split=13 must be between 1 and 12"),
    ],
)
def test_what_cannot_be_cut_is_one_line(model, size, message):
    with pytest.raises(LayerwiseError, match=message) as info:
        build_model(ModelConfig(**{"arch": "timm", "split": 2, **model}), 10, image_size=size)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"arch": "timm", "split": 2}, r"model\.name goes with model\.arch=timm"),
        ({"name": "resnet18"}, r"model\.name goes with model\.arch=timm"),
        ({"arch": "timm", "name": "hf-hub:someone/net", "split": 2}, r"model\.name must be a timm model's name"),
        ({"arch": "timm", "name": "resnet18"}, r"model\.split alone with timm"),
        ({"weights": "w.pt"}, r"model\.weights goes with model\.arch=timm only"),
    ],
)
def test_timm_settings_are_checked_with_the_config(model, message):
    with pytest.raises(LayerwiseError, match=message):
        ModelConfig(**model)


def test_the_preset_trains_from_the_cli(tmp_path, image_folder):
    """`layerwise train --preset cifar10_timm_resnet18_k2` with a smaller timm model, shrunk: both modules train
    and the run is saved."""
    from conftest import tiny_overrides

    from layerwise.cli import main

    sets = [a for s in tiny_overrides() for a in ("--set", s)]
    args = ["train", "--preset", "cifar10_timm_resnet18_k2", "--data", str(image_folder), "--out", str(tmp_path / "r")]
    assert main([*args, *sets, "--set", "model.name=regnety_002"]) == 0
    assert (tmp_path / "r" / "summary.json").is_file()
    assert (tmp_path / "r" / "checkpoints" / "final.pt").is_file()
