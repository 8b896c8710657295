"""DDP under torchrun on the CPU (gloo): the same training as one process, rank 0's statistics and files, resume
across process counts, a dead rank, and one writer per run directory.

The multi-process tests start real torchrun processes on tiny data; the share and shard tests run in-process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides, write_folder

from layerwise.cli import main
from layerwise.config import parse_assignment
from layerwise.data import build_data
from layerwise.data.loaders import Batching, Feed, MemoryLoader
from layerwise.data.sources import Decoded
from layerwise.distributed import Dist
from layerwise.errors import LayerwiseError
from layerwise.evaluate import evaluate
from layerwise.models import build_model
from layerwise.presets import resolve_config
from layerwise.rundir import RunDir, load_checkpoint
from layerwise.train import train

TESTS = Path(__file__).parent
SMALL = ["model.widths=[8,8,16]", "model.downsample_at=[2]", "model.k=2"]
NO_BN = ["model.batchnorm=false", "model.head_batchnorm=false"]
# 48 images: 9 held out leaves 39 to train on, in batches of 12, 12, 12 and a last one of 3, split 2 + 1 between
# two processes; the 9 validation images split 5 + 4.
SPLIT = ["data.val_size=9", "train.batch_size=12"]


def settings(epochs: int, *extra: str) -> list[str]:
    return [*tiny_overrides(epochs), *SMALL, *SPLIT, *extra]


def sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def torchrun(*args: str, nproc: int = 2, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), *extra, *args]


def standalone(*args: str, nproc: int = 2) -> list[str]:
    return torchrun(*args, nproc=nproc, extra=("--standalone",))


def layerwise_train(out: Path, data: Path, items: list[str], *flags: str) -> list[str]:
    return ["-m", "layerwise", "train", "--out", str(out), "--data", str(data), *flags, *sets(items)]


def run(command: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=TESTS.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(out: Path, name: str = "final.pt") -> dict:
    return load_checkpoint(RunDir(out).checkpoints / name)[1]


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=1e-4), k


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_folder(tmp_path_factory.mktemp("ddp") / "folder", per_class=16)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, data) -> Path:
    """An uninterrupted two-process run of a network without BatchNorm, 2 epochs per block."""
    out = tmp_path_factory.mktemp("two") / "run"
    run(standalone(*layerwise_train(out, data, settings(2, *NO_BN))))
    return out


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path, data, two_processes):
    """Without BatchNorm, nothing depends on how a batch is split: two gloo processes (and an uneven last batch)
    end where one process does, up to float rounding. Rank 0 alone wrote each metrics line."""
    assert main(["-q", "train", "--out", str(tmp_path / "one"), "--data", str(data), *sets(settings(2, *NO_BN))]) == 0
    assert_close(weights(tmp_path / "one"), weights(two_processes))
    one, two = RunDir(tmp_path / "one").read_metrics(), RunDir(two_processes).read_metrics()
    assert [(r["stage"], r["epoch"]) for r in two] == [(s, e) for s in range(3) for e in (1, 2)]
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["val"]["loss"] == pytest.approx(b["val"]["loss"], rel=1e-4)
        assert a["train"]["top1"] == b["train"]["top1"] and a["val"]["top1"] == b["val"]["top1"]
    info = json.loads((two_processes / "run.json").read_text())
    assert info["processes"] == 2 and not list(two_processes.glob("*.tmp"))


def test_with_batchnorm_each_process_normalises_its_share_and_keeps_rank_0s_statistics(tmp_path, data):
    """Per-process BN statistics make the run differ from one process by design. After every epoch each
    process takes rank 0's running statistics, so every process ends with the saved weights and buffers, and
    the validation numbers (each image scored once, 5 + 4 of them) are those of the saved network."""
    out = tmp_path / "bn"
    run(standalone(str(TESTS / "ddp_worker.py"), str(out), str(data), *settings(2)))
    saved = weights(out)
    for rank in (0, 1):
        mine = torch.load(out / f"rank{rank}.pt", weights_only=True)
        assert all(torch.equal(mine[k].cpu(), saved[k]) for k in saved), rank
    assert any("running_mean" in k for k in saved)
    rows = RunDir(out).read_metrics()
    assert rows[-1]["loss"] < rows[0]["loss"]  # it trains

    cfg = resolve_config("demo", None, [parse_assignment(a) for a in settings(2)])
    net = build_model(cfg.model, 3)
    net.load_state_dict(saved)
    val = build_data(cfg.data, data, 12, torch.device("cpu")).val
    result = evaluate(net, val, [0, 1, 2])
    assert result["n"] == 9
    assert rows[-1]["val"]["top1"] == pytest.approx(result["blocks"][2]["top1"])
    assert rows[-1]["val"]["ensemble_top1"] == pytest.approx(result["blocks"][2]["ensemble_top1"])
    assert rows[-1]["val"]["loss"] == pytest.approx(result["loss"], rel=1e-5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_invocations_as_two_nodes_complete_a_run(tmp_path, data):
    """torchrun --nnodes 2 with a c10d rendezvous on 127.0.0.1: the multi-node code path, on one machine."""
    out = tmp_path / "nodes"
    port = free_port()
    rendezvous = ("--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test-{port}")
    nodes = [
        subprocess.Popen(
            torchrun(
                *layerwise_train(out, data, settings(1, *NO_BN)),
                nproc=1,
                extra=("--nnodes", "2", "--node-rank", str(rank), *rendezvous),
            ),
            cwd=TESTS.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=180)
        assert node.returncode == 0, err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert [b["block"] for b in summary["blocks"]] == [0, 1, 2]
    assert json.loads((out / "run.json").read_text())["processes"] == 2


def wait_for(predicate, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def metrics_lines(out: Path) -> int:
    try:
        return sum(1 for _ in (out / "metrics.jsonl").open())
    except OSError:
        return 0


def test_a_run_killed_under_torchrun_resumes_under_torchrun_to_the_same_weights(tmp_path, data, two_processes):
    out = tmp_path / "killed"
    job = subprocess.Popen(
        standalone(*layerwise_train(out, data, settings(2, *NO_BN))), cwd=TESTS.parent, start_new_session=True
    )
    wait_for(lambda: metrics_lines(out) >= 1 or job.poll() is not None, 120, "the first epoch")
    os.killpg(job.pid, signal.SIGKILL)  # torchrun and both workers, with no chance to clean up
    job.wait()
    assert not (out / "summary.json").exists(), "the run ended before it could be killed"
    run(standalone("-m", "layerwise", "train", "--out", str(out), "--resume"))
    a, b = weights(out), weights(two_processes)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(r["stage"], r["epoch"]) for r in RunDir(out).read_metrics()] == [(s, e) for s in range(3) for e in (1, 2)]


def test_a_process_whose_validation_shard_is_empty_still_joins_the_evaluation(tmp_path, data):
    """One validation image: process 1's shard is empty, and it must still take part in the all-reduce of the
    counts (a process that skipped it would leave the other waiting)."""
    out = tmp_path / "run"
    run(standalone(*layerwise_train(out, data, settings(1, "data.val_size=1"))))
    rows = RunDir(out).read_metrics()
    assert [r["val"]["top1"] in (0.0, 100.0) for r in rows] == [True] * 3


def test_a_run_started_on_one_process_resumes_on_two(tmp_path, data, two_processes):
    class Stop(Exception):
        pass

    def stop_in_block_1(row):
        if row["stage"] == 1:
            raise Stop

    cfg = resolve_config("demo", None, [parse_assignment(a) for a in settings(2, *NO_BN)])
    with pytest.raises(Stop):
        train(cfg, tmp_path / "run", data, on_epoch_end=stop_in_block_1)
    run(standalone("-m", "layerwise", "train", "--out", str(tmp_path / "run"), "--resume"))
    assert_close(weights(tmp_path / "run"), weights(two_processes))


def test_your_own_network_trains_under_torchrun_as_in_one_process(tmp_path, data):
    """model.arch=custom through torchrun: every process imports the builder (tests.custom_nets, from the
    repository root) and two gloo processes end where one does."""
    custom = settings(2, *NO_BN, "model.arch=custom", "model.builder=tests.custom_nets:plain")
    run(standalone(*layerwise_train(tmp_path / "two", data, custom)))
    assert main(["-q", "train", "--out", str(tmp_path / "one"), "--data", str(data), *sets(custom)]) == 0
    assert_close(weights(tmp_path / "one"), weights(tmp_path / "two"))
    assert json.loads((tmp_path / "two" / "run.json").read_text())["processes"] == 2


def workers_of(job: subprocess.Popen) -> dict[int, int]:
    """{rank: pid} of torchrun's worker processes (found through their environment)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            env = dict(kv.split("=", 1) for kv in (entry / "environ").read_bytes().decode().split("\0") if "=" in kv)
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == job.pid and "RANK" in env:
            found[int(env["RANK"])] = int(entry.name)
    return found


