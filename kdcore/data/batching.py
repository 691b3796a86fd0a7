"""Data: loading, row formats, student/teacher tokenization with offsets, loss masks, batching.

Pipeline (``prepare_data``): read rows (``datasets``) → check each row and normalise it to one
of three formats → split a held-out set off (or read ``data.eval``) → render and tokenize each
row for the student and, when its tokenizer differs, the teacher → apply the max-length
policy → :class:`Sample` objects plus a :class:`DataReport` of what was kept, cut and dropped.

Row formats (``data.format``, ``auto`` picks by columns in this order):

- ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with each
  tokenizer's own chat template. **Every assistant turn is trained** (its content, plus the
  end-of-turn special token the template puts right after it, e.g. ``<|im_end|>`` or
  ``</s>``); system/user turns and template markup are context only.
- ``prompt_completion``: ``{"prompt": str, "completion": str}`` → the text
  ``prompt + completion`` (plain concatenation, no template; the tokenizer's own BOS, if it
  adds one, and EOS appended); the completion and the EOS are trained. When ``prompt`` and
  ``completion`` are both message lists, the row is a conversation whose completion turns
  are trained.
- ``text``: ``{"text": str}`` → every token is trained (BOS if the tokenizer adds one; EOS
  appended).

**Canonical text and offsets.** Every sample has a canonical ``text``: its content only — the
message contents (or prompt + completion, or the text) concatenated in order, with nothing in
between. Each side's :class:`~kdcore.aligner.Tokenized` ``offsets`` are in the coordinates of
that canonical text, not of the side's rendered template string, so aligners can pair tokens
across tokenizers whose templates differ:

- a token's span is the content characters its bytes belong to; a character whose bytes are
  split over several tokens (SentencePiece byte-fallback pieces, byte-level BPE tokens that
  end inside an emoji or CJK character) is in the span of each of them, so adjacent spans
  overlap by that character — as fast tokenizers report it. A position ``p`` has read whole
  characters only when no later token starts before ``offsets[p][1]``;
- template markup inside a token is left out of its span (SentencePiece's ``▁Hello`` after
  ``[INST]`` spans ``Hello``);
- a token of markup only gets the empty span ``(c, c)`` where ``c`` is the end of the content
  before it;
- starts and ends are non-decreasing; every content character the template renders is in some
  token's span (characters a tokenizer leaves out of all spans, such as trimmed spaces, go to
  the following token).

``loss_positions`` are the positions ``p`` whose target ``input_ids[p + 1]`` is trained.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from kdcore.aligner import Tokenized
from kdcore.paths import PKG_SCHEME, resolve

FORMATS = ("messages", "prompt_completion", "text")
ROLES = ("system", "user", "assistant", "tool")
MAX_BAD_EXAMPLES = 5  # bad rows shown in the report; the rest are only counted
_ENCODE_CHUNK = 256  # rows per batched tokenizer call: amortises Python overhead, bounded memory


class DataError(ValueError):
    """A data problem that stops preparation; the message names the file (and row)."""


class BadRow(ValueError):
    """One row that cannot become a sample; ``reason`` says why."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------------------- samples


@dataclass
class Sample:
    """One training sequence.

    ``teacher`` is None when both sides share a tokenizer: the teacher then receives the
    student's ids. ``source`` is the normalised row (``{"messages": [...], "train": [...]}``,
    or ``{"prompt": ..., "completion": ...}`` / ``{"text": ...}``) so that rollouts can rebuild
    a sample with a new response (see :func:`build_sample`).
    """

    text: str
    student: Tokenized
    teacher: Tokenized | None
    row: int  # row number in the source (0-based)
    source: dict[str, Any] | None = field(default=None, repr=False)
    response_spans: list[tuple[int, int]] = field(default_factory=list)  # trained content, canonical coords

    def __len__(self) -> int:
        return len(self.student.input_ids)


# ------------------------------------------------------------------------------------ report


@dataclass
class SplitReport:
    """Counts for one split (train or eval)."""

    source: str = ""
    rows: int = 0  # rows read from the source (after data.limit)
    bad_rows: int = 0
    bad_examples: list[tuple[int, str]] = field(default_factory=list)  # (row, reason), first few
    overlong: int = 0  # samples longer than max_length before the policy
    truncated: int = 0
    dropped_overlong: int = 0  # overlong=drop, or nothing trainable left after truncation
    samples: int = 0
    tokens: int = 0  # student tokens kept
    loss_tokens: int = 0  # student positions in the loss
    max_tokens: int = 0  # longest student sequence kept
    teacher_tokens: int = 0  # teacher tokens kept (cross-tokenizer only)

    def count_bad(self, row: int, reason: str) -> None:
        self.bad_rows += 1
        if len(self.bad_examples) < MAX_BAD_EXAMPLES:
            self.bad_examples.append((row, reason))

    def add(self, sample: Sample) -> None:
        self.samples += 1
        n = len(sample.student.input_ids)
        self.tokens += n
        self.loss_tokens += len(sample.student.loss_positions)
        self.max_tokens = max(self.max_tokens, n)
        if sample.teacher is not None:
            self.teacher_tokens += len(sample.teacher.input_ids)


