"""What ``kdcore train``, ``kdcore eval`` and ``kdcore cache-teacher`` build from a recipe the
same way: the student's tokenizer, every teacher's part (tokenizer, aligner; one teacher is a
list of one), the data as every teacher reads it, then each teacher's head with its aligner set
up (seeded) and each teacher's started engine; and the preparer and teacher schedule that turn
samples into teacher requests. One builder, so the three commands cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from kdcore.training import teachers as _teachers
from kdcore.training.teachers import TeacherPart
from kdcore.modeling.tokenizers import load_tokenizer, pad_token_id
from kdcore.training.steps import StepPreparer
from kdcore.training.teacher_schedule import TeacherSchedule
from kdcore.training.types import LatestEval


def student_tokenizer_spec(cfg) -> str:
    """Which tokenizer the recipe's student speaks: its own, else its model's, else the teacher's."""
    return cfg.student.tokenizer or cfg.student.path or cfg.teacher.tokenizer or cfg.teacher.path


@dataclass
class RunParts:
    cfg: Any
    registry: Any
    student_tok: Any
    teachers: list[TeacherPart]
    data: Any = None  # kdcore.data.PreparedData, once prepare_data() ran

    @classmethod
    def from_recipe(cls, cfg, registry) -> "RunParts":
        """The student's tokenizer and every teacher's tokenizer and aligner (no data, heads or
        engines yet: each command takes those steps when it needs them)."""
        spec = student_tokenizer_spec(cfg)
        student_tok = load_tokenizer(spec)
        return cls(cfg, registry, student_tok, _teachers.build_parts(cfg, registry, student_tok, spec))

    @property
    def views(self) -> bool:
        """Whether samples carry per-teacher tokenizations (several teachers, routes, a context)."""
        return _teachers.uses_views(self.cfg)

    def prepare_data(self):
        """The recipe's train and eval samples with every teacher's tokenization."""
        self.data = _teachers.prepare_run_data(self.cfg, self.teachers, self.student_tok)
        return self.data

    def setup_heads(self, model, device) -> None:
        """Each teacher's head, and its aligner's parameters seeded like the student's."""
        _teachers.setup_heads(self.teachers, model, seed=self.cfg.train.seed, device=device)

    def start_engines(self, *, max_rows_for: Callable[[TeacherPart], int], threads_default,
                      micro_batches_per_step: int = 1) -> None:
        _teachers.start_engines(self.teachers, registry=self.registry, max_rows_for=max_rows_for,
                                threads_default=threads_default, micro_batches_per_step=micro_batches_per_step)

    def longest_input(self, part: TeacherPart, samples: Sequence) -> int:
        return _teachers.longest_input(part, samples)

    def preparer(self, *, parts: list[TeacherPart] | None = None, env=None, kdist=None, **kwargs):
        """A :class:`~kdcore.training.steps.StepPreparer` over ``parts`` (default: every teacher);
        without a rollout it only collates and aligns (``micro_batch``)."""
        parts = parts or self.teachers
        kwargs.setdefault("rollout", None)
        kwargs.setdefault("train_samples", [])
        kwargs.setdefault("latest_eval", LatestEval())
        kwargs.setdefault("shuffle", False)
        return StepPreparer(parts=parts, train_cfg=self.cfg.train, env=env, kdist=kdist,
                            pad_id=pad_token_id(self.student_tok), teacher_pad_id=parts[0].pad_id, **kwargs)

    @staticmethod
    def schedule(engines: dict, **kwargs):
        """A :class:`~kdcore.training.teacher_schedule.TeacherSchedule` over ``engines`` (name → engine)."""
        kwargs.setdefault("looks_ahead", True)
        kwargs.setdefault("max_steps", 0)
        return TeacherSchedule(engines, **kwargs)

    def close(self) -> None:
        _teachers.close_engines(self.teachers)
