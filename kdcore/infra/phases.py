"""Progress for the phases of a run that used to be silent (issue 28: a one-time GGUF
conversion, the step-0 evaluation and ``kdcore eval``'s generation printed nothing for minutes).

``phase(text, total=...)`` is a context manager yielding ``advance(n=1, tokens=0)``. On a
terminal it is a rich line with a spinner, done/total and the elapsed time (tokens/s when
tokens are counted); elsewhere (a file, CI) it prints one line when the phase ends, with its
time, so a log shows where the minutes went. A phase that fails prints nothing (the live line
is transient), so an error stays the one line a failure prints. It writes to stderr, like the
trainer's bar, and never opens a second live display while one is running (rich allows one per
console, and two on one terminal garble each other): a nested or concurrent phase falls back
to the plain line.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

_live = 0  # live displays opened here and still running (this process)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}:{s:02d}" if m else f"{seconds:.1f} s"


@contextlib.contextmanager
def phase(text: str, *, total: int | None = None, enabled: bool = True, stream=None,
          live: bool | None = None) -> Iterator[Callable[..., None]]:
    """Show ``text`` while the block runs; the block calls ``advance(n=1, tokens=0)`` per unit
    done. ``enabled=False`` (other ranks) shows nothing. ``live`` forces (True) or forbids (False)
    the rich display; by default it is used on a terminal when no other is running."""
    global _live
    if not enabled:
        yield lambda n=1, tokens=0: None
        return
    from rich.console import Console

    console = Console(file=stream or sys.stderr)
    use_live = (console.is_terminal and _live == 0) if live is None else live
    state = {"done": 0, "tokens": 0, "t0": time.perf_counter()}

    def rate() -> str:
        elapsed = time.perf_counter() - state["t0"]
        return f"{state['tokens'] / elapsed:.0f} tok/s" if state["tokens"] and elapsed > 0 else ""

    if not use_live:
        # no line when the phase starts: a phase that fails at once (bad input) must leave its
        # error as the only line (docs/runs.md, "One line per failure")

        def advance(n: int = 1, tokens: int = 0) -> None:
            state["done"] += n
            state["tokens"] += tokens

        yield advance
    else:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total:
            columns += [BarColumn(), MofNCompleteColumn()]
        columns += [TextColumn("{task.fields[rate]}"), TimeElapsedColumn()]
        progress = Progress(*columns, console=console, transient=True)
        task = progress.add_task(text, total=total, rate="")

        def advance(n: int = 1, tokens: int = 0) -> None:
            state["done"] += n
            state["tokens"] += tokens
            progress.update(task, advance=n, rate=rate())

        _live += 1
        try:
            with progress:
                yield advance
        finally:
            _live -= 1
    elapsed = time.perf_counter() - state["t0"]
    done = f"{state['done']}/{total}, " if total else ""
    speed = f", {rate()}" if state["tokens"] else ""
    console.print(f"{text}: done ({done}{_clock(elapsed)}{speed})", markup=False, highlight=False, soft_wrap=True)
