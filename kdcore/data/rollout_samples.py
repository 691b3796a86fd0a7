"""Rollout samples: a data row's prompt, and a training sample rebuilt around a generated response.

**Prompts** (:func:`prompt_of`): a chat row's messages up to (without) its final trained
assistant turn, rendered with each tokenizer's chat template *and its generation prompt*; a
``prompt``/``completion`` row's prompt string (plain text, the tokenizer's own BOS when it
adds one). Plain ``text`` rows have no prompt.

**Rollout samples** (:func:`build_rollout_sample`): the sampled side's ids are used as they
are — ``prompt ids + generated ids``, never re-tokenized — with character offsets recovered by
incremental decoding (in the canonical content coordinates of :mod:`kdcore.data`: prompt
contents, then the response text). Its loss positions are exactly the response: position
``p`` is trained iff ``input_ids[p + 1]`` was generated. When the other side uses another
tokenizer, it is re-expressed through the text: the response is decoded and that side is
tokenized the way :mod:`kdcore.data` tokenizes a row, so the aligners pair the two through
their offsets. A response that stopped on EOS is rendered as a finished turn (the template's
end-of-turn token, trained); one cut by ``max_new_tokens`` or the length limit is rendered
open, **with no end-of-turn or EOS token on either side**. With several teachers
(:func:`with_teacher_views`) every teacher that reads its own tokenization gets one the same way.

Rendering goes through this package's own helpers (:mod:`kdcore.data.rendering`), so a rollout
sample is tokenized exactly as a data row is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

from kdcore.distill.aligner import Tokenized
from kdcore.data.common import BadRow, Sample
from kdcore.data.teacher_views import with_context
from kdcore.data.rendering import (_render, _render_chat, _Rendered, _tok_name, _tokenize_rendered, _truncate,
                                   _truncate_at_char, tokenize_rows)
from kdcore.engines.protocol import Generation
from kdcore.modeling.tokenizers import special_affixes, special_ids, tokenizer_fingerprint


# ------------------------------------------------------------------------------ prompts


@dataclass
class Prompt:
    """What a data row asks: chat ``messages`` (without the final assistant turn) or a plain
    ``text`` prompt. ``content`` is its canonical text (message contents concatenated, as in
    :func:`kdcore.data.canonical_text`). Tokenizations with the generation prompt are cached
    per tokenizer fingerprint."""

    row: int
    content: str
    messages: Optional[list[dict[str, str]]] = None
    text: Optional[str] = None
    rendered: dict[str, Tokenized] = field(default_factory=dict, repr=False)


def prompt_of(sample: Sample) -> Optional[Prompt]:
    """The prompt of a data sample, or None when its row has none (plain ``text`` rows)."""
    norm = sample.source
    if not norm:
        return None
    if "messages" in norm:
        msgs, train = norm["messages"], norm["train"]
        last = max((i for i, (m, t) in enumerate(zip(msgs, train)) if t and m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            return None  # nothing before the response to condition on
        prompt = [dict(m) for m in msgs[:last]]
        return Prompt(row=sample.row, content="".join(m["content"] for m in prompt), messages=prompt)
    if "prompt" in norm:
        return Prompt(row=sample.row, content=norm["prompt"], text=norm["prompt"])
    return None


def _prompt_rendered(prompt: Prompt, tok):
    """The prompt as kdcore.data renders rows, plus the template's generation prompt."""
    if prompt.messages is not None:
        base = _render_chat({"messages": prompt.messages, "train": [False] * len(prompt.messages)}, tok)
        try:
            with_gen = tok.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja raise_exception()
            raise BadRow(f"chat template of '{_tok_name(tok)}' rejects the prompt: {type(exc).__name__}: {exc}") from exc
        if not with_gen.startswith(base.string):
            raise BadRow(f"chat template of '{_tok_name(tok)}' renders the generation prompt inconsistently")
        return _Rendered(with_gen, base.regions, [], [], False, False)
    prefix, _ = special_affixes(tok)
    n = len(prompt.text or "")
    return _Rendered(prompt.text or "", [(0, n, 0, False)] if n else [], list(prefix), [], False, False)


