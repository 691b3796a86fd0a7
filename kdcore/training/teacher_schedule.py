"""When the teacher computes which micro-batch: pipelined, or in phases when colocated.

Pipelined (the default): the teacher engine runs in its own process and computes micro-batch
k+1 into the second channel slot while the student trains on micro-batch k. A rollout policy
that samples from the student does not let the next step be prepared before this step's
optimizer update (its samples must come from the current weights), so there the teacher idles
at step boundaries.

Colocated (an engine whose ``colocated`` is true, e.g. SGLang sharing the GPUs with the
student): the teacher is woken once per step, prepares the step (a rollout may sample from
it), computes all of its micro-batches, and sleeps while the student trains on them.

Every teacher (:mod:`kdcore.training.teachers`; one teacher is a list of one) has its own engine
and slots; a micro-batch is submitted to all of its teachers at once (each its own share), so
every teacher computes micro-batch k+1 while the student trains on k.
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from typing import Iterable, Iterator

import torch

from kdcore.training.types import PreparedMicroBatch, PreparedStep, TrainingError
from kdcore.engines import HiddenRequest
from kdcore.infra.channel import ChannelError


class TeacherSchedule:
    """Feeds prepared micro-batches to the trainer with their teacher rows on the way."""

    def __init__(self, engines: dict, *, looks_ahead: bool, max_steps: int, colocation=None):
        self.engines = dict(engines)  # teacher name -> its engine (one teacher: a dict of one)
        self.looks_ahead = looks_ahead
        self.max_steps = max_steps
        self.colocation = colocation  # kdcore engines' Colocation when the engine is colocated
        self.wait_s = 0.0  # time spent waiting for teacher rows (reset by the caller per step)
        self._queue: deque[PreparedMicroBatch] = deque()
        self._pending: deque[PreparedStep] = deque()
        self._next_step = 0

    # ------------------------------------------------------------------ one micro-batch
    def submit(self, pmb: PreparedMicroBatch) -> None:
        for name, share in pmb.teachers.items():
            engine = self.engines[name]
            b = share.batch
            # a batch without teacher ids is read as the student's (one tokenizer)
            cross = getattr(b, "teacher_input_ids", None) is not None
            ids = b.teacher_input_ids if cross else b.input_ids
            mask = b.teacher_attention_mask if cross else b.attention_mask
            # getattr: schedules also feed batches and engines that predate images (test doubles, plugins)
            vision = getattr(b, "teacher_vision" if cross else "vision", None)
            if vision and not getattr(engine, "accepts_vision", False):
                raise TrainingError(f"{self._who(name)} ({type(engine).__name__}) does not take image inputs, and "
                                    f"step {pmb.step} has images; use teacher.engine: hf for a vision-language teacher")
            positions = share.teacher_positions
            wanted = [b for b, p in enumerate(positions) if p]
            if not wanted:
                continue  # nothing to compute (kd_ratio 0, or no pair): no request, hidden() gives None
            if len(wanted) < len(positions) and not vision:
                # rows that ask for no position (CE-only data rows beside rollout samples) are
                # not sent: the reply concatenates the wanted rows' positions in the same order
                ids, mask, positions = ids[wanted], mask[wanted], [positions[b] for b in wanted]
            try:
                share.ticket = engine.submit(HiddenRequest(ids, mask, positions, vision))
            except ChannelError as exc:
                raise TrainingError(f"{self._who(name)} failed at step {pmb.step}: {exc}") from exc
        pmb.submitted = True

    def hidden(self, pmb: PreparedMicroBatch, name: str, *, timed: bool = True) -> torch.Tensor | None:
        """The rows teacher ``name`` computed for a submitted micro-batch: a view of its channel
        slot; None when it asked for no position."""
        ticket = pmb.teachers[name].ticket
        if ticket is None:
            return None
        t0 = time.perf_counter()
        try:
            h_t = self.engines[name].result(ticket)
        except ChannelError as exc:
            raise TrainingError(f"{self._who(name)} failed at step {pmb.step}: {exc}") from exc
        if timed:
            self.wait_s += time.perf_counter() - t0
        return h_t

    def _who(self, name: str) -> str:
        return "teacher engine" if len(self.engines) == 1 else f"teacher '{name}' (its engine)"

    def release(self, pmb: PreparedMicroBatch) -> None:
        for name, share in pmb.teachers.items():
            if share.ticket is not None:
                self.engines[name].release(share.ticket)
                share.ticket = None
        pmb.submitted = False

    def phase(self):
        """Context in which the teacher may be used: a colocated engine is awake only inside it."""
        return self.colocation.teacher_phase() if self.colocation is not None else contextlib.nullcontext()

    def drop_in_flight(self) -> None:
        """Hand back the slots of micro-batches computed ahead (before an evaluation, which
        uses the same slots, or a teacher refresh, after which they are stale); they are
        submitted again when their turn comes."""
        for m in self._queue:
            if m.submitted:
                self.release(m)

    # ------------------------------------------------------------------ the stream
    def micro_batches(self, steps: Iterable[PreparedStep], start_step: int) -> Iterator[tuple[PreparedMicroBatch, PreparedStep]]:
        """``(micro-batch, its step)`` in training order, each with its teacher request
        submitted; the caller reads the rows with :meth:`hidden` and releases them."""
        steps = iter(steps)
        self._next_step = start_step
        fill = self._fill_phase if self.colocation is not None else self._fill_ahead
        while True:
            fill(steps)
            if not self._queue:
                return
            pmb = self._queue.popleft()
            if self.colocation is None:
                fill(steps)  # the teacher computes the next micro-batch while the student trains on this one
            yield pmb, self._pending[0]
            if pmb.last:
                self._pending.popleft()

    def _fill_ahead(self, steps: Iterator[PreparedStep]) -> None:
        # submit queued micro-batches until one waits in the channel (the one the student holds
        # is the other slot of the double buffer)
        while not any(m.submitted for m in self._queue):
            waiting = [m for m in self._queue if not m.submitted]
            if waiting:
                self.submit(waiting[0])
                continue
            if not self.looks_ahead and self._pending:
                return  # on-policy: the next step's rollout must see this step's update
            if not self._take_step(steps):
                return

    def _fill_phase(self, steps: Iterator[PreparedStep]) -> None:
        # one teacher phase per step: prepare it, compute every micro-batch, read them all
        if self._queue or self._next_step >= self.max_steps:
            return  # (no phase just to learn that the steps are over)
        with self.phase():
            if not self._take_step(steps):
                return
            nxt = self._pending[-1]
            (engine,) = self.engines.values()  # one teacher: start_engines refuses several colocated
            if len(nxt.micro_batches) > engine.n_slots:
                raise TrainingError(f"step {nxt.step + 1} has {len(nxt.micro_batches)} micro-batches but the "
                                    f"colocated teacher holds {engine.n_slots}; lower train.grad_accum")
            for m in nxt.micro_batches:
                self.submit(m)
            for m in nxt.micro_batches:
                for name in m.teachers:
                    self.hidden(m, name)

    def _take_step(self, steps: Iterator[PreparedStep]) -> bool:
        nxt = next(steps, None)
        if nxt is None:
            return False
        self._next_step = nxt.step + 1
        self._pending.append(nxt)
        self._queue.extend(nxt.micro_batches)
        return True
