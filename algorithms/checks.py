"""Range checks for the options dataclasses of the built-in algorithms.

Each options dataclass checks its values in ``__post_init__``, so ``kdcore validate`` (which
instantiates it) reports a bad value before any model loads, as one line naming the option,
its allowed range and the value: ``beta must be in (0, 1), got 2``.
"""

from __future__ import annotations

from typing import Any


def check_range(option: str, value: Any, *, low: float | None = None, high: float | None = None,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``ValueError`` unless ``low ≤ value ≤ high`` (``<`` on an open end; a missing bound
    is unbounded). NaN is never in range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{option} must be a number, got {value!r}")
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    if above and below:
        return
    if low is not None and high is not None:
        domain = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        domain = f"{'>' if low_open else '>='} {low:g}"
    else:
        domain = f"{'<' if high_open else '<='} {high:g}"
    raise ValueError(f"{option} must be {domain}, got {value!r}")


def check_choice(option: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{option} must be one of {', '.join(map(str, choices))}, got {value!r}")
