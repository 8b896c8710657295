"""Your own network: the README's snippet end to end, the builder's import path and its opt-in, the library's
heads, recomputation of any stage, and one-line errors for networks that cannot work."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_folder
from custom_nets import unit
from test_recompute import assert_same_training
from torch import nn

from layerwise.config import ModelConfig
from layerwise.errors import LayerwiseError
from layerwise.models import build_model
from layerwise.models.blocks import set_recompute
from layerwise.models.custom import InfoProHead
from layerwise.stages import plan_stages
from layerwise.train.stage import StageModule, freeze_for, frozen_prefix

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet() -> tuple[str, list[str]]:
    """The README's mynet.py and its shell lines, exactly as written there."""
    text = README.read_text()
    python = re.search(r"<!-- readme-snippet: mynet.py -->\n```python\n(.*?)```", text, re.S).group(1)
    shell = re.search(r"<!-- readme-snippet: shell -->\n```bash\n(.*?)```", text, re.S).group(1)
    return python, shell.strip().splitlines()


def command(line: str) -> list[str]:
    """A README shell line as this interpreter runs it (`python` and `layerwise` from this environment)."""
    words = line.split()
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    assert words[0] == "layerwise", line
    return [sys.executable, "-m", "layerwise", *words[1:]]


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "LAYERWISE_TRUST_CODE"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def readme_run(tmp_path_factory):
    """The README's snippet, run verbatim in a folder with a small `images` folder (3 classes x 8 images)."""
    root = tmp_path_factory.mktemp("readme")
    python, shell = readme_snippet()
    (root / "mynet.py").write_text(python)
    write_folder(root / "images", per_class=8)
    for line in shell:
        done = run(command(line), root)
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    return root


