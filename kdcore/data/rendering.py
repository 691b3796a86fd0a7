"""Rendering rows for a tokenizer and tokenizing them with offsets in canonical content
coordinates (see :mod:`kdcore.data`); the max-length policy on one sample."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

from kdcore.distill.aligner import Tokenized
from kdcore.data.common import BadRow, DataError, OverlongRow, Sample
from kdcore.data.formats import canonical_text
from kdcore.modeling.tokenizers import special_affixes, special_ids, same_tokenizer

_ENCODE_CHUNK = 256  # rows per batched tokenizer call: amortises Python overhead, bounded memory


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


def _render_chat(norm: dict[str, Any], tok, processor=None) -> _Rendered:
    """Render with the chat template and locate each message's content in the result.

    The template is rendered twice: once with placeholders instead of contents (which shows
    exactly where each content goes, however the template decorates it) and once for real;
    the real string must then be the placeholder string with each placeholder replaced by the
    content (or the content stripped, for templates that trim). With a ``processor`` (a
    vision-language side, :mod:`kdcore.data.images`) its template renders the messages' parts
    and places the image tokens; each text part is then a content piece of its own.
    """
    name = _tok_name(tok)
    if not getattr(processor or tok, "chat_template", None):
        raise DataError(f"tokenizer '{name}' has no chat template, so 'messages' rows cannot be rendered; "
                        "use a tokenizer with one, or prompt/completion or text data")
    pieces: list[tuple[int, int, str]] = []  # (message, canonical start, text) in content order
    real_msgs, ph_msgs = [], []
    pos = 0

    def piece(i: int, text: str) -> str:
        nonlocal pos
        pieces.append((i, pos, text))
        pos += len(text)
        return _PH.format(len(pieces) - 1)

    for i, m in enumerate(norm["messages"]):
        if processor is not None and m.get("parts"):
            parts = [{"type": "image"} if p["type"] == "image" else p for p in m["parts"]]
            real_msgs.append({"role": m["role"], "content": parts})
            ph_msgs.append({"role": m["role"], "content": [p if p["type"] == "image" else
                                                           {"type": "text", "text": piece(i, p["text"])} for p in parts]})
        else:
            real_msgs.append({"role": m["role"], "content": m["content"]})
            ph_msgs.append({"role": m["role"], "content": piece(i, m["content"])})
    apply = (processor or tok).apply_chat_template
    try:
        real = apply(real_msgs, tokenize=False)
        shape = apply(ph_msgs, tokenize=False)
    except Exception as exc:  # jinja raise_exception() for role order, missing variables, ...
        raise BadRow(f"chat template of '{name}' rejects the conversation: {type(exc).__name__}: {exc}") from exc
    parts_ = _PH_RE.split(shape)  # markup, idx, markup, idx, ..., markup
    order = [int(i) for i in parts_[1::2]]
    markup = parts_[0::2]
    if sorted(order) != list(range(len(pieces))):
        raise BadRow(f"chat template of '{name}' does not render each message exactly once")
    regions = []
    at = 0
    for k, idx in enumerate(order):
        msg, start, content = pieces[idx]
        if not real.startswith(markup[k], at):
            raise BadRow(f"chat template of '{name}' renders the conversation inconsistently (message {msg})")
        at += len(markup[k])
        for variant, lead in ((content, 0), (content.strip(), len(content) - len(content.lstrip())),
                              (content.rstrip(), 0), (content.lstrip(), len(content) - len(content.lstrip()))):
            if real.startswith(variant, at) and real.startswith(markup[k + 1], at + len(variant)):
                break
        else:
            raise BadRow(f"chat template of '{name}' alters the content of message {msg} "
                         f"({norm['messages'][msg]['role']})")
        if variant:
            regions.append((at, at + len(variant), start + lead, norm["train"][msg]))
        at += len(variant)
    if at + len(markup[-1]) != len(real):
        raise BadRow(f"chat template of '{name}' renders the conversation inconsistently (end)")
    return _Rendered(real, regions, [], [], False, False)


def _tok_name(tok) -> str:
    return str(getattr(tok, "name_or_path", "") or type(tok).__name__)


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
    if t.vision is not None and n < t.vision.end:
        # an image's features must fill all of its tokens: a cut image cannot be fed to the model
        raise OverlongRow(f"max_length {n} would cut an image (its tokens end at position {t.vision.end})")
    return Tokenized(input_ids=t.input_ids[:n], offsets=t.offsets[:n],
                     loss_positions=[p for p in t.loss_positions if p < n - 1], vision=t.vision)


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