@dataclass
class DataReport:
    """What data preparation kept, cut and dropped; ``lines()`` / ``rich_table()`` print it."""

    format: str = ""
    max_length: int = 0
    overlong_policy: str = ""
    cross_tokenizer: bool = False
    eval_from: str = ""  # "file", "split" or "none"
    train: SplitReport = field(default_factory=SplitReport)
    eval: SplitReport = field(default_factory=SplitReport)

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def lines(self) -> list[str]:
        out = [f"format {self.format}; max_length {self.max_length} ({self.overlong_policy}); "
               f"eval from {self.eval_from}; {'cross-tokenizer' if self.cross_tokenizer else 'shared tokenizer'}"]
        for name, s in (("train", self.train), ("eval", self.eval)):
            if not s.rows and not s.samples:
                continue
            mean = s.tokens / s.samples if s.samples else 0.0
            out.append(
                f"{name}: {s.samples} samples from {s.rows} rows of {s.source}; bad {s.bad_rows}; "
                f"overlong {s.overlong} (truncated {s.truncated}, dropped {s.dropped_overlong}); "
                f"tokens {s.tokens} (mean {mean:.1f}, max {s.max_tokens}), loss tokens {s.loss_tokens}"
                + (f", teacher tokens {s.teacher_tokens}" if self.cross_tokenizer else "")
            )
            for row, reason in s.bad_examples:
                out.append(f"  {name} row {row}: {reason}")
        return out

    def rich_table(self):
        from rich.table import Table

        t = Table(title=f"data ({self.format}, max_length {self.max_length}, {self.overlong_policy})")
        for col in ("split", "rows", "bad", "samples", "truncated", "dropped", "tokens", "loss tokens", "max len"):
            t.add_column(col, justify="right" if col != "split" else "left")
        for name, s in (("train", self.train), ("eval", self.eval)):
            t.add_row(name, str(s.rows), str(s.bad_rows), str(s.samples), str(s.truncated),
                      str(s.dropped_overlong), str(s.tokens), str(s.loss_tokens), str(s.max_tokens))
        return t


# ----------------------------------------------------------------------------------- loading


@dataclass
class RowSource:
    """Rows read from one data spec. ``rows[i]`` is row ``i``; a row that could not even be
    parsed (a broken JSON line) is a :class:`BadRow` instead of a mapping."""

    path: str
    rows: list[Any]
    columns: list[str]


def resolve_data_path(spec: str, base_dir: str | os.PathLike | None = None) -> str:
    """A data spec as a path: ``pkg://`` resolved, ``~`` expanded, relative paths looked up
    first under ``base_dir`` (the recipe's folder) then the working directory. Specs that are
    no existing path are returned unchanged (hub names)."""
    if spec.startswith(PKG_SCHEME):
        return resolve(spec)
    p = Path(os.path.expanduser(spec))
    if not p.is_absolute() and base_dir is not None and (Path(base_dir) / p).exists():
        return str(Path(base_dir) / p)
    return str(p) if p.exists() or _looks_local(spec) else spec


def _looks_local(spec: str) -> bool:
    # Hub names look like "org/name"; anything with a data-file suffix or a deeper path is local.
    return (spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in _FILE_BUILDERS
            or spec.count("/") > 1)


_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow", ".csv": "csv"}


def read_rows(spec: str, *, base_dir: str | os.PathLike | None = None, limit: int | None = None) -> RowSource:
    """Read a data set: a jsonl/json/parquet/arrow/csv file, a ``save_to_disk`` folder, a folder
    of data files, or (with network) a hub name. Raises :class:`DataError` naming the path
    when it is missing or empty."""
    path = resolve_data_path(spec, base_dir)
    p = Path(path)
    if p.exists():
        ds = _load_local(p)
    elif _looks_local(spec):
        where = f" (looked in {base_dir} and {os.getcwd()})" if base_dir is not None else ""
        raise DataError(f"data file not found: '{spec}'{where}")
    else:
        ds = _load_hub(spec)
    if isinstance(ds, RowSource):
        src = ds
    else:
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        src = RowSource(path=path, rows=ds.to_list(), columns=list(ds.column_names))
    if limit is not None:
        src.rows = src.rows[:limit]
    if not src.rows:
        raise DataError(f"data set is empty: '{path}'")
    return src


