"""Training: Algorithm 1 freezes earlier blocks, runs resume exactly, NaN losses stop cleanly."""

import copy
import json
import math
import time
from unittest.mock import ANY

import pytest
import torch
from conftest import Interrupt, tiny_overrides, train_until_interrupted

from layerwise.config import parse_assignment
from layerwise.data import build_data
from layerwise.device import Precision
from layerwise.distributed import Replicas
from layerwise.errors import LayerwiseError
from layerwise.evaluate import ensemble_scores, evaluate
from layerwise.models import build_model
from layerwise.presets import resolve_config
from layerwise.rundir import RunDir, load_checkpoint
from layerwise.stages import module_bytes, place_for, resident_modules
from layerwise.train import StageTraining, plan_stages, train, train_epoch


def tiny_config(epochs=2, **extra):
    tiny, recipe = tiny_overrides(epochs), extra.get("train", {})
    if recipe.get("block_epochs") and recipe.get("schedule", "step") != "step":  # epochs_per_block would do nothing
        tiny = [a for a in tiny if not a.startswith("train.epochs_per_block=")]
    overrides = [parse_assignment(a) for a in tiny]
    overrides.append({"model": {"widths": [8, 8, 16], "downsample_at": [2], "k": 2}})
    overrides.append(extra)
    return resolve_config("demo", None, overrides)


def test_greedy_stage_leaves_earlier_blocks_untouched(image_folder):
    cfg = tiny_config()
    net = build_model(cfg.model, 3)
    data = build_data(cfg.data, image_folder, 8, torch.device("cpu"))
    stages = plan_stages(net.J, "greedy")
    # train block 0 a little so its BN statistics are not the defaults
    cpu = Precision(torch.device("cpu"), bf16=False)
    train_epoch(StageTraining(net, stages[0], cfg, cpu), data.train, seed=0)
    before = copy.deepcopy(net.state_dict())
    train_epoch(StageTraining(net, stages[1], cfg, cpu), data.train, seed=1)
    after = net.state_dict()
    frozen = [k for k in before if k.startswith(("blocks.0.", "heads.0.", "blocks.2.", "heads.2."))]
    trained = [k for k in before if k.startswith(("blocks.1.", "heads.1.")) and before[k].is_floating_point()]
    assert any("running_mean" in k for k in frozen)
    assert all(torch.equal(before[k], after[k]) for k in frozen)
    assert all(not torch.equal(before[k], after[k]) for k in trained if "num_batches" not in k)
    assert all(p.grad is None for p in net.blocks[0].parameters())


def test_plan_stages():
    greedy = plan_stages(3, "greedy")
    assert [(s.index, s.first, s.block, s.eval_heads) for s in greedy] == [
        (0, 0, 0, (0,)),
        (1, 1, 1, (0, 1)),
        (2, 2, 2, (0, 1, 2)),
    ]
    assert [s.frozen_heads for s in greedy] == [(), (0,), (0, 1)]
    assert [(s.cacheable, s.finishes_block) for s in greedy] == [(False, True), (True, True), (True, True)]
    (e2e,) = plan_stages(3, "e2e")
    assert (e2e.first, e2e.block, e2e.eval_heads, e2e.frozen_heads) == (0, 2, (2,), ())
    assert not e2e.cacheable and not e2e.finishes_block


def devices(module) -> set[str]:
    return {t.device.type for t in (*module.parameters(), *module.buffers())}


def test_a_stage_keeps_only_what_it_runs_on_the_device():
    """place_for, with the meta device standing in for a GPU: greedy stage 1 needs blocks and heads 0-1 (head 0
    for the ensemble); end to end needs every block and the last head, not the auxiliary ones."""
    meta = torch.device("meta")
    net = build_model(tiny_config().model, 3).to(memory_format=torch.channels_last)
    place_for(net, plan_stages(net.J, "greedy")[1], meta)
    assert [devices(b) for b in net.blocks] == [{"meta"}, {"meta"}, {"cpu"}]
    assert [devices(h) for h in net.heads] == [{"meta"}, {"meta"}, {"cpu"}]
    assert net.blocks[1][0].weight.is_contiguous(memory_format=torch.channels_last)  # moves keep the layout
    later = module_bytes(resident_modules(net, plan_stages(net.J, "greedy")[2]), off=meta)
    assert later == module_bytes(net.blocks[2]) + module_bytes(net.heads[2]) > 0  # what stage 2 will bring

    net = build_model(tiny_config().model, 3)
    place_for(net, plan_stages(net.J, "e2e")[0], meta)
    assert [devices(b) for b in net.blocks] == [{"meta"}] * 3
    assert [devices(h) for h in net.heads] == [{"cpu"}, {"cpu"}, {"meta"}]


