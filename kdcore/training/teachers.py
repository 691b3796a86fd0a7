"""One part per teacher: its tokenizer, aligner, engine, head, weight and temperature.

A recipe's ``teachers:`` (or the short form ``teacher:``, one teacher named ``teacher``) becomes
a list of :class:`TeacherPart`. Each teacher has its own engine process and channel slots
(pipelined together by :class:`~kdcore.training.teacher_schedule.TeacherSchedule`), its own
aligner pairing the student's positions with its own tokenization, and its own head. The
student runs one forward per micro-batch; :class:`~kdcore.training.forward.DistillForward`
computes one aligner loss per teacher and the KD loss is ``Σ weight · (that teacher's token-mean
KD)``, with CE counted once (docs/architecture.md).

A teacher *reads its own tokenization* (``own_tokens``: ``Sample.teachers[name]``) when its
aligner pairs by offsets and its tokenizer differs from the student's or it reads a context
(``data.teacher_context``); otherwise it receives the student's ids.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kdcore.training.types import TrainingError
from kdcore.data import TeacherView, prepare_data
from kdcore.engines import create_teacher_engine
from kdcore.modeling.models import load_lm_head
from kdcore.modeling.tokenizers import load_tokenizer, pad_token_id, same_tokenizer
from kdcore.recipe.loading import teacher_entries

DEFAULT_NAME = "teacher"  # the short form's one teacher


@dataclass
class TeacherPart:
    name: str
    section: Any  # its recipe section (cfg.teacher, or one entry of cfg.teachers): what its engine reads
    tokenizer: Any
    aligner: Any  # kdcore.distill.aligner.Aligner
    weight: float
    temperature: float
    own_tokens: bool  # reads Sample.teachers[name]; else the student's ids (or Sample.teacher, short form)
    pad_id: int
    engine: Any = None
    head: torch.Tensor | None = None  # [V_t, H_t]

    @property
    def cross(self) -> bool:
        """Its aligner pairs by character offsets (no shared ids to compare)."""
        return bool(self.aligner.cross_tokenizer)

    def view(self, sample):
        """This teacher's tokenization of a sample."""
        if self.own_tokens:
            return sample.teachers[self.name]
        return sample.teacher if sample.teacher is not None else sample.student

    def teaches(self, sample) -> bool:
        """``data.teacher_column`` routes the sample to this teacher (no route: every teacher)."""
        return sample.route is None or self.name in sample.route


def uses_views(cfg) -> bool:
    """Whether the run needs per-teacher tokenizations (several teachers, routing, a context);
    the short form without them keeps the single-teacher data path exactly."""
    d = cfg.data
    return bool(cfg.teachers) or bool(d.teacher_context) or bool(d.teacher_column)


def prepare_run_data(cfg, parts: list[TeacherPart], student_tok):
    """The recipe's prepared data (:func:`kdcore.data.prepare_data`) as every teacher reads it:
    without views (one teacher, no route, no context) ``Sample.teacher`` holds the teacher's
    tokenization when its aligner pairs by offsets; with them each teacher that reads its own
    tokens has ``Sample.teachers[name]``."""
    if not uses_views(cfg):
        (part,) = parts
        return prepare_data(cfg.data, student_tok, part.tokenizer if part.cross else None, seed=cfg.train.seed)
    context = bool(cfg.data.teacher_context)
    views = {p.name: TeacherView(p.tokenizer, context=context) for p in parts if p.own_tokens}
    return prepare_data(cfg.data, student_tok, None, seed=cfg.train.seed, views=views,
                        teacher_names=tuple(p.name for p in parts))


