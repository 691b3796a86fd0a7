"""Sampling for rollout policies: rollout engines, prompts, and samples rebuilt around responses.

Algorithm-free: *which* sequences a step learns on is a rollout policy's choice
(``kdflow_algorithms.rollouts``); this module only provides the means to generate them.

**Rollout engines** (:class:`RolloutEngine`) generate continuations of prompt token ids and
take new weights. ``hf`` (:class:`HFRolloutEngine`) is an unsharded copy of the student, built
from the student's config in the trainer process, generating with transformers on the
student's device; the SGLang rollout engine implements the same interface
(``create_rollout_engine("sglang", ...)``). Under FSDP2 every rank keeps its own copy and
samples its own prompts: :func:`full_weights` gathers the full weights on *every* rank.

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

import abc
import contextlib
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch

from kdcore.aligner import Tokenized
from kdcore.data import BadRow, DataError, Sample


class RolloutError(RuntimeError):
    """Sampling cannot proceed (bad settings, or an engine that cannot do what was asked)."""


# ------------------------------------------------------------------------------ engines


@dataclass
class Generation:
    """One sampled continuation: the new token ids (EOS included when it stopped on one)."""

    token_ids: list[int]
    finished_by_eos: bool


class RolloutEngine(abc.ABC):
    """Generates continuations from the current policy weights.

    Implementations: :class:`HFRolloutEngine` (transformers, CPU or CUDA), the SGLang engine
    (GPU), and :class:`TeacherRolloutEngine` (the teacher engine's own ``generate``).
    """

    @abc.abstractmethod
    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        """Load full (unsharded) weights by name; returns how many tensors were copied. Unknown
        names, missing names or shape mismatches raise :class:`RolloutError` naming them."""

    @abc.abstractmethod
    def generate(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                 temperature: float = 1.0, top_p: float = 1.0, n: int = 1, eos_ids: Sequence[int] = (),
                 seed: Optional[int] = None) -> list[Generation]:
        """Sample ``n`` continuations of each prompt.

        ``prompt_ids``: token ids per prompt (no padding). ``max_new_tokens``: one limit, or one
        per prompt. ``temperature`` 0 means greedy decoding; ``top_p`` 1 means no nucleus cut;
        no top-k cut is ever applied (the samples follow the model's own distribution).
        ``eos_ids``: generation stops after the first of these. ``seed``: same seed, same
        weights, same prompts → same samples.

        Returns ``len(prompt_ids) * n`` generations, prompt-major (prompt 0's ``n``, then
        prompt 1's, ...). A continuation cut by its length limit ends where it was cut, with
        ``finished_by_eos`` False (no EOS is appended).
        """

    def close(self) -> None:
        """Free the engine's resources (idempotent)."""


def _finish_generations(rows: Sequence[Sequence[int]], limits: Sequence[int], eos: set[int]) -> list[Generation]:
    """Cut each row after its first EOS or at its own limit; no EOS is ever added."""
    out = []
    for row, limit in zip(rows, limits):
        row = list(row)[:limit]
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), None)
        out.append(Generation(row[:cut], True) if cut is not None else Generation(row, False))
    return out


def _limits(max_new_tokens: int | Sequence[int], n_prompts: int) -> list[int]:
    if isinstance(max_new_tokens, int):
        limits = [max_new_tokens] * n_prompts
    else:
        limits = [int(m) for m in max_new_tokens]
        if len(limits) != n_prompts:
            raise RolloutError(f"max_new_tokens has {len(limits)} limits for {n_prompts} prompts")
    if any(m < 1 for m in limits):
        raise RolloutError(f"max_new_tokens must be >= 1, got {min(limits)}")
    return limits


def _check_sampling(temperature: float, top_p: float, n: int) -> None:
    if temperature < 0:
        raise RolloutError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise RolloutError(f"top_p must be within (0, 1], got {top_p}")
    if n < 1:
        raise RolloutError(f"n must be >= 1, got {n}")


def _check_generate(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], temperature: float,
                    top_p: float, n: int) -> list[int]:
    """Check a sampling engine's ``generate()`` arguments; the per-row token limits.

    Rows are prompt-major (prompt 0's ``n`` samples, then prompt 1's), so the result has
    ``len(prompt_ids) * n`` entries, each prompt's limit repeated ``n`` times; ``[]`` for no prompts.
    """
    _check_sampling(temperature, top_p, n)
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise RolloutError("cannot generate from an empty prompt")
    return [m for m in _limits(max_new_tokens, len(prompt_ids)) for _ in range(n)]


