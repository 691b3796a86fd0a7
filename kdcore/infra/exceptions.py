"""Looking through chained exceptions (shared by the CLI's error report and the checkpoint writer,
which both must see a Ctrl-C or an OS error that a library wrapped in another exception)."""

from __future__ import annotations


def find_in_chain(exc: BaseException | None, kind: type) -> BaseException | None:
    """The ``kind`` error behind ``exc``: itself, a cause or context, or a failing rank's
    error inside DCP's CheckpointException (which wraps even a Ctrl-C)."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, kind):
            return e
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    return None


CLIP_CHARS = 200  # a value this long is a mistake or an attack, not something to read in a terminal


def clip(value: object, limit: int = CLIP_CHARS) -> str:
    """``value`` as text (``str``; use ``repr(value)`` to quote it) cut to about ``limit``
    characters: its head and tail with the number of characters left out. Every error message
    that echoes a value the user or a file gave goes through this (a 10 MB value would
    otherwise be printed whole)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return text
    keep = max(limit // 2 - 10, 8)
    return f"{text[:keep]}…[{len(text) - 2 * keep} characters left out]…{text[-keep:]}"
