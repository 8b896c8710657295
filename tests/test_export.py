"""export and predict: the exported files run without layerwise and agree with the eager network on real images."""

import io
import json
import select
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image
from test_train import tiny_config
from test_untrusted import png_header

from layerwise.cli import main
from layerwise.data.loaders import Normalize
from layerwise.data.sources import sample_path
from layerwise.delivered import load_delivered
from layerwise.device import precision_for
from layerwise.evaluate import ensemble_scores
from layerwise.train import train


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory):
    """Eight real CIFAR-10 JPEGs from the built-in sample, as files and as a (8, 3, 32, 32) uint8 batch."""
    from torchvision.io import decode_jpeg

    folder = tmp_path_factory.mktemp("images")
    paths = []
    with tarfile.open(sample_path()) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith(".jpg")][::1250][:8]
        for i, m in enumerate(members):
            paths.append(folder / f"{i}.jpg")
            paths[-1].write_bytes(tf.extractfile(m).read())
    batch = torch.stack([decode_jpeg(torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8)) for p in paths])
    return paths, batch


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from conftest import write_folder

    root = tmp_path_factory.mktemp("export")
    data = write_folder(root / "data", per_class=16)
    train(tiny_config(epochs=1), root / "run", data)
    return root / "run", data


def eager(run_dir, batch, heads=None, kind=None):
    """The run's own network on the batch, normalised as training normalises."""
    got = load_delivered(run_dir, precision_for(torch.device("cpu"), "fp32"))
    x = Normalize(got.cfg.data.mean, got.cfg.data.std, torch.device("cpu"))(batch)
    with torch.no_grad():
        logits = got.net.eval()(x, heads=heads or got.heads)
    return ensemble_scores(logits, kind)[-1] if kind else logits[-1]


WITHOUT_LAYERWISE = "import sys; sys.modules['layerwise'] = None\n"  # any import of layerwise would now fail


