"""Known answers, worked out by hand: accuracy counts and the loss, the 2^j ensemble over three and four heads, the
learning-rate schedule and momentum resets over a whole stage, the presets' optimiser, and the CIFAR-10 reader's
pixel layout and labels. Tiny tensors, no training runs."""

import copy
import itertools
import math
import re
import tarfile

import numpy as np
import pytest
import torch
from conftest import python2_pickle
from torch.nn import functional as F

from layerwise.config import RunConfig, TrainConfig
from layerwise.data.sources import open_eval, open_train
from layerwise.errors import LayerwiseError
from layerwise.evaluate import ensemble_scores, evaluate, topk_correct
from layerwise.presets import list_presets, load_preset
from layerwise.train.schedule import lr_at

PAPER_PRESETS = [p for p in list_presets() if p.startswith(("cifar10_simcnn", "imagenet_")) and not p.endswith("_plus")]
"""The paper's recipes, which its fact sheet pins; every other preset is described in tests/fidelity/own.yaml."""


def test_top1_and_top5_counts_on_hand_made_scores():
    scores = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0, 0.0],  # label 1: top-1 hit
            [0.9, 0.1, 0.5, 0.4, 0.3, 0.2, 0.0],  # label 4: rank 4 of 7, top-5 only
            [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.0],  # label 6: last, no hit
        ]
    )
    labels = torch.tensor([1, 4, 6])
    assert [int(c) for c in topk_correct(scores, labels)] == [1, 2]
    assert [int(c) for c in topk_correct(scores[:, :3], torch.tensor([1, 2, 2]), ks=(1, 5))] == [1, 3]  # k > classes


def test_the_loss_is_the_mean_cross_entropy_of_the_label():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    expected = (-math.log(math.e**2 / (math.e**2 + 1)) - math.log(0.5)) / 2
    assert F.cross_entropy(logits, torch.tensor([0, 1])).item() == pytest.approx(expected)


def test_the_ensemble_weighs_head_j_by_2_to_the_j_over_four_heads():
    """Z_j = sum_{i<=j} 2^i z_i, reported as 2^-j Z_j. With these heads the four weightings disagree: equal
    weights, weights j+1, or only the last head would each pick another class somewhere."""
    z = [torch.tensor([[3.0, 0.0, 0.0]]), torch.tensor([[0.0, 2.0, 0.0]]), torch.tensor([[0.0, 0.0, 2.5]])]
    z.append(torch.tensor([[0.0, 1.0, 0.0]]))
    out = ensemble_scores(z)
    by_hand = [
        [3.0, 0.0, 0.0],  # z0
        [1.5, 2.0, 0.0],  # (z0 + 2 z1) / 2
        [0.75, 1.0, 2.5],  # (z0 + 2 z1 + 4 z2) / 4
        [0.375, 1.5, 1.25],  # (z0 + 2 z1 + 4 z2 + 8 z3) / 8
    ]
    for got, want in zip(out, by_hand, strict=True):
        assert got[0].tolist() == pytest.approx(want)
    assert [int(e.argmax()) for e in out] == [0, 1, 2, 1]
    equal = sum(z)
    assert int(equal.argmax()) == 0  # equal weights would answer class 0 after four heads


def test_the_softmax_ensemble_adds_weighted_probabilities():
    z = [torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3.0), 0.0]]), torch.tensor([[0.0, math.log(3.0)]])]
    (_, _, last) = ensemble_scores(z, "softmax")
    p = [[0.5, 0.5], [0.75, 0.25], [0.25, 0.75]]
    want = [(p[0][c] + 2 * p[1][c] + 4 * p[2][c]) / 4 for c in range(2)]
    assert last[0].tolist() == pytest.approx(want)


SCORES = [  # 3 heads x 5 images x 6 classes, no ties in any row, nor in any running ensemble's row
    [[7, 2, 5, 6, 1, 4], [3, 0, 6, 1, 9, 4], [5, 3, 0, 2, 7, 6], [6, 5, 4, 9, 0, 3], [6, 9, 8, 5, 3, 4]],
    [[8, 0, 3, 4, 7, 9], [2, 5, 1, 6, 9, 0], [9, 0, 3, 5, 2, 7], [3, 2, 6, 7, 4, 8], [1, 3, 7, 2, 8, 6]],
    [[6, 1, 5, 8, 0, 2], [2, 4, 7, 1, 3, 9], [5, 0, 7, 6, 4, 8], [5, 6, 8, 1, 3, 9], [5, 2, 0, 1, 3, 4]],
]
LABELS = [0, 1, 2, 3, 5]


