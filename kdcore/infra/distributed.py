"""Process-group setup, rank helpers and small collectives for the student side.

Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR`` in the environment)
:func:`init_distributed` joins the job's process group: gloo on CPU, ``cpu:gloo,cuda:nccl`` on
CUDA (NCCL for the model's collectives, gloo for the odd CPU tensor). Outside torchrun it makes a
one-rank gloo group over an in-process ``HashStore`` (no ports, no files), so that the collectives
below, DCP and FSDP2's ``fully_shard`` (which needs a device mesh; on one rank it wraps a student
only for bf16 mixed precision, :func:`kdcore.modeling.student.uses_fsdp`) work at every world size.

All helpers work with no process group at all (they act as world size 1), so library code may
call them unconditionally.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    owns_group: bool  # True when init_distributed created the group (teardown destroys it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_ENV: DistEnv | None = None


def under_torchrun() -> bool:
    """True when the torchrun/elastic launcher set this process's rendezvous variables."""
    return all(v in os.environ for v in _TORCHRUN_VARS)


def _resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    d = "auto" if device is None else str(device)
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"device '{d}' requested but CUDA is not available in this torch build/machine")
        return torch.device("cuda", local_rank if d == "cuda" else torch.device(d).index)
    if d != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got '{d}'")
    return torch.device("cpu")


def init_distributed(device: str | torch.device | None = "auto", timeout_s: float = 1800.0) -> DistEnv:
    """Join (or create) the default process group and return this process's :class:`DistEnv`.

    ``device``: ``auto`` (cuda when present), ``cpu`` or ``cuda``; on CUDA each rank takes
    ``cuda:LOCAL_RANK``. Idempotent: a second call returns the same env. If a process group
    already exists (created by the caller), it is adopted and left alone by :func:`teardown`.
    """
    global _ENV
    if _ENV is not None and dist.is_initialized():
        return _ENV
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = _resolve_device(device, local_rank)
    # gloo alone on CPU; on CUDA, NCCL for GPU tensors plus gloo so CPU-side collectives work too
    backend = "gloo" if dev.type == "cpu" else "cpu:gloo,cuda:nccl"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        # generous default: checkpoint writes and the first forward of a big model are slow on CPU
        timeout = timedelta(seconds=timeout_s)
        if under_torchrun():
            dist.init_process_group(backend=backend, timeout=timeout,
                                    device_id=dev if dev.type == "cuda" else None)
        else:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
        owns = True
    _ENV = DistEnv(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        device=dev,
        backend=str(dist.get_backend()),
        owns_group=owns,
    )
    return _ENV


def teardown() -> None:
    """Destroy the process group if :func:`init_distributed` created it; safe to call twice."""
    global _ENV
    env, _ENV = _ENV, None
    if dist.is_available() and dist.is_initialized() and (env is None or env.owns_group):
        # Gloo's worker threads keep finished work objects (and their tensors) alive; if the
        # interpreter finalises them the rank aborts with "terminate called without an active
        # exception" (pytorch#190489). Collect them while Python is alive, leave together.
        gc.collect()
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
        gc.collect()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place and return it (a no-op at world size 1)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average ``tensor`` over ranks in place and return it (a no-op at world size 1)."""
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(get_world_size())
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return rank ``src``'s ``obj`` on every rank (pickled; for small Python objects)."""
    if get_world_size() == 1:
        return obj
    box = [obj if get_rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_text(text: str, limit: int = 480) -> list[str]:
    """Every rank's ``text`` (UTF-8, cut to ``limit`` bytes), in rank order, on every rank.

    A byte tensor each, not pickled objects: ranks may sit on other hosts, and a collective that
    every rank enters is how one rank's failure reaches all the others at once."""
    if get_world_size() == 1:
        return [text]
    raw = text.encode()[:limit]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    mine = torch.zeros(limit + 1, dtype=torch.int32, device=device)
    mine[0] = len(raw)
    if raw:
        mine[1:len(raw) + 1] = torch.tensor(list(raw), dtype=torch.int32)
    out = [torch.empty_like(mine) for _ in range(get_world_size())]
    dist.all_gather(out, mine)
    texts = []
    for t in out:
        n = min(max(int(t[0]), 0), limit)
        texts.append(bytes(t[1:n + 1].clamp(0, 255).to(torch.uint8).cpu().tolist()).decode(errors="replace"))
    return texts


def broadcast_tensors(tensors, src: int = 0) -> None:
    """Overwrite each tensor in place with rank ``src``'s values (same shapes on every rank)."""
    if get_world_size() == 1:
        return
    for t in tensors:
        dist.broadcast(t.data if isinstance(t, torch.nn.Parameter) else t, src=src)


def default_threads(local_world_size: int = 1) -> int:
    """Cores this process may use: its CPU affinity split evenly across local ranks (>= 1).

    The one thread policy of kdflow: a rank's student and its CPU teacher engine both get all
    of these cores by default (they overlap and wait passively; see the README's performance
    section for the measurements)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity API
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_world_size))


def setup_threads(n: int = 0, interop: int = 1) -> int:
    """Set torch's intra-op threads to ``n`` (0 = :func:`default_threads` for this rank) and
    inter-op threads to ``interop`` and return ``n``.

    One inter-op thread by default: the student runs one op stream, and extra inter-op workers
    only compete with the intra-op pool (and with the teacher process) for the same cores.
    ``set_num_interop_threads`` can only be called before the first inter-op work; later calls
    keep the existing pool silently.
    """
    if n < 0:
        raise ValueError(f"threads must be >= 0, got {n}")
    if n == 0:
        n = default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    torch.set_num_threads(n)
    if torch.get_num_interop_threads() != interop:
        try:
            torch.set_num_interop_threads(interop)
        except RuntimeError:
            pass  # pool already started; the intra-op count is what matters on CPU
    return n
