"""The real command line: every small preset runs a few steps, and every bad input is a one-line error."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_overrides

from layerwise.cli import main
from layerwise.models import build_model
from layerwise.presets import list_presets, load_preset

SMALL = [p for p in list_presets() if load_preset(p).data.augment == "cifar"]


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def sets(*assignments):
    return [arg for a in assignments for arg in ("--set", a)]


def error_line(err):
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_presets_lists_every_preset_with_counts(capsys):
    code, out, _ = run_cli(["presets"], capsys)
    assert code == 0
    for name in list_presets():
        assert name in out
    assert "architectures (model.arch): cifar_resnet, custom, resnet, simcnn, timm, vgg, vgg11" in out
    code, out, _ = run_cli(["presets", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    assert round(rows["imagenet_simcnn_k3"]["params_final_m"]) == 102
    assert round(rows["imagenet_simcnn_k2"]["params_final_m"]) == 64


@pytest.mark.parametrize("preset", SMALL)
def test_small_presets_train_through_the_cli(preset, tmp_path, image_folder, capsys):
    args = ["train", "--preset", preset, "--data", str(image_folder), "--out", str(tmp_path / "run")]
    recipe = load_preset(preset).train
    warmup = ["train.warmup_epochs=0.5"] if recipe.warmup_epochs else []  # within 1 epoch
    tiny = tiny_overrides(1)
    if recipe.block_epochs:  # one epoch each: epochs_per_block would do nothing there (and is refused)
        tiny = [a for a in tiny if not a.startswith("train.epochs_per_block=")]
        tiny.append(f"train.block_epochs={[1] * len(recipe.block_epochs)}")
    code, out, err = run_cli(args + sets(*tiny, *warmup), capsys)
    assert code == 0, err
    assert "block 0" in out or "e2e" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (tmp_path / "run" / "report.html").is_file()  # `layerwise train` writes the report, not train()
    cfg = load_preset(preset)
    with torch.device("meta"):
        J = build_model(cfg.model, 3, cfg.data.image_size).J
    assert len(summary["parameters"]["blocks"]) == J
    assert len(summary["blocks"]) == (1 if cfg.train.mode == "e2e" else J)
    epochs = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(epochs) == (J if cfg.train.mode == "greedy" else 1)  # one epoch per stage, whatever the preset says


def test_imagenet_preset_streams_at_tiny_size(tmp_path, imagenet_folder, capsys):
    args = ["train", "--preset", "imagenet_simcnn_k2", "--data", str(imagenet_folder), "--out", str(tmp_path / "r")]
    tiny = sets(
        "model.widths=[4, 4, 8, 8, 8, 8, 16, 16]",
        "data.image_size=32",
        "data.resize_size=40",
        "data.workers=0",
        "train.epochs_per_block=1",
        "train.batch_size=8",
        "train.device=cpu",
    )
    code, _out, err = run_cli(args + tiny, capsys)
    assert code == 0, err
    assert len(json.loads((tmp_path / "r" / "summary.json").read_text())["blocks"]) == 8


def test_eval_and_resume_through_the_cli(tmp_path, image_folder, capsys):
    out_dir = str(tmp_path / "run")
    base = ["train", "--data", str(image_folder), "--out", out_dir, "--epochs-per-block", "1"]
    code, _, err = run_cli(base + sets(*tiny_overrides(1)), capsys)
    assert code == 0, err
    code, _, _ = run_cli(["train", "--out", out_dir, "--resume", "--data", str(image_folder)], capsys)
    assert code == 0  # already finished: resume just reports it
    code, out, err = run_cli(["eval", out_dir, "--data", str(image_folder), "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert set(result["blocks"]) == {"0", "1", "2"} and result["n"] == 48
    code, out, err = run_cli(["eval", out_dir, "--data", str(image_folder), "--json", "--precision", "bf16"], capsys)
    assert code == 0, err
    assert json.loads(out)["loss"] != result["loss"]  # scored under bf16 autocast, not the run's fp32


def write_corrupt(folder):
    (folder / "cat" / "000.jpg").write_bytes(b"garbage")
    return folder


def write_text_file(folder):
    (folder / "dog" / "notes.txt").write_text("not an image")
    return folder


def flat_folder(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    return tmp_path / "flat"


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda t, f: ["--data", str(t / "missing")], "does not exist"),
        (lambda t, f: ["--data", str((t / "empty").mkdir() or t / "empty")], "is empty"),
        (lambda t, f: ["--data", str(flat_folder(t))], "no class subfolders"),
        (lambda t, f: ["--data", str(write_corrupt(f))], "cannot decode"),
        (lambda t, f: ["--data", str(write_text_file(f))], "not an image"),
        (lambda t, f: ["--preset", "imagenet_resnet"], "unknown preset"),
        (lambda t, f: ["--data", str(f), "--set", "train.lr=fast"], "train.lr must be float"),
        (lambda t, f: ["--data", str(f), "--batch-size", "0"], "batch_size must be >= 1"),
        (lambda t, f: ["--resume"], "--resume needs --out"),
        (lambda t, f: ["--config", str(t / "none.yaml")], "not found"),
    ],
)
def test_bad_input_is_a_one_line_error(tmp_path, image_folder, capsys, make_args, message):
    args = ["train", *make_args(tmp_path, image_folder)]
    if "--resume" not in args:
        args += ["--out", str(tmp_path / "out")]
    code, _, err = run_cli(args, capsys)
    assert code == 2
    assert message in error_line(err)


def test_under_torchrun_the_run_directory_is_named(tmp_path, capsys, monkeypatch):
    """The default run directory carries the time: processes started a second apart would each write their own."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2"), monkeypatch.setenv("RANK", "1")
    code, _, err = run_cli(["train"], capsys)
    assert code == 2 and "under torchrun give --out" in error_line(err)
    assert not (tmp_path / "runs").exists()


