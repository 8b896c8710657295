"""Pipelined and data-parallel decoupled training: J gloo processes, one block each, train as one process does;
a process that raises ends the job with its line and torchrun's restart resumes it on the same P; block groups
balance measured step times; bad placements are one line before any work; two DDP processes train as one."""

import itertools
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides, write_folder

from layerwise.cli import main
from layerwise.errors import LayerwiseError
from layerwise.rundir import RunDir, load_checkpoint
from layerwise.train.pipeline.placement import Placement, balance
from layerwise.train.pipeline.replay import ReplayBuffer

TESTS = Path(__file__).parent
SMALL = ["model.widths=[8,8,16]", "model.downsample_at=[2]", "model.k=2", "train.mode=decoupled"]
FLIP = "train.eval_flip=true"  # test-time flips in the per-epoch evaluation: pipelined as well


def settings(epochs: int = 2, *extra: str) -> list[str]:
    return [*tiny_overrides(epochs), *SMALL, *extra]


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def pipeline_train(out: Path, data: Path, items: list[str]) -> list[str]:
    return ["-m", "layerwise", "train", "--out", str(out), "--data", str(data), "--placement", "pipeline", *sets(items)]


def weights(out: Path) -> dict:
    return load_checkpoint(RunDir(out).final)[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("pipe") / "folder", per_class=16)


@pytest.fixture(scope="module")
def pipelined(tmp_path_factory, data) -> Path:
    """Three gloo processes, one block each, 2 epochs of 3 batches (16, 16, 8: the short last batch travels too)."""
    out = tmp_path_factory.mktemp("pipelined") / "run"
    job = subprocess.run(torchrun(3, *pipeline_train(out, data, settings(2, FLIP))), capture_output=True, text=True,
                         timeout=240, cwd=TESTS.parent)  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    return out