def _tokenize(r, tok) -> Tokenized:
    enc = tok([r.string], add_special_tokens=False, return_offsets_mapping=True)
    return _tokenize_rendered(r, enc["input_ids"][0], enc["offset_mapping"][0], special_ids(tok))


def with_prompt_context(prompt: Prompt, context: str) -> Prompt:
    """The prompt as the teachers read it under ``data.teacher_context`` (``context``: the
    sample's ``Sample.context``): prepended to its first content, as
    :func:`kdcore.data.teacher_views.with_context` prepends it to the whole row in training, so a
    context-distilled student is compared with the teacher it learned from. '' leaves it as is."""
    if not context:
        return prompt
    if prompt.messages is not None:
        msgs = with_context({"messages": prompt.messages}, context)["messages"]
        return Prompt(row=prompt.row, content=context + prompt.content, messages=msgs)
    return Prompt(row=prompt.row, content=context + prompt.content, text=context + (prompt.text or ""))


def render_prompt(prompt: Prompt, tok) -> Tokenized:
    """The prompt's tokens with the generation prompt (canonical offsets, no loss positions):
    exactly the ids a model is asked to continue. Raises :class:`kdcore.data.BadRow` when the
    chat template cannot render it."""
    key = tokenizer_fingerprint(tok)
    if key not in prompt.rendered:
        prompt.rendered[key] = _tokenize(_prompt_rendered(prompt, tok), tok)
    return prompt.rendered[key]


def answer_end_id(tok) -> Optional[int]:
    """The token :mod:`kdcore.data` trains as the end of an answer for ``tok``: the end-of-turn
    token its chat template puts after an assistant turn, else its EOS (None: neither)."""
    if getattr(tok, "chat_template", None):
        probe = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                 "train": [False, True]}
        t = tokenize_rows([probe], tok)[0]
        if not isinstance(t, BadRow) and t.loss_positions:
            end = t.input_ids[t.loss_positions[-1] + 1]
            if end in special_ids(tok):
                return int(end)
    return None if tok.eos_token_id is None else int(tok.eos_token_id)


def stop_ids(tok, extra: Sequence[Optional[int]] = ()) -> list[int]:
    """Ids that end a response: the tokenizer's EOS, the end-of-turn token its chat template
    puts after an assistant turn (what :mod:`kdcore.data` trains the model to emit), and
    ``extra`` (e.g. the model's ``generation_config.eos_token_id``)."""
    ids = {int(e) for e in extra if e is not None}
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    end = answer_end_id(tok)
    if end is not None:
        ids.add(end)
    return sorted(ids)


def end_response(generation: Generation, tok, end_at, stop_id: int) -> Optional[Generation]:
    """``generation`` ended where the rule ``end_at`` says, or None when the rule leaves it as
    generated.

    ``end_at(text)`` gets the response's text (special tokens dropped) and returns the character
    index its answer ends at (1 to ``len(text)``), or None. The tokens are kept up to the one that
    reaches that character (a token straddling it is kept whole, so the cut never splits a
    character), and ``stop_id`` follows them: the response is finished. One that stopped on its
    own with nothing but white space past that character is left as generated."""
    ids = [int(i) for i in generation.token_ids]
    text, offsets = response_offsets(tok, ids)
    end = end_at(text)
    if end is None:
        return None
    if not 1 <= end <= len(text):
        raise ValueError(f"a response's end must fall within its {len(text)} characters, got {end} for {text[:40]!r}")
    if generation.finished_by_eos and not text[end:].strip():
        return None
    keep = next(k for k, (_, b) in enumerate(offsets) if b >= end) + 1
    return Generation(token_ids=ids[:keep] + [int(stop_id)], finished_by_eos=True)


# ------------------------------------------------------------------------ rollout samples


