"""Early exit: the exit rule, calibration and compute on hand-made answers, and the analysis of a real run."""

import json

import pytest
import torch
from test_train import tiny_config

from layerwise.config import RunConfig, config_from_dict
from layerwise.early_exit import calibrate, exit_macs, exits, score
from layerwise.errors import LayerwiseError
from layerwise.train import train

# Three images, two heads: head 0 is sure of images 0 and 1 (and wrong on 1); head 1 is right on all three.
CONFIDENCE = torch.tensor([[0.9, 0.6], [0.8, 0.7], [0.3, 0.9]])
CORRECT = torch.tensor([[True, True], [False, True], [False, True]])
MACS = [10.0, 30.0]


def test_each_image_exits_at_the_first_head_sure_enough():
    assert exits(CONFIDENCE, 0.85).tolist() == [0, 1, 1]
    assert exits(CONFIDENCE, 0.5).tolist() == [0, 0, 1]
    assert exits(CONFIDENCE, 2.0).tolist() == [1, 1, 1]  # never sure: the last head answers


def test_score_counts_accuracy_and_average_compute():
    s = score(CONFIDENCE, CORRECT, MACS, 0.85)
    assert s["top1"] == pytest.approx(100.0) and s["macs"] == pytest.approx((10 + 30 + 30) / 3)
    assert s["exits_per_head"] == [1, 2]
    s = score(CONFIDENCE, CORRECT, MACS, 0.5)
    assert s["top1"] == pytest.approx(200 / 3) and s["macs"] == pytest.approx((10 + 10 + 30) / 3)


def test_calibration_takes_the_cheapest_threshold_within_half_a_point_of_the_last_head():
    """0.6 would save more compute but loses a third of the answers; 0.9 loses none and costs 70/3 per image,
    less than the 25 of the network without exits (which skips head 0's 5)."""
    chosen = calibrate(CONFIDENCE, CORRECT, MACS, alone=25.0)
    assert chosen["threshold"] == pytest.approx(0.9) and chosen["last_head_top1"] == pytest.approx(100.0)
    assert chosen["top1"] == pytest.approx(100.0) and chosen["macs"] == pytest.approx(70 / 3)


def test_calibration_keeps_the_last_head_when_no_threshold_saves_compute():
    chosen = calibrate(CONFIDENCE, CORRECT, MACS, alone=20.0)  # cheaper than any exit that keeps the accuracy
    assert chosen["threshold"] is None and chosen["macs"] == 20.0 and chosen["exits_per_head"] == [0, 3]


def test_compute_is_counted_from_the_network():
    """Two convs and two linear heads at 8x8, worked out by hand: exiting at head 1 also paid for head 0."""
    cfg = config_from_dict(
        {"model": {"k": 1, "widths": [4, 8], "downsample_at": [], "batchnorm": False, "head_batchnorm": False},
         "data": {"image_size": 8}}
    )  # fmt: skip
    assert isinstance(cfg, RunConfig)
    block0, head0 = 8 * 8 * 4 * 3 * 9, 4 * 2 * 2 * 3  # conv 3->4 (3x3) at 8x8; linear from 4x2x2 to 3 classes
    block1, head1 = 8 * 8 * 8 * 4 * 9, 8 * 2 * 2 * 3
    assert exit_macs(cfg, 3, [0, 1]) == ([block0 + head0, block0 + block1 + head0 + head1], block0 + block1 + head1)


def test_the_analysis_of_a_run_calibrates_on_its_validation_split_and_saves_its_curve(tmp_path, image_folder):
    from layerwise.cli import main

    train(tiny_config(epochs=2), tmp_path / "run", image_folder)
    assert main(["eval", str(tmp_path / "run"), "--data", str(image_folder), "--early-exit", "--device", "cpu"]) == 0
    saved = json.loads((tmp_path / "run" / "early_exit.json").read_text())[str(image_folder.resolve())]
    assert saved["calibrated_on"] == "the run's validation split (8 images)"
    assert saved["calibration"]["top1"] >= saved["calibration"]["last_head_top1"] - 0.5
    assert saved["macs_per_exit"] == sorted(saved["macs_per_exit"])
    assert saved["last_head"]["macs"] == saved["macs_without_exits"] < saved["macs_per_exit"][-1]
    assert saved["calibration"]["macs"] <= saved["macs_without_exits"]  # early exit is only chosen when it pays
    assert len(saved["curve"]) >= 51 and all(0 <= p["top1"] <= 100 for p in saved["curve"])
    assert sum(saved["at_threshold"]["exits_per_head"]) == 48  # every image of the scored folder answered once
    assert main(["report", str(tmp_path / "run")]) == 0
    page = (tmp_path / "run" / "report.html").read_text()
    assert "Early exit" in page and page.count("data:image/png;base64,") == 3


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"train": {"mode": "e2e"}}, "early exit needs two heads that classify or more"),
        ({"data": {"val_size": 0}}, "calibrates on the run's validation split, and this run has none"),
    ],
)
def test_early_exit_refuses_what_it_cannot_do(tmp_path, image_folder, extra, message):
    from layerwise.early_exit import early_exit_run

    train(tiny_config(epochs=1, **extra), tmp_path / "run", image_folder)
    with pytest.raises(LayerwiseError, match=message):
        early_exit_run(tmp_path / "run", image_folder, "cpu")
    assert not (tmp_path / "run" / "early_exit.json").exists()


def test_early_exit_refuses_to_score_the_data_it_calibrates_on(tmp_path, image_folder):
    from conftest import write_folder

    from layerwise.early_exit import early_exit_run

    held = write_folder(tmp_path / "held", per_class=3, seed=4)
    train(tiny_config(epochs=1, data={"val_size": 0, "val_path": str(held)}), tmp_path / "run", image_folder)
    with pytest.raises(LayerwiseError, match="is the run's own validation data"):
        early_exit_run(tmp_path / "run", held, "cpu")
