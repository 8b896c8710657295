"""`layerwise report`: one self-contained HTML page (plots inlined as PNG) for one run or several side by side.

It reads only the run directory: config.yaml, metrics.jsonl, summary.json (absent while a run is unfinished),
run.json and eval.json (what `layerwise eval` found). Plots use matplotlib's Agg backend; runs are told apart
by line style and marker as well as colour, so the page survives a greyscale print.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from layerwise.config import METHOD_HEADS, RunConfig, config_from_dict
from layerwise.errors import LayerwiseError
from layerwise.rundir import RunDir
from layerwise.safe_io import write_text

log = logging.getLogger("layerwise")

STYLES = [("-", "o", "#1b1b1b"), ("--", "s", "#6a6a6a"), (":", "^", "#0b5394"), ("-.", "D", "#b45f06")]
"""(line style, marker, colour) per run: distinguishable in colour and in grey."""


@dataclass
class RunRecord:
    """What a run directory holds, read once."""

    path: Path
    cfg: RunConfig
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None
    info: dict[str, Any]
    evals: dict[str, Any]
    early_exit: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.path.name} ({self.cfg.preset}, {self.cfg.train.mode})"

    @property
    def label(self) -> str:
        """The run's name as plot text, shown literally (matplotlib would read $...$ as math)."""
        return literal(self.path.name)

    @property
    def finished(self) -> bool:
        return self.summary is not None and RunDir(self.path).final.is_file()


def literal(text: str) -> str:
    """Text that matplotlib draws as it is: a `$` would open mathtext."""
    return text.replace("$", r"\$")


def load_run(path: str | Path) -> RunRecord:
    run = RunDir(path)
    if not run.is_run():
        raise LayerwiseError(f"{run.path} is not a layerwise run (no config.yaml); give a run directory")
    summary = run.read_facts(run.summary) or None  # None while the run is unfinished
    evals, early = run.read_evals(), run.read_facts(run.path / "early_exit.json")
    cfg = config_from_dict(run.saved_config())
    return RunRecord(run.path, cfg, run.read_metrics(), summary, run.read_info(), evals, early)


def scores_key(rows: list[dict]) -> str | None:
    """What the runs' per-epoch scores are on: validation, else the clean training subset."""
    return next((k for k in ("val", "train_eval") if rows and all(k in r for r in rows)), None)


# ---- plots


def png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def figure(**options):
    """A matplotlib Figure drawn with its own Agg canvas: no pyplot, so the caller's backend is left alone."""
    from matplotlib.figure import Figure

    return Figure(**options)


def curves(records: list[RunRecord]) -> str:
    """Top-1, loss and learning rate against the run's epochs, one segment per block, runs on shared axes."""
    fig = figure(figsize=(8, 7.5))
    acc, loss, lr = fig.subplots(3, 1, sharex=True, height_ratios=[3, 2, 1])
    for i, (record, (line, marker, colour)) in enumerate(zip(records, itertools.cycle(STYLES))):
        scored = scores_key(record.rows)
        start = 0
        for stage, rows in itertools.groupby(record.rows, key=lambda r: r["stage"]):
            rows = list(rows)
            x = [start + r["epoch"] for r in rows]
            label = stage == record.rows[0]["stage"]
            style = {"color": colour, "marker": marker, "markersize": 4}
            acc.plot(x, [r["train"]["top1"] for r in rows], linestyle=line, alpha=0.5, **style,
                     label=f"{record.label}: train (augmented)" if label else None)  # fmt: skip
            loss.plot(x, [r["loss"] for r in rows], linestyle=line, alpha=0.5, **style,
                      label=f"{record.label}: train" if label else None)  # fmt: skip
            if scored:
                acc.plot(x, [r[scored]["top1"] for r in rows], linestyle=line, linewidth=2.2, **style,
                         label=f"{record.label}: {scored}" if label else None)  # fmt: skip
                loss.plot(x, [r[scored]["loss"] for r in rows], linestyle=line, linewidth=2.2, **style,
                          label=f"{record.label}: {scored}" if label else None)  # fmt: skip
            if scored and "blocks" in rows[0]:  # decoupled: the earlier blocks' heads, thinner
                for b in range(len(rows[0]["blocks"]) - 1):
                    if scored not in rows[0]["blocks"][b]:  # a head that does not classify: no accuracy
                        continue
                    acc.plot(x, [r["blocks"][b][scored]["top1"] for r in rows], linestyle=line, linewidth=0.9,
                             alpha=0.6, color=colour, label=f"{record.label}: {scored}, earlier blocks" if label and
                             not b else None)  # fmt: skip
            lr.plot(x, [r["lr"] for r in rows], linestyle=line, drawstyle="steps-post", color=colour)
            stage_name = literal(str(rows[0]["stage_name"]))
            acc.annotate(stage_name, (x[0], 1.0 - 0.05 * i), xycoords=("data", "axes fraction"), fontsize=7,
                         va="top", color=colour)  # fmt: skip
            for axis in (acc, loss, lr):
                axis.axvline(start + 0.5, color="#cccccc", linewidth=0.8, zorder=0)
            start = x[-1]
    acc.set_ylabel("top-1 accuracy (%)")
    loss.set_ylabel("cross-entropy loss")
    lr.set_ylabel("learning rate")
    lr.set_yscale("log")
    lr.set_xlabel("epoch, counted over the run's stages (a grey line opens each block)")
    acc.legend(fontsize=7, loc="lower right")
    loss.legend(fontsize=7, loc="upper right")
    for axis in (acc, loss, lr):
        axis.grid(alpha=0.3)
    return png(fig)