def build_parts(cfg, registry, student_tok, student_spec: str) -> list[TeacherPart]:
    """Every teacher's part (tokenizer and aligner; engines and heads come later)."""
    sections = list(cfg.teachers) or [cfg.teacher]
    cache_dir = Path(os.environ.get("KDCORE_CACHE", Path.home() / ".cache" / "kdflow")) / "vocab_maps"
    context = bool(cfg.data.teacher_context)
    views = uses_views(cfg)
    toks: dict[str, Any] = {student_spec: student_tok}
    parts = []
    for i, (section, entry) in enumerate(zip(sections, teacher_entries(cfg))):
        spec = section.tokenizer or section.path
        tok = toks.get(spec) or toks.setdefault(spec, load_tokenizer(spec))
        reg = registry.get("aligner", entry["aligner"])
        aligner = reg.fn(student_tokenizer=student_tok, teacher_tokenizer=tok,
                         options=reg.make_options(dict(entry["aligner_options"])), cache_dir=cache_dir)
        where = f"teachers[{i}]" if cfg.teachers else "distill"
        if context and not aligner.cross_tokenizer:
            raise TrainingError(f"{where}.aligner '{entry['aligner']}' pairs positions by identity; "
                                "data.teacher_context needs an aligner that pairs by character offsets (e.g. overlap)")
        own = views and bool(aligner.cross_tokenizer) and (context or not same_tokenizer(student_tok, tok))
        parts.append(TeacherPart(name=entry.get("name") or DEFAULT_NAME, section=section, tokenizer=tok,
                                 aligner=aligner, weight=entry["weight"], temperature=entry["temperature"],
                                 own_tokens=own, pad_id=pad_token_id(tok)))
    return parts


def setup_heads(parts: list[TeacherPart], model, *, seed: int, device) -> None:
    """Load each teacher's head and let its aligner build its parameters (seeded like the
    student, so their init is reproducible and equal on every rank)."""
    for part in parts:
        s = part.section
        part.head = load_lm_head(s.path, dtype=getattr(torch, s.dtype)).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            part.aligner.setup(student_hidden_size=int(model.config.get_text_config().hidden_size),
                               teacher_hidden_size=int(part.head.shape[1]))


def trains_aligner(part: TeacherPart) -> bool:
    """Whether the part's aligner has parameters trained with the student (DSKD's projectors)."""
    return any(q.requires_grad for q in part.aligner.parameters())


def trained_aligners(parts: list[TeacherPart]) -> tuple[list, float]:
    """The aligners with parameters (trained with the student) and their learning-rate scale."""
    trained = [p.aligner for p in parts if trains_aligner(p)]
    scales = {float(a.lr_scale) for a in trained}
    if len(scales) > 1:
        raise TrainingError(f"the teachers' aligners train at different lr_scale values {sorted(scales)}; "
                            "kdflow trains every aligner parameter at one rate")
    return trained, (scales.pop() if scales else 1.0)


def longest_input(part: TeacherPart, samples) -> int:
    return max((len(part.view(s).input_ids) for s in samples), default=1)


def start_engines(parts: list[TeacherPart], *, registry, max_rows_for, threads_default: int,
                  micro_batches_per_step: int) -> None:
    """Start every teacher's engine, then share the heads they hold; ``max_rows_for(part)`` sizes its
    channel. A failure closes the ones already started."""
    try:
        for part in parts:
            part.engine = create_teacher_engine(part.section, registry=registry, max_rows=max_rows_for(part),
                                                threads=part.section.threads or threads_default,
                                                micro_batches_per_step=micro_batches_per_step)
            part.engine.start()
    except BaseException:
        close_engines(parts)
        raise
    if len(parts) > 1 and any(p.engine.colocated for p in parts):
        raise TrainingError("several teachers with a colocated engine (sharing the accelerators in phases) "
                            "are not supported; give each teacher its own device")
    share_resident_heads(parts)


def share_resident_heads(parts: list[TeacherPart]) -> None:
    """Use the head an engine already holds in this process (``inline``) instead of the copy
    :func:`setup_heads` read, where shape, dtype, device and values agree: one ``[V, H]`` matrix
    less (113 MB for SmolLM2-135M in fp32). Heads are read before the engines start because the
    student and its aligners are built from them first (after a weight push:
    :func:`kdcore.training.weight_sync.push_teacher_weights`)."""
    for part in parts:
        held = part.engine.resident_head()
        if (held is not None and held.shape == part.head.shape and held.dtype == part.head.dtype
                and held.device == part.head.device and torch.equal(held, part.head)):
            part.head = held


def close_engines(parts: list[TeacherPart]) -> None:
    errors = []
    for part in parts:
        if part.engine is not None:
            try:
                part.engine.close()
            except BaseException as exc:  # close every engine, then report the first failure
                errors.append(exc)
            part.engine = None
    if errors:
        raise errors[0]