def test_when_one_process_dies_the_other_stops_with_one_line_and_the_run_resumes(tmp_path, data):
    out = tmp_path / "dead"
    job = subprocess.Popen(
        standalone(*layerwise_train(out, data, settings(20, *NO_BN))),
        cwd=TESTS.parent,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: metrics_lines(out) >= 1 or job.poll() is not None, 120, "the first epoch")
    pids = workers_of(job)
    assert set(pids) == {0, 1}, pids
    killed = time.monotonic()
    os.kill(pids[1], signal.SIGKILL)
    _, err = job.communicate(timeout=60)
    assert time.monotonic() - killed < 45
    assert job.returncode != 0
    ours = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(ours) == 1 and "resume" in ours[0], err[-3000:]
    meta, _, _ = load_checkpoint(RunDir(out).last)  # intact
    assert meta["epoch"] >= 1
    assert main(["-q", "train", "--out", str(out), "--resume"]) == 0


def test_when_one_process_raises_the_job_ends_with_its_line_and_torchrun_restarts_it_where_it_stopped(
    tmp_path, data, two_processes
):
    """Rank 1 raises a LayerwiseError in block 0's second epoch (step 5) of the first attempt. Its line is the
    job's only error: rank 0 stops quietly. torchrun's restart (--max-restarts 1) resumes from the checkpoints by
    itself and ends where the uninterrupted run does, every epoch counted once."""
    out = tmp_path / "restarted"
    job = subprocess.run(
        [*standalone("--max-restarts", "1"), str(TESTS / "ddp_fault.py"), *layerwise_train(out, data,
         settings(2, *NO_BN))[2:]],
        capture_output=True, text=True, timeout=240, cwd=TESTS.parent, env={**os.environ, "FAIL_AT_STEP": "5"},
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    ours = [line for line in job.stderr.splitlines() if line.startswith("error: ")]
    assert ours == ["error: rank 1 failed on purpose at step 5"], job.stderr[-3000:]
    assert "torchrun restarted the job (restart 1): resuming" in job.stderr
    assert "resuming" in job.stderr and "after stage 0 epoch 1" in job.stderr  # the failure was in epoch 2
    a, b = weights(out), weights(two_processes)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(r["stage"], r["epoch"]) for r in RunDir(out).read_metrics()] == [(s, e) for s in range(3) for e in (1, 2)]
    info = RunDir(out).read_info()
    assert info["torchelastic_run_id"] and len(info["resumed"]) == 1