def test_ensemble_weights_later_heads_more():
    z0 = torch.tensor([[1.0, 0.0]])
    z1 = torch.tensor([[0.0, 0.6]])
    e0, e1 = ensemble_scores([z0, z1])
    assert torch.equal(e0, z0)
    assert torch.allclose(e1, (z0 + 2 * z1) / 2)  # Z = sum_j 2^j z_j, scaled


@pytest.mark.parametrize("kind", ["logits", "softmax"])
def test_evaluation_reuses_the_frozen_heads_scores_and_gives_the_same_numbers(image_folder, kind):
    """Within greedy stage 2, heads 0-1 are frozen: after the first evaluation only head 2 runs, and every
    head's and ensemble's numbers stay exactly those of a full evaluation, also after head 2 has changed."""
    cfg = tiny_config()
    net = build_model(cfg.model, 3)
    val = build_data(cfg.data, image_folder, 8, torch.device("cpu")).val
    calls = []
    net.heads[0].register_forward_hook(lambda *_: calls.append(0))
    memo = {}
    first = evaluate(net, val, [0, 1, 2], kind, memo=memo)
    assert first == evaluate(net, val, [0, 1, 2], kind) and calls
    with torch.no_grad():  # the stage trains block 2 and head 2
        for p in (*net.blocks[2].parameters(), *net.heads[2].parameters()):
            p.add_(0.5 * torch.randn_like(p))
    calls.clear()
    again = evaluate(net, val, [0, 1, 2], kind, memo=memo)
    assert not calls  # head 0 did not run
    assert again == evaluate(net, val, [0, 1, 2], kind) != first


@pytest.mark.parametrize(
    "extra",
    [{}, {"train": {"ema": 0.9, "sim_loss": 0.5, "block_epochs": [2, 2, 1], "schedule": "cosine"},
          "data": {"mix": "cutmix"}}],
    ids=["paper", "ema-sim-cutmix-block-epochs"],
)  # fmt: skip
def test_resume_ends_with_identical_weights(tmp_path, image_folder, extra):
    """Stopped mid-stage and resumed, a run ends where an uninterrupted one does: with train.ema the checkpoint
    carries the average beside the weights."""
    cfg = tiny_config(epochs=2, **extra)
    full = train(cfg, tmp_path / "full", image_folder)
    train_until_interrupted(cfg, tmp_path / "cut", image_folder)  # block 1, epoch 1: mid-stage, with momentum
    resumed = train(cfg, tmp_path / "cut", image_folder, resume=True)
    _, a, _ = load_checkpoint(RunDir(tmp_path / "full").final)
    _, b, _ = load_checkpoint(RunDir(tmp_path / "cut").final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final"] == full["final"]
    rows = RunDir(tmp_path / "cut").read_metrics()
    epochs = cfg.train.block_epochs or [2, 2, 2]
    assert [(r["stage"], r["epoch"]) for r in rows] == [(s, e + 1) for s in range(3) for e in range(epochs[s])]

    def untimed(rows):  # block 1's second epoch: a fresh evaluation memo when resumed, a reused one when not
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]

    assert untimed(rows) == untimed(RunDir(tmp_path / "full").read_metrics())