def test_three_pipeline_processes_train_as_one_process_does(tmp_path, data, pipelined):
    """The same batches in the same order, one thread per process in both (torchrun sets OMP_NUM_THREADS=1):
    every block's weights and every figure of every epoch agree with single-process decoupled training."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["-q", "train", "--out", str(tmp_path / "one"), "--data", str(data), *sets(settings(2, FLIP))]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = weights(tmp_path / "one"), weights(pipelined)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-6), k
    one, piped = RunDir(tmp_path / "one").read_metrics(), RunDir(pipelined).read_metrics()
    assert [(r["stage"], r["epoch"]) for r in piped] == [(0, 1), (0, 2)]
    for r, s in zip(one, piped, strict=True):
        for x, y in zip(r["blocks"], s["blocks"], strict=True):
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
            assert x["val"] == pytest.approx(y["val"], abs=1e-6) and x["train"] == y["train"]
            assert x["train_eval"] == pytest.approx(y["train_eval"], abs=1e-6)
    info = RunDir(pipelined).read_info()
    assert info["processes"] == 3 and info["pipeline"] == [[0], [1], [2]]
    meta, _, optimizer = load_checkpoint(RunDir(pipelined).last)
    assert meta["pipeline"] == [[0], [1], [2]] and set(optimizer["blocks"]) == {"0", "1", "2"}  # every block's


def test_a_process_that_raises_ends_the_job_with_its_line_and_the_restart_resumes_on_the_same_processes(
    tmp_path, data, pipelined
):
    """Rank 1 raises at its 5th step (epoch 2) of the first attempt: its line is the job's only error; torchrun's
    restart resumes from epoch 1's checkpoint with the stored grouping and ends where the uninterrupted run does."""
    out = tmp_path / "restarted"
    fault = [str(TESTS / "ddp_fault.py"), *pipeline_train(out, data, settings(2, FLIP))[2:]]
    command = [*torchrun(3, "--max-restarts", "1"), *fault]
    job = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=TESTS.parent,
                         env={**os.environ, "FAIL_AT_STEP": "5"})  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    ours = [line for line in job.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: rank 1 failed on purpose at step 5"], job.stderr[-3000:]
    assert "after stage 0 epoch 1" in job.stderr
    a, b = weights(out), weights(pipelined)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert RunDir(out).read_info()["pipeline"] == [[0], [1], [2]]


def test_more_pipeline_processes_than_blocks_is_one_line(tmp_path, data):
    job = subprocess.run(torchrun(4, *pipeline_train(tmp_path / "run", data, settings(1))), capture_output=True,
                         text=True, timeout=240, cwd=TESTS.parent)  # fmt: skip
    ours = [line for line in job.stderr.splitlines() if line.startswith("error: ")]
    assert job.returncode != 0 and ours, job.stderr[-3000:]
    assert "4 processes for 3 blocks; start at most 3" in ours[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["train.mode=greedy"], "train.placement=pipeline .* needs train.mode=decoupled"),
        ([], "train.placement=pipeline runs one group of blocks per process: start it with torchrun"),
    ],
)
def test_a_placement_that_cannot_run_is_refused_before_any_work(tmp_path, data, capsys, extra, message):
    args = ["train", "--out", str(tmp_path / "run"), "--data", str(data), "--placement", "pipeline"]
    assert main([*args, *sets(settings(1, *extra))]) != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1 and re.search(message, err[0]), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("costs", "processes", "groups"),
    [
        ([1, 1, 1, 1], 2, [[0, 1], [2, 3]]),
        ([4, 1, 1, 1, 1], 2, [[0], [1, 2, 3, 4]]),  # the least maximum: 4 against 4
        ([1, 2, 3, 4, 5], 3, [[0, 1, 2], [3], [4]]),  # 6, 4, 5
        ([3, 1, 1, 3], 3, [[0], [1, 2], [3]]),
        ([5], 1, [[0]]),
    ],
)
def test_blocks_are_cut_into_groups_whose_costliest_costs_the_least(costs, processes, groups):
    got = balance(costs, processes)
    assert got.to_json() == groups
    worst = max(sum(costs[j] for j in g) for g in groups)
    # every other contiguous cut into `processes` groups costs at least as much (checked by brute force)
    J = len(costs)
    for cuts in itertools.combinations(range(1, J), processes - 1):
        bounds = [0, *cuts, J]
        assert max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)) >= worst


def test_a_stored_grouping_must_cover_the_blocks_in_order():
    assert Placement.from_json([[0, 1], [2]], 3).stage(1).first == 2
    for bad in ([[0], [2]], [[1], [0], [2]], "x", [[]], None):
        with pytest.raises(LayerwiseError, match=r"does not cover blocks 0\.\.2"):
            Placement.from_json(bad, 3)
    with pytest.raises(LayerwiseError, match="at least one block"):
        balance([1.0, 2.0], 3)


def batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((2, 1), float(i)), torch.tensor([i, i])


def taken(buffer: ReplayBuffer) -> tuple[int, bool] | None:
    got = buffer.take()
    return None if got is None else (int(got[0][0, 0]), got[2])


def test_a_replay_buffer_trains_on_new_batches_first_then_replays_instead_of_waiting_and_ends_with_the_epoch():
    """A slow upstream, one batch at a time: the newest untrained batch first; while nothing new has come, the
    least replayed, newest one, each at most `reuse` times; after close, what is fresh is left, then None."""
    buffer = ReplayBuffer(capacity=3, reuse=2)
    buffer.put(*batch(0))
    buffer.put(*batch(1))
    assert [taken(buffer) for _ in range(6)] == [(1, True), (0, True), (1, False), (0, False), (1, False), (0, False)]
    buffer.put(*batch(2))
    assert taken(buffer) == (2, True) and taken(buffer) == (2, False)
    buffer.put(*batch(3))  # the fourth batch: the most replayed, oldest one (0) goes
    assert sorted(int(e[0][0, 0]) for e in buffer.entries) == [1, 2, 3] and buffer.dropped == 0
    assert taken(buffer) == (3, True)
    buffer.close()
    assert taken(buffer) is None  # the epoch's fresh batches are all trained: no replays after the end
    assert buffer.replays == 5 and buffer.most == 3


