"""Every engine protocol: teacher engines (hidden states) and rollout engines (sampling).

**Teacher engines** receive **token ids** (never text) and return the teacher's last hidden
states (after the final norm, before ``lm_head``) at the requested positions only, written
straight into a :class:`kdcore.infra.channel.Channel` slot that the student reads as a view. The
student rebuilds teacher logits itself from :meth:`TeacherEngine.lm_head`, chunk by chunk.

Pipelining (see docs/architecture.md): ``submit`` returns at once, so the student submits
batch k+1, then trains on batch k (``result`` of the earlier ticket), then ``release``-s it::

    with create_teacher_engine(recipe.teacher, registry=registry, max_rows=...) as teacher:
        head = teacher.lm_head()                      # [V, H], loaded alone
        t0 = teacher.submit(req0)
        for k, req in enumerate(requests[1:]):
            t1 = teacher.submit(req)                  # teacher works on k+1 ...
            h = teacher.result(t0)                    # ... while the student uses k: [rows, H] view
            train_step(h, head)
            teacher.release(t0)                       # slot back to the teacher; h is dead now
            t0 = t1

At most ``n_slots`` tickets (2 by default) may be outstanding (submitted, not released).

**Rollout engines** (:class:`RolloutEngine`) generate continuations of prompt token ids from
the current policy weights and take new weights. The argument checks below
(:func:`check_generate`, :func:`check_sampling`, :func:`token_limits`) and
:func:`finish_generations` are shared, so every rollout engine refuses the same inputs with the
same words and cuts its outputs the same way.

Engines are registered through the ``register_engines`` hook (:mod:`kdcore.plugin_system.hookspecs`); the
built-in ``hf`` and ``sglang`` come from :mod:`kdcore.engines.builtin`. This module imports
neither torch nor the channel at import time, so recipe validation stays light.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kdcore.infra.channel import Channel


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

    vision          a vision-language teacher's pixel inputs for the batch, as its processor
                    made them (:func:`kdcore.data.images.collate_vision`); None for text. The
                    batch is then right-padded (multimodal position ids are the model's own).
                    Only engines with ``accepts_vision`` take it.
    """

    input_ids: "torch.Tensor"
    attention_mask: "torch.Tensor"
    positions: Sequence[Sequence[int]]
    vision: Optional[Mapping[str, "torch.Tensor"]] = None

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

    ``colocated``: teacher and student share the accelerators, so the engine is woken only for
    teacher phases (the trainer then computes a whole step's micro-batches in one phase and
    trains with the engine asleep, see :mod:`kdcore.engines.colocation`). False by default:
    the teacher runs beside the student, pipelined. ``offloads_optimizer``: with colocation,
    the student's optimizer state moves to CPU memory while the teacher is awake.
    """

    colocated: bool = False  # an engine may set it per instance (sglang: from teacher.sglang.colocate)
    accepts_vision: bool = False  # takes HiddenRequest.vision (hf); others refuse image rows
    offloads_optimizer: bool = False  # sglang: teacher.sglang.offload_optimizer
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

    def resident_head(self) -> "Optional[torch.Tensor]":
        """The ``[V, H]`` head this engine already holds in the trainer's process, for the trainer
        to use instead of its own copy (:func:`kdcore.training.teachers.share_resident_heads`);
        None, the default, where the teacher's weights live elsewhere (a process, a server)."""
        return None

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
            from kdcore.infra.channel import ChannelError

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
            from kdcore.infra.channel import ChannelError

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


# ============================================================================ rollout engines


class RolloutError(RuntimeError):
    """Sampling cannot proceed (bad settings, or an engine that cannot do what was asked)."""


@dataclass
class Generation:
    """One sampled continuation: the new token ids (EOS included when it stopped on one)."""

    token_ids: list[int]
    finished_by_eos: bool


