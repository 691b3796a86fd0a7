"""Teacher engines: the teacher model behind a process boundary, feeding the hidden-state channel.

An engine receives **token ids** (never text) and returns the teacher's last hidden states
(after the final norm, before ``lm_head``) at the requested positions only, written straight
into a :class:`kdcore.channel.Channel` slot that the student reads as a view. The student
rebuilds teacher logits itself from :meth:`TeacherEngine.lm_head`, chunk by chunk.

Pipelining (DESIGN §3): ``submit`` returns at once, so the student submits batch k+1, then
trains on batch k (``result`` of the earlier ticket), then ``release``-s it::

    with create_engine(recipe.teacher, max_rows=...) as teacher:
        head = teacher.lm_head()                      # [V, H], loaded alone
        t0 = teacher.submit(req0)
        for k, req in enumerate(requests[1:]):
            t1 = teacher.submit(req)                  # teacher works on k+1 ...
            h = teacher.result(t0)                    # ... while the student uses k: [rows, H] view
            train_step(h, head)
            teacher.release(t0)                       # slot back to the teacher; h is dead now
            t0 = t1

At most ``n_slots`` tickets (2 by default) may be outstanding (submitted, not released).

Engines: ``hf`` (:class:`kdcore.teacher.hf.HFTeacher`, transformers in a spawned process, CPU or
CUDA) and ``sglang`` (GPU; see ``kdcore.teacher.sglang`` where installed).
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

from kdcore.channel import Channel, ChannelClosed, ChannelError, ChannelTimeout, PeerDiedError, TeacherDiedError

if TYPE_CHECKING:  # pragma: no cover
    import torch


class TeacherError(RuntimeError):
    """A teacher engine refused a request (bad input, wrong state); the engine is still usable."""


@dataclass
class HiddenRequest:
    """One micro-batch for the teacher.

    input_ids       ``[B, L]`` integer token ids in the teacher's vocabulary (padding any id)
    attention_mask  ``[B, L]`` 1 for real tokens, 0 for padding (left or right padding)
    positions       per sample, the positions whose last hidden states are wanted

    The engine returns ``[N, H]`` rows, ``N = sum(len(p) for p in positions)``: sample 0's
    positions in the given order, then sample 1's, and so on. Position ids are computed from
    the mask (``cumsum - 1``), so left padding gives the same states as no padding.
    """

    input_ids: "torch.Tensor"
    attention_mask: "torch.Tensor"
    positions: Sequence[Sequence[int]]

    @property
    def rows(self) -> int:
        return sum(len(p) for p in self.positions)

    def flat_index(self) -> "torch.Tensor":
        """``[N]`` indices into the flattened ``[B * L]`` token grid, in output-row order."""
        import torch

        L = self.input_ids.shape[1]
        parts = [torch.as_tensor(p, dtype=torch.int64).reshape(-1) + b * L for b, p in enumerate(self.positions)]
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def validate(self, *, vocab_size: Optional[int] = None, max_rows: Optional[int] = None) -> None:
        """Raise :class:`TeacherError` naming the first problem (sample, position, value)."""
        import torch

        ids, mask = self.input_ids, self.attention_mask
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
            raise TeacherError(f"input_ids must be a [B, L] tensor, got {getattr(ids, 'shape', type(ids).__name__)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise TeacherError(f"input_ids must hold integer token ids, got {ids.dtype}")
        if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
            raise TeacherError(f"attention_mask must have the shape of input_ids {tuple(ids.shape)}, "
                               f"got {tuple(getattr(mask, 'shape', ()))}")
        B, L = ids.shape
        if len(self.positions) != B:
            raise TeacherError(f"positions has {len(self.positions)} entries for a batch of {B} samples")
        valid = mask.bool()
        flat = self.flat_index()  # vectorised checks: requests carry thousands of positions
        rel = flat - torch.repeat_interleave(torch.arange(B) * L, torch.tensor([len(p) for p in self.positions]))
        sample = torch.repeat_interleave(torch.arange(B), torch.tensor([len(p) for p in self.positions]))
        outside = (rel < 0) | (rel >= L)
        if bool(outside.any()):
            i = int(outside.nonzero()[0])
            raise TeacherError(f"sample {int(sample[i])}: position {int(rel[i])} outside the sequence length {L}")
        padded = ~valid.reshape(-1).cpu()[flat]
        if bool(padded.any()):
            i = int(padded.nonzero()[0])
            raise TeacherError(f"sample {int(sample[i])}: position {int(rel[i])} is padding (attention_mask 0)")
        if vocab_size is not None and bool(valid.any()):
            real = ids[valid]
            lo, hi = int(real.min()), int(real.max())
            if lo < 0 or hi >= vocab_size:
                bad = int(real[(real < 0) | (real >= vocab_size)][0])
                raise TeacherError(f"token id {bad} is outside the teacher's vocabulary [0, {vocab_size}) "
                                   f"(student ids sent to a teacher with another tokenizer?)")
        if max_rows is not None and self.rows > max_rows:
            raise TeacherError(f"the batch asks for {self.rows} hidden-state rows but channel slots hold {max_rows}: "
                               f"lower the micro-batch size/token budget or raise the engine's max_rows")


@dataclass(frozen=True)
class Ticket:
    """A submitted request: its sequence number (also picks the channel slot) and row count."""

    seq: int
    rows: int


class HiddenStates:
    """A finished request's ``[rows, H]`` view plus its ticket; releases the slot on exit.

    ``with engine.hidden_states(req) as h: ...`` — ``h`` is the view (no copy).
    """

    def __init__(self, engine: "TeacherEngine", ticket: Ticket, tensor: "torch.Tensor"):
        self.engine, self.ticket, self.tensor = engine, ticket, tensor

    def release(self) -> None:
        self.engine.release(self.ticket)

    def __enter__(self) -> "torch.Tensor":
        return self.tensor

    def __exit__(self, *exc) -> None:
        self.release()


class TeacherEngine(abc.ABC):
    """What the trainer needs from a teacher. Engines are context managers (``close`` on exit).

    Attributes after ``start()``: ``hidden_size``, ``vocab_size`` (rows of ``lm_head``),
    ``n_slots``, ``max_rows``; engines using the shared ticket helpers also ``channel``.
    """

    hidden_size: int
    vocab_size: int
    n_slots: int
    max_rows: int
    channel: Channel  # the slot ring the shared ticket helpers read and release

    @abc.abstractmethod
    def start(self) -> "TeacherEngine":
        """Load the model (in its own process) and return when it can serve; idempotent."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the engine and its processes; idempotent, never leaves orphans."""

    @abc.abstractmethod
    def submit(self, request: HiddenRequest) -> Ticket:
        """Queue a request and return at once (raises when ``n_slots`` tickets are outstanding)."""

    @abc.abstractmethod
    def result(self, ticket: Ticket, timeout: Optional[float] = None) -> "torch.Tensor":
        """Wait for a ticket; its ``[rows, H]`` view of the channel slot, valid until release.

        Raises :class:`TeacherDiedError` when the teacher died, :class:`ChannelTimeout` when it
        makes no progress for ``timeout`` seconds (default: the engine's progress timeout).
        """

    @abc.abstractmethod
    def release(self, ticket: Ticket) -> None:
        """Hand the ticket's slot back to the teacher (waits for the ticket if unfinished)."""

    def hidden_states(self, request: HiddenRequest) -> HiddenStates:
        """Synchronous ``submit`` + ``result``: a :class:`HiddenStates` handle on the slot view."""
        ticket = self.submit(request)
        return HiddenStates(self, ticket, self.result(ticket))

    def generate(self, input_ids: "torch.Tensor", attention_mask: "torch.Tensor", **kwargs: Any) -> list[list[int]]:
        """Sample continuations (SeqKD / on-policy teacher samples): new token ids per sample."""
        raise NotImplementedError(f"{type(self).__name__} cannot generate yet")

    def update_weights(self, state_dict: Mapping[str, "torch.Tensor"]) -> int:
        """Copy (a subset of) parameters into the teacher, e.g. self-distillation; returns count."""
        raise NotImplementedError(f"{type(self).__name__} cannot update its weights")

    def sleep(self) -> None:
        """Release accelerator memory while the student trains (no-op where nothing is freed)."""

    def wake(self) -> None:
        """Undo :meth:`sleep`."""

    @abc.abstractmethod
    def lm_head(self, dtype: "str | torch.dtype | None" = None) -> "torch.Tensor":
        """The teacher's output projection ``[V, H]`` (tied embedding when tied), loaded alone."""

    def __enter__(self) -> "TeacherEngine":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- ticket bookkeeping
    # Shared by the engines so that every engine numbers tickets, bounds them by n_slots and
    # refuses stale ones the same way; the engine keeps its own queue and its own wait.
    # Engines call _init_tickets() in __init__ and keep the slot ring in ``self.channel``.

    def _init_tickets(self) -> None:
        self._next_seq = 0
        self._outstanding: dict[int, Ticket] = {}  # submitted, not released
        self._read: set[int] = set()  # outstanding tickets already read from the channel

    def _check_capacity(self) -> None:
        """Raise :class:`ChannelError` when ``n_slots`` tickets are outstanding already."""
        if len(self._outstanding) >= self.n_slots:
            held = ", ".join(str(s) for s in sorted(self._outstanding))
            raise ChannelError(f"{self.n_slots} requests already in flight (tickets {held}): release one first")

    def _new_ticket(self, request: HiddenRequest) -> Ticket:
        """The next ticket for ``request`` (not yet outstanding: :meth:`_track` it once queued)."""
        ticket = Ticket(self._next_seq, request.rows)
        self._next_seq += 1
        return ticket

    def _track(self, ticket: Ticket) -> Ticket:
        self._outstanding[ticket.seq] = ticket
        return ticket

    def _check_outstanding(self, ticket: Ticket, hint: str) -> None:
        if ticket.seq not in self._outstanding:
            raise ChannelError(f"ticket {ticket.seq} is not outstanding ({hint})")

    def _check_no_tickets(self, what: str) -> None:
        """Raise :class:`TeacherError` while any ticket is outstanding (``what`` names the call)."""
        if self._outstanding:
            raise TeacherError(f"release all hidden-state tickets before {what}")

    def _check_all_read(self, what: str) -> None:
        """Raise :class:`TeacherError` while a submitted request is still being computed."""
        unread = sorted(set(self._outstanding) - self._read)
        if unread:
            raise TeacherError(f"read the results of tickets {unread} before {what}")

    def _ticket_view(self, ticket: Ticket, wait: "Callable[[], torch.Tensor]") -> "torch.Tensor":
        """The ``[rows, H]`` slot view of an outstanding ticket; ``wait()`` runs only on the first read."""
        self._check_outstanding(ticket, "released already, or from another engine")
        if ticket.seq in self._read:
            return self.channel.view(ticket.seq)
        view = wait()
        self._read.add(ticket.seq)
        return view

    def _release_ticket(self, ticket: Ticket) -> None:
        """Hand the slot back and forget the ticket; an unread ticket is waited for first."""
        self._check_outstanding(ticket, "released twice?")
        if ticket.seq not in self._read:
            self.result(ticket)  # the slot must be consumed before it can be handed back
        self.channel.release(ticket.seq)
        self._read.discard(ticket.seq)
        del self._outstanding[ticket.seq]


