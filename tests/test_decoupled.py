"""Decoupled training (DGL): every block at once, each from its own head on the detached output of the block
before it. One block decoupled is greedy training of that block; no gradient crosses a block boundary; a
resumed run ends where an uninterrupted one does; every block's figures are in every metrics line."""

import copy

import torch
from conftest import tiny_overrides, whole_and_resumed
from torch.nn import functional as F

from layerwise.config import parse_assignment
from layerwise.delivered import evaluate_run
from layerwise.device import Precision
from layerwise.models import build_model
from layerwise.presets import resolve_config
from layerwise.rundir import RunDir, load_checkpoint
from layerwise.train import StageTraining, plan_stages, train
from layerwise.train.stage import StageModule

CPU = Precision(torch.device("cpu"), bf16=False)


def tiny_config(epochs=2, widths=(8, 8, 16), mode="decoupled", **extra):
    overrides = [parse_assignment(a) for a in tiny_overrides(epochs)]
    downsample = [2] if len(widths) > 2 else []
    overrides.append({"model": {"widths": list(widths), "downsample_at": downsample, "k": 2}})
    overrides.append({"train": {"mode": mode}})
    overrides.append(extra)
    return resolve_config("demo", None, overrides)


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s", "stage_name", "blocks")} for r in rows]


def test_plan_of_a_decoupled_run():
    (stage,) = plan_stages(3, "decoupled")
    assert (stage.first, stage.block, stage.loss_heads, stage.eval_heads, stage.frozen_heads) == (
        0, 2, (0, 1, 2), (0, 1, 2), (),
    )  # fmt: skip
    assert not stage.cacheable and not stage.finishes_block
    assert plan_stages(3, "greedy")[1].loss_heads == (1,) and plan_stages(3, "e2e")[0].loss_heads == (2,)


def test_one_block_decoupled_is_greedy_training_of_that_block(tmp_path, image_folder):
    """J = 1: the same batches, the same single loss, one optimizer over the same parameters in the same order."""
    greedy = train(tiny_config(widths=(8,), mode="greedy"), tmp_path / "greedy", image_folder)
    decoupled = train(tiny_config(widths=(8,)), tmp_path / "decoupled", image_folder)
    _, a, _ = load_checkpoint(RunDir(tmp_path / "greedy").final)
    _, b, _ = load_checkpoint(RunDir(tmp_path / "decoupled").final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert untimed(RunDir(tmp_path / "greedy").read_metrics()) == untimed(RunDir(tmp_path / "decoupled").read_metrics())
    assert greedy["final"] == decoupled["final"]


def test_no_gradient_crosses_a_block_boundary():
    """Head j's loss alone gives block j and head j their gradients, and nothing else: computed here on a copy
    of the network, block j fed the earlier blocks' train-mode output without autograd."""
    cfg = tiny_config()
    net = build_model(cfg.model, 3)
    (stage,) = plan_stages(net.J, "decoupled")
    reference = copy.deepcopy(net).train()
    module = StageModule(net, stage).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 3, (6,), generator=g)
    losses, logits = module(x, y)
    assert losses.shape == (3,) and logits.shape == (3, 6, 3)
    for j in range(net.J):  # head j's loss alone reaches block j and head j only (zeros: torch.stack's backward)
        net.zero_grad(set_to_none=True)
        losses[j].backward(retain_graph=True)
        trained = {id(p) for p in (*net.blocks[j].parameters(), *net.heads[j].parameters())}
        for p in net.parameters():
            assert (id(p) in trained) == (p.grad is not None and bool(p.grad.abs().sum() > 0))
    net.zero_grad(set_to_none=True)
    losses.sum().backward()  # what a step does: every block's gradient is its own head's, worked out apart
    for j in range(net.J):
        with torch.no_grad():
            h = x
            for block in copy.deepcopy(reference).blocks[:j]:  # a copy: BN statistics move once, as in `module`
                h = block(h)
        mine = copy.deepcopy(reference)
        F.cross_entropy(mine.heads[j](mine.blocks[j](h)), y).backward()
        for p, q in zip((*net.blocks[j].parameters(), *net.heads[j].parameters()),
                        (*mine.blocks[j].parameters(), *mine.heads[j].parameters()), strict=True):  # fmt: skip
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)
    # one step of the stage: the summed losses, each block with its own optimizer
    training = StageTraining(build_model(cfg.model, 3), stage, cfg, CPU)
    assert len(training.optimizer.optimizers) == 3 and set(training.optimizer.state_dict()["blocks"]) == {"0", "1", "2"}