def time_curves(records: list[RunRecord]) -> str:
    """Each run's scored top-1 after every epoch (the stage's last head: the network delivered so far) against its
    training seconds so far: methods that train the same network differently (greedy, decoupled, pipelined, end
    to end) compared by the time they take, not their epochs."""
    fig = figure(figsize=(8, 3.8))
    axis = fig.subplots()
    for record, (line, marker, colour) in zip(records, itertools.cycle(STYLES)):
        scored = scores_key(record.rows)
        if not scored:
            continue
        elapsed = list(itertools.accumulate(r["seconds"] for r in record.rows))
        label = f"{record.label} ({literal(record.cfg.train.mode)})"
        axis.plot(elapsed, [r[scored]["top1"] for r in record.rows], linestyle=line, marker=marker, markersize=4,
                  color=colour, label=label)  # fmt: skip
    axis.set_xlabel("training seconds (evaluation excluded)")
    axis.set_ylabel("top-1 accuracy (%), last trained head")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    return png(fig)


def final_bars(records: list[RunRecord]) -> str:
    """Each block's own head and the ensemble after it, top-1 and top-5, with the paper's figures."""
    fig = figure(figsize=(9, 3.6))
    axes = fig.subplots(1, 2)
    width = 0.8 / (2 * len(records))
    blocks_seen = sorted({r["block"] for record in records for r in last_rows(record)})
    for i, (record, (_, _, colour)) in enumerate(zip(records, itertools.cycle(STYLES))):
        scored = scores_key(record.rows)
        if not scored:
            continue
        rows = [r for r in last_rows(record) if scored in r]  # a head that does not classify has no bar
        for axis, k in zip(axes, ("top1", "top5"), strict=True):  # each bar over the block its head follows
            x = torch.tensor([blocks_seen.index(r["block"]) for r in rows]).float() + (2 * i - len(records)) * width
            own = [r[scored][k] for r in rows]
            ens = [r[scored][f"ensemble_{k}"] for r in rows]
            axis.bar(x, own, width, align="edge", color=colour, label=f"{record.label}: own head")
            axis.bar(x + width, ens, width, align="edge", color="white", edgecolor=colour, hatch="//",
                     label=f"{record.label}: ensemble")  # fmt: skip
    for axis in axes:
        axis.set_xticks(range(len(blocks_seen)), [f"block {j}" for j in blocks_seen], fontsize=8)
    for axis, k in zip(axes, ("top1", "top5"), strict=True):
        paper = [(r, v) for r in records for key, v in r.cfg.paper.items() if key in (k, f"ensemble_{k}")]
        for record, value in paper[:2]:
            where = "original CIFAR-10 pixels" if record.cfg.data.augment == "cifar" else "ImageNet"
            axis.axhline(value, color="#444444", linestyle=":", linewidth=1)
            axis.annotate(f"paper {value:g} ({where})", (0, value), xycoords=("axes fraction", "data"), fontsize=7,
                          va="bottom")  # fmt: skip
        axis.set_ylabel(f"{'top-1' if k == 'top1' else 'top-5'} accuracy (%)")
        axis.set_xlabel("after block")
        axis.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    return png(fig)


