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