def test_an_unfinished_run_with_a_weight_average_delivers_the_average(tmp_path, image_folder):
    """Mid-stage, last.pt holds the raw weights and, under its own key, the average under the network's names;
    eval, export and predict (load_delivered) use the average, which the epoch's metrics line scored."""
    from layerwise.delivered import load_delivered

    cfg = tiny_config(epochs=2, train={"ema": 0.9})
    seen = train_until_interrupted(cfg, tmp_path / "run", image_folder)
    payload = torch.load(RunDir(tmp_path / "run").last, weights_only=True)
    assert {"model", "optimizer", "average"} <= payload.keys() and "average" not in payload["optimizer"]
    raw, average = payload["model"], payload["average"]["tensors"]
    assert sorted({k.split(".")[1] for k in average}) == ["1"] and "blocks.1.0.weight" in average  # block 1's stage
    assert not torch.equal(average["blocks.1.0.weight"], raw["blocks.1.0.weight"])
    net = load_delivered(tmp_path / "run", Precision(torch.device("cpu"), bf16=False)).net
    state = net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in average.items())
    assert torch.equal(state["blocks.0.0.weight"], raw["blocks.0.0.weight"])  # the finished block as saved
    data = build_data(cfg.data, image_folder, 8, torch.device("cpu"))
    scored = evaluate(net.eval(), data.val, [0, 1])
    assert scored["blocks"][1]["top1"] == seen[2]["val"]["top1"]


def test_a_checkpoint_with_the_average_inside_the_optimizer_state_still_resumes(tmp_path, image_folder):
    """Before 2026-12-07 train.ema's average was saved inside the optimizer's state: such a last.pt resumes to
    the same end as an uninterrupted run."""
    cfg = tiny_config(epochs=2, train={"ema": 0.9})
    train(cfg, tmp_path / "full", image_folder)
    train_until_interrupted(cfg, tmp_path / "cut", image_folder)
    last = RunDir(tmp_path / "cut").last
    payload = torch.load(last, weights_only=True)
    payload["optimizer"] = {**payload["optimizer"], "average": payload.pop("average")}  # the older layout
    torch.save(payload, last)
    train(cfg, tmp_path / "cut", image_folder, resume=True)
    _, a, _ = load_checkpoint(RunDir(tmp_path / "full").final)
    _, b, _ = load_checkpoint(RunDir(tmp_path / "cut").final)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_directory_contents(tmp_path, image_folder):
    summary = train(tiny_config(epochs=1), tmp_path / "run", image_folder)
    run = RunDir(tmp_path / "run")
    assert json.loads(run.classes.read_text()) == ["cat", "dog", "ship"]
    assert all(run.block(j).is_file() for j in range(3)) and run.last.is_file() and run.final.is_file()
    row = run.read_metrics()[-1]
    for key in ("block", "epoch", "loss", "lr", "images_per_s", "seconds"):
        assert key in row
    assert set(row["val"]) >= {"top1", "top5", "ensemble_top1", "ensemble_top5"}
    assert set(row["train"]) == {"top1", "top5"} and "ensemble_top1" in row["train_eval"]
    assert [b["block"] for b in summary["blocks"]] == [0, 1, 2]
    assert summary["wall_seconds_this_session"] >= summary["train_seconds"]  # evaluation and set-up as well
    assert json.loads(run.summary.read_text())["final"] == summary["final"]
    payload = torch.load(run.final, weights_only=True)  # plain tensors, no pickled objects
    assert isinstance(payload["meta"], str)


def test_e2e_trains_every_block_and_the_last_head(tmp_path, image_folder):
    summary = train(tiny_config(epochs=1, train={"mode": "e2e"}), tmp_path / "e2e", image_folder)
    assert [b["stage"] for b in summary["blocks"]] == ["e2e"]
    assert not RunDir(tmp_path / "e2e").block(0).exists()


def spoil_loss_after_first_epoch(monkeypatch, spoil) -> dict:
    """Make the stages' loss spoil(loss) once the returned switch's "on" is set (by on_epoch_end)."""
    from layerwise import losses

    switch = {"on": False}
    real = losses.F.cross_entropy

    class FakeF:
        @staticmethod
        def cross_entropy(logits, y, **options):
            loss = real(logits, y, **options)
            return spoil(loss) if switch["on"] else loss

    monkeypatch.setattr(losses, "F", FakeF)
    return switch


def test_nan_loss_stops_and_keeps_checkpoints(tmp_path, image_folder, monkeypatch):
    poisoned = spoil_loss_after_first_epoch(monkeypatch, lambda loss: loss * float("nan"))
    with pytest.raises(
        LayerwiseError, match=r"block 0.s training loss became non-finite at step \d+ of epoch 2"
    ) as info:
        train(tiny_config(epochs=3), tmp_path / "run", image_folder, on_epoch_end=lambda row: poisoned.update(on=True))
    assert "\n" not in str(info.value)
    meta, _, _ = load_checkpoint(RunDir(tmp_path / "run").last)
    assert (meta["stage"], meta["epoch"]) == (0, 1)


