"""What a run reports: ``metrics.jsonl`` records, the progress bar and the console lines.

Only the main rank writes; other ranks get the same object and it stays silent, so callers
never test the rank. A step record's figures are summed over micro-batches here
(:class:`StepMeter`) and over ranks by the caller (one all-reduce per step).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class StepMeter:
    """Sums of one optimizer step's micro-batches on this rank (reset by :meth:`take`)."""

    kd_sum: float = 0.0
    ce_sum: float = 0.0
    tokens: int = 0
    kd_by_teacher: dict[str, float] = field(default_factory=dict)  # several teachers: each one's KD sum

    def add(self, kd_sum: float, ce_sum: float, tokens: int, kd_by_teacher: dict[str, float] | None = None) -> None:
        self.kd_sum += kd_sum
        self.ce_sum += ce_sum
        self.tokens += tokens
        for name, v in (kd_by_teacher or {}).items():
            self.kd_by_teacher[name] = self.kd_by_teacher.get(name, 0.0) + v

    def take(self) -> "StepMeter":
        """This step's sums; the meter starts the next step from zero."""
        done = StepMeter(self.kd_sum, self.ce_sum, self.tokens, self.kd_by_teacher)
        self.kd_sum = self.ce_sum = 0.0
        self.tokens = 0
        self.kd_by_teacher = {}
        return done


class RunLog:
    """``metrics.jsonl`` (one JSON record per line, appended), the console and the progress bar."""

    def __init__(self, path: Path, *, is_main: bool, progress: bool):
        self.path = path
        self.is_main = is_main
        self.show_progress = progress and is_main
        self.console = None
        if is_main:
            from rich.console import Console

            self.console = Console(stderr=True)
        self._progress = None
        self._task = None

    def say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)  # the live bar shares this console and stays below the message

    def record(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def eval_record(self, record: dict) -> None:
        """Write an evaluation record and print its one-line summary."""
        self.record(record)
        parts = [f"{k.removeprefix('eval_')} {v:.4f}" for k, v in record.items()
                 if k.startswith("eval_") and k != "eval_tokens"]
        self.say(f"[bold]eval @ step {record['step']}[/bold]: " + ", ".join(parts))

    # ------------------------------------------------------------------ progress bar
    def progress(self, *, total: int, completed: int) -> "RunLog":
        """Context manager showing the bar (a no-op on other ranks or with logging.progress false)."""
        if self.show_progress:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            )
            self._task = self._progress.add_task("distilling", total=total, completed=completed,
                                                 loss=float("nan"), tps=0.0)
        return self

    def advance(self, step: int, *, loss: float, tps: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=loss, tps=tps)

    def __enter__(self) -> "RunLog":
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = self._task = None
