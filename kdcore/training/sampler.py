"""The rollout sampler: what rollout policies sample with (:class:`RolloutSampler`), and how a
run builds it (:func:`build_sampler`).

Algorithm-free: *which* sequences a step learns on is a rollout policy's choice
(``kdflow_algorithms.rollouts``); this module only provides the means to generate them. The
samples themselves are built in :mod:`kdcore.data.rollout_samples`; the weights a student copy
and a refreshed teacher load come from :mod:`kdcore.training.weight_sync`.

**Rollout engines** live in :mod:`kdcore.engines` (protocol: :class:`kdcore.engines.protocol.RolloutEngine`);
the recipe's ``rollout.engine`` names one registered through the ``register_engines`` hook
(``hf``: a student copy in the trainer process; ``sglang``: GPU). Under FSDP2 every rank keeps
its own copy and samples its own prompts: :func:`kdcore.training.weight_sync.full_weights`
gathers the full weights on *every* rank.

**Weight sync.** The copy holds the weights of some optimizer step; :class:`RolloutSampler`
re-syncs it before sampling whenever it is ``rollout.sync_every`` or more updates behind, so
samples always come from weights at most ``sync_every - 1`` updates old (``sync_every: 1`` =
strictly on-policy). With one rank the sync is lazy (steps that do not sample skip it); with
several it runs on every rank at the start of each step's rollout, since the gather is a
collective.

**Several teachers**: ``sample_teacher`` generates with the first teacher; every rollout
sample carries each teacher's tokenization and its data row's route
(:func:`kdcore.data.rollout_samples.with_teacher_views`).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from kdcore.data import BadRow, DataError, Sample
from kdcore.data.rollout_samples import (Prompt, answer_end_id, build_rollout_sample, end_response, prompt_of,
                                         render_prompt, stop_ids, with_prompt_context, with_teacher_views)
from kdcore.engines import create_rollout_engine
from kdcore.engines.hf_rollout import TeacherRolloutEngine
from kdcore.engines.protocol import RolloutEngine, RolloutError, check_sampling
from kdcore.training.weight_sync import check_self_distill, full_weights, sync_teacher
from kdcore.modeling.models import torch_dtype
from kdcore.modeling.student import load_config


# ------------------------------------------------------------------------------ sampler


@dataclass
class SamplingSettings:
    """Generation settings (the recipe's ``rollout`` section, see :class:`kdcore.recipe.loading.RolloutConfig`)."""

    engine: str = "hf"
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    n: int = 1
    sync_every: int = 1
    dtype: str = "float32"
    sglang: Any = None  # the rollout server's settings (kdcore.recipe.loading.SGLangConfig) for engine sglang
    engine_options: Any = None  # a plugin engine's own options (rollout.engine_options), checked at validation

    @classmethod
    def from_config(cls, cfg: Any) -> "SamplingSettings":
        return cls(**{k: getattr(cfg, k) for k in cls.__dataclass_fields__ if getattr(cfg, k, None) is not None})


@dataclass
class _Stats:
    samples: int = 0
    response_tokens: int = 0
    eos: int = 0
    drawn_end: int = 0  # of those ended on a stop token, ended by the policy's end_at rule
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
    ``grouped=True`` returns one list per input sample instead of one flat list. ``end_at``: a
    policy's rule for where an answer ends (a function of the response's text, see
    :func:`kdcore.data.rollout_samples.end_response`); a response it ends is cut there and gets
    the answer-end token of the tokenizer it was generated in, and its sample is marked
    ``drawn_end``.

    The student copy is built on first use, re-synced as described in the module docstring.
    """

    def __init__(self, *, settings: SamplingSettings, student_model, student_tok, teacher_tok=None,
                 teacher_engine=None, max_length: Optional[int] = None, teacher_max_length: Optional[int] = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 threads: Optional[int] = None, sources: Sequence[str] = ("student", "teacher"),
                 views: Optional[dict] = None, generator: Optional[str] = None):
        if settings.sync_every < 1:
            raise RolloutError(f"rollout.sync_every must be >= 1, got {settings.sync_every}")
        check_sampling(settings.temperature, settings.top_p, settings.n)
        self.settings = settings
        self.student_model = student_model
        self.student_tok = student_tok
        self.teacher_tok = teacher_tok  # None: shared tokenizer
        self.teacher_engine = teacher_engine
        # several teachers (or routes): name -> tokenizer of every teacher that reads its own
        # tokens, and the teacher whose engine sample_teacher uses; None: the short form
        self.views = views
        self.generator = generator
        # data.teacher_context: the teachers read each sample's context before its prompt, when
        # the first one answers and in every teacher's view of a rollout sample (views required)
        self.teacher_context = False
        self.max_length = max_length
        self.teacher_max_length = teacher_max_length
        self.world_size = world_size
        self.device = device
        self.threads = threads  # None: the rollout engine decides (hf on CPU: its cpu_decode_plan)
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
    def sample_student(self, samples: Sequence[Sample], *, grouped: bool = False, end_at=None, **overrides) -> list:
        if self._stale():
            if self.world_size > 1:
                raise RolloutError("the rollout engine is stale mid-step; with several ranks the trainer must call "
                                   "before_step() on every rank first")
            self.sync()
        return self._sample(samples, "student", self.engine, overrides, grouped, end_at)

    def sample_teacher(self, samples: Sequence[Sample], *, grouped: bool = False, end_at=None, **overrides) -> list:
        if self.teacher_engine is None:
            raise RolloutError("no teacher engine to sample from")
        return self._sample(samples, "teacher", TeacherRolloutEngine(self.teacher_engine), overrides, grouped, end_at)

    def _sample(self, samples, side: str, engine: RolloutEngine, overrides: dict, grouped: bool, end_at=None) -> list:
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
        end_id = None
        if end_at is not None:
            end_id = answer_end_id(own_tok)
            if end_id is None:
                raise RolloutError(f"the {side}'s tokenizer has no EOS or end-of-turn token to end a response with")
        jobs, limits = self._jobs(samples, own_tok, cap, max_new, context=side == "teacher" and self.teacher_context)
        gens = engine.generate([j[2] for j in jobs], max_new_tokens=limits, temperature=temperature, top_p=top_p,
                               n=n, eos_ids=self.teacher_stop if side == "teacher" else self.student_stop,
                               seed=self._rng.randrange(2 ** 31)) if jobs else []
        built: dict[int, list[Sample]] = {}
        for k, (i, prompt, _) in enumerate(jobs):
            for g in gens[k * n:(k + 1) * n]:
                ended = None if end_at is None else end_response(g, own_tok, end_at, end_id)
                rs = self._build(prompt, ended or g, side, samples[i], drawn=ended is not None)
                if rs is not None:
                    built.setdefault(i, []).append(rs)
        groups: list[list[Sample]] = []
        for i, s in enumerate(samples):
            if i not in built:
                self.stats.fallback += 1  # no room for a response under max_length: the data's own
            groups.append(built.get(i, [s]))
        self.stats.sample_s += time.perf_counter() - t0
        return groups if grouped else [x for g in groups for x in g]

    def _jobs(self, samples, tok, cap: Optional[int], max_new: int, *, context: bool = False) -> tuple[list, list[int]]:
        """``(index, prompt, prompt ids)`` of each sample with room for a response under ``cap``,
        and that room (at most ``max_new`` tokens); ``context``: the ids are of the prompt with the
        sample's context before it (the prompt returned stays the student's)."""
        jobs, limits = [], []
        for i, s in enumerate(samples):
            prompt = self.prompt(s)
            if prompt is None:
                raise DataError(f"data row {s.row} has no prompt to sample a response for")
            try:
                ids = render_prompt(with_prompt_context(prompt, s.context) if context else prompt, tok).input_ids
            except BadRow as exc:
                raise DataError(f"data row {s.row}: its prompt cannot be rendered for sampling: {exc.reason}") from exc
            room = max_new if cap is None else min(max_new, cap - len(ids))
            if room >= 1 and ids:
                jobs.append((i, prompt, ids))
                limits.append(room)
        return jobs, limits

    def _build(self, prompt: Prompt, g, side: str, data: Sample, *, drawn: bool):
        """The rollout sample of one generation (None: nothing of it survives the length caps),
        counted in the sampling metrics. ``drawn``: its stop token was put there by an end rule."""
        rs = build_rollout_sample(prompt, g, sampled_by=side, student_tok=self.student_tok, teacher_tok=self.teacher_tok,
                                  max_length=self.max_length, teacher_max_length=self.teacher_max_length)
        if rs is None:
            return None
        rs.drawn_end = drawn and rs.finished_by_eos  # a length cap may have cut the stop away
        if self.views is not None:
            rs = with_teacher_views(rs, prompt, self.views, route=data.route, generator=self.generator,
                                    max_length=self.teacher_max_length,
                                    context=data.context if self.teacher_context else "")
            if rs is None:
                return None
        self.stats.samples += 1
        self.stats.response_tokens += len(rs.response_ids)
        self.stats.eos += int(rs.finished_by_eos)
        self.stats.drawn_end += int(rs.drawn_end)
        setattr(self.stats, side, getattr(self.stats, side) + 1)
        return rs

    # ---------------------------------------------------------------- context and metrics
    def context_fields(self) -> dict[str, Any]:
        """Fields of :class:`kdcore.training.rollout_policy.RolloutContext` this sampler provides."""
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
                       rollout_eos_frac=s.eos / s.samples, rollout_drawn_end_frac=s.drawn_end / s.samples,
                       rollout_student_samples=s.student,
                       rollout_teacher_samples=s.teacher)
        if s.fallback:
            rec["rollout_fallback"] = s.fallback
        return rec

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def length_caps(max_length: int, samples: Sequence[Sample], *, cross: bool) -> Optional[int]:
    """Teacher-side token cap for rollout samples (None with a shared tokenizer, where the
    student's ``max_length`` bounds both). Cross-tokenizer: the data's worst teacher/student
    length ratio, with 50% headroom because generated text (code, odd characters) can split
    into more teacher tokens than the data ever did."""
    if not cross:
        return None
    ratio = max((len(t.input_ids) / max(1, len(s.student.input_ids)) for s in samples
                 for t in ([s.teacher] if s.teacher is not None else []) + list(s.teachers.values())), default=1.0)
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


# ------------------------------------------------------------------------ trainer wiring


def rollout_rows(cfg, policy, train_samples: Sequence[Sample], *, cross: bool) -> int:
    """Channel rows the teacher engine needs for rollout micro-batches (0 for a policy that
    does not sample)."""
    if not getattr(policy, "needs_sampling", False):
        return 0
    cap = length_caps(cfg.data.max_length, train_samples, cross=cross)
    return rows_bound(max_length=cfg.data.max_length, teacher_cap=cap, micro_batch_size=cfg.train.micro_batch_size,
                      token_budget=cfg.train.max_tokens_per_micro_batch, samples=train_samples, n=cfg.rollout.n)


def sampler_sides(parts, views: bool) -> tuple[Any, Optional[dict], bool]:
    """From the run's teacher parts (:mod:`kdcore.training.teachers`): the tokenizer the
    generating (first) teacher renders prompts with when it is not the student's (None: the
    student's), the several-teacher views (None: the short form) and whether any teacher reads
    a tokenization of its own (the rows of a rollout sample can grow on its side)."""
    first = parts[0]
    if not views:
        return (first.tokenizer if first.cross else None), None, first.cross
    own = {p.name: p.tokenizer for p in parts if p.own_tokens}
    return (first.tokenizer if first.own_tokens else None), own, bool(own)


def build_sampler(cfg, policy, *, student_model, student_tok, parts, views: bool, env,
                  train_samples: Sequence[Sample]) -> Optional[RolloutSampler]:
    """The sampler a run needs: for a sampling policy, or for self-distillation (teacher
    refreshes); None otherwise. Checks prompts and architectures up front (one-line errors).
    ``parts``: every teacher's part; ``sample_teacher`` generates with the first."""
    sampling = bool(getattr(policy, "needs_sampling", False))
    every = int(getattr(cfg.teacher, "self_distill_every", 0) or 0)
    if not sampling and not every:
        return None
    if every:
        check_self_distill(student_model.config, load_config(cfg.teacher.path))
    sources = tuple(getattr(policy, "sample_sources", ()) or ("student", "teacher")) if sampling else ()
    teacher_tok, own, cross = sampler_sides(parts, views)
    sampler = RolloutSampler(
        settings=SamplingSettings.from_config(cfg.rollout), student_model=student_model,
        student_tok=student_tok, teacher_tok=teacher_tok, views=own, generator=parts[0].name,
        teacher_engine=parts[0].engine, max_length=cfg.data.max_length,
        teacher_max_length=length_caps(cfg.data.max_length, train_samples, cross=cross),
        seed=cfg.train.seed, rank=env.rank, world_size=env.world_size, device=env.device,
        sources=sources)
    sampler.self_distill_every = every
    sampler.teacher_context = bool(cfg.data.teacher_context)
    if sampling:
        sampler.check_prompts(train_samples, f"distill.rollout '{cfg.distill.rollout}'")
    return sampler


__all__ = ["SamplingSettings", "RolloutSampler", "RolloutError", "length_caps", "rows_bound", "rollout_rows",
           "sampler_sides", "build_sampler"]