def test_existing_run_is_not_overwritten(tmp_path, image_folder, capsys):
    args = ["train", "--data", str(image_folder), "--out", str(tmp_path / "run"), *sets(*tiny_overrides(1))]
    assert run_cli(args, capsys)[0] == 0
    saved = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "already holds a run" in error_line(err)
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == saved


def test_console_script_runs():
    result = subprocess.run(
        [sys.executable, "-m", "layerwise.cli", "presets"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0 and "cifar10_simcnn_k3" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--set", "train=3"], "train must be a mapping"),
        (["train", "--device", "cuda:x"], "train.device must be"),
        (["eval", "nowhere", "--data", "x"], "holds no layerwise run"),
    ],
)
def test_more_bad_input(tmp_path, capsys, args, message):
    code, _, err = run_cli([*args, "--out", str(tmp_path / "o")] if args[0] == "train" else args, capsys)
    assert code == 2 and message in error_line(err)


def test_eval_rejects_batch_size_zero(tmp_path, image_folder, capsys):
    out_dir = str(tmp_path / "run")
    assert run_cli(["train", "--data", str(image_folder), "--out", out_dir, *sets(*tiny_overrides(1))], capsys)[0] == 0
    code, _, err = run_cli(["eval", out_dir, "--data", str(image_folder), "--batch-size", "0"], capsys)
    assert code == 2 and "--batch-size must be >= 1" in error_line(err)


def test_truncated_archive_is_a_one_line_error(tmp_path, cifar_archive, capsys):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(cifar_archive.read_bytes()[: cifar_archive.stat().st_size // 2])
    code, _, err = run_cli(["train", "--data", str(cut), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "cannot read archive" in error_line(err)


def test_eval_without_class_list_is_a_one_line_error(tmp_path, image_folder, capsys):
    out_dir = tmp_path / "run"
    assert (
        run_cli(["train", "--data", str(image_folder), "--out", str(out_dir), *sets(*tiny_overrides(1))], capsys)[0]
        == 0
    )
    (out_dir / "classes.json").unlink()
    code, _, err = run_cli(["eval", str(out_dir), "--data", str(image_folder)], capsys)
    assert code == 2 and "classes.json is missing" in error_line(err)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--blocks", "a"], "--blocks takes block numbers"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--blocks", "7"], "--blocks must be between 0 and 2"),
    ],
)
def test_bench_bad_arguments(capsys, extra, message):
    code, _, err = run_cli(["bench", "--preset", "demo", "--no-input", *extra], capsys)
    assert code == 2 and message in error_line(err)