class HFRolloutEngine(RolloutEngine):
    """An unsharded copy of the student (same config), generating with transformers.

    Args:
        config: the student's ``transformers`` config (copied; the KV cache is switched on).
        device: where the copy lives and generates (the student's device).
        dtype: weights' dtype; float32 keeps samples exactly those of the fp32 master weights.
        threads: torch intra-op threads while generating (None = leave as is). The trainer
            passes all of the rank's cores: while the student samples, the teacher is idle.
    """

    def __init__(self, config, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 threads: Optional[int] = None):
        from transformers import AutoModelForCausalLM

        cfg = type(config).from_dict(config.to_dict())
        if hasattr(cfg, "quantization_config"):  # GGUF-loaded configs carry it; the copy is plain
            del cfg.quantization_config
        cfg.use_cache = True  # generation without a KV cache is quadratic
        self.device = torch.device(device)
        self.dtype = dtype
        self.threads = threads
        # the seed only makes the (immediately overwritten) random init reproducible
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        self.model.to(self.device).eval().requires_grad_(False)
        self._targets = self._named_tensors()
        self.version: Optional[int] = None  # optimizer step of the weights held (set by the sampler)

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        persistent = self.model.state_dict(keep_vars=True)  # non-persistent buffers (rotary) excluded
        named.update({k: v for k, v in persistent.items() if k not in named})
        return named

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        unknown = [k for k in state_dict if k not in self._targets]
        if unknown:
            raise RolloutError(f"rollout engine: the student copy has no tensor named {', '.join(unknown[:5])}"
                               + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        missing = [k for k in self._targets if k not in state_dict]
        if missing:
            raise RolloutError(f"rollout engine: the weights lack {', '.join(missing[:5])}"
                               + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                               + " (a partial sync would sample from a mix of two models)")
        bad = [f"{k} {tuple(v.shape)} vs {tuple(self._targets[k].shape)}" for k, v in state_dict.items()
               if tuple(v.shape) != tuple(self._targets[k].shape)]
        if bad:
            raise RolloutError(f"rollout engine: shape mismatch for {', '.join(bad[:5])}")
        with torch.no_grad():
            done: set[int] = set()
            for k, v in state_dict.items():
                t = self._targets[k]
                if id(t) in done:  # tied weights: one tensor under two names
                    continue
                t.copy_(v.detach().to(device=t.device, dtype=t.dtype))
                done.add(id(t))
        return len(state_dict)

    def generate(self, prompt_ids, *, max_new_tokens, temperature=1.0, top_p=1.0, n=1, eos_ids=(), seed=None):
        from transformers import GenerationConfig

        limits = _check_generate(prompt_ids, max_new_tokens, temperature, top_p, n)
        if not limits:
            return []
        rows = [list(map(int, p)) for p in prompt_ids for _ in range(n)]
        eos = {int(e) for e in eos_ids}
        pad = min(eos) if eos else 0  # any id: padded positions are masked out
        width = max(len(r) for r in rows)
        # batched generation needs left padding (every row's next token at the same column)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, width - len(r):] = 1
        greedy = temperature == 0
        gen = GenerationConfig(
            max_new_tokens=max(limits), do_sample=not greedy, num_beams=1, use_cache=True,
            eos_token_id=sorted(eos) or None, pad_token_id=pad,
            **({} if greedy else {"temperature": float(temperature), "top_p": float(top_p), "top_k": 0}),
        )
        with _threads(self.threads), torch.random.fork_rng(devices=_rng_devices(self.device)), torch.inference_mode():
            if seed is not None:
                torch.manual_seed(int(seed))
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=gen)
        return _finish_generations(out[:, width:].tolist(), limits, eos)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self._targets = {}