@pytest.mark.parametrize(
    ("attempt", "job", "saved", "resumes"),
    [("1", "job-7", "job-7", True), ("0", "job-7", "job-7", False), ("1", "job-8", "job-7", False),
     ("1", "none", "none", False), (None, None, None, False)],
)  # fmt: skip
def test_only_a_restart_of_the_job_that_started_a_run_resumes_it_by_itself(
    tmp_path, monkeypatch, attempt, job, saved, resumes
):
    """torchrun's restart count above 0, and run.json naming this job's id; torchrun's default id "none" (no
    --standalone, no --rdzv-id) names no job in particular."""
    from layerwise.train.resume import elastic_restart_of

    for key, value in {"TORCHELASTIC_RESTART_COUNT": attempt, "TORCHELASTIC_RUN_ID": job}.items():
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)
    run = RunDir(tmp_path / "run")
    assert not elastic_restart_of(run.path)  # no run there yet
    run.path.mkdir()
    run.create("model: {}\n")
    run.write_json(run.info, {"torchelastic_run_id": saved})
    assert elastic_restart_of(run.path) == resumes


# ---- one writer per run directory (in-process and one plain subprocess)


def test_a_second_process_cannot_train_a_run_that_is_training(tmp_path, data):
    from test_train import tiny_config

    cfg = tiny_config(epochs=1)
    refused = []

    def try_to_resume(row):
        if not refused:
            with pytest.raises(LayerwiseError, match=rf"is being trained by process {os.getpid()} on ") as info:
                train(cfg, tmp_path / "run", data, resume=True)
            refused.append(str(info.value))

    train(cfg, tmp_path / "run", data, on_epoch_end=try_to_resume)
    assert refused and "\n" not in refused[0]
    train(cfg, tmp_path / "run", data, resume=True)  # the lock went with the run that held it