def test_a_diverging_loss_stops_at_its_epoch_and_the_last_good_checkpoint_loads(tmp_path, image_folder, monkeypatch):
    """Fine for an epoch, then the loss reads 1000x what it is (the gradient unchanged): the running mean passes
    divergence_factor x ln(3 classes), the stage stops in epoch 2, and epoch 1's checkpoint is the last."""
    inflated = spoil_loss_after_first_epoch(monkeypatch, lambda loss: loss + 999 * loss.detach())
    with pytest.raises(
        LayerwiseError, match=r"block 0.s training loss diverged: its mean .* above .* at step \d+ of epoch 2"
    ) as info:
        train(tiny_config(epochs=3), tmp_path / "run", image_folder, on_epoch_end=lambda row: inflated.update(on=True))
    assert "\n" not in str(info.value) and "lower --lr or raise --batch-size" in str(info.value)
    meta, state, _ = load_checkpoint(RunDir(tmp_path / "run").last)
    assert (meta["stage"], meta["epoch"]) == (0, 1) and all(torch.isfinite(v).all() for v in state.values())
    inflated["on"] = False
    train(
        tiny_config(epochs=3, train={"divergence_factor": 0.0}),
        tmp_path / "off",
        image_folder,
        on_epoch_end=lambda row: inflated.update(on=True),
    )  # fmt: skip - the check off: the run goes on


def test_out_of_memory_in_a_step_is_one_line_and_keeps_the_last_checkpoint(tmp_path, image_folder, monkeypatch):
    from layerwise.train import loop

    real, short = loop.StageTraining.step, {"on": False}

    def step(self, *args, **kwargs):
        if short["on"]:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(loop.StageTraining, "step", step)
    with pytest.raises(LayerwiseError, match=r"out of memory on cpu in block 0, epoch 2, at 16 images per step") as e:
        train(tiny_config(epochs=3), tmp_path / "run", image_folder, on_epoch_end=lambda row: short.update(on=True))
    assert "recompute_activations" in str(e.value) and "\n" not in str(e.value)
    meta, _, _ = load_checkpoint(RunDir(tmp_path / "run").last)
    assert (meta["stage"], meta["epoch"]) == (0, 1)


def test_the_loss_watch_flags_a_mean_far_above_the_starting_level_and_non_finite_losses():
    from layerwise.train.divergence import DIVERGENCE_WINDOW, Diverged, LossWatch

    cpu = torch.device("cpu")
    watch = LossWatch(10.0, cpu)
    for value in [1.0, 2.0, 3.0]:  # the first window sets the level, never below ln(10) = 2.303
        watch.add(torch.tensor(value), 10)
    watch.check()
    assert watch.level == pytest.approx(math.log(10))
    spiky = LossWatch(10.0, cpu)
    for value in [2.0, 400.0, 6.0]:  # early spikes raise the level instead of stopping the run
        spiky.add(torch.tensor(value), 10)
    spiky.check()
    assert spiky.level == pytest.approx(136.0)
    later = LossWatch(10.0, cpu, level=2.0)  # a later epoch of the stage, or a resumed one
    for value in [19.0, 21.0]:  # a mean of 20: at the limit, not above it
        later.add(torch.tensor(value), 10)
    later.check()
    later.add(torch.tensor(23.0), 10)  # the mean of the three: 21
    with pytest.raises(Diverged) as info:
        later.check()
    assert info.value.mean == pytest.approx(21.0) and info.value.limit == pytest.approx(20.0)
    window = LossWatch(10.0, cpu, level=2.0)
    for value in [40.0] * DIVERGENCE_WINDOW + [1.0] * DIVERGENCE_WINDOW:  # the old values leave the window
        window.add(torch.tensor(value), 10)
    window.check()
    window.add(torch.tensor(float("inf")), 10)
    window.add(torch.tensor(1.0), 10)
    with pytest.raises(Diverged):  # a non-finite loss counts even once it has left the mean
        window.check()
    off = LossWatch(0.0, cpu, level=2.0)
    off.add(torch.tensor(1e30), 10)
    off.check()


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_it_resumes(tmp_path, image_folder, monkeypatch):
    """Checkpoints are written in the background; a failed write still stops the run with one line, and the
    checkpoints written before it are intact."""
    from layerwise.train import checkpoint

    real, calls = checkpoint.torch.save, {"n": 0}

    def full_disk_on_the_second_save(obj, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("PytorchStreamWriter failed writing file: No space left on device")
        real(obj, path)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk_on_the_second_save)
    with pytest.raises(
        LayerwiseError,
        match=r"could not write .*last\.pt \(the disk is full or over quota\); free disk space.*--resume",
    ) as info:
        train(tiny_config(epochs=3), tmp_path / "run", image_folder)
    assert "\n" not in str(info.value)
    meta, _, _ = load_checkpoint(RunDir(tmp_path / "run").last)
    assert (meta["stage"], meta["epoch"]) == (0, 1)
    monkeypatch.setattr(checkpoint.torch, "save", real)
    summary = train(tiny_config(epochs=3), tmp_path / "run", image_folder, resume=True)
    assert [b["block"] for b in summary["blocks"]] == [0, 1, 2]