def test_bench_input_needs_image_files(cifar_archive, capsys):
    code, _, err = run_cli(
        ["bench", "--preset", "demo", "--quick", "--steps", "1", "--data", str(cifar_archive)], capsys
    )
    assert code == 2 and "needs image files" in error_line(err)


def test_the_paper_set_up_trains_on_every_image_and_scores_the_test_split(tmp_path, cifar_archive, capsys):
    """A recipe's set-up: all training images (data.val_size=0) and --val-data on a CIFAR-10 archive, whose
    test_batch (20 images here) is scored after every epoch."""
    args = ["train", "--data", str(cifar_archive), "--val-data", str(cifar_archive), "--val-size", "0"]
    sets = [arg for a in tiny_overrides(1) for arg in ("--set", a)]
    assert main([*args, "--out", str(tmp_path / "run"), *sets]) == 0
    info = json.loads((tmp_path / "run" / "run.json").read_text())
    assert f"validation on {cifar_archive.resolve()} (20 images)" in info["data_description"]
    assert "held out" not in info["data_description"]
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert f"val_path: {cifar_archive.resolve()}" in config and "val_size: 0" in config


def test_the_device_check_runs_end_to_end_on_the_cpu_at_tiny_size(tmp_path, image_folder):
    """recipes/device_check.sh --tiny: every step that needs no GPU, shrunk, on the CPU; one JSON line each. With
    a test split, the k=3 runs train on every image and score that split (here a folder of the run's classes)."""
    from conftest import write_folder

    test_split = write_folder(tmp_path / "test", per_class=2, seed=3)
    env = {**os.environ, "OUT": str(tmp_path / "out"), "DEVICE_CHECK_DATA": str(image_folder)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # python3: this environment's
    script = Path(__file__).parent.parent / "recipes" / "device_check.sh"
    result = subprocess.run(
        ["bash", str(script), str(test_split), "--tiny"], env=env, capture_output=True, text=True, timeout=1800
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    steps = ["k3-paper", "k3-short", "k3-plus-short", "memory-vgg11", "bench-k3"]
    assert [r["step"] for r in lines] == steps, result.stderr
    assert all(r["exit"] == 0 for r in lines), result.stdout
    paper = lines[0]
    assert all(r["limit_s"] == 0 and not r["timed_out"] for r in lines)  # --tiny sets no time limit
    # the speed goal is judged, whichever way it went on this machine
    assert paper["goal"] == {"seconds": 90.0, "met": paper["seconds_train_and_eval"] <= 90.0}
    assert paper["no_validation"] is None
    assert set(paper["per_block_top1"]) == {"block 0", "block 1", "block 2", "block 3"}
    info = json.loads((tmp_path / "out" / "runs" / "k3-paper" / "run.json").read_text())
    assert "validation on" in info["data_description"] and "held out" not in info["data_description"]
    assert set(lines[2]["per_block_top1"]) == {"block 0", "block 1", "block 2", "block 3"}  # the modern recipe
    assert 0 < lines[3]["memory_ratio"] < 1 and lines[3]["goal"]["memory_ratio"] == 0.5
    assert (tmp_path / "out" / "steps.jsonl").read_text().splitlines() == result.stdout.splitlines()


def test_a_device_check_step_stopped_before_its_first_epoch_still_reports(tmp_path):
    (tmp_path / "runs" / "k3-paper").mkdir(parents=True)  # the limit struck while the data was decoding
    (tmp_path / "k3-paper.txt").write_text("decoding train\n")
    script = Path(__file__).parent.parent / "recipes" / "step_report.py"
    done = subprocess.run(
        [sys.executable, str(script), "k3-paper", "124", "210", "210", str(tmp_path)], capture_output=True, text=True
    )
    report = json.loads(done.stdout)
    assert report["timed_out"] and report["epochs_done"] == 0 and report["goal"] == {"seconds": 90.0, "met": None}
