"""Sampling for rollout policies: prompts, samples rebuilt around responses, and the sampler.

Algorithm-free: *which* sequences a step learns on is a rollout policy's choice
(``kdflow_algorithms.rollouts``); this module only provides the means to generate them.

**Rollout engines** live in :mod:`kdcore.engines` (protocol: :class:`kdcore.engines.protocol.RolloutEngine`);
the recipe's ``rollout.engine`` names one registered through the ``register_engines`` hook
(``hf``: a student copy in the trainer process; ``sglang``: GPU). Under FSDP2 every rank keeps
its own copy and samples its own prompts: :func:`full_weights` gathers the full weights on
*every* rank.

**Weight sync.** The copy holds the weights of some optimizer step; :class:`RolloutSampler`
re-syncs it before sampling whenever it is ``rollout.sync_every`` or more updates behind, so
samples always come from weights at most ``sync_every - 1`` updates old (``sync_every: 1`` =
strictly on-policy). With one rank the sync is lazy (steps that do not sample skip it); with
several it runs on every rank at the start of each step's rollout, since the gather is a
collective.

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
open, **with no end-of-turn or EOS token on either side**.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from kdcore import lora
from kdcore.aligner import Tokenized
from kdcore.data import BadRow, DataError, Sample
from kdcore.engines import create_rollout_engine
from kdcore.engines.hf_rollout import HFRolloutEngine, TeacherRolloutEngine
from kdcore.engines.protocol import Generation, RolloutEngine, RolloutError, check_sampling


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights of a possibly FSDP2-sharded model, on **every** rank.

    Collective under FSDP2 (every rank calls it at the same point). Tensors are detached and
    may alias the model's own storage when nothing had to be gathered: copy them before the
    next optimizer step if they must outlive it. Tied weights are gathered once and appear
    under each of their names. Non-persistent buffers (rotary ``inv_freq``) are not included.
    """
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            key = id(t)
            if key not in gathered:
                gathered[key] = (t.full_tensor() if isinstance(t, DTensor) else t).detach()
            out[name] = gathered[key]
    # a LoRA student hands out merged weights under the base model's names (what engines load)
    return lora.merge_lora_weights(model, out) if lora.is_lora_model(model) else out


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
    from kdcore.data import BadRow, _render_chat, _Rendered, _tok_name
    from kdcore.tokenizers import special_affixes

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
    from kdcore.data import _tokenize_rendered
    from kdcore.tokenizers import special_ids

    enc = tok([r.string], add_special_tokens=False, return_offsets_mapping=True)
    return _tokenize_rendered(r, enc["input_ids"][0], enc["offset_mapping"][0], special_ids(tok))


def render_prompt(prompt: Prompt, tok) -> Tokenized:
    """The prompt's tokens with the generation prompt (canonical offsets, no loss positions):
    exactly the ids a model is asked to continue. Raises :class:`kdcore.data.BadRow` when the
    chat template cannot render it."""
    from kdcore.tokenizers import tokenizer_fingerprint

    key = tokenizer_fingerprint(tok)
    if key not in prompt.rendered:
        prompt.rendered[key] = _tokenize(_prompt_rendered(prompt, tok), tok)
    return prompt.rendered[key]


def stop_ids(tok, extra: Sequence[Optional[int]] = ()) -> list[int]:
    """Ids that end a response: the tokenizer's EOS, the end-of-turn token its chat template
    puts after an assistant turn (what :mod:`kdcore.data` trains the model to emit), and
    ``extra`` (e.g. the model's ``generation_config.eos_token_id``)."""
    from kdcore.data import BadRow, tokenize_rows
    from kdcore.tokenizers import special_ids

    ids = {int(e) for e in extra if e is not None}
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    if getattr(tok, "chat_template", None):
        probe = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                 "train": [False, True]}
        t = tokenize_rows([probe], tok)[0]
        if not isinstance(t, BadRow) and t.loss_positions:
            end = t.input_ids[t.loss_positions[-1] + 1]
            if end in special_ids(tok):
                ids.add(int(end))
    return sorted(ids)


# ------------------------------------------------------------------------ rollout samples