def _load_local(p: Path):
    import datasets

    datasets.disable_progress_bars()  # the trainer prints its own report
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists() or (p / "state.json").exists():
            try:
                ds = datasets.load_from_disk(str(p))
            except Exception as exc:
                raise DataError(f"cannot read save_to_disk folder '{p}': {type(exc).__name__}: {exc}") from exc
            return _one_split(ds, str(p))
        try:
            return _one_split(datasets.load_dataset(str(p)), str(p))
        except Exception as exc:
            raise DataError(f"cannot read data folder '{p}': {type(exc).__name__}: {exc}") from exc
    suffix = p.suffix.lower()
    builder = _FILE_BUILDERS.get(suffix)
    if builder is None:
        raise DataError(f"unknown data file type '{p}': expected {', '.join(_FILE_BUILDERS)} or a save_to_disk folder")
    if p.stat().st_size == 0:
        raise DataError(f"data set is empty: '{p}'")
    try:
        return datasets.load_dataset(builder, data_files=str(p), split="train")
    except Exception as exc:
        if builder == "json":
            # Arrow needs one type per column; rows of mixed types (or broken lines) are read one
            # by one so that each bad row is reported with its number instead of failing the file.
            return _read_json_rows(p)
        raise DataError(f"cannot read data file '{p}': {type(exc).__name__}: {exc}") from exc


def _load_hub(spec: str):
    import datasets

    datasets.disable_progress_bars()
    try:
        return _one_split(datasets.load_dataset(spec), spec)
    except Exception as exc:
        raise DataError(f"cannot load data set '{spec}' (not a local path; tried the hub): "
                        f"{type(exc).__name__}: {exc}") from exc


def _one_split(ds, name: str):
    import datasets

    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            return ds["train"]
        if len(ds) == 1:
            return next(iter(ds.values()))
        raise DataError(f"'{name}' has several splits ({', '.join(ds)}) and none is called 'train'")
    return ds


def _read_json_rows(p: Path) -> RowSource:
    text = p.read_text(encoding="utf-8")
    rows: list[Any] = []
    stripped = text.lstrip()
    if p.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"cannot parse JSON file '{p}': {exc}") from exc
        rows = list(data)
    else:
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                rows.append(BadRow(f"line {lineno} is not valid JSON ({exc.msg})"))
    columns: list[str] = []
    for r in rows:
        if isinstance(r, dict):
            columns.extend(k for k in r if k not in columns)
    return RowSource(path=str(p), rows=rows, columns=columns)


# ------------------------------------------------------------------------------ row formats


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


# ----------------------------------------------------------------------------- rendering


@dataclass
class _Rendered:
    string: str  # what the tokenizer sees
    # content pieces rendered verbatim: (rendered start, rendered end, canonical start, trained)
    regions: list[tuple[int, int, int, bool]]
    prefix: list[int]  # special ids before the encoded string (BOS for plain text)
    suffix: list[int]  # special ids after it (EOS for plain text)
    train_all: bool  # plain text: every token is trained
    train_suffix: bool  # the suffix (EOS) is trained


_PH = "\ue000kdflow{}\ue001"  # private-use code points: no chat template alters or emits them
_PH_RE = re.compile("\ue000kdflow(\\d+)\ue001", re.IGNORECASE)  # survives case filters, so the error says what changed


def _render(norm: dict[str, Any], tok) -> _Rendered:
    from kdcore.tokenizers import special_affixes

    if "messages" in norm:
        return _render_chat(norm, tok)
    prefix, suffix = special_affixes(tok)
    eos = tok.eos_token_id
    if eos is not None and eos not in suffix:
        suffix = list(suffix) + [eos]  # teaches the student to stop, as SFT trainers do
    if "prompt" in norm:
        lp, lc = len(norm["prompt"]), len(norm["completion"])
        regions = [(0, lp, 0, False), (lp, lp + lc, lp, True)] if lp else [(0, lc, 0, True)]
        return _Rendered(norm["prompt"] + norm["completion"], regions, list(prefix), suffix, False, True)
    n = len(norm["text"])
    return _Rendered(norm["text"], [(0, n, 0, True)], list(prefix), suffix, True, True)