def test_the_readme_network_trains_greedily_and_is_evaluated_and_exported(readme_run):
    import json

    summary = json.loads((readme_run / "runs/mine/summary.json").read_text())
    assert [b["stage"] for b in summary["blocks"]] == ["block 0", "block 1", "block 2"]
    # The blocks' sizes worked out by hand: 3x3 convs without bias, BN (weight and bias) after each
    assert summary["parameters"]["blocks"] == [27 * 32 + 64, 9 * 32 * 64 + 128, 9 * 64 * 128 + 256]
    # Paper heads for k=2: one 3x3 conv with BN as wide as the block, average to 2x2, BN, linear to 3 classes
    assert summary["parameters"]["heads"] == [9 * c * c + 2 * c + 2 * c + 4 * c * 3 + 3 for c in (32, 64, 128)]
    assert [b["downsample"] for b in summary["blocks"]] == [False, True, True]
    evals = json.loads((readme_run / "runs/mine/eval.json").read_text())
    assert next(iter(evals.values()))["n"] == 24
    program = torch.export.load(readme_run / "runs/mine/model.pt2").module()
    scores = program(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert scores.shape == (2, 3)


def test_the_readme_local_loss_trains_decoupled_and_is_evaluated(tmp_path):
    """The README's myloss.py, verbatim: a head kind and its loss registered from Python, trained decoupled on a
    small folder; `eval --trust-code` imports the script again, which registers them again (the same functions,
    so no clash), and scores every head."""
    text = README.read_text()
    python = re.search(r"<!-- readme-snippet: myloss.py -->\n```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "myloss.py").write_text(python)
    write_folder(tmp_path / "images", per_class=8)
    done = run([sys.executable, "myloss.py"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    done = run([sys.executable, "-m", "layerwise", "eval", "runs/focal", "--data", "images", "--trust-code"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["0", "1", "2"]
    (row,) = [json.loads(line) for line in (tmp_path / "runs/focal/metrics.jsonl").read_text().splitlines()][-1:]
    assert [b["block"] for b in row["blocks"]] == [0, 1, 2]
    saved = yaml.safe_load((tmp_path / "runs/focal/config.yaml").read_text())
    assert saved["model"]["head"] == "focal" and saved["train"]["mode"] == "decoupled"


def test_a_received_run_imports_its_code_only_when_trusted_and_the_report_never(readme_run, tmp_path):
    shutil.copytree(readme_run, tmp_path / "copy")
    root = tmp_path / "copy"
    (root / "mynet.py").write_text("raise SystemExit('mynet was imported')\n")
    refused = run(command("layerwise eval runs/mine --data images"), root)
    assert refused.returncode == 2
    assert "pass --trust-code (or set LAYERWISE_TRUST_CODE=1)" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert run(command("layerwise report runs/mine"), root).returncode == 0  # reads files, imports nothing
    page = (root / "runs/mine/report.html").read_text()
    assert f"<td>{27 * 32 + 64}</td>" in page  # the block sizes, from summary.json
    broken = run(command("layerwise eval runs/mine --data images --trust-code"), root)
    assert broken.returncode == 2
    assert "model.builder mynet:stages: importing mynet raised SystemExit: mynet was imported" in broken.stderr
    resumed = run(command("layerwise train --out runs/mine --resume"), root)
    assert resumed.returncode == 2 and "--trust-code" in resumed.stderr


def test_a_script_run_from_another_folder_is_refused_before_training(tmp_path):
    """Its builder would be recorded as `mynet:stages`, which `layerwise eval` run from here could not import."""
    python, _ = readme_snippet()
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "mynet.py").write_text(python)
    done = run([sys.executable, "sub/mynet.py"], tmp_path)
    assert done.returncode == 1 and f"run mynet.py from its own folder, {tmp_path / 'sub'} (or as" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_infopro_head_has_the_published_layout():
    """One conv (16 -> 32 channels, stride 2, no bias), BN, pooling, 32 -> 128 -> 10 linear layers."""
    head = InfoProHead(16, 10)
    assert sum(p.numel() for p in head.parameters()) == 16 * 32 * 9 + 2 * 32 + (32 * 128 + 128) + (128 * 10 + 10)
    assert head[0].stride == (2, 2)
    assert head(torch.randn(2, 16, 8, 8)).shape == (2, 10)
    wide = InfoProHead(64, 10)  # 64 channels stay 64, at stride 1
    assert (wide[0].out_channels, wide[0].stride) == (64, (1, 1))


def not_chaining() -> list[nn.Module]:
    return [unit(3, 8), unit(16, 8)]


def wrong_head(num_classes: int):
    return [unit(3, 4)], [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes + 2))]


def own_heads(num_classes: int):
    return [unit(3, 4)], [nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))]


def module_lists(num_classes: int):
    stages, heads = own_heads(num_classes)
    return nn.ModuleList(stages), nn.ModuleList(heads)


def head_too_small():
    return [unit(3, 4)], [nn.Sequential(nn.Flatten(), nn.Linear(5, 3))]


def one_head():
    return [unit(3, 4)], nn.Linear(4, 3)


def raises() -> list[nn.Module]:
    raise ValueError("boom")


def not_stages() -> int:
    return 3


def custom(builder: str, **model) -> ModelConfig:
    return ModelConfig(arch="custom", builder=builder, **model)


@pytest.mark.parametrize(
    "builder, message",
    [
        ("test_custom:not_chaining", "stage 1 (Sequential) cannot take stage 0's 2x8x32x32 output: it expects 16 "),
        ("test_custom:wrong_head", "head 0 (Sequential) returns 2x5 for stage 0's 2x4x32x32, not (batch, 3) class"),
        ("test_custom", "model.builder must be an import path package.module:function (got 'test_custom')"),
        ("no_such_module:f", "model.builder no_such_module:f: no module no_such_module in the current directory"),
        ("test_custom:missing", "model.builder test_custom:missing: test_custom has no missing"),
        ("test_custom:raises", "model.builder test_custom:raises raised ValueError: boom"),
        ("test_custom:not_stages", "model.builder test_custom:not_stages returned int; return a list of stages"),
        ("test_custom:head_too_small", "head 0 (Sequential) cannot take stage 0's 2x4x32x32 output: "),
        ("test_custom:one_head", "heads must be a list with one nn.Module per stage, not Linear"),
        ("os:system\nrm", "model.builder must be an import path package.module:function (got 'os:system\\nrm')"),
    ],
)
def test_networks_that_cannot_work_are_refused_in_one_line(builder, message):
    with pytest.raises(LayerwiseError) as e:
        build_model(custom(builder), 3)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_heads_follow_each_stage_and_num_classes_reaches_the_builder():
    net = build_model(custom("tests.custom_nets:good", builder_args={"width": 6}, head="infopro"), 3)
    assert [h[0].in_channels for h in net.heads] == [6, 12, 12]
    net = build_model(custom("test_custom:own_heads"), 5)
    assert net.heads[0][-1].out_features == 5
    net = build_model(custom("test_custom:module_lists"), 5)  # a pair of ModuleLists is (stages, heads) too
    assert net.J == 1 and net.heads[0][-1].out_features == 5


def test_custom_heads_fail_when_the_class_count_disagrees():
    with pytest.raises(LayerwiseError, match="not \\(batch, 4\\) class scores"):
        build_model(custom("test_custom:wrong_head"), 4)


@pytest.mark.parametrize("mode,which", [("greedy", 1), ("e2e", 0)])
def test_recompute_trains_any_stage_exactly_like_the_plain_path(mode, which):
    """A stage of your own (with dropout, so the RNG state matters) is checkpointed whole: same losses, weights
    and BN buffers, and less kept for the backward pass."""
    torch.manual_seed(0)
    plain = build_model(custom("tests.custom_nets:good", head="infopro"), 4, 16)
    batches = [(torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,))) for _ in range(3)]
    stage = plan_stages(plain.J, mode)[which]
    assert_same_training(plain, stage, batches)

    def kept(net) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        module = StageModule(net, stage)
        freeze_for(net, stage)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(frozen_prefix(net, stage, batches[0][0]), batches[0][1])[0].backward()
        return total

    full = kept(plain)
    set_recompute(plain, True)
    assert kept(plain) < 0.5 * full