def test_a_pt2_export_runs_without_layerwise_and_agrees_with_the_eager_network(run, sample_images, tmp_path):
    run_dir, _ = run
    _, batch = sample_images
    out = tmp_path / "model.pt2"
    assert main(["export", str(run_dir), "--format", "pt2", "-o", str(out)]) == 0
    torch.save(batch, tmp_path / "batch.pt")
    code = WITHOUT_LAYERWISE + (
        f"import torch; m = torch.export.load({str(out)!r}).module()\n"
        f"torch.save(m(torch.load({str(tmp_path / 'batch.pt')!r})), {str(tmp_path / 'out.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert torch.allclose(torch.load(tmp_path / "out.pt"), eager(run_dir, batch), atol=1e-4, rtol=1e-4)


def test_an_onnx_export_of_the_ensemble_agrees_in_onnxruntime(run, sample_images, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    run_dir, _ = run
    _, batch = sample_images
    out = tmp_path / "model.onnx"
    assert main(["export", str(run_dir), "--format", "onnx", "--ensemble", "-o", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (scores,) = session.run(None, {"images": batch.numpy()})
    expected = eager(run_dir, batch, kind="logits")
    assert torch.allclose(torch.from_numpy(scores), expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, eager(run_dir, batch))  # the ensemble is not the last head alone


def test_one_head_can_be_exported(run, sample_images, tmp_path):
    run_dir, _ = run
    _, batch = sample_images
    out = tmp_path / "head0.pt2"
    assert main(["export", str(run_dir), "--format", "pt2", "--head", "0", "-o", str(out)]) == 0
    with torch.no_grad():
        scores = torch.export.load(out).module()(batch)
    assert torch.allclose(scores, eager(run_dir, batch, heads=[0]), atol=1e-5)


def test_flip_exports_and_predicts_the_mean_of_each_heads_logits_over_the_image_and_its_mirror(
    run, sample_images, tmp_path, capsys
):
    """Worked out from the eager network: the ensemble of the heads' (z(x) + z(mirror x)) / 2."""
    run_dir, _ = run
    paths, batch = sample_images
    out = tmp_path / "flip.pt2"
    assert main(["export", str(run_dir), "--format", "pt2", "--ensemble", "--flip", "-o", str(out)]) == 0
    capsys.readouterr()
    got = load_delivered(run_dir, precision_for(torch.device("cpu"), "fp32"))
    x = Normalize(got.cfg.data.mean, got.cfg.data.std, torch.device("cpu"))(batch)
    with torch.no_grad():
        plain, mirrored = got.net.eval()(x, heads=got.heads), got.net(x.flip(-1), heads=got.heads)
        expected = ensemble_scores([(a + b) / 2 for a, b in zip(plain, mirrored, strict=True)], "logits")[-1]
        scores = torch.export.load(out).module()(batch)
    assert torch.allclose(scores, expected, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(expected, ensemble_scores(plain, "logits")[-1], atol=1e-4)
    assert main(["predict", str(run_dir), *map(str, paths[:2]), "--top", "1", "--flip", "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    probs = ((plain[-1] + mirrored[-1]) / 2)[:2].softmax(-1)
    assert [a["top"][0]["probability"] for a in answers] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)
    assert main(["predict", str(run_dir), str(paths[0]), "--flip", "--early-exit"]) == 2
    assert "--flip and --early-exit exclude each other" in capsys.readouterr().err


def test_a_missing_export_dependency_is_a_one_line_error_and_no_file(run, tmp_path, monkeypatch, capsys):
    run_dir, _ = run
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert main(["export", str(run_dir), "--format", "onnx", "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: --format onnx needs the onnx and onnxscript packages: pip install 'layerwise[export]'"
    assert list(tmp_path.iterdir()) == []
    assert main(["export", str(run_dir), "--format", "pt2", "--head", "7"]) == 2
    assert "--head 7 is not one of the run's trained heads that classify [0, 1, 2]" in capsys.readouterr().err


def test_predict_names_the_top_classes_and_reports_an_unreadable_image(run, sample_images, tmp_path, capsys):
    run_dir, _ = run
    paths, batch = sample_images
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(60_000, 60_000))
    gif = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (32, 32), c) for c in ((200, 0, 0), (0, 200, 0))]
    frames[0].save(gif, save_all=True, append_images=frames[1:])
    images = [paths[0], broken, bomb, gif, paths[1]]
    code = main(["predict", str(run_dir), *map(str, images), "--top", "2", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and err.count("\n") == 2, err
    assert f"cannot decode {broken}: not a valid image" in err and f"{bomb} is 60000x60000" in err
    lines = [json.loads(line) for line in out.splitlines()]  # JSON lines, in input order, errors included
    assert [a["image"] for a in lines] == list(map(str, images))
    assert ["error" in a for a in lines] == [False, True, True, False, False]  # the others are answered
    answers = [lines[0], lines[4]]
    probs = eager(run_dir, batch[:2]).softmax(-1)
    classes = json.loads((run_dir / "classes.json").read_text())
    for a, p in zip(answers, probs, strict=True):
        top = p.topk(2)
        assert [t["class"] for t in a["top"]] == [classes[i] for i in top.indices]
        assert [t["probability"] for t in a["top"]] == pytest.approx(top.values.tolist(), abs=1e-5)


def test_predict_with_early_exit_names_the_head_that_answered(run, sample_images, capsys):
    run_dir, data = run
    paths, _ = sample_images
    assert main(["predict", str(run_dir), str(paths[0]), "--early-exit"]) == 2
    assert "no threshold calibrated for this checkpoint yet" in capsys.readouterr().err
    assert main(["eval", str(run_dir), "--data", str(data), "--early-exit", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert main(["predict", str(run_dir), *map(str, paths), "--early-exit", "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(answers) == 8 and all(a["head"] in (0, 1, 2) for a in answers)
    # batches of 3 mix images that exit at different heads: each answers at the first head whose top probability
    # reaches the calibrated threshold, with that head's top classes
    (saved,) = json.loads((run_dir / "early_exit.json").read_text()).values()
    threshold = saved["calibration"]["threshold"]
    _, batch = sample_images
    got = load_delivered(run_dir, precision_for(torch.device("cpu"), "fp32"))
    x = Normalize(got.cfg.data.mean, got.cfg.data.std, torch.device("cpu"))(batch)
    with torch.no_grad():
        probs = [z.softmax(-1) for z in got.net.eval()(x, heads=got.heads)]
    assert main(["predict", str(run_dir), *map(str, paths), "--early-exit", "--json", "--batch-size", "3"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for i, a in enumerate(answers):
        head = next((j for j, p in zip(got.heads, probs, strict=True) if p[i].max() >= threshold), got.heads[-1])
        assert a["head"] == head
        assert a["top"][0]["probability"] == pytest.approx(probs[got.heads.index(head)][i].max().item(), abs=1e-5)


def test_predict_reads_folders_lists_and_stdin_in_order(sample_images, tmp_path, monkeypatch):
    from layerwise.predict import MAX_LINE, expand

    jpg = sample_images[0][0].read_bytes()
    root = tmp_path / "photos"
    for name in ("b/2.jpg", "a/c/3.PNG", "a/1.webp", "0.jpeg", ".hidden.jpg", "._0.jpeg", "notes.txt"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(jpg)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.jpg").write_bytes(jpg)
    (root / "linked").symlink_to(tmp_path / "elsewhere")  # a linked folder is not followed
    (tmp_path / "empty").mkdir()
    listed = tmp_path / "list.txt"
    listed.write_text(f"{root / 'b'}\r\n\n{tmp_path / 'missing.jpg'}\n{'x' * (MAX_LINE + 5)}\n@{listed}\n")
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{root / '0.jpeg'}\n"))
    got = [(i.name, i.error) for i in expand([str(root), f"@{listed}", "-", str(tmp_path / "empty"), "@nope"])]
    names = [n for n, e in got if e is None]
    assert names == [str(root / n) for n in ("0.jpeg", "a/1.webp", "a/c/3.PNG", "b/2.jpg")] + [
        str(root / "b" / "2.jpg"), str(tmp_path / "missing.jpg"), f"@{listed}", str(root / "0.jpeg")
    ]  # fmt: skip
    errors = [e for _, e in got if e]
    assert len(errors) == 3 and f"line 4 of {listed} is longer than {MAX_LINE:,} characters" in errors[0]
    assert "no image files" in errors[1] and "cannot read the list nope" in errors[2]


def test_predict_answers_each_stdin_line_as_it_comes_and_stops_quietly_on_a_closed_pipe(run, sample_images):
    """A line written to stdin is answered while stdin stays open; a reader that goes away ends the command
    without a traceback."""
    run_dir, _ = run
    paths, _ = sample_images
    proc = subprocess.Popen(
        [sys.executable, "-m", "layerwise", "predict", str(run_dir), "-", "--json", "--device", "cpu"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        for path in paths[:2]:
            proc.stdin.write(f"{path}\n")
            proc.stdin.flush()
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready, "no answer within 60 s while stdin stays open"
            assert json.loads(proc.stdout.readline())["image"] == str(path)
        proc.stdin.write(f"{paths[0].parent}\n" * 50)  # 400 answers, more than a pipe holds
        proc.stdin.close()
        assert proc.stdout.readline()
        proc.stdout.close()
        assert proc.wait(timeout=120) == 1
        err = proc.stderr.read()
        assert "Traceback" not in err and "Error" not in err, err
    finally:
        proc.kill()


def test_a_one_channel_dataset_trains_evaluates_exports_and_predicts(tmp_path, image_folder, capsys):
    """model.in_channels=1: images become one luma channel everywhere (training, eval, export, predict)."""
    from layerwise.data.loaders import to_channels

    red = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    red[:, 0] = 255
    assert to_channels(red, 1).unique().tolist() == [76]  # ITU-R 601-2 luma: 0.299 x 255
    run = tmp_path / "gray"
    train(tiny_config(epochs=1, model={"in_channels": 1}, data={"mean": [0.45], "std": [0.25]}), run, image_folder)
    got = load_delivered(run, precision_for(torch.device("cpu"), "fp32"))
    assert got.net.blocks[0][0].in_channels == 1
    assert main(["eval", str(run), "--data", str(image_folder), "--device", "cpu"]) == 0
    assert main(["export", str(run), "--format", "pt2"]) == 0
    program = torch.export.load(run / "model.pt2").module()
    assert program(torch.zeros(2, 1, 32, 32, dtype=torch.uint8)).shape == (2, 3)
    capsys.readouterr()
    assert main(["predict", str(run), str(next(image_folder.rglob("*.jpg"))), "--json", "--device", "cpu"]) == 0
    assert len(json.loads(capsys.readouterr().out)["top"]) == 3
