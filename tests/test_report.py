"""`layerwise report`: the HTML page a run leaves, checked as a reader sees it in headless Chromium."""

import json
import re
import shutil
import subprocess

import pytest
import torch
from test_train import tiny_config
from torchvision.io import decode_png

from layerwise.cli import main
from layerwise.errors import LayerwiseError
from layerwise.rundir import RunDir
from layerwise.train import train

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs it)")


def chromium(tmp_path, page, *args: str) -> str:
    """Run headless Chromium on the page (as root it needs --no-sandbox; no network, no background services)."""
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chromium-profile'}"]  # fmt: skip
    done = subprocess.run([CHROMIUM, *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A greedy run and its end-to-end reference on the same tiny data."""
    from conftest import write_folder

    root = tmp_path_factory.mktemp("report")
    data = write_folder(root / "data", per_class=16)
    greedy = train(tiny_config(epochs=2), root / "greedy", data)
    e2e = train(tiny_config(epochs=2, train={"mode": "e2e"}), root / "e2e", data)
    return root, data, greedy, e2e


def test_a_finished_runs_report_is_self_contained(pair):
    root, _, greedy, _ = pair
    assert main(["report", str(root / "greedy")]) == 0
    page = (root / "greedy" / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 2  # curves, final accuracy: inlined, self-contained
    assert f"{greedy['final']['val_top1']:.2f}" in page and "unfinished" not in page


def test_a_decoupled_run_is_reported_block_by_block_and_beside_another_against_training_time(pair, tmp_path):
    root, data, _, _ = pair
    decoupled = train(tiny_config(epochs=2, train={"mode": "decoupled"}), root / "decoupled", data)
    out = tmp_path / "methods.html"
    assert main(["report", str(root / "greedy"), str(root / "decoupled"), "-o", str(out)]) == 0
    page = out.read_text()
    assert page.count('src="data:image/png;base64,') == 3  # curves, final accuracy, accuracy against time
    assert "Accuracy against training time" in page
    assert [b["stage"] for b in decoupled["blocks"]] == ["block 0", "block 1", "block 2"]
    for block in decoupled["blocks"]:  # its own head's figures, each block in a row of its own
        assert f"<td>{block['stage']}</td><td>{block['val_top1']:.2f}</td><td>{block['val_top5']:.2f}</td>" in page


def test_many_runs_compare_in_one_table_of_the_settings_that_differ(pair, tmp_path, capsys):
    """Three runs differing in train.mode, train.ema and data.mix: one line each, naming those settings alone,
    with the summaries' final top-1 and training seconds; the HTML page opens with the same table."""
    root, data, greedy, e2e = pair
    mixed = train(tiny_config(epochs=2, train={"ema": 0.9}, data={"mix": "mixup"}), root / "mixed", data)
    runs = [str(root / n) for n in ("greedy", "e2e", "mixed")]
    assert main(["report", *runs, "--table"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 5 and lines[0].split()[:2] == ["run", "settings"] and set(lines[1]) == {"-"}
    for line, name, summary in zip(lines[2:], ("greedy", "e2e", "mixed"), (greedy, e2e, mixed), strict=True):
        cells = line.split()
        assert cells[0] == name
        assert [float(c) for c in cells[-3:]] == pytest.approx(
            [summary["final"]["val_top1"], summary["final"]["val_ensemble_top1"], summary["train_seconds"]], abs=0.006
        )
    assert "data.mix=none, train.mode=greedy, train.ema=0.0" in lines[2]
    assert "data.mix=mixup, train.mode=greedy, train.ema=0.9" in lines[4]
    assert "train.mode=e2e" in lines[3] and "lr=" not in lines[3]  # what they share is left out
    out = tmp_path / "three.html"
    assert main(["report", *runs, "-o", str(out)]) == 0
    page = out.read_text()
    assert page.index("<h2>Runs compared</h2>") < page.index("<h2>Training curves</h2>")
    assert "<td>data.mix=mixup, train.mode=greedy, train.ema=0.9</td>" in page


@needs_chromium
def test_a_reader_sees_both_runs_plots_and_numbers(pair, tmp_path, capsys):
    root, _, greedy, e2e = pair
    out = tmp_path / "both.html"
    assert main(["report", str(root / "greedy"), str(root / "e2e"), "-o", str(out)]) == 0
    dom = chromium(tmp_path, out, "--dump-dom", "--virtual-time-budget=5000")
    assert 'data-images-loaded="true"' in dom  # every plot decoded with a size
    assert "greedy (demo, greedy)" in dom and "e2e (demo, e2e)" in dom
    for block in greedy["blocks"]:  # every block's numbers, as the summary has them
        assert f"<td>{block['stage']}</td><td>{block['val_top1']:.2f}</td><td>{block['val_top5']:.2f}</td>" in dom
    assert f"<td>e2e</td><td>{e2e['final']['val_top1']:.2f}</td>" in dom
    assert re.search(r"<td>block 1</td>.*?</tr>", dom)

    shot = tmp_path / "shot.png"
    chromium(tmp_path, out, f"--screenshot={shot}", "--window-size=1000,1400")
    pixels = decode_png(torch.frombuffer(bytearray(shot.read_bytes()), dtype=torch.uint8)).float()
    ink = (pixels.mean(0) < 200).float().mean()  # dark pixels: plots, text and table lines
    assert 0.02 < ink < 0.6, float(ink)  # neither blank nor a block of colour


def test_an_unfinished_run_gets_a_report_of_what_it_has(tmp_path, pair):
    _, data, _, _ = pair

    class Stop(Exception):
        pass

    def stop(row):
        raise Stop

    with pytest.raises(Stop):
        train(tiny_config(epochs=2), tmp_path / "cut", data, on_epoch_end=stop)
    assert main(["report", str(tmp_path / "cut")]) == 0
    page = (tmp_path / "cut" / "report.html").read_text()
    assert "unfinished" in page and "block 0" in page


def test_the_report_shows_eval_results_and_the_adaptive_depth_decision(tmp_path, pair):
    _, data, _, _ = pair
    train(tiny_config(epochs=1, train={"min_gain": 101.0}), tmp_path / "run", data)
    assert main(["eval", str(tmp_path / "run"), "--data", str(data), "--device", "cpu"]) == 0
    evals = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert list(evals) == [str(data.resolve())]
    assert main(["report", str(tmp_path / "run")]) == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Adaptive depth: block 1&#x27;s head reached" in page
    assert f"<td>{data.resolve()}</td><td>block 0</td><td>{evals[str(data.resolve())]['n']}</td>" in page


def test_a_folder_that_is_not_a_run_is_a_one_line_error_and_no_file(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "is not a layerwise run" in err and "\n" not in err
    assert not (tmp_path / "r.html").exists()
    assert not RunDir(tmp_path / "empty").summary.exists()


def test_hostile_values_and_names_are_shown_literally_under_a_strict_policy(tmp_path, pair):
    root, *_ = pair
    run = tmp_path / "run $x^2$ <b>"
    shutil.copytree(root / "greedy", run)
    info = json.loads((run / "run.json").read_text())
    info.update(processes="<img src=x onerror=alert(1)>", device="<script>alert(2)</script>")
    (run / "run.json").write_text(json.dumps(info))
    assert main(["report", str(run), "-o", str(tmp_path / "page.html")]) == 0
    page = (tmp_path / "page.html").read_text()
    assert "<img src=x" not in page and "<script>alert" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page and "run $x^2$ &lt;b&gt;" in page
    policy = re.search(r'<meta http-equiv="Content-Security-Policy" content="([^"]+)">', page).group(1)
    assert "default-src 'none'" in policy and "img-src data:" in policy and "unsafe-inline" not in policy
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 1 and "script-src 'sha256-" in policy
    if CHROMIUM is not None:  # the page's own script still runs under its policy, and the plots still load
        dom = chromium(tmp_path, tmp_path / "page.html", "--dump-dom", "--virtual-time-budget=5000")
        assert 'data-images-loaded="true"' in dom


def test_a_malformed_metrics_file_is_a_one_line_error(tmp_path, pair, capsys):
    root, *_ = pair
    run = tmp_path / "run"
    shutil.copytree(root / "greedy", run)
    (run / "metrics.jsonl").write_text('{"stage": 0, "epoch": "one"}\n')
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds something layerwise did not write" in err[0]


def test_tensorboard_event_files_hold_each_epochs_metrics_and_a_resume_drops_the_epochs_it_redoes(tmp_path, pair):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_train import train_until_interrupted

    _, data, _, _ = pair
    cfg = tiny_config(epochs=2, train={"tensorboard": True})
    train_until_interrupted(cfg, tmp_path / "run", data)
    train(cfg, tmp_path / "run", data, resume=True)
    rows = RunDir(tmp_path / "run").read_metrics()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    for tag, value in [("top1/val", lambda r: r["val"]["top1"]), ("loss/train", lambda r: r["loss"]),
                       ("ensemble_top1/train_eval", lambda r: r["train_eval"]["ensemble_top1"])]:  # fmt: skip
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == list(range(6))  # the third epoch's first try was dropped
        assert [s.value for s in scalars] == pytest.approx([value(r) for r in rows], rel=1e-6)


def test_tensorboard_without_its_package_is_a_one_line_error_before_anything_is_written(tmp_path, pair, monkeypatch):
    import sys

    _, data, _, _ = pair
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    with pytest.raises(LayerwiseError, match=r"pip install 'layerwise\[tensorboard\]'"):
        train(tiny_config(train={"tensorboard": True}), tmp_path / "run", data)
    assert not (tmp_path / "run").exists()