def test_a_replay_buffer_waits_only_when_it_has_nothing_to_train_on():
    buffer = ReplayBuffer(capacity=2, reuse=0)  # nothing may be replayed: take() must wait for the next batch
    buffer.put(*batch(0))
    assert taken(buffer) == (0, True)
    later = threading.Timer(0.3, lambda: buffer.put(*batch(1)))
    started = time.monotonic()
    later.start()
    assert taken(buffer) == (1, True) and time.monotonic() - started >= 0.25
    threading.Timer(0.1, buffer.close).start()
    assert taken(buffer) is None


def test_a_replay_buffer_holds_at_most_its_capacity_whatever_the_upstream_sends():
    """A fast upstream (a thread putting 200 batches while the trainer is slow): never more than M batches held;
    the fresh batches dropped unused and the ones trained add up to what was sent."""
    buffer, trained = ReplayBuffer(capacity=4, reuse=1), []

    def upstream() -> None:
        for i in range(200):
            buffer.put(*batch(i))
        buffer.close()

    thread = threading.Thread(target=upstream)
    thread.start()
    while (got := taken(buffer)) is not None:
        trained.append(got)
        time.sleep(0.0005)
    thread.join()
    fresh = [i for i, new in trained if new]
    assert buffer.most <= 4 and len(buffer.entries) <= 4
    assert len(set(fresh)) == len(fresh) and len(fresh) + buffer.dropped == 200
    assert all(trained.count((i, False)) <= 1 for i in range(200))  # reuse=1


def test_a_process_whose_upstream_is_slower_trains_on_replays_and_reports_them(tmp_path, data):
    """Rank 0's steps each take 0.2 s longer (tests/pipeline_slow.py): the next processes train on replays while
    they wait, at most train.replay_reuse = 1 per batch they received, and the run still ends and evaluates."""
    out = tmp_path / "replay"
    slow = [str(TESTS / "pipeline_slow.py"), *pipeline_train(out, data, settings(2, "train.replay=2"))[2:]]
    job = subprocess.run(torchrun(3, *slow), capture_output=True, text=True, timeout=240, cwd=TESTS.parent)
    assert job.returncode == 0, job.stderr[-3000:]
    rows = RunDir(out).read_metrics()
    assert [r["epoch"] for r in rows] == [1, 2]
    for row in rows:
        first, second, _ = row["blocks"]
        assert first["replays"] == first["dropped"] == 0  # the first process reads the data
        assert 1 <= second["replays"] <= 3 and second["dropped"] == 0  # 3 batches an epoch, each replayed at most once
    assert main(["-q", "eval", str(out), "--data", str(data), "--device", "cpu"]) == 0


def test_two_processes_for_three_blocks_train_as_one_process_does_in_bf16(tmp_path, data):
    """P < J: rank 0 times the blocks and cuts them into two groups (stored in the run); under bf16 autocast the
    activations are channels_last and travel so. One thread on both sides: the same weights to 1e-6."""
    items = settings(2, "train.precision=bf16")
    job = subprocess.run(torchrun(2, *pipeline_train(tmp_path / "two", data, items)), capture_output=True,
                         text=True, timeout=240, cwd=TESTS.parent)  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    groups = RunDir(tmp_path / "two").read_info()["pipeline"]
    assert groups in ([[0], [1, 2]], [[0, 1], [2]])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["-q", "train", "--out", str(tmp_path / "one"), "--data", str(data), *sets(items)]) == 0
    finally:
        torch.set_num_threads(threads)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-6), k


