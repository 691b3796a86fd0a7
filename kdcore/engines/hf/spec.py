"""The ``hf`` and ``inline`` engines as the registry knows them (light: each imports its engine
only to build one)."""

from __future__ import annotations

from typing import Any, Optional

from kdcore.engines.factory import EngineSpec


class HFEngine(EngineSpec):
    """transformers in a spawned process (teacher) or in the trainer (rollout); CPU or CUDA."""

    roles = ("teacher", "rollout")

    def create_teacher(self, teacher_cfg: Any, *, max_rows: int, threads: Optional[int] = None,
                       micro_batches_per_step: int = 1, **kwargs: Any):
        from kdcore.engines.hf.teacher import HFTeacher

        return HFTeacher(teacher_cfg.path, dtype=teacher_cfg.dtype, device=teacher_cfg.device,
                         threads=threads or (teacher_cfg.threads or None), max_rows=max_rows, **kwargs)

    def create_rollout(self, *, config: Any, device: Any, dtype: Any = None, threads: Optional[int] = None,
                       settings: Any = None, **kwargs: Any):
        import torch

        from kdcore.engines.hf_rollout import HFRolloutEngine

        # float32 by default: samples from the exact master weights
        return HFRolloutEngine(config, device=device, dtype=torch.float32 if dtype is None else dtype, threads=threads)


class InlineEngine(EngineSpec):
    """transformers teacher in the trainer's own process: no second runtime, no overlap."""

    roles = ("teacher",)

    def create_teacher(self, teacher_cfg: Any, *, max_rows: int, threads: Optional[int] = None,
                       micro_batches_per_step: int = 1, **kwargs: Any):
        from kdcore.engines.hf.inline import InlineTeacher

        # teacher.threads only: the default (all cores) is what the trainer already has
        return InlineTeacher(teacher_cfg.path, dtype=teacher_cfg.dtype, device=teacher_cfg.device,
                             threads=teacher_cfg.threads or None, max_rows=max_rows, **kwargs)
