"""Teacher and student on the same accelerators: the teacher engine sleeps outside its phases.

Engine-agnostic (any :class:`kdcore.engines.protocol.TeacherEngine` with ``sleep``/``wake``): the
``sglang`` engine releases its server's GPU memory (SGLang's memory saver), the ``hf`` engine
on CUDA moves its weights to the host. The trainer uses :class:`Colocation` when the
engine is ``colocated`` (sglang: ``teacher.sglang.colocate``): per step, one teacher phase computes every micro-batch of
the step (into ``n_slots >= grad_accum`` channel slots, which are kdflow's memory and stay
valid while the engine sleeps), then the student trains with the teacher asleep and,
with ``teacher.sglang.offload_optimizer``, gets its optimizer state back from the host.

Tested on CPU with the ``hf`` engine (whose CPU sleep refuses requests, so every teacher call
outside a phase would fail the run); never run on a GPU.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import torch

if TYPE_CHECKING:
    from kdcore.engines.protocol import TeacherEngine


def offload_optimizer_state(optimizer: torch.optim.Optimizer, device: str | torch.device = "cpu", *,
                            move: Optional[Callable[[torch.Tensor, torch.device], torch.Tensor]] = None
                            ) -> Callable[[], None]:
    """Move every tensor of the optimizer's state to ``device`` (pinned host memory for CUDA
    state, so the way back is a fast async copy) and return a function that moves each back
    where it was. DTensor state (FSDP2) moves its local shard. ``move(tensor, device)``
    replaces the transfer itself (default ``tensor.to(device)``)."""
    target = torch.device(device)
    homes: list[tuple[dict, Any, torch.device]] = []

    def to(t: torch.Tensor, d: torch.device) -> torch.Tensor:
        if move is not None:
            return move(t, d)
        out = t.to(d, non_blocking=True)
        if d.type == "cpu" and t.is_cuda and not _is_dtensor(out):
            out = out.pin_memory()
        return out

    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.device != target:
                homes.append((state, k, v.device))
                state[k] = to(v, target)
    if any(h[2].type == "cuda" for h in homes):
        torch.cuda.synchronize()  # the GPU copies are gone before the teacher takes the memory

    def restore() -> None:
        for state, k, home in homes:
            state[k] = to(state[k], home)
        if any(h[2].type == "cuda" for h in homes):
            torch.cuda.synchronize()
        homes.clear()

    return restore


def release_cached_memory() -> None:
    """Hand the blocks the student's caching allocator keeps (freed activations, offloaded
    optimizer state) back to the driver, so the waking server can map them; without it the
    memory stays reserved by this process. No-op without CUDA."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


class Colocation:
    """Teacher and student on the same GPUs: the teacher sleeps except during its phases.

    ``with colocation.teacher_phase(): ...`` wakes the engine (after moving the optimizer
    state to host memory when ``offload_optimizer``), runs the block (submit/result the
    step's micro-batches: give the engine ``n_slots >= micro-batches per step`` so all of them
    fit before the student trains), then puts the engine back to sleep and restores the
    optimizer state. Collective when torch.distributed is initialised (barriers around the
    server's sleep/wake, which only the rank that owns the server performs).
    """

    def __init__(self, engine: "TeacherEngine", optimizer: Optional[torch.optim.Optimizer] = None,
                 offload_optimizer: bool = False):
        self.engine, self.optimizer, self.offload_optimizer = engine, optimizer, offload_optimizer
        self.phases = 0

    @staticmethod
    def _barrier() -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    def start_asleep(self) -> None:
        """Put a freshly started engine to sleep (collective), so the student has the memory
        until the first :meth:`teacher_phase`."""
        self._barrier()
        self.engine.sleep()
        self._barrier()

    @contextmanager
    def teacher_phase(self) -> Iterator[None]:
        restore = None
        if self.offload_optimizer and self.optimizer is not None:
            restore = offload_optimizer_state(self.optimizer)
        release_cached_memory()
        self._barrier()  # every rank's memory is free before the server takes it back
        self.engine.wake()
        self._barrier()
        try:
            yield
        finally:
            self._barrier()  # every rank has its rows before the server lets go of them
            self.engine.sleep()
            self._barrier()
            if restore is not None:
                restore()
            self.phases += 1


__all__ = ["Colocation", "offload_optimizer_state", "release_cached_memory"]