@dataclass
class RolloutSample(Sample):
    """A :class:`kdcore.data.Sample` whose response was generated.

    ``origin``: ``student`` or ``teacher`` (who generated it); ``response_ids``: the generated
    ids, in the generator's vocabulary, exactly as sampled (after any length cut);
    ``finished_by_eos``: it ended on a stop token (else it was cut by a length limit and
    carries no EOS/end-of-turn token on either side).
    """

    origin: str = "data"
    response_ids: list[int] = field(default_factory=list)
    finished_by_eos: bool = False


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
    from kdcore.tokenizers import special_ids

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
    from kdcore.data import _render, _render_chat, _Rendered

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
    from kdcore.data import _truncate, _truncate_at_char

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


# ------------------------------------------------------------------------------ sampler


@dataclass
class SamplingSettings:
    """Generation settings (the recipe's ``rollout`` section, see :class:`kdcore.config.RolloutConfig`)."""

    engine: str = "hf"
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    sync_every: int = 1
    dtype: str = "float32"
    sglang: Any = None  # the rollout server's settings (kdcore.config.SGLangConfig) for engine sglang
    engine_options: Any = None  # a plugin engine's own options (rollout.engine_options), checked at validation

    @classmethod
    def from_config(cls, cfg: Any) -> "SamplingSettings":
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__ if getattr(cfg, k, None) is not None})


@dataclass
class _Stats:
    samples: int = 0
    response_tokens: int = 0
    eos: int = 0
    student: int = 0
    teacher: int = 0
    fallback: int = 0  # prompts kept as data (no room left under max_length)
    sample_s: float = 0.0
    sync_s: float = 0.0
    syncs: int = 0
    teacher_sync_s: float = 0.0