def early_exit_curve(result: dict[str, Any]) -> str:
    """Top-1 against the average multiply-adds per image as the threshold moves, with the calibrated point."""
    fig = figure(figsize=(6, 3.6))
    axis = fig.subplots()
    points = sorted(result["curve"], key=lambda p: p["macs"])
    axis.plot([p["macs"] / 1e6 for p in points], [p["top1"] for p in points], "-o", color="#1b1b1b", markersize=3,
              label="one threshold for all heads")  # fmt: skip
    at, last = result["at_threshold"], result["last_head"]
    if at["threshold"] is not None:
        axis.plot(at["macs"] / 1e6, at["top1"], "D", color="#b45f06", markersize=8,
                  label=f"calibrated threshold {at['threshold']:.3f}")  # fmt: skip
    axis.plot(last["macs"] / 1e6, last["top1"], "s", color="#6a6a6a", markersize=8, label="last head alone")
    axis.set_xlabel("average multiply-adds per image (millions)")
    axis.set_ylabel("top-1 accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower right")
    return png(fig)


def early_exit_section(record: RunRecord) -> str:
    parts = []
    for data, result in record.early_exit.items():
        at, last, t = result["at_threshold"], result["last_head"], result["calibration"]
        chosen = "none: no threshold saves compute" if at["threshold"] is None else at["threshold"]
        rows = [
            ["calibrated threshold", chosen, at["top1"], at["macs"] / 1e6, str(at["exits_per_head"])],
            ["last head alone (no exits)", "-", last["top1"], last["macs"] / 1e6, str(last["exits_per_head"])],
        ]
        parts += [
            f"<p>On {html.escape(data)}; the threshold was calibrated on {html.escape(result['calibrated_on'])}, "
            f"where it lost {t['last_head_top1'] - t['top1']:.2f} points against the last head (at most "
            f"{result['tolerance_points']:g}).</p>",
            table(["", "threshold", "top-1", "M multiply-adds per image", "answers per head"], rows),
            f'<img alt="early exit: accuracy against compute" src="data:image/png;base64,{early_exit_curve(result)}">',
        ]
    return "\n".join(parts)


# ---- tables


def last_rows(record: RunRecord) -> list[dict[str, Any]]:
    """Each stage's last epoch; a decoupled stage's as one row per block (its row["blocks"])."""
    out = []
    for _, rows in itertools.groupby(record.rows, key=lambda r: r["stage"]):
        last = list(rows)[-1]
        out += [per_block(last, b) for b in last["blocks"]] if "blocks" in last else [last]
    return out


def per_block(row: dict[str, Any], figures: dict[str, Any]) -> dict[str, Any]:
    """Block figures["block"]'s own line of a decoupled stage's row, shaped like a greedy stage's row (without the
    last block's scores where its own head has none: it does not classify)."""
    own = {k: v for k, v in row.items() if k not in ("val", "train_eval")}
    return {**own, **figures, "stage_name": f"block {figures['block']}"}