class FixedHeads(torch.nn.Module):
    """A network whose head j scores image i with the row SCORES[j][i]; the images are their own indices."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, upto, heads):
        self.calls.append((upto, list(heads), torch.is_grad_enabled(), self.training))
        rows = x[:, 0].long()
        return [torch.tensor(SCORES[j], dtype=torch.float32, requires_grad=True)[rows] for j in heads]


class Batches:
    """A validation loader over the images with these indices, in batches of these sizes."""

    device = torch.device("cpu")

    def __init__(self, *batches: list[int]):
        self.indices = batches

    def batches(self):
        for rows in self.indices:
            yield torch.tensor(rows, dtype=torch.float32)[:, None], torch.tensor([LABELS[i] for i in rows])


TWO_BATCHES = Batches([0, 1, 2], [3, 4])


def cross_entropy_by_hand(row: list[int], label: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[label]  # log sum_c e^z_c - z_label


HEADS_BY_HAND = [  # the rank of each image's label in each head's row: top-1 hits and top-5 hits of 5 images
    (40.0, 60.0),  # head 0: ranks 1, 6, 6, 1, 5
    (0.0, 100.0),  # head 1: ranks 2, 3, 4, 2, 3
    (0.0, 80.0),  # head 2: ranks 2, 3, 2, 6, 2
]
ENSEMBLES_BY_HAND = {  # the running ensembles' rows, 0.5 * previous + z_j, and the labels' ranks in them
    "logits": [
        (40.0, 60.0),  # z0 itself
        (40.0, 100.0),  # rows (11.5 1 5.5 7 7.5 11) (3.5 5 4 6.5 13.5 2) (11.5 1.5 3 6 5.5 10) ...: ranks 1, 3, 5, 1, 3
        (40.0, 100.0),  # rows (11.75 1.5 7.75 11.5 3.75 7.5) (3.75 6.5 9 4.25 9.75 10) ...: ranks 1, 4, 4, 5, 1
    ],  # equal weights would give 20 % top-1 after head 2, weights j + 1 too
    "softmax": [  # 0.5 * previous + softmax(z_j), worked out in float64
        (40.0, 60.0),
        (20.0, 80.0),  # ranks 2, 4, 6, 1, 4
        (0.0, 100.0),  # ranks 2, 5, 3, 2, 3
    ],
}


@pytest.mark.parametrize("kind", ["logits", "softmax"])
@pytest.mark.parametrize("training", [True, False])
def test_evaluate_scores_each_head_and_the_running_ensemble_as_worked_out_by_hand(kind, training):
    net = FixedHeads().train(training)
    result = evaluate(net, TWO_BATCHES, [0, 1, 2], kind)
    assert result["n"] == 5
    want = {
        j: {"top1": h1, "top5": h5, "ensemble_top1": e1, "ensemble_top5": e5}
        for j, ((h1, h5), (e1, e5)) in enumerate(zip(HEADS_BY_HAND, ENSEMBLES_BY_HAND[kind], strict=True))
    }
    assert result["blocks"] == want
    by_hand = [cross_entropy_by_hand(row, y) for row, y in zip(SCORES[2], LABELS, strict=True)]  # the last head's
    assert result["loss"] == pytest.approx(sum(by_hand) / 5, rel=1e-6)
    assert net.calls == [(2, [0, 1, 2], False, False)] * 2  # both batches, every head, no autograd, eval mode
    assert net.training == training  # put back as it was

    memo = {}  # within a greedy stage: heads 0 and 1 frozen, so the second call runs head 2 alone
    assert evaluate(net, TWO_BATCHES, [0, 1, 2], kind, memo=memo)["blocks"] == want
    net.calls.clear()
    again = evaluate(net, TWO_BATCHES, [0, 1, 2], kind, memo=memo)
    assert again["blocks"] == want and again["loss"] == result["loss"] and again["n"] == 5
    assert net.calls == [(2, [2], False, False)] * 2


@pytest.mark.parametrize(
    "images, head_0, head_1, ensemble_1",
    [
        ([[0, 1, 2]], (100 / 3, 100 / 3), (0.0, 100.0), (100 / 3, 100.0)),  # the ranks above, of images 0-2
        ([[3]], (100.0, 100.0), (0.0, 100.0), (100.0, 100.0)),  # one image: every figure is 0 or 100
    ],
)
def test_evaluate_divides_by_the_number_of_images(images, head_0, head_1, ensemble_1):
    result = evaluate(FixedHeads(), Batches(*images), [0, 1])
    figures = [(b["top1"], b["top5"]) for b in result["blocks"].values()]
    assert figures == [head_0, head_1]
    assert (result["blocks"][1]["ensemble_top1"], result["blocks"][1]["ensemble_top5"]) == ensemble_1
    assert result["n"] == len(images[0])
    by_hand = [cross_entropy_by_hand(SCORES[1][i], LABELS[i]) for i in images[0]]
    assert result["loss"] == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-6)


def test_evaluate_keeps_the_first_heads_scores_from_two_heads_on():
    """Greedy stage 1 scores heads 0 and 1, and head 0 is frozen: the memo keeps it after the first call."""
    net, memo = FixedHeads(), {}
    first = evaluate(net, TWO_BATCHES, [0, 1], memo=memo)
    net.calls.clear()
    assert evaluate(net, TWO_BATCHES, [0, 1], memo=memo) == first
    assert net.calls == [(1, [1], False, False)] * 2
    ensembles = [(b["ensemble_top1"], b["ensemble_top5"]) for b in first["blocks"].values()]
    assert ensembles == ENSEMBLES_BY_HAND["logits"][:2]


def test_the_learning_rate_over_a_whole_stage_of_the_paper_recipe():
    """CIFAR-10: lr 0.1 divided by 5 every 15 epochs, 50 epochs, restarting for every block."""
    cfg = load_preset("cifar10_simcnn_k3").train
    schedule = [lr_at(cfg, e) for e in range(cfg.epochs_per_block)]
    assert schedule == pytest.approx([0.1] * 15 + [0.02] * 15 + [0.004] * 15 + [0.0008] * 5)
    imagenet = load_preset("imagenet_simcnn_k3").train  # lr / 10 every 20 epochs, 45 epochs
    assert [lr_at(imagenet, e) for e in (0, 19, 20, 39, 40, 44)] == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])


@pytest.mark.parametrize(
    "lr_step, lrs, cleared",
    [
        (2, [0.1, 0.1, 0.05, 0.05, 0.025], [True, False, True, False, True]),  # decays at epochs 2 and 4
        (1, [0.1, 0.05, 0.025, 0.0125, 0.00625], [True] * 5),  # a decay every epoch
    ],
)
def test_momentum_is_forgotten_at_each_decay_and_only_there_and_each_step_uses_the_epochs_rate(lr_step, lrs, cleared):
    """After a reset (and at the start) SGD's step is exactly -lr * (grad + weight_decay * w): it shows both the
    rate the optimizer really used and that the momentum buffer was empty."""
    from layerwise.device import Precision
    from layerwise.models import build_model
    from layerwise.stages import plan_stages
    from layerwise.train.loop import StageTraining

    cfg = TrainConfig(lr=0.1, lr_step=lr_step, lr_gamma=0.5, epochs_per_block=5, weight_decay=5e-4)
    net = build_model(load_preset("demo").model, 3).double()  # float64: the step's difference stays exact enough
    training = StageTraining(
        net, plan_stages(net.J, "greedy")[0], RunConfig(train=cfg), Precision(torch.device("cpu"), False)
    )
    w = net.heads[0][-1].weight  # the first head's linear layer
    x, y = torch.randn(4, 3, 32, 32, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    kept = []
    for epoch in range(cfg.epochs_per_block):
        had_momentum = bool(training.optimizer.state)
        lr = training.start_epoch(epoch)
        empty = not training.optimizer.state
        before = w.detach().clone()
        reference = copy.deepcopy(net)  # the mean cross-entropy's gradient, by autograd on a copy
        reference.zero_grad(set_to_none=True)  # the copy came with the last step's gradients
        F.cross_entropy(reference.heads[0](reference.blocks[0](x)), y).backward()
        training.step(x, y)
        assert torch.allclose(w.grad, reference.heads[0][-1].weight.grad, rtol=1e-5, atol=1e-6)  # loss in float32
        fresh_step = -lrs[epoch] * (w.grad + cfg.weight_decay * before)
        fresh = torch.allclose(w.detach() - before, fresh_step, rtol=1e-9, atol=1e-12)  # rounding: ~1e-16 |w|
        kept.append((lr, had_momentum, empty, fresh))
    assert [lr for lr, *_ in kept] == pytest.approx(lrs)
    assert [empty for _, _, empty, _ in kept] == cleared
    assert [had for _, had, _, _ in kept] == [False, True, True, True, True]
    assert [fresh for *_, fresh in kept] == cleared  # a step with momentum left is not a fresh one


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_the_presets_optimiser_is_the_papers(preset):
    """The fact sheet (../shared/paper/PAPER.md): SGD with momentum 0.9 and lr 0.1; CIFAR-10 weight decay 5e-4,
    batch 128, lr / 5 every 15 epochs, 50 per block; ImageNet weight decay 1e-4, batch 256, lr / 10 every 20
    epochs, 45 per block; momentum reset at each decay (the released code rebuilds its optimizer)."""
    train = load_preset(preset).train
    imagenet = preset.startswith("imagenet")
    assert (train.lr, train.momentum, train.weight_decay) == (0.1, 0.9, 1e-4 if imagenet else 5e-4)
    assert train.batch_size == (256 if imagenet else 128) and train.reset_momentum_at_decay
    assert (train.lr_step, train.lr_gamma, train.epochs_per_block) == ((20, 0.1, 45) if imagenet else (15, 0.2, 50))


# ---- the CIFAR-10 python archive: pixels, orientation, channels and labels round trip


def pattern(label: int) -> np.ndarray:
    """(3, 32, 32) uint8 with every channel, row and column telling itself apart, and the label in it."""
    c, r, k = np.meshgrid(np.arange(3), np.arange(32), np.arange(32), indexing="ij")
    return ((c * 80 + r * 2 + k + label * 7) % 256).astype(np.uint8)


def write_cifar(tmp_path, names: list[str]) -> tuple:
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir(parents=True)
    labels = [3, 0, 9, 5]
    rows = np.stack([pattern(y).reshape(-1) for y in labels])  # CIFAR-10 rows: R plane, G plane, B plane
    for name in [*[f"data_batch_{i}" for i in range(1, 6)], "test_batch"]:
        (root / name).write_bytes(python2_pickle({b"data": rows, b"labels": labels}))
    (root / "batches.meta").write_bytes(python2_pickle({b"label_names": [n.encode() for n in names]}))
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(root, arcname="cifar-10-batches-py")
    return archive, labels


def test_the_cifar_reader_keeps_channels_rows_columns_and_labels(tmp_path):
    names = [f"c{i}" for i in range(10)]
    archive, labels = write_cifar(tmp_path, names)
    source = open_train(archive, decode=True, size=32)
    assert source.classes == names and len(source.train) == 20  # five data batches
    images, got = source.train.images, source.train.labels
    assert got[:4].tolist() == labels
    for image, y in zip(images[:4], labels, strict=True):
        assert torch.equal(image, torch.from_numpy(pattern(y)))  # (C, H, W): R first, rows top-down
    assert image[0, 0, 1] - image[0, 0, 0] == 1 and image[0, 1, 0] - image[0, 0, 0] == 2  # columns, then rows


@pytest.mark.parametrize("inside", [True, False])
def test_an_extracted_cifar_folder_reads_as_its_archive(tmp_path, inside):
    """The extracted archive, given as cifar-10-batches-py/ itself or as the folder holding it."""
    names = [f"c{i}" for i in range(10)]
    archive, _ = write_cifar(tmp_path, names)
    folder = tmp_path / "cifar-10-batches-py" if inside else tmp_path
    for read in (lambda p: open_train(p, decode=True, size=32).train, lambda p: open_eval(p, True, 32, names)):
        want, got = read(archive), read(folder)
        assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)


@pytest.mark.parametrize("form", ["folder", "archive"])
def test_a_cifar_source_missing_a_batch_names_it(tmp_path, form):
    archive, _ = write_cifar(tmp_path, [f"c{i}" for i in range(10)])
    root = tmp_path / "cifar-10-batches-py"
    (root / "data_batch_3").unlink()
    if form == "archive":
        archive.unlink()
        with tarfile.open(archive, "w:gz") as tf:
            tf.add(root, arcname="cifar-10-batches-py")
    path = root if form == "folder" else archive
    with pytest.raises(LayerwiseError, match=rf"^CIFAR-10 {form} {re.escape(str(path))} lacks data_batch_3;"):
        open_train(path, decode=True, size=32)
    assert len(open_eval(path, True, 32, [f"c{i}" for i in range(10)])) == 4  # its test_batch is all there


def test_a_truncated_cifar_archive_is_one_error_naming_it(tmp_path):
    archive, _ = write_cifar(tmp_path, [f"c{i}" for i in range(10)])
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[: archive.stat().st_size * 2 // 3])
    with pytest.raises(LayerwiseError, match=rf"^cannot read archive {re.escape(str(cut))} "):
        open_train(cut, decode=True, size=32)


def test_an_archive_cut_before_its_first_batch_is_one_error_naming_it(tmp_path):
    """Telling a CIFAR-10 archive from an image archive reads members until data_batch_1 or an image: a cut
    before either is met fails there, and says which file."""
    write_cifar(tmp_path, [f"c{i}" for i in range(10)])
    root = tmp_path / "cifar-10-batches-py"
    (root / "readme.html").write_bytes(np.random.default_rng(0).bytes(300_000))  # incompressible
    archive = tmp_path / "readme-first.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        for name in ("readme.html", "batches.meta", "data_batch_1"):
            tf.add(root / name, arcname=f"cifar-10-batches-py/{name}")
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(archive.read_bytes()[:150_000])  # inside readme.html
    with pytest.raises(LayerwiseError, match=rf"^cannot read archive {re.escape(str(cut))} "):
        open_train(cut, decode=True, size=32)


def test_an_empty_archive_is_no_cifar_archive(tmp_path):
    empty = tmp_path / "empty.tar"
    tarfile.open(empty, "w").close()
    with pytest.raises(LayerwiseError, match=rf"^no images found in {re.escape(str(empty))};"):
        open_train(empty, decode=True, size=32)


def test_eval_maps_an_archives_labels_to_the_runs_classes_by_name(tmp_path):
    """An archive whose label_names come in another order: each image keeps its class name, not its index."""
    names = [f"c{i}" for i in range(10)]
    archive, labels = write_cifar(tmp_path, names[::-1])  # label 3 now names c6, and so on
    run_classes = names
    examples = open_eval(archive, True, 32, run_classes)
    assert examples.labels.tolist() == [run_classes.index(names[::-1][y]) for y in labels] == [6, 9, 0, 4]


def test_an_image_folder_of_pngs_and_its_tar_archive_read_back_the_same_pixels_and_labels(tmp_path):
    """PNG is lossless: the decoded images are the written ones, channel order and orientation included, and
    each image's label is its class folder's index in sorted order."""
    from torchvision.io import encode_png

    classes = ["bird", "airplane", "cat"]  # written out of order: labels follow the sorted names
    root = tmp_path / "folder"
    written = {}
    for name in classes:
        (root / name).mkdir(parents=True)
        y = sorted(classes).index(name)
        image = torch.from_numpy(pattern(y))
        (root / name / "0.png").write_bytes(bytes(encode_png(image).numpy()))
        written[y] = image
    archive = tmp_path / "folder.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(root, arcname="folder")
    for source in (root, archive):
        got = open_train(source, decode=True, size=32)
        assert got.classes == sorted(classes)
        for image, y in zip(got.train.images, got.train.labels.tolist(), strict=True):
            assert torch.equal(image, written[y]), (source, y)


# ---- label smoothing and Nesterov momentum (issue 20's first ingredients; off in every preset)


def test_label_smoothing_gives_the_smoothed_cross_entropy_of_fixed_logits():
    """Logits (2, 0, 0), label 0, smoothing 0.3 over 3 classes: targets 0.8, 0.1, 0.1, so the loss is
    0.8 (log Z - 2) + 0.2 log Z with Z = e^2 + 2; without smoothing it is log Z - 2."""
    from torch import nn

    from layerwise.device import Precision
    from layerwise.models.staged import StagedNet
    from layerwise.stages import plan_stages
    from layerwise.train.loop import StageTraining

    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.tensor([[2.0, 0.0, 0.0]]) + self.w * x.sum()

    log_z = math.log(math.exp(2) + 2)
    for smoothing, expected in ((0.3, 0.8 * (log_z - 2) + 0.2 * log_z), (0.0, log_z - 2)):
        net = StagedNet([nn.Identity()], [Fixed()])
        cfg = TrainConfig(label_smoothing=smoothing)
        training = StageTraining(
            net, plan_stages(1, "greedy")[0], RunConfig(train=cfg), Precision(torch.device("cpu"), False)
        )
        loss, _ = training.model(torch.zeros(1, 1), torch.tensor([0]))
        assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_nesterov_steps_by_hand():
    """w = 1, loss 3w (gradient 3), lr 0.1, momentum 0.9, no weight decay. Nesterov: buffer b = 0.9 b + g and
    step g + 0.9 b, so w1 = 1 - 0.1 * 3 * 1.9 = 0.43 and w2 = 0.43 - 0.1 * 3 * (1 + 0.9 + 0.81) = -0.383."""
    from layerwise.train.optim import make_optimizer

    w = torch.nn.Parameter(torch.ones(()))
    optimizer = make_optimizer([w], TrainConfig(lr=0.1, momentum=0.9, weight_decay=0.0, nesterov=True))
    seen = []
    for _ in range(2):
        optimizer.zero_grad()
        (3 * w).backward()
        optimizer.step()
        seen.append(w.item())
    assert seen == pytest.approx([0.43, -0.383], abs=1e-6)
    with pytest.raises(LayerwiseError, match=r"train\.nesterov needs train\.momentum above 0"):
        TrainConfig(momentum=0.0, nesterov=True)


def test_with_both_off_the_loss_and_the_steps_are_todays_bit_for_bit():
    """label_smoothing=0 is the plain cross-entropy, and nesterov=False the plain SGD the paper presets always
    had, to the last bit (so the demo's documented numbers cannot move)."""
    from layerwise.models.staged import StagedNet
    from layerwise.stages import plan_stages
    from layerwise.train.optim import make_optimizer
    from layerwise.train.stage import StageModule

    torch.manual_seed(0)
    x, y = torch.randn(8, 6), torch.randint(0, 5, (8,))
    net = StagedNet([torch.nn.Identity()], [torch.nn.Linear(6, 5)])
    loss, _ = StageModule(net, plan_stages(1, "greedy")[0])(x, y)
    assert torch.equal(loss, torch.nn.functional.cross_entropy(net.heads[0](x), y))
    a = torch.nn.Parameter(torch.randn(7))
    b = torch.nn.Parameter(a.detach().clone())
    ours = make_optimizer([a], TrainConfig())
    plain = torch.optim.SGD([b], lr=0.1, momentum=0.9, weight_decay=5e-4)
    for _ in range(3):
        for p, opt in ((a, ours), (b, plain)):
            opt.zero_grad()
            (p**3).sum().backward()
            opt.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("schedule", "by_hand"),
    [  # lr 0.1, 2 epochs of 4 steps, W = round(0.5 x 4) = 2 warm-up steps, T = 8
        ("cosine", [0.05, 0.1, 0.1, 0.05 * (1 + math.cos(math.pi / 6)), 0.05 * (1 + math.cos(math.pi / 3)), 0.05,
                    0.05 * (1 + math.cos(2 * math.pi / 3)), 0.05 * (1 + math.cos(5 * math.pi / 6))]),
        ("triangle", [0.05, 0.1, 0.1, 0.1 * 5 / 6, 0.1 * 4 / 6, 0.05, 0.1 * 2 / 6, 0.1 / 6]),
    ],
)  # fmt: skip
def test_the_per_step_schedules_worked_out_by_hand(schedule, by_hand):
    from layerwise.train.schedule import lr_at_step

    cfg = TrainConfig(lr=0.1, epochs_per_block=2, schedule=schedule, warmup_epochs=0.5)
    assert [lr_at_step(cfg, t // 4, t % 4, 4) for t in range(8)] == pytest.approx(by_hand, rel=1e-12)
    assert lr_at_step(cfg, 1, 9, 4) == pytest.approx(by_hand[-1])  # past the stage's last step: its rate


def test_a_per_step_schedule_sets_each_steps_rate_and_the_step_schedule_each_epochs():
    """The rate SGD holds at each of an epoch's 4 steps, read inside the step."""
    from layerwise.device import Precision
    from layerwise.models import build_model
    from layerwise.stages import plan_stages
    from layerwise.train.loop import StageTraining, train_epoch
    from layerwise.train.schedule import lr_at_step

    class FourBatches:
        offset, device = 0, torch.device("cpu")

        def __len__(self):
            return 4

        def global_batch(self, i):
            return 2

        def batches(self, seed=0, epoch=0):
            g = torch.Generator().manual_seed(epoch)
            for _ in range(4):
                yield torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 1])

    def rates(cfg: TrainConfig) -> list[float]:
        net = build_model(load_preset("demo").model, 3)
        training = StageTraining(
            net, plan_stages(net.J, "greedy")[0], RunConfig(train=cfg), Precision(torch.device("cpu"), False)
        )
        seen, real = [], training.step
        training.step = lambda *a, **k: seen.append(training.optimizer.param_groups[0]["lr"]) or real(*a, **k)
        for epoch in range(3):
            first = training.start_epoch(epoch, steps=4)
            train_epoch(training, FourBatches(), seed=0, epoch=epoch)
            assert first == seen[4 * epoch]  # the metrics line's rate: the epoch's first step's
        return seen

    cosine = TrainConfig(lr=0.1, epochs_per_block=3, schedule="cosine")
    seen = rates(cosine)
    assert seen == pytest.approx([lr_at_step(cosine, t // 4, t % 4, 4) for t in range(12)])
    assert seen[0] == 0.1 and all(a > b for a, b in itertools.pairwise(seen))  # falls at every step
    assert (
        rates(TrainConfig(lr=0.1, epochs_per_block=3, lr_step=1, lr_gamma=0.5)) == [0.1] * 4 + [0.05] * 4 + [0.025] * 4
    )


class RowHead(torch.nn.Module):
    """One head whose logits are the image's single row of 3 pixels weighted 1, 2, 3: z = (a, 2b, 3c)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, upto, heads):
        self.calls.append(len(x))
        return [x[:, 0, 0, :] * torch.tensor([1.0, 2.0, 3.0])]


class OneRow:
    device = torch.device("cpu")

    def batches(self):
        yield torch.tensor([[[[0.9, 0.5, 0.0]]], [[[0.0, 0.5, 0.9]]]]), torch.tensor([2, 2])


def test_test_time_flip_averages_each_heads_logits_over_the_image_and_its_mirror():
    """Image 0's row (0.9, 0.5, 0) scores (0.9, 1.0, 0) and its mirror (0, 0.5, 0.9) scores (0, 1.0, 2.7): the
    mean (0.45, 1.0, 1.35) answers class 2, the image alone class 1. Image 1 is image 0 mirrored: the same mean."""
    net = RowHead()
    plain = evaluate(net, OneRow(), [0])
    assert plain["blocks"][0]["top1"] == 50.0  # image 1 alone scores (0, 1.0, 2.7): class 2
    flipped = evaluate(net, OneRow(), [0], flip=True)
    assert flipped["blocks"][0]["top1"] == 100.0 and flipped["blocks"][0]["ensemble_top1"] == 100.0
    assert net.calls == [2, 4]  # one pass over the images and their mirrors together
    by_hand = cross_entropy_by_hand([0.45, 1.0, 1.35], 2)  # both images' mean logits
    assert flipped["loss"] == pytest.approx(by_hand, rel=1e-6)


@pytest.mark.parametrize(
    ("cy", "cx", "area"),
    [(4, 4, 16), (0, 0, 4), (7, 7, 9), (0, 5, 8), (3, 7, 12)],  # rows [cy-2, cy+2) and columns likewise, clipped
)
def test_cutout_zeroes_a_square_clipped_at_the_border(cy, cx, area):
    from layerwise.data.augment import cut_out

    x = torch.ones(1, 3, 8, 8)
    out = cut_out(x, 4, torch.tensor([cy]), torch.tensor([cx]))
    zero = out[0, 0] == 0
    assert int(zero.sum()) == area and torch.equal(out[0, 0], out[0, 2])  # every channel alike
    rows, cols = zero.nonzero().T.tolist() if area else ([], [])
    assert set(rows) == set(range(max(cy - 2, 0), min(cy + 2, 8))) and set(cols) == set(
        range(max(cx - 2, 0), min(cx + 2, 8))
    )


def test_cutout_draws_after_the_crops_and_flips_which_stay_as_they_were():
    """The epoch plan with cutout on has the same order, crops and flips as without: its centres come last."""
    from layerwise.data.augment import Augmentation

    plain = Augmentation((32, 32), padding=4).draw(50, torch.Generator().manual_seed(3))
    cut = Augmentation((32, 32), padding=4, cutout=8).draw(50, torch.Generator().manual_seed(3))
    assert torch.equal(plain.dy, cut.dy) and torch.equal(plain.dx, cut.dx) and torch.equal(plain.flip, cut.flip)
    assert plain.cy is None and cut.cy.min() >= 0 and cut.cy.max() < 32 and len(set(cut.cx.tolist())) > 10


def test_a_warm_up_never_fills_the_whole_stage_and_replays_keep_their_epochs_last_rate():
    from layerwise.train.schedule import lr_at_step

    cfg = TrainConfig(lr=0.1, epochs_per_block=2, schedule="triangle", warmup_epochs=1.99)  # W would round to T
    rates = [lr_at_step(cfg, t // 50, t % 50, 50) for t in range(100)]
    assert rates[0] == pytest.approx(0.1 / 99) and rates[98] == pytest.approx(0.1)  # W = T - 1 = 99 steps
    assert rates[99] == pytest.approx(0.1)  # the last step is the schedule's own (triangle: lr (T - t) / (T - W))
    cosine = TrainConfig(lr=0.1, epochs_per_block=2, schedule="cosine")
    assert lr_at_step(cosine, 0, 7, 4) == lr_at_step(cosine, 0, 3, 4) > lr_at_step(cosine, 1, 0, 4)


def test_the_weight_average_follows_tensorflows_rule_worked_out_by_hand():
    """decay 0.3: update 0 uses min(0.3, 1/10) = 0.1, update 1 min(0.3, 2/11) = 2/11, update 2 min(0.3, 3/12) =
    0.25, update 3 min(0.3, 4/13) = 0.3; the integer buffer is copied."""
    from layerwise.train.ema import WeightAverage

    module = torch.nn.BatchNorm1d(1)
    module.weight.data.fill_(0.0)
    average = WeightAverage(module, decay=0.3)
    expected = 0.0
    for t, (w, d) in enumerate(zip([1.0, 2.0, 3.0, 4.0], [0.1, 2 / 11, 0.25, 0.3], strict=True)):
        module.weight.data.fill_(w)
        module.num_batches_tracked.fill_(t + 1)
        assert average.rate() == pytest.approx(d)
        average.update()
        expected = d * expected + (1 - d) * w
    state = average.state_dict()
    assert state["updates"] == 4 and state["tensors"]["weight"].item() == pytest.approx(expected, rel=1e-6)
    assert state["tensors"]["num_batches_tracked"].item() == 4
    with average.in_module():  # the average in place for an evaluation, the weights back afterwards
        assert module.weight.item() == pytest.approx(expected, rel=1e-6)
    assert module.weight.item() == 4.0
    average.copy_to_module()
    assert module.weight.item() == pytest.approx(expected, rel=1e-6)


def test_the_similarity_matching_loss_worked_out_by_hand():
    """Rows (1, 0, -1) and (0, 1, -1) are centred already; normalised, their cosine is 1/2. One-hot labels 0 and 1
    of two classes centre to (1/2, -1/2) and (-1/2, 1/2): cosine -1. The loss is the mean of the squared
    differences (0, 1.5^2, 1.5^2, 0) = 1.125."""
    from layerwise.losses import similarities, similarity_loss

    rows = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, -1.0]])
    assert similarities(rows) == pytest.approx(torch.tensor([[1.0, 0.5], [0.5, 1.0]]), abs=1e-6)
    onehot = F.one_hot(torch.tensor([0, 1]), 2).float()
    assert similarity_loss(rows, onehot).item() == pytest.approx(1.125, rel=1e-6)
    # a feature map's rows are each channel's standard deviation over the positions: (1, 0, 2) and (0, 1, 2) here
    maps = torch.stack([torch.tensor([[1.0, -1.0], [0.0, 0.0], [2.0, -2.0]]), torch.tensor([[0.0, 0.0], [1.0, -1.0],
                        [2.0, -2.0]])]).mul(2**-0.5).view(2, 3, 1, 2)  # fmt: skip
    centred = torch.tensor([[0.0, -1.0, 1.0], [-1.0, 0.0, 1.0]])
    assert similarities(maps)[0, 1].item() == pytest.approx(float(F.cosine_similarity(*centred, dim=0)), rel=1e-5)


def test_mixup_blends_each_image_with_its_partner_and_the_targets_alike():
    """Image i is lam_i x image i + (1 - lam_i) x image partner(i), its target lam_i on its label and the rest on
    the partner's, with everything else of the plan as it was without mixing."""
    from layerwise.config import DataConfig
    from layerwise.data.augment import Augmentation
    from layerwise.data.loaders import Feed, MemoryLoader
    from layerwise.data.sources import Decoded

    images = torch.arange(4, dtype=torch.uint8).mul(60).view(4, 1, 1, 1).expand(4, 3, 2, 2).contiguous()
    data = Decoded(images, torch.tensor([0, 1, 2, 0]))
    cfg = DataConfig(crop_padding=0, mean=[0.0] * 3, std=[1.0] * 3, mix="mixup", mix_alpha=0.4)
    with pytest.raises(LayerwiseError, match=r"data\.mix needs the number of classes"):
        MemoryLoader(data, cfg, Feed(4, torch.device("cpu"), True))
    loader = MemoryLoader(data, cfg, Feed(4, torch.device("cpu"), True, classes=3))
    order, plan = loader.epoch_plan(2)
    g = torch.Generator().manual_seed(2)
    assert torch.equal(order, torch.randperm(4, generator=g))
    assert torch.equal(plan.flip, Augmentation((2, 2), padding=0).draw(4, g).flip)
    assert plan.partner.tolist() == [3, 2, 0, 1]  # this seed's partners: no image is its own
    idx = torch.arange(4)
    x, y = plan.view(loader.images, idx, loader.normalize), plan.targets(loader.labels, idx)
    for i in range(4):
        p, lam = int(plan.partner[i]), float(plan.lam[i])
        assert x[i, 0, 0, 0].item() == pytest.approx((lam * 60 * i + (1 - lam) * 60 * p) / 255, abs=1e-5)
        by_hand = torch.zeros(3)
        by_hand[int(data.labels[i])] += lam
        by_hand[int(data.labels[p])] += 1 - lam
        assert y[i] == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.parametrize(
    ("lam", "cy", "cx", "box", "share"),
    [  # 8 x 8 images: half-sides round(8 sqrt(1 - lam) / 2)
        (0.75, 4, 4, [2, 6, 2, 6], 0.75),  # sides 4: a 4 x 4 box inside, 16 of 64 pixels pasted
        (0.75, 0, 7, [0, 2, 5, 8], 58 / 64),  # clipped at the top and the right: 2 x 3 pasted
        (0.0, 3, 3, [0, 7, 0, 7], 15 / 64),  # sides 8 around (3, 3): rows and columns -1..7 clipped to 0..7
    ],
)
def test_cutmix_pastes_a_clipped_box_and_the_target_share_is_what_is_left(lam, cy, cx, box, share, monkeypatch):
    from layerwise.data import augment

    monkeypatch.setattr(torch.distributions.Beta, "sample", lambda self, shape: torch.full(shape, lam))
    g = torch.Generator().manual_seed(0)
    real = torch.randint
    centres = iter([torch.tensor([cy]), torch.tensor([cx])])
    monkeypatch.setattr(torch, "randint", lambda *a, **k: next(centres) if a[:2] == (0, 8) else real(*a, **k))
    _, share_drawn, drawn = augment.mixing(1, g, "cutmix", 1.0, (8, 8))
    assert drawn[0].tolist() == box and share_drawn.item() == pytest.approx(share)
    mask = augment.in_box(torch.Size([8, 8]), drawn)
    assert int(mask.sum()) == round((1 - share) * 64)


def test_block_epochs_give_each_greedy_block_its_own_and_a_whole_network_stage_their_sum():
    from layerwise.stages import plan_stages
    from layerwise.train.schedule import stage_epochs

    cfg = TrainConfig(block_epochs=[3, 1, 2], epochs_per_block=9)
    assert [stage_epochs(cfg, s) for s in plan_stages(3, "greedy")] == [3, 1, 2]
    assert stage_epochs(cfg, plan_stages(3, "e2e")[0]) == stage_epochs(cfg, plan_stages(3, "decoupled")[0]) == 6
    assert stage_epochs(TrainConfig(epochs_per_block=9), plan_stages(3, "greedy")[2]) == 9
    with pytest.raises(LayerwiseError, match="warmup_epochs must be below every stage's epochs"):
        TrainConfig(block_epochs=[3, 1, 2], schedule="cosine", warmup_epochs=1)


def test_alternating_flips_mirror_each_image_in_every_other_epoch_and_leave_the_rest_of_the_plan():
    """Image i is mirrored where i + epoch is odd: epoch 0 mirrors images 1 and 3, epoch 1 images 0 and 2; the
    order and crops are the random plan's."""
    from layerwise.config import DataConfig
    from layerwise.data.loaders import Feed, MemoryLoader
    from layerwise.data.sources import Decoded

    data = Decoded(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    alternate = MemoryLoader(data, DataConfig(flip="alternate"), Feed(4, torch.device("cpu"), True))
    plain = MemoryLoader(data, DataConfig(), Feed(4, torch.device("cpu"), True))
    for epoch, mirrored in [(0, [False, True, False, True]), (1, [True, False, True, False]), (2, [False, True,
                            False, True])]:  # fmt: skip
        (order, plan), (order_plain, plan_plain) = alternate.epoch_plan(7, epoch), plain.epoch_plan(7, epoch)
        assert plan.flip.tolist() == mirrored
        assert (
            torch.equal(order, order_plain)
            and torch.equal(plan.dy, plan_plain.dy)
            and torch.equal(plan.dx, plan_plain.dx)
        )


@pytest.mark.parametrize(
    ("epochs", "rates"),
    [  # lr 0.1, lr / 5 after 3 of epochs_per_block=4: decay k at round(k x 3 x E / 4), halves up
        (4, [0.1, 0.1, 0.1, 0.02]),  # the paper's: epoch 3
        (5, [0.1, 0.1, 0.1, 0.1, 0.02]),  # 3.75 -> 4
        (3, [0.1, 0.1, 0.02]),  # 2.25 -> 2
        (2, [0.1, 0.1]),  # 1.5 -> 2, past the stage's last epoch (1): no decay
        (12, [0.1] * 9 + [0.02] * 3),  # 9, as the end-to-end twin's lr_step=9
    ],
)
def test_the_step_schedule_stretches_to_a_stage_of_other_length(epochs, rates):
    from layerwise.train.schedule import lr_at

    cfg = TrainConfig(lr=0.1, epochs_per_block=4, lr_step=3, lr_gamma=0.2)
    assert [lr_at(cfg, e, epochs) for e in range(epochs)] == pytest.approx(rates)


def test_a_heads_whole_local_loss_with_every_term_on_worked_out_by_hand():
    """Label smoothing 0.2, mixed (soft) targets and the similarity term at weight 2, on two images of two classes.

    Image 0: logits (ln 3, 0), softmax (3/4, 1/4); target (0.6, 0.4), smoothed to 0.8 x target + 0.1 = (0.58, 0.42);
    cross-entropy -(0.58 ln 3/4 + 0.42 ln 1/4) = 0.749099. Image 1: logits (0, 0), softmax (1/2, 1/2): ln 2 =
    0.693147 for any target. Mean: 0.721123.
    Features (1, 0, -1) and (0, 1, -1): cosine 1/2. Targets (0.6, 0.4) and (1, 0) centre to (0.1, -0.1) and
    (0.5, -0.5): cosine 1. Squared differences (0, 1/4, 1/4, 0), mean 1/8, times 2: 0.25. Total 0.971123."""
    from layerwise.losses import Seen, local_losses

    (loss,) = local_losses(RunConfig(train=TrainConfig(label_smoothing=0.2, sim_loss=2.0)), 1)
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    targets = torch.tensor([[0.6, 0.4], [1.0, 0.0]])
    features = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, -1.0]])
    ce = (-(0.58 * math.log(0.75) + 0.42 * math.log(0.25)) + math.log(2.0)) / 2
    assert ce == pytest.approx(0.721123, abs=1e-6)
    assert loss(Seen(logits, targets, features)).item() == pytest.approx(ce + 2 * 0.125, rel=1e-6)
    assert loss(Seen(logits, targets, features)).item() == pytest.approx(0.971123, abs=1e-6)
    (plain,) = local_losses(RunConfig(), 1)  # the paper's: cross-entropy of labels alone, no other term
    assert plain(Seen(logits, torch.tensor([0, 0]))).item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)
