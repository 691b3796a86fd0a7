"""The ``remote`` engine as the registry knows it (light: imports zmq and torch only to build one)."""

from __future__ import annotations

from typing import Any, Mapping, Optional

from kdcore.engines.factory import EngineSpec


class RemoteEngine(EngineSpec):
    """A ``kdcore serve-teacher`` on another machine (or this one), over ZeroMQ; see
    kdcore/engines/remote/client.py. The teacher head is still read from ``teacher.path`` here."""

    roles = ("teacher",)

    def create_teacher(self, teacher_cfg: Any, *, max_rows: int, threads: Optional[int] = None,
                       micro_batches_per_step: int = 1, **kwargs: Any):
        from kdcore.engines.remote.client import RemoteTeacher
        from kdcore.engines.remote.config import parse_addresses
        from kdcore.engines.remote.pool import RemotePool
        from kdcore.recipe.secret import remote_token

        remote = teacher_cfg.remote  # its token is masked in the recipe (kdcore/recipe/secret.py)
        addresses = parse_addresses(remote.address)  # several: a pool of replicas (remote/pool.py)
        cls, where = (RemotePool, {"addresses": addresses}) if len(addresses) > 1 else (RemoteTeacher, {"address": remote.address})
        return cls(teacher_cfg.path, **where, token=remote_token(remote), timeout_s=remote.timeout_s,
                   retries=remote.retries, dtype=teacher_cfg.dtype, max_rows=max_rows, **kwargs)

    def check_recipe(self, section: Mapping[str, Any], prefix: str) -> list[str]:
        from kdcore.engines.remote.config import check_recipe_section

        return check_recipe_section(section, prefix)
