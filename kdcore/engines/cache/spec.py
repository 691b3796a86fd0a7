"""The ``cache`` engine as the registry knows it, and its recipe checks (light: no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from kdcore.engines.cache.format import (CacheError, identity_differences, needs_live_teacher, read_manifest,
                                         recipe_identity)
from kdcore.engines.factory import EngineSpec


class CacheEngine(EngineSpec):
    """Teacher hidden states from a ``kdcore cache-teacher`` folder (``teacher.cache``)."""

    roles = ("teacher",)

    def create_teacher(self, teacher_cfg: Any, *, max_rows: int, threads: Optional[int] = None,
                       micro_batches_per_step: int = 1, **kwargs: Any):
        if not getattr(teacher_cfg, "cache", None):
            raise CacheError("teacher.cache: required with teacher.engine 'cache' (a `kdcore cache-teacher` folder)")
        from kdcore.engines.cache.teacher import CacheTeacher

        return CacheTeacher(teacher_cfg.cache, teacher_path=teacher_cfg.path, dtype=teacher_cfg.dtype,
                            max_rows=max_rows, n_slots=max(2, int(micro_batches_per_step)))

    def check_recipe(self, section: Mapping[str, Any], prefix: str) -> list[str]:
        folder = section.get("cache")
        if not folder:
            return [f"{prefix}.cache: required with {prefix}.engine 'cache' (a `kdcore cache-teacher` folder)"]
        if not Path(str(folder)).is_dir():
            return [f"{prefix}.cache: no such folder '{folder}'"]
        try:
            read_manifest(folder)
        except CacheError as exc:
            return [str(exc)]
        return []

    def check_run(self, raw: Mapping[str, Any], registry, prefix: str) -> list[str]:
        """Whole-recipe checks: what needs a live teacher, and manifest vs recipe."""
        problems = needs_live_teacher(raw, registry)
        folder = (raw.get(prefix) or {}).get("cache")
        try:
            manifest = read_manifest(folder) if folder and Path(str(folder)).is_dir() else None
        except CacheError:
            manifest = None  # reported by check_recipe
        if manifest is not None:
            problems += [f"{prefix}.cache: {d}" for d in
                         identity_differences(manifest["identity"], recipe_identity(raw))]
        return problems