class TeacherRolloutEngine(RolloutEngine):
    """The teacher engine as a rollout engine: generation runs in the teacher's own process
    (SeqKD's teacher samples); ``update_weights`` is the engine's (self-distillation)."""

    def __init__(self, engine):
        self.engine = engine

    def update_weights(self, state_dict):
        return self.engine.update_weights(state_dict)

    def generate(self, prompt_ids, *, max_new_tokens, temperature=1.0, top_p=1.0, n=1, eos_ids=(), seed=None):
        _check_sampling(temperature, top_p, n)
        if not prompt_ids:
            return []
        limits = [m for m in _limits(max_new_tokens, len(prompt_ids)) for _ in range(n)]
        rows = [list(map(int, p)) for p in prompt_ids for _ in range(n)]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = 1
        eos = sorted({int(e) for e in eos_ids})
        greedy = temperature == 0
        out = self.engine.generate(ids, mask, max_new_tokens=max(limits), do_sample=not greedy,
                                   temperature=float(temperature) if not greedy else 1.0, top_p=float(top_p),
                                   top_k=0, seed=seed, eos_token_id=eos or None)
        return _finish_generations(out, limits, set(eos))


def create_rollout_engine(kind: str, *, config=None, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32, threads: Optional[int] = None, **kwargs) -> RolloutEngine:
    """The student rollout engine a recipe's ``rollout.engine`` names (``hf`` or ``sglang``)."""
    if kind == "hf":
        return HFRolloutEngine(config, device=device, dtype=dtype, threads=threads)
    if kind == "sglang":
        try:
            from kdcore.sampling_sglang import SGLangRolloutEngine  # type: ignore[import-not-found]
        except ImportError as exc:
            raise RolloutError(f"rollout.engine 'sglang' is not available here ({exc}); it needs a GPU and "
                               "`pip install kdflow[sglang]`") from exc
        return SGLangRolloutEngine(config=config, device=device, dtype=dtype, **kwargs)
    raise RolloutError(f"unknown rollout.engine '{kind}' (known: hf, sglang)")


@contextlib.contextmanager
def _threads(n: Optional[int]) -> Iterator[None]:
    if not n or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


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
    return out


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

    @classmethod
    def from_config(cls, cfg: Any) -> "SamplingSettings":
        names = [f for f in cls.__dataclass_fields__]
        return cls(**{k: getattr(cfg, k) for k in names if getattr(cfg, k, None) is not None})


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
        _check_sampling(settings.temperature, settings.top_p, settings.n)
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
            extra = {"sglang": self.settings.sglang} if self.settings.engine == "sglang" and self.settings.sglang else {}
            self.engine = create_rollout_engine(self.settings.engine, config=self.student_model.config,
                                                device=self.device, dtype=self.dtype, threads=self.threads, **extra)
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
    head = model.get_output_embeddings().weight
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is head:
            return name
    raise RolloutError(f"{type(model).__name__}: cannot find the lm_head weight among its parameters")


def sync_teacher(engine, model: torch.nn.Module, *, dtype: torch.dtype, device) -> torch.Tensor:
    """Self-distillation: copy the student's full weights into the teacher engine (every rank
    into its own engine; collective under FSDP) and return the new teacher head ``[V, H]``
    (a copy in ``dtype`` on ``device``) for the student side of the loss."""
    weights = full_weights(model)
    engine.update_weights(weights)
    return weights[head_name(model)].to(device=device, dtype=dtype, copy=True)


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
        # the student's own threads: growing the OpenMP pool while the (idle) teacher process
        # holds the other cores measured 10x slower on a loaded 2-core machine, never faster
        threads=None,
        sources=sources)
    sampler.self_distill_every = every
    if sampling:
        sampler.check_prompts(train_samples, f"distill.rollout '{cfg.distill.rollout}'")
    return sampler
