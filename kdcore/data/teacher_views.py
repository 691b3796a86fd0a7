"""Per-teacher tokenizations for several teachers and for context distillation.

A teacher whose tokenizer differs from the student's, or that reads a context the student
does not (``data.teacher_context``), gets its own :class:`~kdcore.distill.aligner.Tokenized` per
sample in ``Sample.teachers[name]``, rendered by the same code as the single teacher
(:func:`kdcore.data.rendering.tokenize_rows`) and with offsets in the sample's canonical text.

Context distillation: the context is prepended to the first content of the row the teacher
reads (the first message's content — a system prompt when the row starts with one, else the
first user turn —, the prompt, or the text), so every template renders it without a role of its
own. The teacher's canonical text is then ``context + the sample's text``: its offsets are
shifted back by ``len(context)`` (context tokens get the empty span ``(0, 0)``, i.e. they have
consumed none of the sample's text) and positions whose target lies inside the context are
dropped from its loss positions, so offset pairing (kdflow_algorithms' ``offsets``) pairs only
positions that have read the same response text. End the context with a newline or a space:
a token spanning its end and the row's first characters would count as the row's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from kdcore.distill.aligner import Tokenized
from kdcore.data.common import BadRow
from kdcore.data.rendering import tokenize_rows


@dataclass
class TeacherView:
    """How one teacher reads the data: its tokenizer, and whether it gets the context."""

    tokenizer: Any
    context: bool = False


def with_context(norm: dict[str, Any], context: str) -> dict[str, Any]:
    """The normalised row with ``context`` prepended to its first content."""
    if not context:
        return norm
    if "messages" in norm:
        msgs = [dict(m) for m in norm["messages"]]
        msgs[0]["content"] = context + msgs[0]["content"]
        return {**norm, "messages": msgs}
    if "prompt" in norm:
        return {**norm, "prompt": context + norm["prompt"]}
    return {**norm, "text": context + norm["text"]}


def shift_past_context(t: Tokenized, n: int) -> Tokenized:
    """Offsets of a context-prefixed tokenization moved into the sample's own text; positions
    predicting a context token are no loss positions."""
    if n == 0:
        return t
    offsets = [(max(0, a - n), max(0, b - n)) for a, b in t.offsets]
    keep = [p for p in t.loss_positions if t.offsets[p + 1][1] > n]
    return Tokenized(input_ids=list(t.input_ids), offsets=offsets, loss_positions=keep)


def tokenize_views(norms: Sequence[dict[str, Any]], contexts: Sequence[str], views: dict[str, TeacherView]
                   ) -> dict[str, list[Tokenized | BadRow]]:
    """Per teacher name, each row's tokenization (a :class:`BadRow` where its template fails)."""
    out = {}
    for name, view in views.items():
        rows = [with_context(n, c) for n, c in zip(norms, contexts)] if view.context else list(norms)
        toks = tokenize_rows(rows, view.tokenizer)
        if view.context:
            toks = [t if isinstance(t, BadRow) else shift_past_context(t, len(c)) for t, c in zip(toks, contexts)]
        out[name] = toks
    return out


def row_context(row: Any, setting: dict | None) -> str:
    """The context of one raw row under ``data.teacher_context`` ('' when off)."""
    if not setting:
        return ""
    if "text" in setting:
        return str(setting["text"])
    value = row.get(setting["column"]) if isinstance(row, dict) else None
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow(f"data.teacher_context column '{setting['column']}' must be a string, got {type(value).__name__}")
    return value


def row_route(row: Any, column: str | None, names: Sequence[str]) -> tuple[str, ...] | None:
    """The teachers of one raw row under ``data.teacher_column`` (None = every teacher)."""
    if not column or not isinstance(row, dict) or row.get(column) is None:
        return None
    value = row[column]
    chosen = [value] if isinstance(value, str) else value
    if not isinstance(chosen, list) or not chosen or not all(isinstance(v, str) for v in chosen):
        raise BadRow(f"data.teacher_column '{column}' must be a teacher name or a non-empty list of names, got {value!r}")
    unknown = [v for v in chosen if v not in names]
    if unknown:
        raise BadRow(f"data.teacher_column '{column}' names unknown teacher '{unknown[0]}' (teachers: {', '.join(names)})")
    return tuple(dict.fromkeys(chosen))