def test_your_network_resumes_exactly_with_the_cache_bf16_early_exit_and_predict(tmp_path, image_folder, capsys):
    """What a preset run has: a run stopped mid-block and resumed ends where an uninterrupted one does (here
    with the host prefix cache and bf16), and early exit and predict load it with --trust-code."""
    from test_cache import final_weights

    from layerwise import config_for
    from layerwise.cli import main
    from layerwise.train import train

    cfg = config_for(
        "tests.custom_nets:good",
        args={"width": 4},
        data={"val_size": 8},
        train={"epochs_per_block": 2, "batch_size": 16, "train_eval_size": 8, "device": "cpu", "cache": "host",
               "precision": "bf16"},
    )  # fmt: skip
    train(cfg, tmp_path / "whole", image_folder)

    class Stop(Exception):
        pass

    def stop(row):
        if (row["stage"], row["epoch"]) == (1, 1):
            raise Stop

    with pytest.raises(Stop):
        train(cfg, tmp_path / "cut", image_folder, on_epoch_end=stop)
    train(cfg, tmp_path / "cut", image_folder, resume=True)
    whole, cut = final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut")
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    run_dir = str(tmp_path / "whole")
    assert main(["eval", run_dir, "--data", str(image_folder), "--early-exit", "--trust-code", "--device", "cpu"]) == 0
    image = str(next(image_folder.rglob("*.jpg")))
    capsys.readouterr()
    assert main(["predict", run_dir, image, "--early-exit", "--json", "--trust-code", "--device", "cpu"]) == 0
    assert "head" in capsys.readouterr().out
    capsys.readouterr()
    for refused in (["predict", run_dir, image], ["export", run_dir, "--format", "pt2"]):  # no --trust-code
        assert main(refused) == 2
        code = "import tests.custom_nets (running its top-level code) and call tests.custom_nets:good with {'width': 4}"
        assert f"would {code}" in capsys.readouterr().err
