"""What a run reports: its records (to every logger), the progress bar and the console lines.

Records go to ``metrics.jsonl`` first and always (the reserved name ``jsonl``, not a registered
logger), then to the recipe's ``logging.backends`` (``register_loggers`` plugins). Only the main
rank writes; other ranks get the same object and it stays silent, so callers never test the rank. A step
record's figures are summed over micro-batches here (:class:`StepMeter`) and over ranks by the
caller (one all-reduce per step).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from kdcore.plugin_system.registry import ALWAYS_ON_LOGGER  # metrics.jsonl's reserved name: why it is always on, there


class Logger(Protocol):
    """What a ``register_loggers`` factory returns (contract in :mod:`kdcore.plugin_system.hookspecs`)."""

    def log(self, record: dict) -> None: ...

    def close(self) -> None: ...


class JsonlLogger:
    """``metrics.jsonl``: one JSON record per line, appended and closed per record, so the
    lines written survive a crash and ``--resume`` continues the same file."""

    def __init__(self, path: Path):
        self.path = path

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        pass  # nothing is held open between records


def build_loggers(registry, backends, *, run_dir: Path, config: dict, warn) -> list[tuple[str, Logger]]:
    """The recipe's ``logging.backends`` beside the always-on ``jsonl``; a tracker whose factory
    raises is reported by ``warn`` and left out."""
    loggers = []
    for name in dict.fromkeys(backends):  # a name listed twice is one logger
        if name == ALWAYS_ON_LOGGER:
            continue  # RunLog has it already
        factory = registry.get("logger", name).fn
        try:
            loggers.append((name, factory(run_dir=run_dir, config=config)))
        except Exception as exc:
            warn(logger_failure(name, exc))
    return loggers


def logger_failure(name: str, exc: Exception, *, closing: bool = False) -> str:
    detail = " ".join(str(exc).split()) or "no message"  # one line, whatever the exception holds
    if closing:
        return f"logger '{name}' failed to close: {type(exc).__name__}: {detail}; the others were closed"
    return f"logger '{name}' failed: {type(exc).__name__}: {detail}; disabled, the run goes on"


@dataclass
class StepMeter:
    """Sums of one optimizer step's micro-batches on this rank (reset by :meth:`take`)."""

    ce_sum: float = 0.0
    tokens: int = 0
    kd_by_teacher: dict[str, float] = field(default_factory=dict)  # each teacher's KD sum

    def add(self, ce_sum: float, tokens: int, kd_by_teacher: dict[str, float]) -> None:
        self.ce_sum += ce_sum
        self.tokens += tokens
        for name, v in kd_by_teacher.items():
            self.kd_by_teacher[name] = self.kd_by_teacher.get(name, 0.0) + v

    def take(self) -> "StepMeter":
        """This step's sums; the meter starts the next step from zero."""
        done = StepMeter(self.ce_sum, self.tokens, self.kd_by_teacher)
        self.ce_sum = 0.0
        self.tokens = 0
        self.kd_by_teacher = {}
        return done


class RunLog:
    """The run's records (through its loggers, see :meth:`open_loggers`), the console and the
    progress bar. ``path`` is ``metrics.jsonl``, written by the always-on ``jsonl`` logger."""

    def __init__(self, path: Path, *, is_main: bool, progress: bool, print_every: int = 0):
        self.path = path
        self.is_main = is_main
        self.console = None
        if is_main:
            from rich.console import Console

            self.console = Console(stderr=True)
        # a live bar only where it can redraw: redirected to a file (or in CI) it shows only its
        # last state, so plain lines every print_every steps take its place there
        self.show_progress = progress and is_main and self.console.is_terminal
        self.print_every = print_every if is_main and not self.show_progress else 0
        self._plain: dict | None = None  # total steps and when the bar-less run started
        self._progress = None
        self._task = None
        self.loggers: list[tuple[str, Logger]] = [(ALWAYS_ON_LOGGER, JsonlLogger(path))] if is_main else []

    def say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)  # the live bar shares this console and stays below the message

    def warn(self, msg: str) -> None:
        """One line, as it is: no markup (exception text may hold brackets), no wrapping."""
        if self.console is not None:
            self.console.print(msg, style="yellow", markup=False, highlight=False, soft_wrap=True)

    def open_loggers(self, registry, backends, *, config: dict) -> None:
        """Add the recipe's trackers after ``jsonl`` (main rank only), writing under the run folder."""
        if self.is_main:
            self.loggers += build_loggers(registry, list(backends), run_dir=self.path.parent, config=config,
                                          warn=self.warn)

    def record(self, record: dict) -> None:
        for name, logger in list(self.loggers):
            try:
                logger.log(dict(record))  # a copy each: one logger's edits never reach the next
            except Exception as exc:
                if name == ALWAYS_ON_LOGGER:
                    raise
                self._disable(name, exc)

    def close(self) -> None:
        """Close every logger once (also after a failed run); later calls do nothing."""
        loggers, self.loggers = self.loggers, []
        for name, logger in loggers:
            try:
                logger.close()
            except Exception as exc:
                self.warn(logger_failure(name, exc, closing=True))

    def _disable(self, name: str, exc: Exception) -> None:
        broken = [lg for n, lg in self.loggers if n == name]
        self.loggers = [(n, lg) for n, lg in self.loggers if n != name]
        self.warn(logger_failure(name, exc))
        with contextlib.suppress(Exception):  # let it release what it holds; its failure is reported already
            broken[0].close()

    def eval_record(self, record: dict) -> None:
        """Write an evaluation record and print its one-line summary."""
        self.record(record)
        parts = [f"{k.removeprefix('eval_')} {v:.4f}" for k, v in record.items()
                 if k.startswith("eval_") and k != "eval_tokens"]
        self.say(f"[bold]eval @ step {record['step']}[/bold]: " + ", ".join(parts))

    # ------------------------------------------------------------------ progress bar
    def progress(self, *, total: int, completed: int) -> "RunLog":
        """Context manager showing the bar (a no-op on other ranks or with logging.progress false)."""
        if self.print_every:
            import time

            self._plain = {"total": total, "start": completed, "t0": time.perf_counter()}
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

    @property
    def bar_live(self) -> bool:
        """The live bar is on screen (no other live display may start until it ends)."""
        return self._progress is not None

    def advance(self, step: int, *, loss: float, tps: float) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=step, loss=loss, tps=tps)
        plain = self._plain
        if plain is not None and (step % self.print_every == 0 or step == plain["total"]):
            import time

            elapsed = time.perf_counter() - plain["t0"]
            done = step - plain["start"]
            eta = elapsed / done * (plain["total"] - step) if done > 0 else float("nan")
            self.console.print(f"step {step}/{plain['total']}  loss {loss:.4f}  {tps:.0f} tok/s  "
                               f"elapsed {_clock(elapsed)}  eta {_clock(eta)}", markup=False, highlight=False,
                               soft_wrap=True)

    def __enter__(self) -> "RunLog":
        if self._progress is not None:
            self._progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._plain = None
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = self._task = None


def _clock(seconds: float) -> str:
    if seconds != seconds:  # nan: no step timed yet
        return "-:--"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"