class RolloutSampler:
    """What the trainer gives rollout policies: ``sample_student`` / ``sample_teacher``.

    ``sample_student(samples, **overrides)`` returns, for each data sample, ``n`` samples whose
    responses the live student generated (prompt-major), built by :func:`build_rollout_sample`;
    a prompt with no room left under ``data.max_length`` keeps its data sample (counted as
    ``rollout_fallback``). ``sample_teacher`` is the same with the teacher generating (in its own
    process). ``overrides``: any of ``max_new_tokens``, ``temperature``, ``top_p``, ``n``.
    ``grouped=True`` returns one list per input sample instead of one flat list.

    The student copy is built on first use, re-synced as described in the module docstring.
    """

    def __init__(self, *, settings: SamplingSettings, student_model, student_tok, teacher_tok=None,
                 teacher_engine=None, max_length: Optional[int] = None, teacher_max_length: Optional[int] = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 threads: Optional[int] = None, sources: Sequence[str] = ("student", "teacher")):
        from kdcore.models import torch_dtype

        if settings.sync_every < 1:
            raise RolloutError(f"rollout.sync_every must be >= 1, got {settings.sync_every}")
        check_sampling(settings.temperature, settings.top_p, settings.n)
        self.settings = settings
        self.student_model = student_model
        self.student_tok = student_tok
        self.teacher_tok = teacher_tok  # None: shared tokenizer
        self.teacher_engine = teacher_engine
        self.max_length = max_length
        self.teacher_max_length = teacher_max_length
        self.world_size = world_size
        self.device = device
        self.threads = threads
        self.sources = tuple(sources)
        self.dtype = torch_dtype(settings.dtype)
        self._rng = random.Random(seed * 1_000_003 + 7919 * rank + 1)
        self._prompts: dict[int, tuple[Sample, Optional[Prompt]]] = {}
        self.engine: Optional[RolloutEngine] = None
        self.version = 0  # optimizer steps applied to the student so far
        self.teacher_version = 0  # teacher weight refreshes (self-distillation)
        self.buffer: list[Any] = []  # replay buffer handed to policies through the context
        self.self_distill_every = 0  # > 0: teacher_sync_due() every that many optimizer steps
        self.stats = _Stats()
        model_eos = getattr(getattr(student_model, "generation_config", None), "eos_token_id", None)
        self.student_stop = stop_ids(student_tok, model_eos if isinstance(model_eos, list) else [model_eos])
        self.teacher_stop = stop_ids(teacher_tok) if teacher_tok is not None else self.student_stop

    # ---------------------------------------------------------------- weights
    @property
    def samples_student(self) -> bool:
        return "student" in self.sources

    def _stale(self) -> bool:
        v = None if self.engine is None else getattr(self.engine, "version", None)
        return v is None or self.version - v >= self.settings.sync_every

    def sync(self) -> None:
        """Copy the student's current weights into the rollout engine (collective under FSDP)."""
        t0 = time.perf_counter()
        if self.engine is None:
            self.engine = create_rollout_engine(self.settings.engine, config=self.student_model.config,
                                                device=self.device, dtype=self.dtype, threads=self.threads,
                                                settings=self.settings)
        if hasattr(self.engine, "sync_model"):  # engines that gather shards their own way (sglang)
            self.engine.sync_model(self.student_model)
        else:
            self.engine.update_weights(full_weights(self.student_model))
        self.engine.version = self.version  # type: ignore[attr-defined]
        self.stats.sync_s += time.perf_counter() - t0
        self.stats.syncs += 1

    def before_step(self, step: int) -> None:
        """Start of a step's rollout, on every rank: with several ranks, sync now when due
        (the gather is a collective, so it cannot wait for a rank that happens to sample)."""
        if self.world_size > 1 and self.samples_student and self._stale():
            self.sync()

    def after_update(self) -> None:
        """An optimizer step changed the student's weights."""
        self.version += 1

    def teacher_sync_due(self, step: int) -> bool:
        """Self-distillation: refresh the teacher after optimizer step ``step`` (1-based)?"""
        return self.self_distill_every > 0 and step % self.self_distill_every == 0

    def refresh_teacher(self, engine, *, dtype: torch.dtype, device) -> torch.Tensor:
        """Self-distillation: the teacher takes the student's weights (see :func:`sync_teacher`);
        returns the new teacher head. No hidden-state request may be outstanding."""
        t0 = time.perf_counter()
        head = sync_teacher(engine, self.student_model, dtype=dtype, device=device)
        self.teacher_version += 1
        self.stats.teacher_sync_s += time.perf_counter() - t0
        return head

    # ---------------------------------------------------------------- prompts
    def prompt(self, sample: Sample) -> Optional[Prompt]:
        hit = self._prompts.get(id(sample))
        if hit is not None and hit[0] is sample:
            return hit[1]
        p = prompt_of(sample)
        self._prompts[id(sample)] = (sample, p)
        return p

    def check_prompts(self, samples: Sequence[Sample], who: str) -> None:
        """Raise :class:`kdcore.data.DataError` naming the first sample without a prompt."""
        for s in samples:
            if self.prompt(s) is None:
                raise DataError(f"{who} samples responses to prompts, but data row {s.row} has none (plain "
                                "text, or no turn before its assistant reply); use 'messages' or 'prompt' rows")

    # ---------------------------------------------------------------- sampling
    def sample_student(self, samples: Sequence[Sample], *, grouped: bool = False, **overrides) -> list:
        if self._stale():
            if self.world_size > 1:
                raise RolloutError("the rollout engine is stale mid-step; with several ranks the trainer must call "
                                   "before_step() on every rank first")
            self.sync()
        return self._sample(samples, "student", self.engine, overrides, grouped)

    def sample_teacher(self, samples: Sequence[Sample], *, grouped: bool = False, **overrides) -> list:
        if self.teacher_engine is None:
            raise RolloutError("no teacher engine to sample from")
        return self._sample(samples, "teacher", TeacherRolloutEngine(self.teacher_engine), overrides, grouped)

    def _sample(self, samples, side: str, engine: RolloutEngine, overrides: dict, grouped: bool) -> list:
        unknown = set(overrides) - {"max_new_tokens", "temperature", "top_p", "n"}
        if unknown:
            raise RolloutError(f"unknown sampling option(s) {', '.join(sorted(unknown))}")
        st = self.settings
        max_new = int(overrides.get("max_new_tokens", st.max_new_tokens))
        n = int(overrides.get("n", st.n))
        temperature = float(overrides.get("temperature", st.temperature))
        top_p = float(overrides.get("top_p", st.top_p))
        t0 = time.perf_counter()
        own_tok = self.teacher_tok if side == "teacher" and self.teacher_tok is not None else self.student_tok
        cap = self.teacher_max_length if side == "teacher" and self.teacher_tok is not None else self.max_length
        jobs, limits = [], []
        for i, s in enumerate(samples):
            prompt = self.prompt(s)
            if prompt is None:
                raise DataError(f"data row {s.row} has no prompt to sample a response for")
            try:
                ids = render_prompt(prompt, own_tok).input_ids
            except BadRow as exc:
                raise DataError(f"data row {s.row}: its prompt cannot be rendered for sampling: {exc.reason}") from exc
            room = max_new if cap is None else min(max_new, cap - len(ids))
            if room >= 1 and ids:
                jobs.append((i, prompt, ids))
                limits.append(room)
        gens = engine.generate([j[2] for j in jobs], max_new_tokens=limits, temperature=temperature, top_p=top_p,
                               n=n, eos_ids=self.teacher_stop if side == "teacher" else self.student_stop,
                               seed=self._rng.randrange(2 ** 31)) if jobs else []
        built: dict[int, list[Sample]] = {}
        for k, (i, prompt, _) in enumerate(jobs):
            for g in gens[k * n:(k + 1) * n]:
                rs = build_rollout_sample(prompt, g, sampled_by=side, student_tok=self.student_tok,
                                          teacher_tok=self.teacher_tok, max_length=self.max_length,
                                          teacher_max_length=self.teacher_max_length)
                if rs is not None:
                    built.setdefault(i, []).append(rs)
                    self.stats.samples += 1
                    self.stats.response_tokens += len(rs.response_ids)
                    self.stats.eos += int(rs.finished_by_eos)
                    setattr(self.stats, side, getattr(self.stats, side) + 1)
        groups: list[list[Sample]] = []
        for i, s in enumerate(samples):
            if i not in built:
                self.stats.fallback += 1  # no room for a response under max_length: the data's own
            groups.append(built.get(i, [s]))
        self.stats.sample_s += time.perf_counter() - t0
        return groups if grouped else [x for g in groups for x in g]

    # ---------------------------------------------------------------- context and metrics
    def context_fields(self) -> dict[str, Any]:
        """Fields of :class:`kdcore.rollout.RolloutContext` this sampler provides."""
        return {"sample_student": self.sample_student if self.samples_student else None,
                "sample_teacher": self.sample_teacher if self.teacher_engine is not None else None,
                "buffer": self.buffer, "teacher_version": self.teacher_version}

    def pop_metrics(self) -> dict[str, float]:
        """Sampling metrics since the last call (one optimizer step when called every step)."""
        s, self.stats = self.stats, _Stats()
        rec: dict[str, float] = {"sample_s": s.sample_s, "sync_s": s.sync_s}
        if self.self_distill_every:
            rec["teacher_sync_s"] = s.teacher_sync_s
        if s.samples:
            rec.update(rollout_samples=s.samples, rollout_response_len=s.response_tokens / s.samples,
                       rollout_eos_frac=s.eos / s.samples, rollout_student_samples=s.student,
                       rollout_teacher_samples=s.teacher)
        if s.fallback:
            rec["rollout_fallback"] = s.fallback
        return rec

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