def test_decoupled_training_under_ddp_matches_one_process(tmp_path, data):
    """--placement single under torchrun: two processes split each batch (DDP over every block and head).
    Without BatchNorm nothing depends on the split: the weights end as one process's, up to float rounding."""
    items = settings(2, "model.batchnorm=false", "model.head_batchnorm=false", "train.batch_size=12")
    command = ["-m", "layerwise", "train", "--out", str(tmp_path / "ddp"), "--data", str(data), *sets(items)]
    job = subprocess.run(torchrun(2, *command), capture_output=True, text=True, timeout=240, cwd=TESTS.parent)
    assert job.returncode == 0, job.stderr[-3000:]
    assert main(["-q", "train", "--out", str(tmp_path / "one"), "--data", str(data), *sets(items)]) == 0
    a, b = weights(tmp_path / "one"), weights(tmp_path / "ddp")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    one, two = RunDir(tmp_path / "one").read_metrics(), RunDir(tmp_path / "ddp").read_metrics()
    for r, s in zip(one, two, strict=True):
        assert [b["val"]["top1"] for b in r["blocks"]] == [b["val"]["top1"] for b in s["blocks"]]
        assert [b["loss"] for b in r["blocks"]] == pytest.approx([b["loss"] for b in s["blocks"]], rel=1e-4)


def test_two_replicas_of_a_two_process_pipeline_train_as_one_process(tmp_path, data):
    """4 gloo processes, train.pipeline_processes=2: replicas {0, 1} and {2, 3} split each batch, positions 0
    (ranks 0, 2) and 1 (ranks 1, 3) each train their blocks under DDP. Without BatchNorm nothing depends on the
    split: the weights end as one process's, up to float rounding."""
    items = settings(2, "model.batchnorm=false", "model.head_batchnorm=false", "train.batch_size=12",
                     "train.pipeline_processes=2")  # fmt: skip
    job = subprocess.run(torchrun(4, *pipeline_train(tmp_path / "grid", data, items)), capture_output=True, text=True,
                         timeout=240, cwd=TESTS.parent)  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    single = [i for i in items if not i.startswith("train.pipeline_processes")]
    assert main(["-q", "train", "--out", str(tmp_path / "one"), "--data", str(data), *sets(single)]) == 0
    a, b = weights(tmp_path / "one"), weights(tmp_path / "grid")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), k
    info = RunDir(tmp_path / "grid").read_info()
    assert info["processes"] == 4 and len(info["pipeline"]) == 2
    one, grid = RunDir(tmp_path / "one").read_metrics(), RunDir(tmp_path / "grid").read_metrics()
    for r, s in zip(one, grid, strict=True):
        assert [b["val"]["top1"] for b in r["blocks"]] == [b["val"]["top1"] for b in s["blocks"]]
        assert [b["loss"] for b in r["blocks"]] == pytest.approx([b["loss"] for b in s["blocks"]], rel=1e-4)


def test_a_pipeline_process_is_sized_as_one_block_not_the_whole_decoupled_stage(monkeypatch):
    """check_size with mode="greedy" (what a pipeline process is sized as) counts one block and its head per step;
    the decoupled stage in one process counts every block's: a device between the two refuses only the latter."""
    from layerwise import sizing
    from layerwise.config import parse_assignment
    from layerwise.models import build_model
    from layerwise.presets import resolve_config
    from layerwise.stages import plan_stages

    cfg = resolve_config("demo", None, [parse_assignment(a) for a in settings(1)])
    with torch.device("meta"):
        net = build_model(cfg.model, 3, 32)
    args = (net, None, 64, 3, 32, 4)
    one_block = max(sizing.trained_activations(*args[:1], plan_stages(3, "greedy"), *args[2:]))
    every_block = sizing.trained_activations(*args[:1], plan_stages(3, "decoupled"), *args[2:])[0]
    assert one_block < every_block
    monkeypatch.setattr(sizing, "device_memory", lambda device: (one_block + every_block) // 2)
    sizing.check_size(cfg, 3, torch.device("cpu"), 64, mode="greedy")
    with pytest.raises(LayerwiseError, match="decoupled needs at least"):
        sizing.check_size(cfg, 3, torch.device("cpu"), 64)