def test_a_run_killed_with_sigkill_can_resume_at_once(tmp_path, data):
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, *layerwise_train(out, data, settings(6, *NO_BN))], cwd=TESTS.parent)
    wait_for(lambda: metrics_lines(out) >= 1 or job.poll() is not None, 60, "the first epoch")
    job.kill()
    job.wait()
    assert not (out / "summary.json").exists(), "the run ended before it could be killed"
    assert main(["-q", "train", "--out", str(out), "--resume"]) == 0


# ---- checks made before any work, in every process alike (no process group is started)


def as_rank(monkeypatch, rank: int, world: int) -> None:
    for key, value in {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank, "LOCAL_WORLD_SIZE": world}.items():
        monkeypatch.setenv(key, str(value))


def test_a_world_size_that_does_not_divide_the_batch_is_refused(tmp_path, data, monkeypatch, capsys):
    as_rank(monkeypatch, 0, 5)
    assert main(["-q", "train", "--out", str(tmp_path / "run"), "--data", str(data), *sets(settings(1))]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "error: train.batch_size=12 is the global batch and must divide by the 5 processes; "
        "change --batch-size or --nproc-per-node"
    )
    assert not (tmp_path / "run").exists()


def test_a_missing_backend_and_sync_bn_on_the_cpu_are_refused(tmp_path, data, monkeypatch):
    import torch.distributed as dist
    from test_train import tiny_config

    as_rank(monkeypatch, 0, 2)
    with pytest.raises(LayerwiseError, match="SyncBatchNorm does not run on the CPU"):
        train(tiny_config(epochs=1, train={"sync_bn": True}), tmp_path / "run", data)
    monkeypatch.setattr(dist, "is_gloo_available", lambda: False)
    with pytest.raises(LayerwiseError, match="backend 'gloo' is not available"):
        train(tiny_config(epochs=1), tmp_path / "run", data)
    assert not (tmp_path / "run").exists()


# ---- how batches and evaluation sets are divided between processes


@pytest.mark.parametrize("n, batch, world", [(39, 12, 2), (40, 12, 3), (37, 12, 4), (5, 4, 2)])
def test_the_processes_shares_of_each_batch_make_up_the_global_batch(n, batch, world):
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    single = list(Batching(n, batch).shares(order))
    shares = [list(Batching(n, batch, Dist(r, world)).shares(order)) for r in range(world)]
    last = n % batch
    dropped = 0 < last < world
    assert all(len(s) == len(single) - dropped for s in shares)
    for i in range(len(single) - dropped):
        parts = [s[i] for s in shares]
        assert torch.equal(torch.cat(parts), single[i])  # contiguous, in rank order
        assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
        assert Batching(n, batch, Dist(0, world)).global_batch(i) == len(single[i])


def test_evaluation_shards_cover_every_image_once():
    examples = Decoded(torch.zeros(11, 3, 2, 2, dtype=torch.uint8), torch.arange(11))
    labels = torch.cat([examples.part(Dist(r, 3)).labels for r in range(3)])
    assert sorted(labels.tolist()) == list(range(11))


def test_a_memory_loader_share_holds_the_same_images_as_the_single_process_batch(tmp_path):
    from layerwise.config import DataConfig

    g = torch.Generator().manual_seed(0)
    images = Decoded(torch.randint(0, 255, (13, 3, 8, 8), dtype=torch.uint8, generator=g), torch.arange(13))
    cfg, cpu = DataConfig(image_size=8, crop_padding=2), torch.device("cpu")
    one = list(MemoryLoader(images, cfg, Feed(4, cpu, True)).batches(seed=5))
    two = [list(MemoryLoader(images, cfg, Feed(4, cpu, True, Dist(r, 2))).batches(seed=5)) for r in range(2)]
    assert len(one) == 4 and len(two[0]) == len(two[1]) == 3  # the last batch, 1 image, is dropped for 2 processes
    for i, (x, y) in enumerate(one[:3]):
        assert torch.equal(torch.cat([two[0][i][0], two[1][i][0]]), x)
        assert torch.equal(torch.cat([two[0][i][1], two[1][i][1]]), y)