# ------------------------------------------------------------------------- self-distillation


def head_name(model: torch.nn.Module) -> str:
    """The state-dict name of the model's output projection weight (lm_head, or the tied embedding)."""
    model = lora.unwrap(model)  # a LoRA student's names as in its merged weights (full_weights)
    head = model.get_output_embeddings().weight
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is head:
            return name
    raise RolloutError(f"{type(model).__name__}: cannot find the lm_head weight among its parameters")


def sync_teacher(engine, model: torch.nn.Module, *, dtype: torch.dtype, device) -> torch.Tensor:
    """Self-distillation: copy the student's full weights into the teacher engine (every rank
    into its own engine; collective under FSDP) and return the new teacher head ``[V, H]``
    (a copy in ``dtype`` on ``device``) for the student side of the loss."""
    return push_teacher_weights(engine, full_weights(model), head_name(model), dtype=dtype, device=device)


def push_teacher_weights(engine, weights: dict[str, torch.Tensor], head_key: str, *, dtype: torch.dtype,
                         device) -> torch.Tensor:
    """Load full ``weights`` into the teacher engine (self-distillation, an EMA teacher) and
    return the teacher head they hold, a copy in ``dtype`` on ``device``."""
    engine.update_weights(weights)
    return weights[head_key].to(device=device, dtype=dtype, copy=True)


def check_self_distill(student_config, teacher_config) -> None:
    """Self-distillation copies the student into the teacher by name: same architecture required."""
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    diff = [f"{k} {getattr(student_config, k, None)} vs {getattr(teacher_config, k, None)}" for k in keys
            if getattr(student_config, k, None) != getattr(teacher_config, k, None)]
    if diff:
        raise RolloutError("teacher.self_distill_every needs the student to have the teacher's architecture "
                           f"(student.init: pretrained from the teacher); student vs teacher: {', '.join(diff)}")


