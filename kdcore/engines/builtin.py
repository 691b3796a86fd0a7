"""The built-in engines, registered through the ``kdcore`` entry-point group like any plugin.

``hf``: transformers, CPU or CUDA (teacher in its own process; rollout as a student copy in the
trainer process). ``sglang``: an SGLang server per node, GPU only (see
``kdcore/engines/sglang/README.md``). ``remote``: a ``kdcore serve-teacher`` elsewhere (teacher
only). ``cache``: stored teacher states from a ``kdcore cache-teacher`` folder
(:mod:`kdcore.engines.cache`). Nothing heavy is imported here: each spec imports its
engine when it builds one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

from kdcore.engines.cache import (CacheError, identity_differences, needs_live_teacher, read_manifest,
                                  recipe_identity)
from kdcore.engines.factory import EngineSpec
from kdcore.engines.protocol import RolloutError, TeacherError
from kdcore.plugins import hookimpl


class HFEngine(EngineSpec):
    """transformers in a spawned process (teacher) or in the trainer (rollout); CPU or CUDA."""

    roles = ("teacher", "rollout")

    def create_teacher(self, teacher_cfg: Any, *, max_rows: int, threads: Optional[int] = None,
                       micro_batches_per_step: int = 1, **kwargs: Any):
        from kdcore.engines.hf import HFTeacher

        return HFTeacher(teacher_cfg.path, dtype=teacher_cfg.dtype, device=teacher_cfg.device,
                         threads=threads or (teacher_cfg.threads or None), max_rows=max_rows, **kwargs)

    def create_rollout(self, *, config: Any, device: Any, dtype: Any = None, threads: Optional[int] = None,
                       settings: Any = None, **kwargs: Any):
        import torch

        from kdcore.engines.hf_rollout import HFRolloutEngine

        # float32 by default: samples from the exact master weights
        return HFRolloutEngine(config, device=device, dtype=torch.float32 if dtype is None else dtype, threads=threads)


class SGLangEngine(EngineSpec):
    """An SGLang server per node (GPU only; never run yet, see kdcore/engines/sglang/README.md)."""

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


class RemoteEngine(EngineSpec):
    """A ``kdcore serve-teacher`` on another machine (or this one), over ZeroMQ; see
    kdcore/engines/remote.py. The teacher head is still read from ``teacher.path`` here."""

    roles = ("teacher",)

    def create_teacher(self, teacher_cfg: Any, *, max_rows: int, threads: Optional[int] = None,
                       micro_batches_per_step: int = 1, **kwargs: Any):
        from kdcore.engines.remote import RemoteTeacher
        from kdcore.engines.remote_pool import RemotePool, parse_addresses
        from kdcore.secret import remote_token

        remote = teacher_cfg.remote  # its token is masked in the recipe (kdcore/secret.py)
        addresses = parse_addresses(remote.address)  # several: a pool of replicas (remote_pool.py)
        cls, where = (RemotePool, {"addresses": addresses}) if len(addresses) > 1 else (RemoteTeacher, {"address": remote.address})
        return cls(teacher_cfg.path, **where, token=remote_token(remote), timeout_s=remote.timeout_s,
                   retries=remote.retries, dtype=teacher_cfg.dtype, max_rows=max_rows, **kwargs)

    def check_recipe(self, section: Mapping[str, Any], prefix: str) -> list[str]:
        remote = section.get("remote") or {}
        if not isinstance(remote, Mapping):
            return []  # the schema check reports the type
        errors = []
        from kdcore.engines.remote_pool import parse_addresses

        try:  # one HOST:PORT, or several comma-separated (a pool of replicas), each checked
            parse_addresses(remote.get("address"), key=f"{prefix}.remote.address")
        except TeacherError as exc:
            errors.append(str(exc))
        timeout, retries = remote.get("timeout_s", 1.0), remote.get("retries", 0)
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout <= 0:
            errors.append(f"{prefix}.remote.timeout_s: must be > 0, got {timeout!r}")
        if isinstance(retries, int) and not isinstance(retries, bool) and retries < 0:
            errors.append(f"{prefix}.remote.retries: must be >= 0, got {retries!r}")
        if (section.get("self_distill_every") or 0) > 0:
            errors.append(f"{prefix}.self_distill_every: a remote teacher cannot take the student's weights "
                          f"(use engine hf or sglang for self-distillation)")
        return errors


class CacheEngine(EngineSpec):
    """Teacher hidden states from a ``kdcore cache-teacher`` folder (``teacher.cache``)."""

    roles = ("teacher",)

    def create_teacher(self, teacher_cfg: Any, *, max_rows: int, threads: Optional[int] = None,
                       micro_batches_per_step: int = 1, **kwargs: Any):
        if not getattr(teacher_cfg, "cache", None):
            raise CacheError("teacher.cache: required with teacher.engine 'cache' (a `kdcore cache-teacher` folder)")
        from kdcore.engines.cache_teacher import CacheTeacher

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


@hookimpl
def register_engines(register):
    register("hf", HFEngine())
    register("sglang", SGLangEngine())
    register("remote", RemoteEngine())
    register("cache", CacheEngine())