class RolloutEngine(abc.ABC):
    """Generates continuations from the current policy weights.

    Implementations: :class:`kdcore.engines.hf_rollout.HFRolloutEngine` (transformers, CPU or
    CUDA), :class:`kdcore.engines.sglang.rollout.SGLangRolloutEngine` (GPU), and
    :class:`kdcore.engines.hf_rollout.TeacherRolloutEngine` (the teacher engine's own ``generate``).
    """

    @abc.abstractmethod
    def update_weights(self, state_dict: Mapping[str, "torch.Tensor"]) -> int:
        """Load full (unsharded) weights by name; returns how many tensors were copied. Unknown
        names, missing names or shape mismatches raise :class:`RolloutError` naming them."""

    @abc.abstractmethod
    def generate(self, prompt_ids: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                 temperature: float = 1.0, top_p: float = 1.0, n: int = 1, eos_ids: Sequence[int] = (),
                 seed: Optional[int] = None) -> list[Generation]:
        """Sample ``n`` continuations of each prompt.

        ``prompt_ids``: token ids per prompt (no padding). ``max_new_tokens``: one limit, or one
        per prompt. ``temperature`` 0 means greedy decoding; ``top_p`` 1 means no nucleus cut;
        no top-k cut is ever applied (the samples follow the model's own distribution).
        ``eos_ids``: generation stops after the first of these. ``seed``: same seed, same
        weights, same prompts → same samples.

        Returns ``len(prompt_ids) * n`` generations, prompt-major (prompt 0's ``n``, then
        prompt 1's, ...). A continuation cut by its length limit ends where it was cut, with
        ``finished_by_eos`` False (no EOS is appended).
        """

    def close(self) -> None:
        """Free the engine's resources (idempotent)."""


def finish_generations(rows: Sequence[Sequence[int]], limits: Sequence[int], eos: set[int]) -> list[Generation]:
    """Cut each row after its first EOS or at its own limit; no EOS is ever added."""
    out = []
    for row, limit in zip(rows, limits):
        row = list(row)[:limit]
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), None)
        out.append(Generation(row[:cut], True) if cut is not None else Generation(row, False))
    return out


def token_limits(max_new_tokens: int | Sequence[int], n_prompts: int) -> list[int]:
    """One new-token limit per prompt from ``generate()``'s ``max_new_tokens`` (each >= 1)."""
    if isinstance(max_new_tokens, int):
        limits = [max_new_tokens] * n_prompts
    else:
        limits = [int(m) for m in max_new_tokens]
        if len(limits) != n_prompts:
            raise RolloutError(f"max_new_tokens has {len(limits)} limits for {n_prompts} prompts")
    if any(m < 1 for m in limits):
        raise RolloutError(f"max_new_tokens must be >= 1, got {min(limits)}")
    return limits


def check_sampling(temperature: float, top_p: float, n: int) -> None:
    """:class:`RolloutError` for a negative temperature, a ``top_p`` outside (0, 1] or ``n < 1``."""
    if temperature < 0:
        raise RolloutError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise RolloutError(f"top_p must be within (0, 1], got {top_p}")
    if n < 1:
        raise RolloutError(f"n must be >= 1, got {n}")


def check_generate(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], temperature: float,
                   top_p: float, n: int) -> list[int]:
    """Check a sampling engine's ``generate()`` arguments; the per-row token limits.

    Rows are prompt-major (prompt 0's ``n`` samples, then prompt 1's), so the result has
    ``len(prompt_ids) * n`` entries, each prompt's limit repeated ``n`` times; ``[]`` for no prompts.
    """
    check_sampling(temperature, top_p, n)
    if not prompt_ids:
        return []
    if any(len(p) == 0 for p in prompt_ids):
        raise RolloutError("cannot generate from an empty prompt")
    return [m for m in token_limits(max_new_tokens, len(prompt_ids)) for _ in range(n)]


__all__ = [
    "HiddenRequest", "Ticket", "HiddenStates", "TeacherEngine", "TeacherError", "RolloutError", "Generation",
    "RolloutEngine", "finish_generations", "token_limits", "check_sampling", "check_generate",
]