def test_the_background_writer_keeps_order_waits_on_exit_and_reports_errors(tmp_path):
    import time

    from layerwise.train.checkpoint import BackgroundWriter

    done = []
    with BackgroundWriter() as writer:
        writer.submit(lambda: (time.sleep(0.2), done.append(1)))
        writer.submit(lambda: done.append(2))
    assert done == [1, 2]  # in order, and finished when the block is left

    def fail():
        raise LayerwiseError("could not write x")

    with pytest.raises(LayerwiseError, match="could not write x"), BackgroundWriter() as writer:
        writer.submit(fail)
    with pytest.raises(KeyError), BackgroundWriter() as writer:  # the run's own error wins over the writer's
        writer.submit(fail)
        raise KeyError("interrupted")


def test_refuses_a_folder_holding_another_run(tmp_path, image_folder):
    train(tiny_config(epochs=1), tmp_path / "run", image_folder)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(LayerwiseError, match="already holds a run"):
        train(tiny_config(epochs=1), tmp_path / "run", image_folder)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before


def test_resume_refuses_a_changed_config(tmp_path, image_folder):
    train(tiny_config(epochs=1), tmp_path / "run", image_folder)
    with pytest.raises(LayerwiseError, match=r"train\.lr is 0\.5"):
        train(tiny_config(epochs=1, train={"lr": 0.5}), tmp_path / "run", image_folder, resume=True)


def test_cuda_request_without_gpu_is_an_error(tmp_path, image_folder):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(LayerwiseError, match="no CUDA GPU"):
        train(tiny_config(epochs=1, train={"device": "cuda"}), tmp_path / "run", image_folder)
    assert not (tmp_path / "run").exists()


def test_resume_without_data_uses_the_runs_data(tmp_path, image_folder):
    cfg = tiny_config(epochs=1)

    def stop(row):
        raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "run", image_folder, on_epoch_end=stop)
    train(cfg, tmp_path / "run", None, resume=True)  # no data given: the run's own folder, not the sample
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert info["data_path"] == str(image_folder.resolve())


def test_resume_after_losing_last_checkpoint_continues_after_the_last_block(tmp_path, image_folder):
    cfg = tiny_config(epochs=1)
    seen = []

    def stop_in_block_2(row):
        seen.append(row)
        if row["block"] == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train(cfg, tmp_path / "run", image_folder, on_epoch_end=stop_in_block_2)
    run = RunDir(tmp_path / "run")
    block1 = run.block(1).read_bytes()
    run.last.unlink()
    with open(run.metrics, "a") as f:
        f.write('{"stage": 2, "epo')  # a line cut short by a crash
    summary = train(cfg, tmp_path / "run", image_folder, resume=True)
    assert run.block(1).read_bytes() == block1  # finished blocks are not retrained
    assert [r["stage"] for r in run.read_metrics()] == [0, 1, 2]
    assert len(summary["blocks"]) == 3


def test_model_that_cannot_take_the_image_size_fails_before_writing(tmp_path, image_folder):
    cfg = tiny_config(model={"widths": [4, 4, 4, 4, 4, 4], "downsample_at": [0, 1, 2, 3, 4, 5]})
    with pytest.raises(LayerwiseError, match="cannot be built or run on 3x32x32 inputs"):
        train(cfg, tmp_path / "run", image_folder)
    assert not (tmp_path / "run").exists()