def length_caps(max_length: int, samples: Sequence[Sample], *, cross: bool) -> Optional[int]:
    """Teacher-side token cap for rollout samples (None with a shared tokenizer, where the
    student's ``max_length`` bounds both). Cross-tokenizer: the data's worst teacher/student
    length ratio, with 50% headroom because generated text (code, odd characters) can split
    into more teacher tokens than the data ever did."""
    if not cross:
        return None
    ratio = max((len(s.teacher.input_ids) / max(1, len(s.student.input_ids)) for s in samples if s.teacher is not None),
                default=1.0)
    return int(math.ceil(max_length * max(1.0, ratio) * 1.5))


def rows_bound(*, max_length: int, teacher_cap: Optional[int], micro_batch_size: int, token_budget: int,
               samples: Sequence[Sample], n: int) -> int:
    """Channel rows a rollout micro-batch may need: samples per micro-batch × ``n`` × the
    longest sequence a rollout sample can have on the teacher side."""
    per_mb = micro_batch_size
    if token_budget:
        shortest = min((len(s.student.input_ids) for s in samples), default=1)
        per_mb = max(1, token_budget // max(1, shortest))
    return per_mb * n * (teacher_cap or max_length)


__all__ = [
    "Generation", "RolloutEngine", "HFRolloutEngine", "TeacherRolloutEngine", "create_rollout_engine",
    "full_weights", "Prompt", "prompt_of", "render_prompt", "stop_ids", "RolloutSample", "response_offsets",
    "build_rollout_sample", "SamplingSettings", "RolloutSampler", "RolloutError", "sync_teacher",
    "check_self_distill", "head_name", "length_caps", "rows_bound",
]


# ------------------------------------------------------------------------ trainer wiring


def rollout_rows(cfg, policy, train_samples: Sequence[Sample], *, cross: bool) -> int:
    """Channel rows the teacher engine needs for rollout micro-batches (0 for a policy that
    does not sample)."""
    if not getattr(policy, "needs_sampling", False):
        return 0
    cap = length_caps(cfg.data.max_length, train_samples, cross=cross)
    return rows_bound(max_length=cfg.data.max_length, teacher_cap=cap, micro_batch_size=cfg.train.micro_batch_size,
                      token_budget=cfg.train.max_tokens_per_micro_batch, samples=train_samples, n=cfg.rollout.n)


def build_sampler(cfg, policy, *, student_model, student_tok, teacher_tok, cross: bool, teacher_engine, env,
                  train_samples: Sequence[Sample]) -> Optional[RolloutSampler]:
    """The sampler a run needs: for a sampling policy, or for self-distillation (teacher
    refreshes); None otherwise. Checks prompts and architectures up front (one-line errors)."""
    sampling = bool(getattr(policy, "needs_sampling", False))
    every = int(getattr(cfg.teacher, "self_distill_every", 0) or 0)
    if not sampling and not every:
        return None
    if every:
        from kdcore.student import load_config

        check_self_distill(student_model.config, load_config(cfg.teacher.path))
    sources = tuple(getattr(policy, "sample_sources", ()) or ("student", "teacher")) if sampling else ()
    sampler = RolloutSampler(
        settings=SamplingSettings.from_config(cfg.rollout), student_model=student_model,
        student_tok=student_tok, teacher_tok=teacher_tok if cross else None,
        teacher_engine=teacher_engine, max_length=cfg.data.max_length,
        teacher_max_length=length_caps(cfg.data.max_length, train_samples, cross=cross),
        seed=cfg.train.seed, rank=env.rank, world_size=env.world_size, device=env.device,
        # CPU: one thread. Decoding is a stream of tiny ops, and with kdflow's passive OpenMP
        # waits every parallel one pays a worker wake-up: 64 tokens × 4 rows of the bench
        # student took 0.60 s on 2 threads, 0.44 s on 1 (growing the pool instead, while the
        # idle teacher process holds the other cores, measured 10x slower). Accelerators: as is.
        threads=1 if env.device.type == "cpu" else None,
        sources=sources)
    sampler.self_distill_every = every
    if sampling:
        sampler.check_prompts(train_samples, f"distill.rollout '{cfg.distill.rollout}'")
    return sampler
