"""``kdcore plot``: training loss, held-out teacher KL and perplexity of one or more runs, overlaid.

Reads each run folder's ``metrics.jsonl`` (what :class:`kdcore.training.metrics.RunLog` writes:
step records with ``loss``, evaluation records with ``eval_teacher_kl`` and ``eval_ppl``) and
draws one subplot per metric against the step, a line per run. Comparing a KD run with its
CE-only twin (``distill.kd_ratio=0``) is the intended use.

matplotlib is imported only when a picture is drawn (the ``plot`` extra), so reading and
checking the metrics needs nothing beyond the standard library.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

# (record key, subplot title, y scale). Perplexity spans orders of magnitude over a run (millions
# at a random start, hundreds at the end), so only a log axis shows both ends.
METRICS: tuple[tuple[str, str, str], ...] = (
    ("loss", "training loss", "linear"),
    ("eval_teacher_kl", "held-out teacher KL", "linear"),
    ("eval_ppl", "held-out perplexity", "log"),
)
FIGURE_INCHES = (4.0 * len(METRICS), 3.6)  # one 4-inch panel per metric: readable in a README at 100%
DPI = 100  # with FIGURE_INCHES: a 1200 x 360 picture


class PlotError(ValueError):
    """Bad input to ``kdcore plot`` (the message is one line naming the culprit)."""


@dataclass(frozen=True)
class Series:
    steps: list[int]
    values: list[float]


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``; a missing, empty or malformed file is a PlotError."""
    run = Path(run_dir)
    if not run.is_dir():
        raise PlotError(f"{run}: not a run folder (no such directory)")
    path = run / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run}: no metrics.jsonl in this folder (is it a train.output_dir?)")
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise PlotError(f"{path}:{lineno}: not a JSON record ({exc.msg})") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or isinstance(rec["step"], bool):
                raise PlotError(f"{path}:{lineno}: a record needs an integer 'step'")
            for key, _, _ in METRICS:
                value = rec.get(key)
                if key in rec and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise PlotError(f"{path}:{lineno}: '{key}' is {value!r}, not a number")
            records.append(rec)
    if not records:
        raise PlotError(f"{path}: empty (no records yet)")
    return records


def extract_series(records: list[dict]) -> dict[str, Series]:
    """Per metric of METRICS that the records hold: its steps (ascending) and values.

    A step logged twice keeps its last record: a resumed run logs again the steps after its
    checkpoint, and the later records are the trajectory the run actually finished with.
    """
    out: dict[str, Series] = {}
    for key, _, _ in METRICS:
        by_step = {rec["step"]: float(rec[key]) for rec in records if key in rec}
        if by_step:
            steps = sorted(by_step)
            out[key] = Series(steps, [by_step[s] for s in steps])
    return out


def load_runs(run_dirs: list[str], labels: list[str] | None = None) -> dict[str, dict[str, Series]]:
    """``{label: {metric: Series}}`` for the runs, in order; labels default to the folder names."""
    if labels is not None and len(labels) != len(run_dirs):
        raise PlotError(f"--labels: {len(labels)} label(s) for {len(run_dirs)} run folder(s)")
    labels = labels or [Path(d).resolve().name for d in run_dirs]
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        raise PlotError(f"two runs share the label '{dupes[0]}'; give --labels a,b,...")
    return {label: extract_series(read_metrics(d)) for label, d in zip(labels, run_dirs)}


def plot_runs(runs: dict[str, dict[str, Series]], out: str | os.PathLike) -> Path:
    """Draw the runs (one subplot per metric, a line per run) into the PNG ``out``."""
    out = Path(out)
    if not out.parent.is_dir():
        raise PlotError(f"{out}: cannot write the picture: folder '{out.parent}' does not exist")
    try:
        import matplotlib
    except ImportError:
        raise PlotError("matplotlib is not installed: pip install 'kdflow[plot]'") from None
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS), figsize=FIGURE_INCHES, dpi=DPI)
    try:
        for ax, (key, title, scale) in zip(axes, METRICS):
            drawn = False
            for label, series in runs.items():
                s = series.get(key)
                if s is None:  # e.g. a run without evaluation: absent from that panel only
                    continue
                # markers only on short series: a handful of evaluation points would read as one line
                ax.plot(s.steps, s.values, label=label, marker="o" if len(s.steps) < 12 else None)
                drawn = True
            ax.set_title(title)
            ax.set_xlabel("step")
            if drawn:
                ax.set_yscale(scale)
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, "no run has it", ha="center", va="center", transform=ax.transAxes)
            ax.grid(True, alpha=0.3)
        fig.tight_layout()
        try:
            fig.savefig(out, format="png")
        except OSError as exc:
            raise PlotError(f"{out}: cannot write the picture: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
    return out