def test_resume_of_a_finished_run_does_not_retrain(tmp_path, image_folder):
    cfg = tiny_config(epochs=1, train={"mode": "e2e"})
    first = train(cfg, tmp_path / "run", image_folder)
    run = RunDir(tmp_path / "run")
    final = run.final.read_bytes()
    run.last.unlink()
    again = train(cfg, tmp_path / "run", image_folder, resume=True)
    assert run.final.read_bytes() == final and again["final"] == first["final"]
    assert len(run.read_metrics()) == 1


def test_each_stage_compiles_its_step_in_the_configured_mode(tmp_path, image_folder, monkeypatch):
    modes = []
    monkeypatch.setattr(torch, "compile", lambda model, mode: modes.append(mode) or model)
    train(tiny_config(epochs=1, train={"compile": "reduce-overhead"}), tmp_path / "run", image_folder)
    assert modes == ["reduce-overhead"] * 3


def test_a_failing_compile_is_a_one_line_error_and_the_run_can_go_on_without_it(tmp_path, image_folder, monkeypatch):
    from torch._dynamo.exc import Unsupported

    def broken(x, y):
        raise Unsupported("no compiler here\nmore details")

    monkeypatch.setattr(torch, "compile", lambda model, mode: broken)
    with pytest.raises(LayerwiseError, match=r"train.compile=default failed in block 0 \(no compiler here\)") as e:
        train(tiny_config(epochs=1, train={"compile": "default"}), tmp_path / "run", image_folder)
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    summary = train(tiny_config(epochs=1), tmp_path / "run", image_folder, resume=True)
    assert len(summary["blocks"]) == 3


@pytest.mark.parametrize("precision, expected", [("auto", False), ("fp32", False), ("bf16", True)])
def test_the_cpu_runs_channels_last_under_bf16_only(precision, expected):
    from layerwise.device import precision_for
    from layerwise.network import checked_model

    net = checked_model(tiny_config(train={"precision": precision}), 4, precision_for(torch.device("cpu"), precision))
    weight = net.blocks[0][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) == expected


def test_without_validation_the_run_trains_on_every_image_and_says_its_figures_are_training_ones(
    tmp_path, image_folder
):
    summary = train(tiny_config(epochs=1, data={"val_size": 0}), tmp_path / "run", image_folder)
    run = RunDir(tmp_path / "run")
    assert "no validation" in json.loads(run.info.read_text())["data_description"]
    rows = run.read_metrics()
    assert all("val" not in r and "train_eval" in r for r in rows)
    names = ("top1", "top5", "ensemble_top1", "ensemble_top5")
    assert summary["final"] == {f"train_eval_{k}": rows[-1]["train_eval"][k] for k in names}
    assert "train_eval" in summary["no_validation"]
    from layerwise.train.metrics import summary_table

    assert "no validation" in summary_table(summary)


def test_val_data_replaces_the_held_out_split_and_maps_classes_by_name(tmp_path, image_folder):
    """--val-data (data.val_path): scored every epoch instead of holding images out; here a folder with two of
    the run's three classes, in another order, so its labels must be mapped by name."""
    from conftest import write_folder

    from layerwise.delivered import evaluate_run

    other = write_folder(tmp_path / "other", per_class=3, classes=["ship", "cat"], seed=5)
    cfg = tiny_config(epochs=1, data={"val_size": 0, "val_path": str(other)})
    train(cfg, tmp_path / "run", image_folder)
    run = RunDir(tmp_path / "run")
    assert "validation on" in json.loads(run.info.read_text())["data_description"]
    last = run.read_metrics()[-1]
    scored = evaluate_run(tmp_path / "run", other, device="cpu")
    assert scored["n"] == 6
    assert last["val"]["top1"] == pytest.approx(scored["blocks"][2]["top1"])
    assert last["val"]["ensemble_top1"] == pytest.approx(scored["blocks"][2]["ensemble_top1"])


def test_val_data_replaces_a_sources_own_val_folder(imagenet_folder, tmp_path):
    from conftest import write_folder

    from layerwise.config import DataConfig

    other = write_folder(tmp_path / "other", per_class=1, size=48, fmt="png")
    cfg = DataConfig(augment="imagenet", image_size=32, resize_size=40, workers=0)
    cpu = torch.device("cpu")
    assert build_data(cfg, imagenet_folder, 4, cpu).val_images == 6  # its own val/ folder
    cfg.val_path = str(other)
    assert build_data(cfg, imagenet_folder, 4, cpu).val_images == 3