def _render_chat(norm: dict[str, Any], tok) -> _Rendered:
    """Render with the chat template and locate each message's content in the result.

    The template is rendered twice: once with placeholders instead of contents (which shows
    exactly where each content goes, however the template decorates it) and once for real;
    the real string must then be the placeholder string with each placeholder replaced by the
    content (or the content stripped, for templates that trim).
    """
    name = _tok_name(tok)
    if not getattr(tok, "chat_template", None):
        raise DataError(f"tokenizer '{name}' has no chat template, so 'messages' rows cannot be rendered; "
                        "use a tokenizer with one, or prompt/completion or text data")
    msgs = norm["messages"]
    try:
        real = tok.apply_chat_template(msgs, tokenize=False)
        ph_msgs = [{"role": m["role"], "content": _PH.format(i)} for i, m in enumerate(msgs)]
        shape = tok.apply_chat_template(ph_msgs, tokenize=False)
    except Exception as exc:  # jinja raise_exception() for role order, missing variables, ...
        raise BadRow(f"chat template of '{name}' rejects the conversation: {type(exc).__name__}: {exc}") from exc
    pieces = _PH_RE.split(shape)  # markup, idx, markup, idx, ..., markup
    order = [int(i) for i in pieces[1::2]]
    markup = pieces[0::2]
    if sorted(order) != list(range(len(msgs))):
        raise BadRow(f"chat template of '{name}' does not render each message exactly once")
    starts = []
    pos = 0
    for m in msgs:
        starts.append(pos)
        pos += len(m["content"])
    regions = []
    at = 0
    for k, idx in enumerate(order):
        if not real.startswith(markup[k], at):
            raise BadRow(f"chat template of '{name}' renders the conversation inconsistently (message {idx})")
        at += len(markup[k])
        content = msgs[idx]["content"]
        for variant, lead in ((content, 0), (content.strip(), len(content) - len(content.lstrip())),
                              (content.rstrip(), 0), (content.lstrip(), len(content) - len(content.lstrip()))):
            if real.startswith(variant, at) and real.startswith(markup[k + 1], at + len(variant)):
                break
        else:
            raise BadRow(f"chat template of '{name}' alters the content of message {idx} ({msgs[idx]['role']})")
        if variant:
            regions.append((at, at + len(variant), starts[idx] + lead, norm["train"][idx]))
        at += len(variant)
    if at + len(markup[-1]) != len(real):
        raise BadRow(f"chat template of '{name}' renders the conversation inconsistently (end)")
    return _Rendered(real, regions, [], [], False, False)


def _tok_name(tok) -> str:
    return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


# ---------------------------------------------------------------------------- tokenization


