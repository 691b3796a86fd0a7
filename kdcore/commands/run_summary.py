"""The ending that says whether distillation worked (issue 28): the run's held-out figures
before training (step 0) and at its last evaluation, read from its ``metrics.jsonl``, beside
another run's (the CE-only twin, ``kdcore eval RUN --against TWIN``) when given, and one line
on what greedy answers can be expected to look like at this budget."""

from __future__ import annotations

import json
import math
from pathlib import Path

# (metrics.jsonl key, label, True when lower is better)
FIGURES = (("eval_teacher_kl", "held-out teacher-KL", True), ("eval_ppl", "held-out perplexity", True),
           ("eval_top1_agreement", "top-1 agreement", False))


def run_folder_of(student_dir: Path) -> Path | None:
    """The run folder a student folder was exported into (``<run>/hf``), when it has metrics."""
    for folder in (student_dir, student_dir.parent):
        if (folder / "metrics.jsonl").is_file():
            return folder
    return None


def read_run(run_dir: Path) -> dict:
    """First and last evaluation records, the last step and the training tokens of a run.
    Lines that are not JSON objects (a line cut by a crash) are skipped."""
    evals, steps, tokens = [], 0, 0
    with open(run_dir / "metrics.jsonl") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                continue
            if "eval_teacher_kl" in rec:
                evals.append(rec)
            elif "loss" in rec:
                steps = max(steps, rec["step"])
                tokens += int(rec.get("tokens") or 0)
    evals.sort(key=lambda r: r["step"])
    return {"first": evals[0] if evals else None, "last": evals[-1] if evals else None, "steps": steps,
            "tokens": tokens}


def summary(run_dir: Path, against: Path | None = None) -> dict | None:
    """Before/after per figure (and the other run's last figures), or None without evaluations."""
    run = read_run(run_dir)
    if run["first"] is None:
        return None
    other = read_run(against)["last"] if against is not None else None
    rows = []
    for key, label, lower in FIGURES:
        before, after = run["first"].get(key), run["last"].get(key)
        if before is None or after is None:
            continue
        row = {"metric": key, "label": label, "before": before, "after": after, "lower_is_better": lower,
               "improved": after < before if lower else after > before}
        if other is not None and other.get(key) is not None:
            row["against"] = other[key]
            row["beats_against"] = after < other[key] if lower else after > other[key]
        rows.append(row)
    return {"run": str(run_dir), "against": str(against) if against else None, "first_step": run["first"]["step"],
            "last_step": run["last"]["step"], "steps": run["steps"], "tokens": run["tokens"], "rows": rows}


def budget_line(s: dict) -> str:
    return (f"At this budget ({s['steps']} steps, {s['tokens']:,} tokens in the loss) expect the student's greedy "
            f"answers to be fragments, repetitions or a few stock sentences (\"Return the given object.\"), not "
            f"readable answers: distillation shows first in the token-level figures above, long before whole "
            f"answers read well.")


def _fmt(v: float) -> str:
    return f"{v:.4g}" if math.isfinite(v) and abs(v) < 1e5 else f"{v:.3g}"


def print_summary(s: dict, console) -> None:
    from rich.table import Table

    title = f"did distillation work? {s['run']}, step {s['first_step']} -> step {s['last_step']}"
    table = Table(title=title, title_justify="left")
    for col in ("metric", f"step {s['first_step']}", f"step {s['last_step']}", "better?"):
        table.add_column(col, justify="left" if col in ("metric", "better?") else "right")
    if s["against"]:
        table.add_column(f"{s['against']} (last)", justify="right")
    for r in s["rows"]:
        cells = [r["label"], _fmt(r["before"]), _fmt(r["after"]),
                 ("yes" if r["improved"] else "no") + (" (lower)" if r["lower_is_better"] else " (higher)")]
        if s["against"]:
            mark = "" if "against" not in r else (" (this run better)" if r["beats_against"] else " (that run better)")
            cells.append(_fmt(r["against"]) + mark if "against" in r else "-")
        table.add_row(*cells)
    console.print(table)
    console.print(budget_line(s), markup=False, highlight=False)