def available_cores() -> int:
    """CPU cores this process may run on (affinity-aware; containers often restrict it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_threads(total: Optional[int] = None, teacher_share: float = 1 / 3) -> int:
    """Torch threads for a CPU teacher sharing ``total`` cores with the student.

    Per token the teacher runs a forward (2·P_t FLOPs) and the student a forward and backward
    (6·P_s) plus the logits of both heads in the loss; for a teacher about twice the student
    that puts the teacher near a third of the step's work. Giving it that share of the cores
    (at least 1, and at least 1 left for the student) keeps both processes busy without
    oversubscribing: on 2 cores that is 1 + 1. Pass ``teacher_share`` from parameter counts
    when the sizes differ a lot.
    """
    total = total or available_cores()
    if total <= 1:
        return 1
    return max(1, min(total - 1, round(total * teacher_share)))


def create_engine(teacher_cfg: Any, *, max_rows: int, threads: Optional[int] = None, **kwargs: Any) -> TeacherEngine:
    """Build (not start) the engine a recipe's ``teacher`` section asks for."""
    engine = getattr(teacher_cfg, "engine", "hf")
    if engine == "hf":
        from kdcore.teacher.hf import HFTeacher

        return HFTeacher(teacher_cfg.path, dtype=teacher_cfg.dtype, device=teacher_cfg.device,
                         threads=threads or (teacher_cfg.threads or None), max_rows=max_rows, **kwargs)
    if engine == "sglang":
        try:
            from kdcore.teacher.sglang import SGLangTeacher  # type: ignore[import-not-found]
        except ImportError as exc:
            raise TeacherError(f"teacher.engine 'sglang' is not available here ({exc}); it needs a GPU "
                               f"and `pip install kdflow[sglang]`") from exc
        return SGLangTeacher(teacher_cfg, max_rows=max_rows, **kwargs)
    raise TeacherError(f"unknown teacher.engine '{engine}' (known: hf, sglang)")


__all__ = [
    "HiddenRequest", "Ticket", "HiddenStates", "TeacherEngine", "TeacherError", "create_engine",
    "default_threads", "available_cores", "TeacherDiedError", "ChannelTimeout", "ChannelError",
    "ChannelClosed", "PeerDiedError",
]