def test_adaptive_depth_stops_at_the_first_block_that_does_not_pay_and_delivers_the_ones_before(tmp_path, image_folder):
    """train.min_gain: with a gain no block can reach, the run stops after block 1 and delivers block 0 alone;
    block 2 never trains, the summary and final.pt say why and what, eval scores head 0 only, and a resumed
    run keeps the decision."""
    from layerwise.delivered import evaluate_run

    cfg = tiny_config(epochs=1, train={"min_gain": 101.0})
    summary = train(cfg, tmp_path / "run", image_folder)
    run = RunDir(tmp_path / "run")
    rows = run.read_metrics()
    assert [r["stage"] for r in rows] == [0, 1]
    decision = summary["adaptive_depth"]
    assert decision["blocks_delivered"] == 1 and "less than train.min_gain=101" in decision["reason"]
    assert summary["final"]["val_top1"] == rows[0]["val"]["top1"]  # block 0's head, not block 1's
    net = build_model(cfg.model, 3)
    assert summary["params_final"] == sum(p.numel() for m in (net.blocks[0], net.heads[0]) for p in m.parameters())
    meta, _, _ = load_checkpoint(run.final)
    assert meta["blocks_trained"] == 1 and not run.block(2).exists()
    assert list(evaluate_run(tmp_path / "run", image_folder, device="cpu")["blocks"]) == [0]
    assert train(cfg, tmp_path / "run", image_folder, resume=True) == {**summary, "wall_seconds_this_session": ANY}
    assert [r["stage"] for r in run.read_metrics()] == [0, 1]


def test_adaptive_depth_trains_every_block_that_pays(tmp_path, image_folder):
    summary = train(tiny_config(epochs=1, train={"min_gain": -101.0}), tmp_path / "run", image_folder)
    assert "adaptive_depth" not in summary and [b["block"] for b in summary["blocks"]] == [0, 1, 2]


def test_adaptive_depth_needs_validation(tmp_path, image_folder):
    with pytest.raises(LayerwiseError, match=r"train\.min_gain compares the blocks' validation top-1"):
        train(tiny_config(epochs=1, train={"min_gain": 1.0}, data={"val_size": 0}), tmp_path / "run", image_folder)
    assert not (tmp_path / "run").exists()
    with pytest.raises(LayerwiseError, match=r"needs train\.mode=greedy"):
        tiny_config(train={"min_gain": 1.0, "mode": "e2e"})


def test_end_to_end_trains_every_block_and_the_last_head_and_leaves_the_other_heads_alone(image_folder):
    from layerwise.device import Precision

    cfg = tiny_config()
    torch.manual_seed(0)
    net = build_model(cfg.model, 3)
    before = copy.deepcopy(net.state_dict())
    data = build_data(cfg.data, image_folder, 8, torch.device("cpu"))
    (stage,) = plan_stages(net.J, "e2e")
    training = StageTraining(net, stage, cfg, Precision(torch.device("cpu"), bf16=False))
    train_epoch(training, data.train, seed=0)
    after = net.state_dict()

    def moved(prefix: str, buffers: bool) -> set[bool]:
        keys = [k for k in before if k.startswith(prefix) and ("running" in k) == buffers]
        assert keys
        return {not torch.equal(before[k], after[k]) for k in keys}

    for j in range(net.J):  # every block's weights and BN statistics
        assert moved(f"blocks.{j}.", buffers=False) == {True} and moved(f"blocks.{j}.", buffers=True) == {True}
    assert moved("heads.2.", buffers=False) == {True} and moved("heads.2.", buffers=True) == {True}
    for j in (0, 1):  # the auxiliary heads neither learn nor update their statistics
        assert moved(f"heads.{j}.", buffers=False) == {False} and moved(f"heads.{j}.", buffers=True) == {False}
    assert stage.eval_heads == (2,)  # only the last head is scored


