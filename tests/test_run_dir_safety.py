"""Shared and received run directories: links planted at the names a run writes, concurrent writers of one file,
and filesystems that cannot lock. Nothing is written outside the run directory, and no result is lost."""

from __future__ import annotations

import errno
import json
import multiprocessing
import shutil
from pathlib import Path

import pytest
from conftest import tiny_overrides

from layerwise import locks
from layerwise.cli import main
from layerwise.config import parse_assignment
from layerwise.errors import LayerwiseError
from layerwise.presets import resolve_config
from layerwise.rundir import RunDir
from layerwise.safe_io import write_text
from layerwise.train import train


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """One tiny greedy run (3 blocks, one epoch each, a disk prefix cache), trained once for the module."""
    from conftest import write_folder

    root = tmp_path_factory.mktemp("safety")
    data = write_folder(root / "data", per_class=12)
    overrides = [parse_assignment(a) for a in [*tiny_overrides(1), "train.cache=disk"]]
    overrides.append({"model": {"widths": [8, 8, 16], "downsample_at": [2], "k": 2}})
    train(resolve_config("demo", None, overrides), root / "run", data=data)
    return root / "run"


def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to, symlinks=True)
    return to


def victims(folder: Path, names: list[str]) -> dict[str, Path]:
    folder.mkdir(exist_ok=True)
    out = {}
    for name in names:
        out[name] = folder / name.replace("/", "_")
        out[name].write_text("victim\n")
    return out


def plant(run: Path, name: str, target: Path) -> None:
    path = run / name
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    path.symlink_to(target)


ATOMIC = ["run.json", "metrics.jsonl", "summary.json"]
"""Files a resumed run reads, then rewrites whole: a link there is replaced by the new file, never written through."""
NEW = ["checkpoints/last.json", "checkpoints/block1.json", "checkpoints/block2.json", "checkpoints/final.json"]
"""Files the resumed run makes afresh and never reads (a link at a .pt name would be read as the checkpoint; its
write goes through the same atomic_write as these)."""


def test_links_at_the_files_a_run_rewrites_are_replaced_not_followed(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    for stale in ("last", "block1", "block2", "final"):  # the resumed run trains blocks 1 and 2 again
        for suffix in (".pt", ".json"):
            (run / "checkpoints" / f"{stale}{suffix}").unlink()
    targets = victims(tmp_path / "victims", NEW)
    for name in ATOMIC:  # copies of the real files, since resume reads them
        targets[name] = tmp_path / "victims" / name
        shutil.copy(finished_run / name, targets[name])
    before = {name: target.read_bytes() for name, target in targets.items()}
    for name, target in targets.items():
        plant(run, name, target)
    assert main(["-q", "train", "--out", str(run), "--resume"]) == 0
    assert main(["eval", str(run), "--data", str(finished_run.parent / "data"), "--json"]) == 0
    capsys.readouterr()
    for name, target in targets.items():
        assert target.read_bytes() == before[name], name
        assert not (run / name).is_symlink() and (run / name).is_file(), name
    assert json.loads((run / "eval.json").read_text())
    assert not list(run.rglob("*.tmp"))


@pytest.mark.parametrize("name", ["train.log", ".lock", "checkpoints", "cache", "eval.json", ".record.lock"])
def test_a_link_where_the_run_appends_locks_or_keeps_folders_is_refused(finished_run, tmp_path, capsys, name):
    run = copy_run(finished_run, tmp_path / "run")
    outside = tmp_path / "outside"
    outside.mkdir()
    if name not in ("eval.json", ".record.lock"):  # resume trains block 1, on the disk cache
        for stale in ("last.pt", "block1.pt", "block2.pt", "final.pt"):
            (run / "checkpoints" / stale).unlink()
    if name in ("checkpoints", "cache"):
        shutil.copytree(run / "checkpoints", outside / "checkpoints")
        target = outside / "checkpoints" if name == "checkpoints" else outside
    else:
        target = victims(outside, [name])[name]
    plant(run, name, target)
    before = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    if name in ("eval.json", ".record.lock"):
        code = main(["eval", str(run), "--data", str(finished_run.parent / "data")])
        assert code == 0  # eval still answers; only saving its result is refused
        assert "the result was not saved in the run" in capsys.readouterr().err or name == "eval.json"
    else:
        assert main(["-q", "train", "--out", str(run), "--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "symbolic link" in err[0] and str(run / name) in err[0], err
    after = {p: p.read_bytes() for p in outside.rglob("*") if p.is_file()}
    assert after == before  # nothing outside the run directory was written


def _write_many(path: str, tag: str, times: int, errors) -> None:
    for i in range(times):
        try:
            write_text(Path(path), f"{tag} {i}\n" * 100)
        except LayerwiseError as e:
            errors.put(str(e))


def test_concurrent_writers_of_one_file_never_fail(tmp_path):
    target = tmp_path / "report.html"
    errors = multiprocessing.get_context("fork").Queue()
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_write_many, args=(str(target), tag, 150, errors)) for tag in "ab"]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    assert errors.empty()
    lines = set(target.read_text().splitlines())
    assert len(lines) == 1 and lines.pop() in {"a 149", "b 149"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


def _record_many(run: str, tag: str) -> None:
    for i in range(25):
        RunDir(run).record(Path(run) / "eval.json", f"{tag}{i}", {"n": i})


def test_concurrent_results_in_eval_json_are_merged_not_lost(tmp_path):
    (tmp_path / "run").mkdir()
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_record_many, args=(str(tmp_path / "run"), tag)) for tag in "ab"]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert sorted(saved) == sorted(f"{t}{i}" for t in "ab" for i in range(25))


def refuse_with(code: int):
    def flock(fd, operation):
        raise OSError(code, "No locks available" if code == errno.ENOLCK else "Resource temporarily unavailable")

    return flock


def test_a_filesystem_without_flock_gets_its_own_error_and_a_way_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(locks.fcntl, "flock", refuse_with(errno.ENOLCK))
    with pytest.raises(LayerwiseError, match=r"does not support flock \(ENOLCK.*LAYERWISE_NO_LOCK=1") as info:
        locks.RunLock(tmp_path / "run" / ".lock")
    assert "being trained by" not in str(info.value)
    monkeypatch.setenv("LAYERWISE_NO_LOCK", "1")
    lock = locks.RunLock(tmp_path / "run" / ".lock")
    assert "going on without the lock" in caplog.text
    lock.release()


def test_a_held_lock_names_its_holder_and_only_then(tmp_path, monkeypatch):
    first = locks.RunLock(tmp_path / "run" / ".lock")
    try:
        with pytest.raises(LayerwiseError, match=r"being trained by process \d+ on "):
            locks.RunLock(tmp_path / "run" / ".lock")
    finally:
        first.release()
    monkeypatch.setattr(locks.fcntl, "flock", refuse_with(errno.EWOULDBLOCK))
    with pytest.raises(LayerwiseError, match="being trained by"):
        locks.RunLock(tmp_path / "run" / ".lock")


def test_relative_and_absolute_names_of_one_run_directory_agree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    write_text(Path("run/checkpoints/a.json"), "{}", Path("run"))
    write_text(tmp_path / "run" / "b.json", "{}", Path("run"))
    assert sorted(p.name for p in (tmp_path / "run").rglob("*.json")) == ["a.json", "b.json"]
