"""Row formats: which one a data set has, checking and normalising one row, its canonical text."""

from __future__ import annotations

from typing import Any, Iterable

from kdcore.data.common import BadRow, DataError

FORMATS = ("messages", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")


def detect_format(columns: Iterable[str], requested: str = "auto", source: str = "") -> str:
    """The row format for a data set with these columns (``requested`` unless ``auto``)."""
    cols = set(columns)
    need = {"messages": {"messages"}, "prompt_completion": {"prompt", "completion"}, "text": {"text"}}
    if requested != "auto":
        if requested not in need:
            raise DataError(f"unknown data format '{requested}'; choose auto, {', '.join(FORMATS)}")
        missing = need[requested] - cols
        if missing:
            raise DataError(f"'{source}': format '{requested}' needs column(s) {', '.join(sorted(missing))}; "
                            f"the data has {', '.join(sorted(cols)) or 'no columns'}")
        return requested
    for fmt in FORMATS:
        if need[fmt] <= cols:
            return fmt
    raise DataError(f"'{source}': cannot tell the row format from columns {sorted(cols)}; expected 'messages', "
                    "'prompt' + 'completion', or 'text' (or set data.format)")


def normalize_row(row: Any, fmt: str) -> dict[str, Any]:
    """Check one row and return its normalised form; raises :class:`BadRow` with the reason.

    ``messages`` rows (and conversational prompt/completion rows) become
    ``{"messages": [{"role", "content"}], "train": [bool per message]}``.
    """
    if isinstance(row, BadRow):
        raise row
    if not isinstance(row, dict):
        raise BadRow(f"row is a {type(row).__name__}, not an object")
    if fmt == "messages":
        msgs = _check_messages(row.get("messages"), "messages")
        train = [m["role"] == "assistant" for m in msgs]
        return _check_trainable({"messages": msgs, "train": train})
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if "prompt" not in row or prompt is None:
            raise BadRow("missing 'prompt'")
        if "completion" not in row or completion is None:
            raise BadRow("missing 'completion'")
        if isinstance(prompt, list) and isinstance(completion, list):
            p = _check_messages(prompt, "prompt", allow_empty=True)
            c = _check_messages(completion, "completion")
            return _check_trainable({"messages": p + c, "train": [False] * len(p) + [True] * len(c)})
        if not isinstance(prompt, str):
            raise BadRow(f"'prompt' must be a string, got {type(prompt).__name__}")
        if not isinstance(completion, str):
            raise BadRow(f"'completion' must be a string, got {type(completion).__name__}")
        if not completion:
            raise BadRow("empty 'completion'")
        return {"prompt": prompt, "completion": completion}
    if fmt == "text":
        text = row.get("text")
        if "text" not in row or text is None:
            raise BadRow("missing 'text'")
        if not isinstance(text, str):
            raise BadRow(f"'text' must be a string, got {type(text).__name__}")
        if not text.strip():
            raise BadRow("empty 'text'")
        return {"text": text}
    raise DataError(f"unknown data format '{fmt}'")


def _check_messages(value: Any, key: str, allow_empty: bool = False) -> list[dict[str, str]]:
    if value is None:
        raise BadRow(f"missing '{key}'")
    if not isinstance(value, list):
        raise BadRow(f"'{key}' must be a list of {{role, content}}, got {type(value).__name__}")
    if not value and not allow_empty:
        raise BadRow(f"empty '{key}'")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRow(f"{key}[{i}] must be an object with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRow(f"{key}[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        if not isinstance(content, str):
            raise BadRow(f"{key}[{i}].content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _check_trainable(norm: dict[str, Any]) -> dict[str, Any]:
    if not any(t and m["role"] == "assistant" and m["content"].strip()
               for m, t in zip(norm["messages"], norm["train"])):
        raise BadRow("no assistant message with content to train on")
    return norm


def canonical_text(norm: dict[str, Any]) -> tuple[str, list[tuple[int, int]]]:
    """The canonical content text of a normalised row and its trained spans (canonical coords)."""
    if "messages" in norm:
        text, spans, pos = [], [], 0
        for m, t in zip(norm["messages"], norm["train"]):
            if t:
                spans.append((pos, pos + len(m["content"])))
            text.append(m["content"])
            pos += len(m["content"])
        return "".join(text), spans
    if "prompt" in norm:
        lp = len(norm["prompt"])
        return norm["prompt"] + norm["completion"], [(lp, lp + len(norm["completion"]))]
    return norm["text"], [(0, len(norm["text"]))]