def test_a_streaming_loader_share_holds_the_labels_of_the_single_process_batch(imagenet_folder):
    """The streamed (ImageNet-style) loader cuts the same global batches from the same seed; its crops are random."""
    from layerwise.config import DataConfig
    from layerwise.data.loaders import StreamLoader
    from layerwise.data.sources import open_train

    files = open_train(imagenet_folder / "train", decode=False, size=32).train
    cfg, cpu = DataConfig(augment="imagenet", image_size=32, resize_size=40, workers=0), torch.device("cpu")
    one = [y for _, y in StreamLoader(files, cfg, Feed(6, cpu, True)).batches(seed=3)]
    two = [[y for _, y in StreamLoader(files, cfg, Feed(6, cpu, True, Dist(r, 2))).batches(seed=3)] for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 4  # 24 images in batches of 6, 3 + 3 per process
    assert all(torch.equal(torch.cat([a, b]), y) for a, b, y in zip(two[0], two[1], one, strict=True))
    assert sorted(torch.cat(one).tolist()) == sorted(files.labels)


def test_each_process_caches_the_whole_prefix_in_its_own_file_and_trains_as_without_it(tmp_path, data, two_processes):
    """train.cache=disk under DDP: one file per process (the same x_j in each), read in the process's shares; with
    a view per epoch the run sees the uncached run's batches."""
    out = tmp_path / "cached"
    items = settings(2, *NO_BN, "train.cache=disk", "train.cache_views=2")
    stderr = run(standalone(*layerwise_train(out, data, items))).stderr
    assert "block 1: cached 2 view(s)" in stderr and "block 2: cached 2 view(s)" in stderr
    assert "in each of 2 processes" in stderr  # the size check counted both copies
    assert_close(weights(out), weights(two_processes), atol=1e-4)
    assert not list((out / "cache").glob("*.bin"))  # every process removed its file after its stage


def test_the_weight_average_and_mixing_train_under_two_processes_as_in_one(tmp_path, data):
    """train.ema and data.mix under DDP: every process mixes its share of the plan's mixed images and keeps the same
    average (rank 0's BN-free weights), ending where one process does."""
    items = settings(2, *NO_BN, "train.ema=0.9", "data.mix=mixup")
    run(standalone(*layerwise_train(tmp_path / "two", data, items)))
    assert main(["-q", "train", "--out", str(tmp_path / "one"), "--data", str(data), *sets(items)]) == 0
    assert_close(weights(tmp_path / "one"), weights(tmp_path / "two"), atol=1e-4)
    one, two = RunDir(tmp_path / "one").read_metrics(), RunDir(tmp_path / "two").read_metrics()
    assert [a["val"]["loss"] for a in one] == pytest.approx([b["val"]["loss"] for b in two], rel=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_sync_bn_on_two_gpus(tmp_path, data):
    """NCCL with SyncBatchNorm: the trained module's statistics are over the global batch."""
    items = [*settings(1, "train.sync_bn=true"), "train.device=cuda"]
    run(standalone(*layerwise_train(tmp_path / "run", data, items)))
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["device"].startswith("cuda")


def test_bench_under_torchrun_times_ddp_steps_and_the_all_reduce():
    out = run(standalone("-m", "layerwise", "bench", "--preset", "demo", "--quick", "--steps", "1", "--json")).stdout
    result = json.loads(out)  # rank 0 alone printed
    assert result["processes"] == 2 and result["threads_per_process"] == 1  # torchrun's OMP_NUM_THREADS=1
    assert [r["stage"] for r in result["stages"]] == ["block 0", "block 1", "block 2", "e2e"]
    assert all(r["images_per_s"] > 0 and r["allreduce_ms"] > 0 for r in result["stages"])
    assert result["stages"][-1]["gradient_bytes"] > result["stages"][0]["gradient_bytes"]
