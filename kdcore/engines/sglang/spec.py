"""The ``sglang`` engine as the registry knows it (light: no torch, no sglang until it builds one).

Its recipe section is ``<teacher|rollout>.sglang`` (:class:`kdcore.engines.sglang.config.SGLangConfig`),
checked by :func:`kdcore.engines.sglang.config.check_recipe_section`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from kdcore.engines.factory import EngineSpec
from kdcore.engines.protocol import RolloutError, TeacherError


class SGLangEngine(EngineSpec):
    """An SGLang server per node (GPU only; see kdcore/engines/sglang/README.md)."""

    roles = ("teacher", "rollout")

    def create_teacher(self, teacher_cfg: Any, *, max_rows: int, threads: Optional[int] = None,
                       micro_batches_per_step: int = 1, **kwargs: Any):
        try:
            from kdcore.engines.sglang.teacher import SGLangTeacher
        except ImportError as exc:
            raise TeacherError(f"teacher.engine 'sglang' is not available here ({exc}); it needs a GPU "
                               f"and `pip install kdflow[sglang]`") from exc
        if bool(getattr(getattr(teacher_cfg, "sglang", None), "colocate", False)):
            # colocated: a whole step's micro-batches are computed in one teacher phase, then
            # read while the engine sleeps, so every one of them needs its own slot
            kwargs.setdefault("n_slots", max(2, int(micro_batches_per_step)))
        return SGLangTeacher(teacher_cfg, max_rows=max_rows, **kwargs)

    def create_rollout(self, *, config: Any, device: Any, dtype: Any = None, threads: Optional[int] = None,
                       settings: Any = None, **kwargs: Any):
        try:
            from kdcore.engines.sglang.rollout import SGLangRolloutEngine
        except ImportError as exc:
            raise RolloutError(f"rollout.engine 'sglang' is not available here ({exc}); it needs a GPU and "
                               "`pip install kdflow[sglang]`") from exc
        if dtype is not None:
            kwargs["dtype"] = dtype
        server = getattr(settings, "sglang", None)
        if server:
            kwargs.setdefault("sglang", server)
        return SGLangRolloutEngine(config=config, device=device, **kwargs)

    def check_recipe(self, section: Mapping[str, Any], prefix: str) -> list[str]:
        from kdcore.engines.sglang.config import check_recipe_section

        return check_recipe_section(section, prefix, role="rollout" if prefix == "rollout" else "teacher")