def table(header: list[str], rows: list[list[Any]], flags: list[bool] | None = None) -> str:
    def cell(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else "-" if v is None else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        f"<tr{' class=flag' if flags and flags[i] else ''}>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def results_table(record: RunRecord) -> str:
    scored = scores_key(record.rows)
    rows, flags = [], []
    previous = None
    same_loss = record.cfg.model.head not in METHOD_HEADS  # a method's risks differ in kind from block to block
    for r in last_rows(record):
        s = r.get(scored, {}) if scored else {}
        risk = r["train_eval"]["loss"] if "train_eval" in r else r["loss"]
        improved = None if previous is None or not same_loss else risk <= previous
        flags.append(improved is False)
        rows.append(
            [
                r["stage_name"],
                s.get("top1", "-"),
                s.get("top5", "-"),
                s.get("ensemble_top1", "-"),
                s.get("ensemble_top5", "-"),
                r["train"]["top1"],
                risk,
                "-" if improved is None else ("yes" if improved else "NO"),
            ]
        )
        previous = risk
    what = {"val": "validation", "train_eval": "train_eval (training images, no augmentation)"}.get(scored, "none")
    header = ["stage", "top-1", "top-5", "ensemble top-1", "ensemble top-5", "train top-1 (augmented)", "risk",
              "risk not above the block before (Prop. 3.1)"]  # fmt: skip
    note = (
        "<p class=note>Scores on: " + html.escape(what) + ". Risk: the train_eval loss when there is one, else the "
        "epoch's running training loss. Proposition 3.1: without P the best risk cannot grow from one block to the "
        "next; flagged rows did not improve (expected only where P opens a block).</p>"
    )
    return table(header, rows, flags) + note


IGNORED_SETTINGS = ("preset", "description", "paper")
"""Config entries that name or describe a run rather than set it: never "a setting that differs"."""


def flat_settings(cfg: RunConfig) -> dict[str, Any]:
    """model.k, train.lr, ...: every setting of the config under its dotted name."""
    return {
        f"{section}.{key}": value
        for section, values in cfg.to_dict().items()
        if section not in IGNORED_SETTINGS
        for key, value in values.items()
    }


def comparison(records: list[RunRecord]) -> tuple[list[str], list[list[Any]]]:
    """One row per run: its name, the settings in which the runs differ, the last block's and the ensemble's final
    top-1 (validation, else train_eval; "-" while unfinished) and the training seconds."""
    settings = [flat_settings(r.cfg) for r in records]
    differ = [k for k in settings[0] if any(s.get(k) != settings[0][k] for s in settings)]
    rows = []
    for record, values in zip(records, settings, strict=True):
        final = (record.summary or {}).get("final", {})
        scored = next((key for key in ("val", "train_eval") if f"{key}_top1" in final), None)
        changed = ", ".join(f"{k}={values.get(k, '-')}" for k in differ) or "(the same settings)"
        rows.append([
            record.path.name,
            changed,
            final.get(f"{scored}_top1", "-"),
            final.get(f"{scored}_ensemble_top1", "-"),
            (record.summary or {}).get("train_seconds", "-"),
        ])  # fmt: skip
    return ["run", "settings that differ", "last block top-1", "ensemble top-1", "train s"], rows


def printable(text: str) -> str:
    """Text as a terminal should show it: as written, or quoted when it holds a control character (a run's folder
    name or a setting's value from someone else)."""
    return text if text.isprintable() else repr(text)


def comparison_text(records: list[RunRecord]) -> str:
    """The comparison as aligned plain text, for a terminal (`layerwise report --table`)."""
    header, rows = comparison(records)
    cells = [header, *([printable(f"{v:.2f}" if isinstance(v, float) else str(v)) for v in row] for row in rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]  # fmt: skip
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def speed_table(record: RunRecord) -> str:
    rows = []
    for _, group in itertools.groupby(record.rows, key=lambda r: r["stage"]):
        group = list(group)
        seconds = sum(r["seconds"] for r in group)
        rows.append([group[0]["stage_name"], len(group), seconds, sum(r["images_per_s"] for r in group) / len(group)])
    return table(["stage", "epochs", "training seconds", "images/s (mean of epochs)"], rows)


def parameter_table(record: RunRecord) -> str:
    """From summary.json, which the run wrote: the report never builds (or imports) the run's network."""
    summary = record.summary or {}
    counts = summary.get("parameters")
    numbers = lambda v: isinstance(v, list) and v and all(isinstance(n, int) for n in v)  # noqa: E731
    if not (isinstance(counts, dict) and numbers(counts.get("blocks")) and numbers(counts.get("heads"))):
        return "<p class=note>No parameter counts: the run has no summary.json yet, or one without them.</p>"
    rows = [[f"block {j}", b, h] for j, (b, h) in enumerate(zip(counts["blocks"], counts["heads"], strict=False))]
    delivered = summary.get("adaptive_depth", {}).get("blocks_delivered", len(counts["blocks"]))
    final = summary.get("params_final", "-")
    rows.append([f"delivered network (blocks 0-{delivered - 1} + head {delivered - 1})", final, "-"])
    return table(["", "block parameters", "its head's parameters"], rows)


def eval_table(record: RunRecord) -> str:
    if not record.evals:
        return "<p class=note>No <code>layerwise eval</code> has been run on this run yet.</p>"
    rows = []
    for data, result in record.evals.items():
        for j, b in result["blocks"].items():
            rows.append([data, f"block {j}", result["n"], b["top1"], b["top5"], b["ensemble_top1"]])
    return table(["data", "head", "images", "top-1", "top-5", "ensemble top-1"], rows)


def run_section(record: RunRecord) -> str:
    status = "finished" if record.finished else "<strong class=flag>unfinished</strong>: what it has so far"
    info = record.info
    parts = [
        f"<h2>{html.escape(record.name)}</h2>",
        f"<p>{status}. {html.escape(record.cfg.description)}. Device {html.escape(str(info.get('device')))}, "
        f"{html.escape(str(info.get('processes', 1)))} process(es), "
        f"data {html.escape(str(info.get('data_description', '')))}.</p>",
    ]
    if record.summary and "adaptive_depth" in record.summary:
        parts.append(f"<p class=decision>Adaptive depth: {html.escape(record.summary['adaptive_depth']['reason'])}</p>")
    if record.summary and "no_validation" in record.summary:
        parts.append(f"<p class=flag>No validation: {html.escape(record.summary['no_validation'])}.</p>")
    if not record.rows:
        parts.append("<p class=flag>No epoch has finished yet.</p>")
        return "\n".join(parts)
    parts += [
        "<h3>Per block: accuracy and Proposition 3.1</h3>",
        results_table(record),
        "<h3>Time per block</h3>",
        speed_table(record),
        "<h3>Parameters</h3>",
        parameter_table(record),
        "<h3>Evaluation (layerwise eval)</h3>",
        eval_table(record),
    ]
    if record.early_exit:
        parts += ["<h3>Early exit (layerwise eval --early-exit)</h3>", early_exit_section(record)]
    return "\n".join(parts)


CSS = """body{font-family:sans-serif;max-width:1000px;margin:1em auto;color:#111}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #999;padding:2px 6px;text-align:right}
th{background:#eee}td:first-child{text-align:left}tr.flag td,.flag{font-weight:bold;color:#8b0000}
.note{font-size:85%;color:#444}.decision{border-left:4px solid #444;padding-left:.5em}img{max-width:100%}"""

# Marks the page once every plot has loaded with a size, so a headless browser can check what a reader sees.
SCRIPT = """window.addEventListener('load',()=>{const imgs=[...document.images];
document.body.dataset.imagesLoaded=String(imgs.length>0&&imgs.every(i=>i.complete&&i.naturalWidth>0));});"""


def sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


POLICY = f"default-src 'none'; img-src data:; style-src {sha256(CSS)}; script-src {sha256(SCRIPT)}; base-uri 'none'"
"""The page's Content-Security-Policy: its own inline style and script (by hash) and data: images, nothing else.
Every value from the run directory is escaped as well; this stops what an escape might miss."""


def render(records: list[RunRecord]) -> str:
    titles = ", ".join(r.path.name for r in records)
    with_rows = [r for r in records if r.rows]
    plots = ""
    if with_rows:
        plots = (
            "<h2>Training curves</h2>"
            f'<img alt="top-1, loss and learning rate against epochs" src="data:image/png;base64,{curves(with_rows)}">'
            "<h2>Final accuracy per block</h2>"
            f'<img alt="per-block and ensemble accuracy" src="data:image/png;base64,{final_bars(with_rows)}">'
        )
        if len(with_rows) > 1:
            image = time_curves(with_rows)
            alt = "top-1 against training seconds"
            plots += f'<h2>Accuracy against training time</h2><img alt="{alt}" src="data:image/png;base64,{image}">'

    if len(records) > 1:
        plots = "<h2>Runs compared</h2>" + table(*comparison(records)) + plots
    sections = "\n".join(run_section(r) for r in records)
    return (
        f"<!doctype html><html><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
        f"<title>layerwise report: {html.escape(titles)}</title>"
        f"<style>{CSS}</style><script>{SCRIPT}</script></head><body data-report=layerwise>"
        f"<h1>layerwise report: {html.escape(titles)}</h1>{plots}\n{sections}</body></html>\n"
    )


def report_finished_run(run_dir: str | Path) -> None:
    """RUN/report.html after training; a report that cannot be drawn must not fail a finished run."""
    out = Path(run_dir) / "report.html"
    try:
        write_report([run_dir], out)
    except Exception as e:  # noqa: BLE001
        log.warning("could not write %s (%s); try `layerwise report %s`", out, e, run_dir)


def write_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Render the runs into one HTML file at `out` (written atomically; nothing is left on an error)."""
    records = [load_run(p) for p in run_dirs]
    try:
        page = render(records)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # a hand-edited or foreign file
        names = ", ".join(str(r.path) for r in records)
        raise LayerwiseError(
            f"cannot draw the report of {names}: metrics.jsonl, summary.json, eval.json or early_exit.json holds "
            f"something layerwise did not write ({type(e).__name__}: {str(e)[:80]})"
        ) from None
    out = Path(out)
    write_text(out, page)
    return out
