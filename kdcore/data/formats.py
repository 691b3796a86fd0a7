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
        return _attach_images(_check_trainable({"messages": msgs, "train": train}), row.get("images"))
    if fmt == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if "prompt" not in row or prompt is None:
            raise BadRow("missing 'prompt'")
        if "completion" not in row or completion is None:
            raise BadRow("missing 'completion'")
        if isinstance(prompt, list) and isinstance(completion, list):
            p = _check_messages(prompt, "prompt", allow_empty=True)
            c = _check_messages(completion, "completion")
            return _attach_images(_check_trainable({"messages": p + c, "train": [False] * len(p) + [True] * len(c)}),
                                  row.get("images"))
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
        if isinstance(content, list):
            text, parts = _check_parts(content, f"{key}[{i}].content")
            out.append({"role": role, "content": text, "parts": parts})
            continue
        if not isinstance(content, str):
            raise BadRow(f"{key}[{i}].content must be a string or a list of parts, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _check_parts(parts: list, key: str) -> tuple[str, list[dict[str, Any]]]:
    """A message's content parts: ``{"type": "text", "text": str}`` and ``{"type": "image",
    "image": REF}`` (REF a path, bytes, a ``datasets`` Image value, or absent when the row's
    ``images`` column supplies it). The message's canonical content is its text parts joined;
    images are loaded later, by the side that reads them (:mod:`kdcore.data.images`)."""
    out, text = [], []
    for j, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            out.append({"type": "text", "text": part["text"]})
            text.append(part["text"])
        elif kind == "image":
            out.append({"type": "image", "image": part.get("image")})
        else:
            raise BadRow(f"{key}[{j}] must be {{type: text, text: str}} or {{type: image, image: ...}}, got {part!r:.80}")
    return "".join(text), out


def _attach_images(norm: dict[str, Any], column: Any) -> dict[str, Any]:
    """Collect the row's images in order into ``norm["images"]`` and number the image parts.

    A top-level ``images`` column fills the image parts that carry no image, in order; a row
    with such a column and no image part gets its images before the first user message's text
    (the usual layout of single-image VQA sets). Rows without images are left as they were."""
    column = [] if column is None else column
    if not isinstance(column, list):
        raise BadRow(f"'images' must be a list, got {type(column).__name__}")
    msgs = norm["messages"]
    if column and not any(p["type"] == "image" for m in msgs for p in m.get("parts", ())):
        first = next((m for m in msgs if m["role"] == "user"), msgs[0])
        first["parts"] = [{"type": "image", "image": None} for _ in column] + \
            first.get("parts", [{"type": "text", "text": first["content"]}])
    refs, free = [], list(column)
    for m in msgs:
        for p in m.get("parts", ()):
            if p["type"] != "image":
                continue
            ref = p.pop("image")
            if ref is None:
                if not free:
                    raise BadRow(f"an image part has no image and the 'images' column has {len(column)} "
                                 f"entr{'y' if len(column) == 1 else 'ies'} for {_count_images(msgs)} image parts")
                ref = free.pop(0)
            p["index"] = len(refs)
            refs.append(ref)
    if free:
        raise BadRow(f"the 'images' column has {len(column)} entries but the messages have "
                     f"{_count_images(msgs)} image parts to fill")
    if refs:
        norm["images"] = refs
    return norm


def _count_images(msgs) -> int:
    return sum(p["type"] == "image" for m in msgs for p in m.get("parts", ()))


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