def _normalize_offsets(offsets: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Make raw tokenizer offsets cover the string without gaps, with non-decreasing starts.

    Overlaps are kept: they mark characters split across tokens. Characters no token covers
    (trimmed by the tokenizer) go to the following token.
    """
    spans = [[int(a), int(b)] for a, b in offsets]
    reach = 0  # end of the characters covered so far
    prev_start = 0
    for sp in spans:
        if sp[0] > reach:
            sp[0] = reach
        sp[0] = max(sp[0], prev_start)
        sp[1] = max(sp[1], sp[0])
        prev_start = sp[0]
        reach = max(reach, sp[1])
    return spans


def _tokenize_rendered(r: _Rendered, ids: list[int], offsets: Sequence[tuple[int, int]],
                       specials: set[int]) -> Tokenized:
    """Map a rendered string's tokens to canonical content coordinates and mark the trained ones."""
    spans = _normalize_offsets(offsets)
    regions = sorted(r.regions)
    out_offsets: list[tuple[int, int]] = []
    trained: list[bool] = []
    j = 0
    last_c = 0  # canonical end of the content seen so far: where markup tokens sit
    prev_c0 = 0
    for s, e in spans:
        while j < len(regions) and regions[j][1] <= s:
            j += 1
        c0 = c1 = None
        train = r.train_all
        k = j
        while k < len(regions) and regions[k][0] < e:
            rs, re_, cs, t = regions[k]
            a, b = max(s, rs), min(e, re_)
            if a < b:
                if c0 is None:
                    c0 = cs + a - rs
                c1 = cs + b - rs
                train = train or t
            k += 1
        if c0 is None:
            out_offsets.append((last_c, last_c))
        else:
            c0 = max(c0, prev_c0)  # starts never go back (templates that reorder messages)
            c1 = max(c1, c0)
            out_offsets.append((c0, c1))
            prev_c0, last_c = c0, max(last_c, c1)
        trained.append(train)
    # The end-of-turn special right after a trained turn is trained too (the model learns to stop).
    if not r.train_all:
        for i in range(len(ids) - 1):
            if trained[i] and not trained[i + 1] and ids[i + 1] in specials:
                trained[i + 1] = True
    end = regions[-1][2] + regions[-1][1] - regions[-1][0] if regions else 0
    end = max([end, last_c])
    all_ids = list(r.prefix) + list(ids) + list(r.suffix)
    all_offsets = [(0, 0)] * len(r.prefix) + out_offsets + [(end, end)] * len(r.suffix)
    all_trained = [r.train_all] * len(r.prefix) + trained + [r.train_suffix] * len(r.suffix)
    loss_positions = [p - 1 for p in range(1, len(all_ids)) if all_trained[p]]
    return Tokenized(input_ids=all_ids, offsets=all_offsets, loss_positions=loss_positions)


def tokenize_rows(norms: Sequence[dict[str, Any]], tok) -> list[Tokenized | BadRow]:
    """Tokenize normalised rows for one tokenizer (batched); a row the tokenizer's chat
    template cannot render comes back as a :class:`BadRow`."""
    from kdcore.tokenizers import special_ids

    specials = special_ids(tok)
    out: list[Tokenized | BadRow] = [None] * len(norms)  # type: ignore[list-item]
    for start in range(0, len(norms), _ENCODE_CHUNK):
        chunk = range(start, min(start + _ENCODE_CHUNK, len(norms)))
        rendered: dict[int, _Rendered] = {}
        for i in chunk:
            try:
                rendered[i] = _render(norms[i], tok)
            except BadRow as exc:
                out[i] = exc
        idx = list(rendered)
        if not idx:
            continue
        enc = tok([rendered[i].string for i in idx], add_special_tokens=False, return_offsets_mapping=True)
        for n, i in enumerate(idx):
            out[i] = _tokenize_rendered(rendered[i], enc["input_ids"][n], enc["offset_mapping"][n], specials)
    return out


def _truncate(t: Tokenized, n: int) -> Tokenized:
    return Tokenized(input_ids=t.input_ids[:n], offsets=t.offsets[:n],
                     loss_positions=[p for p in t.loss_positions if p < n - 1])


def _truncate_at_char(t: Tokenized, x: int) -> Tokenized:
    """Keep the leading tokens whose content ends by canonical position ``x`` (markup at ``x``
    itself is dropped: it belongs to what was cut)."""
    n = 0
    for a, b in t.offsets:
        if b > x or (a == b == x and n > 0 and x > 0):
            break
        n += 1
    return _truncate(t, n)


def build_sample(norm: dict[str, Any], row: int, student_tok, teacher_tok=None, *,
                 max_length: int | None = None, overlong: str = "truncate") -> Sample:
    """One sample from a normalised row (see :func:`normalize_row`); ``teacher_tok`` None or
    the same tokenizer as the student gives ``teacher=None``. Raises :class:`BadRow`
    (unrenderable / nothing trainable) or :class:`OverlongRow` (``overlong='drop'``)."""
    from kdcore.tokenizers import same_tokenizer

    cross = teacher_tok is not None and not same_tokenizer(student_tok, teacher_tok)
    s = tokenize_rows([norm], student_tok)[0]
    if isinstance(s, BadRow):
        raise s
    t = None
    if cross:
        t = tokenize_rows([norm], teacher_tok)[0]
        if isinstance(t, BadRow):
            raise t
    sample, _ = _finish(norm, row, s, t, max_length, overlong)
    return sample


class OverlongRow(ValueError):
    """A sample dropped by the max-length policy."""


def _finish(norm, row, s: Tokenized, t: Tokenized | None, max_length, overlong) -> tuple[Sample, bool]:
    """Apply the max-length policy; returns (sample, was_truncated)."""
    text, spans = canonical_text(norm)
    truncated = False
    if max_length is not None and len(s.input_ids) > max_length:
        if overlong == "drop":
            raise OverlongRow(f"{len(s.input_ids)} tokens > max_length {max_length}")
        s = _truncate(s, max_length)
        if t is not None:
            t = _truncate_at_char(t, max(b for _, b in s.offsets))
        truncated = True
    if not s.loss_positions:
        raise OverlongRow(f"no trained tokens within max_length {max_length}")
    return Sample(text=text, student=s, teacher=t, row=row, source=norm, response_spans=spans), truncated


# ------------------------------------------------------------------------------ preparation


@dataclass
class PreparedData:
    train: list[Sample]
    eval: list[Sample]
    report: DataReport


def _cfg(cfg: Any, key: str, default: Any) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def split_eval(n: int, eval_size: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic held-out split of ``n`` items: (train indices, eval indices), each sorted.
    ``eval_size`` < 1 is a fraction (rounded, at least one item when > 0), >= 1 a count."""
    if eval_size <= 0 or n == 0:
        return list(range(n)), []
    k = int(eval_size) if eval_size >= 1 else max(1, int(round(eval_size * n)))
    if k >= n:
        raise DataError(f"data.eval_size={eval_size} leaves no training rows out of {n}; lower it or set data.eval")
    perm = list(range(n))
    random.Random(seed).shuffle(perm)
    return sorted(perm[k:]), sorted(perm[:k])


def prepare_data(data_cfg: Any, student_tokenizer, teacher_tokenizer=None, *, seed: int = 0,
                 base_dir: str | os.PathLike | None = None) -> PreparedData:
    """Load, check, split and tokenize the recipe's ``data`` section.

    ``data_cfg`` is a :class:`kdcore.config.DataConfig` (or any object/dict with its fields);
    ``seed`` is ``train.seed`` (held-out split); ``base_dir`` is the recipe's folder, where
    relative data paths are looked up first. Returns the train and eval samples and a
    :class:`DataReport`. Raises :class:`DataError` for a missing or empty data set, columns
    that fit no format, a bad row under ``bad_rows: error``, or nothing left to train on.
    """
    from kdcore.tokenizers import same_tokenizer

    fmt_req = _cfg(data_cfg, "format", "auto")
    max_length = _cfg(data_cfg, "max_length", 512)
    overlong = _cfg(data_cfg, "overlong", "truncate")
    bad_policy = _cfg(data_cfg, "bad_rows", "skip")
    limit = _cfg(data_cfg, "limit", None)
    eval_spec = _cfg(data_cfg, "eval", None)
    eval_size = _cfg(data_cfg, "eval_size", 0.05)
    if overlong not in ("truncate", "drop"):
        raise DataError(f"data.overlong must be truncate or drop, got {overlong!r}")
    if bad_policy not in ("skip", "error"):
        raise DataError(f"data.bad_rows must be skip or error, got {bad_policy!r}")

    cross = teacher_tokenizer is not None and not same_tokenizer(student_tokenizer, teacher_tokenizer)
    train_src = read_rows(_cfg(data_cfg, "train", None), base_dir=base_dir, limit=limit)
    fmt = detect_format(train_src.columns, fmt_req, train_src.path)
    report = DataReport(format=fmt, max_length=max_length, overlong_policy=overlong, cross_tokenizer=cross)
    report.train.source, report.train.rows = train_src.path, len(train_src.rows)
    train_rows = _normalize_all(train_src, fmt, report.train, bad_policy)

    if eval_spec:
        eval_src = read_rows(eval_spec, base_dir=base_dir)
        detect_format(eval_src.columns, fmt, eval_src.path)  # same format as train, checked
        report.eval.source, report.eval.rows = eval_src.path, len(eval_src.rows)
        eval_rows = _normalize_all(eval_src, fmt, report.eval, bad_policy)
        report.eval_from = "file"
    else:
        tr, ev = split_eval(len(train_rows), eval_size, seed)
        eval_rows = [train_rows[i] for i in ev]
        train_rows = [train_rows[i] for i in tr]
        report.eval.source = f"{train_src.path} (held out: {len(eval_rows)} rows, seed {seed})" if ev else ""
        report.eval.rows = len(eval_rows)
        report.eval_from = "split" if ev else "none"

    kw = dict(max_length=max_length, overlong=overlong, bad_policy=bad_policy)
    ttok = teacher_tokenizer if cross else None
    train = _tokenize_split(train_rows, student_tokenizer, ttok, report.train, train_src.path, **kw)
    evals = _tokenize_split(eval_rows, student_tokenizer, ttok, report.eval, report.eval.source, **kw)
    if not train:
        raise DataError(f"no training samples left in '{train_src.path}' ({report.train.rows} rows, "
                        f"{report.train.bad_rows} bad, {report.train.dropped_overlong} dropped by max_length)")
    return PreparedData(train=train, eval=evals, report=report)


def _normalize_all(src: RowSource, fmt: str, rep: SplitReport, bad_policy: str) -> list[tuple[int, dict]]:
    out = []
    for i, row in enumerate(src.rows):
        try:
            out.append((i, normalize_row(row, fmt)))
        except BadRow as exc:
            _bad(rep, i, exc.reason, bad_policy, src.path)
    return out


def _bad(rep: SplitReport, row: int, reason: str, policy: str, path: str) -> None:
    if policy == "error":
        raise DataError(f"'{path}' row {row}: {reason} "
                        "(data.bad_rows=error; set it to skip to count and skip bad rows)")
    rep.count_bad(row, reason)


def _tokenize_split(rows: list[tuple[int, dict]], stok, ttok, rep: SplitReport, path: str, *,
                    max_length: int, overlong: str, bad_policy: str) -> list[Sample]:
    norms = [n for _, n in rows]
    s_tok = tokenize_rows(norms, stok)
    t_tok = tokenize_rows(norms, ttok) if ttok is not None else [None] * len(norms)
    samples = []
    for (row, norm), s, t in zip(rows, s_tok, t_tok):
        bad = s if isinstance(s, BadRow) else t if isinstance(t, BadRow) else None
        if bad is not None:
            _bad(rep, row, bad.reason, bad_policy, path)
            continue
        if max_length is not None and len(s.input_ids) > max_length:
            rep.overlong += 1
        try:
            sample, truncated = _finish(norm, row, s, t, max_length, overlong)
        except OverlongRow:
            rep.dropped_overlong += 1
            continue
        rep.truncated += truncated
        rep.add(sample)
        samples.append(sample)
    return samples


# ---------------------------------------------------------------------------------- batching


@dataclass
class MicroBatch:
    """Padded tensors for one micro-batch (right padding).

    Student side: ``input_ids``/``attention_mask`` ``[B, L]`` (long); per sample
    ``loss_positions``; ``loss_index`` ``[N]`` flat indices ``b * L + p`` into ``[B * L]``
    (sample-major, positions ascending); ``labels`` ``[N]`` = ``input_ids[b, p + 1]``.
    Teacher side (cross-tokenizer only, else None — the teacher then receives ``input_ids``):
    ``teacher_input_ids``/``teacher_attention_mask`` ``[B, L_t]``, ``teacher_loss_positions``,
    ``teacher_loss_index`` (flat into ``[B * L_t]``).
    """

    input_ids: Any
    attention_mask: Any
    loss_positions: list[list[int]]
    loss_index: Any
    labels: Any
    samples: list[Sample]
    teacher_input_ids: Any = None
    teacher_attention_mask: Any = None
    teacher_loss_positions: list[list[int]] | None = None
    teacher_loss_index: Any = None

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) student tokens."""
        return int(self.attention_mask.sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_index.numel())


def flat_index(positions: Sequence[Sequence[int]], seq_len: int):
    """``[N]`` long tensor of ``b * seq_len + p`` for each sample ``b`` and position ``p``."""
    import torch

    idx = [b * seq_len + p for b, ps in enumerate(positions) for p in ps]
    return torch.tensor(idx, dtype=torch.long)


def _pad(seqs: Sequence[Sequence[int]], pad_id: int):
    import torch

    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


def collate(samples: Sequence[Sample], pad_id: int, teacher_pad_id: int | None = None) -> MicroBatch:
    """Pad samples into a :class:`MicroBatch` (see its docstring for shapes)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    ids, mask = _pad([s.student.input_ids for s in samples], pad_id)
    positions = [list(s.student.loss_positions) for s in samples]
    index = flat_index(positions, ids.shape[1])
    labels = ids.reshape(-1)[index + 1]
    mb = MicroBatch(input_ids=ids, attention_mask=mask, loss_positions=positions, loss_index=index,
                    labels=labels, samples=list(samples))
    have_t = [s.teacher is not None for s in samples]
    if any(have_t):
        if not all(have_t):
            raise ValueError("collate: some samples have a teacher tokenization and some do not")
        tpad = pad_id if teacher_pad_id is None else teacher_pad_id
        t_ids, t_mask = _pad([s.teacher.input_ids for s in samples], tpad)
        t_pos = [list(s.teacher.loss_positions) for s in samples]
        mb.teacher_input_ids, mb.teacher_attention_mask = t_ids, t_mask
        mb.teacher_loss_positions = t_pos
        mb.teacher_loss_index = flat_index(t_pos, t_ids.shape[1])
    return mb


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: ``step`` optimizer steps of ``epoch`` are done."""

    epoch: int = 0
    step: int = 0


@dataclass
class PlannedStep:
    """One optimizer step for one rank: ``micro_batches`` (``grad_accum`` lists of sample
    indices). ``next`` is the position after this step (store it in checkpoints).
    ``global_loss_tokens`` sums the loss tokens of every rank's micro-batches in this step
    (for an exact token mean without a collective), when the planner knows them."""

    epoch: int
    step: int
    micro_batches: list[list[int]]
    next: DataPosition
    global_loss_tokens: int | None = None


@dataclass
class PlanStats:
    micro_batches: int  # over all ranks
    steps: int
    samples: int  # samples scheduled this epoch (the rest could not fill a whole step)
    real_tokens: int
    padded_tokens: int

    @property
    def padding_waste(self) -> float:
        """Fraction of computed positions that are padding."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


class BatchPlanner:
    """Deterministic per-epoch micro-batch plan shared by all ranks (no communication).

    Each epoch: the sample order is shuffled from ``(seed, epoch)``; micro-batches hold
    ``micro_batch_size`` samples, or — when ``max_tokens`` > 0 — are length-grouped so each
    one's padded size ``B × L_max`` stays within ``max_tokens`` (samples are sorted by length
    within windows of about 64 micro-batches, packed longest first, and the micro-batches
    shuffled). Steps take ``world_size × grad_accum`` micro-batches; within a step, micro-batches
    go to ranks by padded size, largest first to the least-loaded rank, so every rank gets
    exactly ``grad_accum`` of them and a similar token load. When the epoch's micro-batches do
    not divide into whole steps, the largest ones are split in two until they do; only when
    that is impossible (too few samples) are the leftovers skipped for that epoch.
    """

    def __init__(self, lengths: Sequence[int], *, micro_batch_size: int = 4, max_tokens: int = 0,
                 world_size: int = 1, grad_accum: int = 1, seed: int = 0, shuffle: bool = True,
                 loss_tokens: Sequence[int] | None = None):
        if not lengths:
            raise ValueError("BatchPlanner needs at least one sample")
        if micro_batch_size < 1 or world_size < 1 or grad_accum < 1 or max_tokens < 0:
            raise ValueError("micro_batch_size, world_size and grad_accum must be >= 1 and max_tokens >= 0")
        longest = max(lengths)
        if max_tokens and longest > max_tokens:
            raise ValueError(f"train.max_tokens_per_micro_batch={max_tokens} is smaller than the longest sample "
                             f"({longest} tokens); raise it to at least data.max_length")
        self.lengths = [int(n) for n in lengths]
        self.loss_tokens = None if loss_tokens is None else [int(n) for n in loss_tokens]
        self.micro_batch_size = micro_batch_size
        self.max_tokens = max_tokens
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.shuffle = shuffle
        self._cache: dict[int, list[list[list[list[int]]]]] = {}

    @property
    def per_step(self) -> int:
        return self.world_size * self.grad_accum

    def _rng(self, epoch: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + epoch)

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        rng = self._rng(epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if not self.max_tokens:
            return [order[i:i + self.micro_batch_size] for i in range(0, len(order), self.micro_batch_size)]
        mean = sum(self.lengths) / len(self.lengths)
        # Sorting within windows (not globally) keeps batches different from epoch to epoch.
        window = max(1, int(64 * self.max_tokens / max(mean, 1.0))) if self.shuffle else len(order)
        batches: list[list[int]] = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: -self.lengths[i])  # stable: shuffled ties
            cur: list[int] = []
            cur_max = 0
            for i in chunk:
                n = self.lengths[i]
                if cur and (len(cur) + 1) * max(cur_max, n) > self.max_tokens:
                    batches.append(cur)
                    cur, cur_max = [], 0
                cur.append(i)
                cur_max = max(cur_max, n)
            if cur:
                batches.append(cur)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def epoch_plan(self, epoch: int) -> list[list[list[list[int]]]]:
        """``plan[step][rank]`` = that rank's ``grad_accum`` micro-batches (lists of indices)."""
        if epoch in self._cache:
            return self._cache[epoch]
        batches = self._micro_batches(epoch)
        k = self.per_step
        while len(batches) % k:
            big = max(range(len(batches)), key=lambda i: (len(batches[i]), -i))
            b = batches[big]
            if len(b) < 2:
                break
            batches[big:big + 1] = [b[: len(b) // 2], b[len(b) // 2:]]
        usable = len(batches) - len(batches) % k
        if usable == 0:
            raise ValueError(f"{len(self.lengths)} samples cannot fill one step of world_size × grad_accum = "
                             f"{k} micro-batches")
        plan = []
        for s in range(0, usable, k):
            step = batches[s:s + k]
            load = [0] * self.world_size
            ranks: list[list[tuple[int, list[int]]]] = [[] for _ in range(self.world_size)]
            cost = [len(b) * max(self.lengths[i] for i in b) for b in step]
            for j in sorted(range(k), key=lambda j: (-cost[j], j)):
                r = min((r for r in range(self.world_size) if len(ranks[r]) < self.grad_accum),
                        key=lambda r: (load[r], r))
                ranks[r].append((j, step[j]))
                load[r] += cost[j]
            plan.append([[b for _, b in sorted(rk)] for rk in ranks])
        if len(self._cache) > 4:  # an epoch plan is small, but runs may have many epochs
            self._cache.pop(min(self._cache))
        self._cache[epoch] = plan
        return plan

    def steps_per_epoch(self, epoch: int = 0) -> int:
        return len(self.epoch_plan(epoch))

    def stats(self, epoch: int = 0) -> PlanStats:
        plan = self.epoch_plan(epoch)
        mbs = [b for step in plan for rk in step for b in rk]
        real = sum(self.lengths[i] for b in mbs for i in b)
        padded = sum(len(b) * max(self.lengths[i] for i in b) for b in mbs)
        return PlanStats(micro_batches=len(mbs), steps=len(plan), samples=sum(len(b) for b in mbs),
                         real_tokens=real, padded_tokens=padded)

    def iterate(self, rank: int = 0, start: DataPosition = DataPosition()) -> Iterator[PlannedStep]:
        """This rank's steps from ``start`` on, endlessly (epoch after epoch)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world_size {self.world_size}")
        epoch, step = start.epoch, start.step
        while True:
            plan = self.epoch_plan(epoch)
            if step >= len(plan):
                epoch, step = epoch + 1, step - len(plan)
                continue
            nxt = DataPosition(epoch, step + 1) if step + 1 < len(plan) else DataPosition(epoch + 1, 0)
            glt = None
            if self.loss_tokens is not None:
                glt = sum(self.loss_tokens[i] for rk in plan[step] for b in rk for i in b)
            yield PlannedStep(epoch=epoch, step=step, micro_batches=plan[step][rank], next=nxt, global_loss_tokens=glt)
            epoch, step = nxt.epoch, nxt.step


def planner_for(samples: Sequence[Sample], train_cfg: Any, *, world_size: int = 1,
                shuffle: bool = True) -> BatchPlanner:
    """A :class:`BatchPlanner` for samples from the recipe's ``train`` section."""
    return BatchPlanner(
        [len(s.student.input_ids) for s in samples],
        micro_batch_size=_cfg(train_cfg, "micro_batch_size", 4),
        max_tokens=_cfg(train_cfg, "max_tokens_per_micro_batch", 0),
        world_size=world_size,
        grad_accum=_cfg(train_cfg, "grad_accum", 1),
        seed=_cfg(train_cfg, "seed", 0),
        shuffle=shuffle,
        loss_tokens=[len(s.student.loss_positions) for s in samples],
    )