@dataclass
class RolloutSample(Sample):
    """A :class:`kdcore.data.Sample` whose response was generated.

    ``origin``: ``student`` or ``teacher`` (who generated it); ``response_ids``: the generated
    ids, in the generator's vocabulary, exactly as sampled (after any length cut);
    ``finished_by_eos``: it ended on a stop token (else it was cut by a length limit and
    carries no EOS/end-of-turn token on either side); ``drawn_end``: that stop token was put
    there by a rule (:func:`end_response`).
    """

    origin: str = "data"
    response_ids: list[int] = field(default_factory=list)
    finished_by_eos: bool = False
    # its stop token was appended where a rule ended the response (:func:`end_response`), not
    # generated: no model chose to stop there, so the step preparer teaches that target by CE
    # alone (kept where the row's other CE goes to the data) and pairs it with no teacher
    drawn_end: bool = False


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def response_offsets(tok, ids: Sequence[int], start: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """The text of generated ``ids`` and each token's character span in it (shifted by
    ``start``), by incremental decoding; special tokens (EOS) are not text and get an empty
    span. A character whose bytes are split over several tokens is in the span of each of
    them (the convention of :mod:`kdcore.data`)."""
    ids = [int(i) for i in ids]
    if not ids:
        return "", []
    specials = special_ids(tok)
    kw = dict(skip_special_tokens=True, clean_up_tokenization_spaces=False)
    prefixes = [""] + tok.batch_decode([ids[: k + 1] for k in range(len(ids))], **kw)
    text = prefixes[-1]
    stable = [_common_prefix(p, text) for p in prefixes]
    # a prefix ending inside a character decodes to a replacement char past the stable part
    reach = [min(len(p), s + 1) if len(p) > s else s for p, s in zip(prefixes, stable)]
    offsets = []
    lo = 0
    for k, tid in enumerate(ids):
        a = max(stable[k], lo)
        b = max(reach[k + 1], a)
        if tid in specials:
            b = a = max(stable[k + 1], a)
        offsets.append((start + a, start + b))
        lo = a
    return text, offsets


def _response_rendered(prompt: Prompt, text: str, finished: bool, tok):
    """The row (prompt + this response) as kdcore.data renders it for ``tok``; open (no
    end-of-turn, no EOS) when the response was cut."""

    if prompt.messages is not None:
        msgs = prompt.messages + [{"role": "assistant", "content": text}]
        if finished:
            return _render_chat({"messages": msgs, "train": [False] * len(prompt.messages) + [True]}, tok)
        head = _prompt_rendered(prompt, tok)
        regions = list(head.regions)
        if text:
            regions.append((len(head.string), len(head.string) + len(text), len(prompt.content), True))
        return _Rendered(head.string + text, regions, [], [], False, False)
    full = _render({"prompt": prompt.text or "", "completion": text}, tok)
    if not finished:
        full.suffix = []  # the EOS kdcore.data appends would be a false stop
    return full


def build_rollout_sample(prompt: Prompt, generation: Generation, *, sampled_by: str, student_tok, teacher_tok=None,
                         max_length: Optional[int] = None, teacher_max_length: Optional[int] = None) -> Optional[RolloutSample]:
    """A training sample for ``prompt`` + a generated response.

    ``sampled_by``: ``student`` or ``teacher``; ``generation.token_ids`` are in that side's
    vocabulary and are kept as they are. ``teacher_tok``: None when both sides share the
    student's tokenizer (then ``sample.teacher`` is None and the teacher reads the student's
    ids); otherwise the other side is rebuilt from the decoded text. ``max_length`` caps the
    student side, ``teacher_max_length`` the teacher side (the other side is cut at the same
    character). Returns None when nothing of the response survives the caps.
    """

    if sampled_by not in ("student", "teacher"):
        raise ValueError(f"sampled_by must be 'student' or 'teacher', got {sampled_by!r}")
    cross = teacher_tok is not None
    own_tok = student_tok if sampled_by == "student" or not cross else teacher_tok
    head = render_prompt(prompt, own_tok)
    ids = list(generation.token_ids)
    text, offs = response_offsets(own_tok, ids, start=len(prompt.content))
    p = len(head.input_ids)
    own = Tokenized(input_ids=list(head.input_ids) + ids, offsets=list(head.offsets) + offs,
                    loss_positions=list(range(p - 1, p - 1 + len(ids))))
    if cross:
        other_tok = teacher_tok if sampled_by == "student" else student_tok
        other = _tokenize(_response_rendered(prompt, text, generation.finished_by_eos, other_tok), other_tok)
        s, t = (own, other) if sampled_by == "student" else (other, own)
    else:
        s, t = own, None  # one tokenizer: the teacher reads the student's ids
    if max_length is not None and len(s.input_ids) > max_length:
        s = _truncate(s, max_length)
        if t is not None:
            t = _truncate_at_char(t, max((b for _, b in s.offsets), default=0))
    if t is not None and teacher_max_length is not None and len(t.input_ids) > teacher_max_length:
        t = _truncate(t, teacher_max_length)
        s = _truncate_at_char(s, max((b for _, b in t.offsets), default=0))
    gen_side = s if sampled_by == "student" or not cross else t
    kept = max(0, len(gen_side.input_ids) - p)
    finished = generation.finished_by_eos and kept == len(ids)
    if cross and not finished:
        # The response is open on the generated side (cut by a limit, or its stop token cut
        # away): the rebuilt side ends at the same character, without an end-of-turn of its own.
        x = max((b for _, b in gen_side.offsets), default=0)
        if sampled_by == "student":
            t = _truncate_at_char(t, x)
        else:
            s = _truncate_at_char(s, x)
    if not s.loss_positions or (t is not None and not t.loss_positions):
        return None
    content = prompt.content + text
    if prompt.messages is not None:
        source = {"messages": prompt.messages + [{"role": "assistant", "content": text}],
                  "train": [False] * len(prompt.messages) + [True]}
    else:
        source = {"prompt": prompt.text, "completion": text}
    return RolloutSample(text=content, student=s, teacher=t, row=prompt.row, source=source,
                         response_spans=[(len(prompt.content), len(content))], origin=sampled_by,
                         response_ids=ids[:kept], finished_by_eos=finished)


def with_teacher_views(rs: RolloutSample, prompt: Prompt, views: dict, *, route=None,
                       generator: Optional[str] = None, max_length: Optional[int] = None,
                       context: str = "") -> Optional[RolloutSample]:
    """``rs`` as the several-teacher path reads it: ``teacher`` moved to ``teachers[generator]``
    (the teacher that generated it, when it reads its own tokens) and every other teacher of
    ``views`` (name → tokenizer: those that read their own tokenization) rebuilt from the
    text, cut at the student's last character; ``route``: the data sample's. ``context``
    (``data.teacher_context``, the sample's ``Sample.context``): every teacher reads it before the
    prompt, as in :mod:`kdcore.data.teacher_views` (the generator's view is then rebuilt from the
    text too: its ids were rendered without it). None when a teacher is left without a trained
    position."""
    from dataclasses import replace as _replace

    from kdcore.data.teacher_views import shift_past_context

    text = rs.text[len(prompt.content):]
    end = max((b for _, b in rs.student.offsets), default=0)
    read = with_prompt_context(prompt, context)
    out: dict[str, Tokenized] = {}
    for name, tok in views.items():
        if name == generator and rs.teacher is not None and not context:
            out[name] = rs.teacher
            continue
        v = _tokenize(_response_rendered(read, text, rs.finished_by_eos, tok), tok)
        v = shift_past_context(v, len(context))  # offsets back in the sample's own text
        if not rs.finished_by_eos:
            v = _truncate_at_char(v, end)  # open on the student's side: no end-of-turn of its own
        if max_length is not None and len(v.input_ids) > max_length:
            v = _truncate(v, max_length)
        if not v.loss_positions:
            return None
        out[name] = v
    return _replace(rs, teacher=None, teachers=out, route=route)


__all__ = ["Prompt", "prompt_of", "with_prompt_context", "render_prompt", "answer_end_id", "stop_ids", "end_response",
           "RolloutSample", "response_offsets", "build_rollout_sample", "with_teacher_views"]