def test_a_resumed_decoupled_run_ends_where_an_uninterrupted_one_does(tmp_path, image_folder):
    cfg = tiny_config(epochs=3)
    full, resumed, a, b = whole_and_resumed(cfg, tmp_path, image_folder)  # momentum in every optimizer
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final"] == full["final"]
    cut, whole = RunDir(tmp_path / "cut").read_metrics(), RunDir(tmp_path / "full").read_metrics()
    assert untimed(cut) == untimed(whole) and [r["blocks"] for r in cut] == [r["blocks"] for r in whole]


def test_every_metrics_line_carries_every_blocks_figures_and_eval_scores_every_head(tmp_path, image_folder):
    summary = train(tiny_config(epochs=2), tmp_path / "run", image_folder)
    rows = RunDir(tmp_path / "run").read_metrics()
    assert [(r["stage"], r["stage_name"], r["epoch"]) for r in rows] == [(0, "decoupled", 1), (0, "decoupled", 2)]
    for row in rows:
        assert [b["block"] for b in row["blocks"]] == [0, 1, 2]
        for b in row["blocks"]:
            assert set(b) == {"block", "lr", "loss", "train", "val", "train_eval"}
            assert set(b["val"]) == {"top1", "top5", "ensemble_top1", "ensemble_top5", "loss"}
            assert b["lr"] == row["lr"]
        assert row["blocks"][-1]["val"] == row["val"] and row["blocks"][-1]["loss"] == row["loss"]
        assert row["blocks"][0]["val"]["ensemble_top1"] == row["blocks"][0]["val"]["top1"]  # one head: itself
    last = rows[-1]["blocks"]
    assert [b["block"] for b in summary["blocks"]] == [0, 1, 2]
    assert [b["val_top1"] for b in summary["blocks"]] == [b["val"]["top1"] for b in last]
    assert summary["mode"] == "decoupled" and not RunDir(tmp_path / "run").block(0).exists()
    # eval scores every head of the delivered network, from final.pt, as for any run
    result = evaluate_run(tmp_path / "run", image_folder, device="cpu")
    assert sorted(result["blocks"]) == [0, 1, 2] and not result["flip"]
    assert evaluate_run(tmp_path / "run", image_folder, device="cpu", flip=True)["flip"]
    recorded = RunDir(tmp_path / "run").read_evals()  # the flipped evaluation beside the plain one
    assert sorted(recorded) == [str(image_folder.resolve()), f"{image_folder.resolve()} (flip)"]


def test_each_block_draws_its_own_random_stream_whatever_runs_beside_it():
    """Dropout in block 1's head draws the same masks whether block 0 runs before it in the same process or not:
    the streams are per block (seeded by epoch, block and replica), not per process."""
    from layerwise.train.stage import BlockRandomness

    def masks(order: list[int]) -> dict[int, torch.Tensor]:
        streams, out = BlockRandomness(seed=5, device=torch.device("cpu")), {}
        for j in order:
            with streams.block(j):
                out[j] = torch.rand(4)
        return out

    both, alone = masks([0, 1, 0, 1]), masks([1, 1])
    assert torch.equal(both[1], alone[1])
    assert not torch.equal(masks([0])[0], alone[1])
    before = torch.get_rng_state()
    masks([0, 1])
    assert torch.equal(torch.get_rng_state(), before)  # the process's own stream is left as it was