def test_an_epochs_figures_are_means_over_its_images_worked_out_from_its_steps(image_folder, monkeypatch):
    """train_epoch's loss, top-1 and top-5 against sums kept here in Python floats, step by step."""
    import layerwise.train.loop as loop

    cfg = tiny_config()
    torch.manual_seed(0)
    net = build_model(cfg.model, 3)
    data = build_data(cfg.data, image_folder, 12, torch.device("cpu"))
    training = StageTraining(net, plan_stages(net.J, "greedy")[0], cfg, Precision(torch.device("cpu"), False))
    steps, step = [], training.step

    def recording(x, y, offset, weight):
        assert weight == 1.0  # one process: every batch, the short last one too, is its own mean
        loss, logits = step(x, y, offset, weight)
        steps.append((loss.item(), logits.detach().argsort(-1, descending=True), y))
        return loss, logits

    monkeypatch.setattr(training, "step", recording)
    bars, epochs, batches = [], [], data.train.batches
    monkeypatch.setattr(loop, "tqdm", lambda items, **kw: bars.append(kw) or items)
    monkeypatch.setattr(data.train, "batches", lambda seed, epoch: epochs.append(epoch) or batches(seed, epoch))
    start = time.perf_counter()
    got = train_epoch(training, data.train, seed=0, desc="block 1")
    elapsed = time.perf_counter() - start
    n = sum(len(y) for _, _, y in steps)
    assert n == data.train.num_examples == 40 and [len(y) for _, _, y in steps] == [12, 12, 12, 4]
    assert got["loss"] == pytest.approx(sum(loss * len(y) for loss, _, y in steps) / n, rel=1e-12, abs=0)
    rank = [(order == y[:, None]).float().argmax(-1) for _, order, y in steps]  # where each label ranks
    assert got["top1"] == pytest.approx(100 * sum((r == 0).sum().item() for r in rank) / n, rel=1e-12)
    assert got["top5"] == 100.0  # three classes
    assert got["images_per_s"] == pytest.approx(n / got["seconds"], rel=1e-12) and 0 < got["seconds"] <= elapsed
    # one progress bar over the epoch's batches, which disappears when done (None: shown on a terminal only)
    assert bars == [{"total": 4, "desc": "block 1", "leave": False, "disable": None}]
    training.replicas = Replicas(index=1)  # a process other than the first shows none
    train_epoch(training, data.train, seed=1)
    assert bars[1]["disable"] is True and bars[1]["desc"] == ""
    assert epochs == [0, 0]  # unless told, the stage's first epoch (a prefix cache's first view)


GOLDEN = {  # each epoch's training loss, from commit e40ae10 (before ema, mixing and sim_loss existed)
    "greedy": [0.8435185790061951, 0.027218941040337084, 0.6912096202373504, 0.029692759551107884,
               0.6333309967070818, 0.001585270496434532],
    "cutout-cache": [0.8831591606140137, 0.06830245070159435, 0.789239940047264, 0.048719294182956216,
                     0.4609016992151737, 0.0006319213774986565],
    "e2e": [0.5266194343566895, 0.003830413005198352],
}  # fmt: skip


@pytest.mark.parametrize(
    ("name", "extra"),
    [("greedy", []), ("cutout-cache", ["data.cutout=8", "train.cache=host"]), ("e2e", ["train.mode=e2e"])],
)
def test_with_every_new_setting_off_a_tiny_run_trains_as_before_they_existed(tmp_path, image_folder, name, extra):
    """The demo preset for 2 epochs per block on the 48-image folder: its losses are the ones measured before
    train.ema, train.sim_loss, train.block_epochs, data.mix, data.flip and SimCNN's model.head were added (their
    draws come after the others)."""
    from layerwise.config import config_from_dict, merge
    from layerwise.presets import load_preset

    off = [
        "train.ema=0",
        "train.sim_loss=0",
        "train.block_epochs=[]",
        "data.mix=none",
        "data.flip=random",
        "model.head=paper",
    ]
    cfg = load_preset("demo").to_dict()
    for assignment in [*tiny_overrides(2), *extra, *off]:
        cfg = merge(cfg, parse_assignment(assignment))
    train(config_from_dict(cfg), tmp_path / name, image_folder)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    # equal to the last bit on the machine that measured them; another CPU, or another thread count, rounds
    # differently (up to 1e-4 here with one thread), while a shifted random stream moves them by several percent
    assert [r["loss"] for r in rows] == pytest.approx(GOLDEN[name], rel=1e-3, abs=1e-3)
