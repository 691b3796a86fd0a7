"""The hidden-state channel: preallocated shared-memory slots between teacher and student.

One *producer* (the teacher process) writes last hidden states into slots; one *consumer*
(the student process) reads them as tensor **views** of the shared buffer — no copy, no
pickling — and releases them when the step no longer needs them.

Layout (all allocated once, by the consumer, before the producer process is spawned)::

    data    [n_slots, max_rows, hidden]  float32/bfloat16/float16   the payload
    header  [n_slots, 4] int64   per slot: rows, cols, sequence number, state (FREE/FULL)
    control [5] int64            producer beat, consumer beat, producer pid, consumer pid, closed

Protocol: request number ``seq`` (0, 1, 2, ...) uses slot ``seq % n_slots`` — a ring, so with
two slots the teacher fills batch k+1 while the student trains on batch k. Each slot has a
``free`` and a ``full`` semaphore: the producer waits for ``free``, writes, sets the header and
posts ``full``; the consumer waits for ``full``, reads the view, and ``release`` posts ``free``.
Semaphore post/wait are full memory barriers, so header and payload writes are visible to the
other side once it returns from the wait.

Failure handling: every wait polls its semaphore in short steps and in between checks that
the peer is alive (pid, or a caller-given ``peer_alive`` such as ``Process.is_alive``) — a dead
peer raises :class:`TeacherDiedError` (consumer side) or :class:`PeerDiedError` within a poll
step. The consumer also watches the producer's *beat* counter, which the producer bumps as it
makes progress (the hf engine bumps it after every module of the decoder): no beat for
``progress_timeout`` seconds raises :class:`ChannelTimeout`. The producer does not time out
waiting for a free slot (the student may legitimately train for long), it only checks that the
consumer is alive.

Why torch shared-memory tensors (``share_memory_()``, passed to the child at spawn) rather than
``multiprocessing.shared_memory`` + ``torch.frombuffer``: torch's default Linux strategy hands
the segment over as a file descriptor and unlinks its name at once, so the memory is returned
to the OS when the last process holding it exits — even when both are SIGKILLed — whereas named
``SharedMemory`` segments leak in ``/dev/shm`` on a crash and fight the resource tracker
(Python < 3.13 unlinks a segment when any attaching process exits). Views of it are ordinary
tensors (``data_ptr`` stays the same for every read of a slot).

CUDA: ``Channel(..., device="cuda")`` puts ``data`` on the GPU; it reaches the spawned producer
through CUDA IPC (torch.multiprocessing pickles the storage as an IPC handle), the producer
synchronises its stream before posting ``full``, and the consumer reads the same device memory.
The creating (consumer) process must outlive every use of it, as CUDA IPC requires. This path
is guarded by ``torch.cuda.is_available()`` and is **not tested on the CPU-only development
machines**; it is exercised by the GPU check scripts.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import torch
import torch.multiprocessing  # noqa: F401  registers the reductions that share tensors at spawn

FREE, FULL = 0, 1
_ROWS, _COLS, _SEQ, _STATE = range(4)
_PRODUCER_BEAT, _CONSUMER_BEAT, _PRODUCER_PID, _CONSUMER_PID, _CLOSED = range(5)

POLL_S = 0.1  # semaphore wait step: bounds how late a dead peer is noticed
PROGRESS_TIMEOUT_S = 20.0  # no producer progress for this long = hung (well within the 30 s budget)


class ChannelError(RuntimeError):
    """Misuse of the channel or a failed peer."""


class PeerDiedError(ChannelError):
    """The process on the other side of the channel is gone."""


class TeacherDiedError(PeerDiedError):
    """The teacher (producer) process died; the message carries its error when known."""


def describe_exit(exitcode: int | None) -> str:
    """How a child process ended, as it was observed: the signal by name and number (a
    SIGKILL may be the OOM killer, or kill -9 from a user or scheduler: both are said)."""
    import signal

    if exitcode is None:
        return "stopped responding"
    if exitcode >= 0:
        return f"exited with code {exitcode}"
    num = -exitcode
    try:
        name = signal.Signals(num).name
    except ValueError:
        return f"was killed by signal {num}"
    how = f"was killed by {name} (signal {num})"
    if num == signal.SIGKILL:
        how += "; the kernel's OOM killer sends this when memory runs out, as does kill -9"
    return how


class ChannelTimeout(ChannelError, TimeoutError):
    """The peer is alive but made no progress within the timeout (hung)."""


class ChannelClosed(ChannelError):
    """The channel was closed while waiting on it."""


def pid_alive(pid: int) -> bool:
    """True when ``pid`` runs and is not a zombie (an exited child not yet reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except (OSError, IndexError):
        return True  # no /proc (not Linux): kill(0) succeeded, trust it


def shm_free_bytes() -> Optional[int]:
    """Free bytes in ``/dev/shm`` (containers often mount only 64 MiB), None when unknown."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class Channel:
    """Double-buffered (or deeper) shared-memory slots of up to ``max_rows x hidden`` values.

    Create it in the consumer process before spawning the producer, and pass it to the
    producer as a ``Process`` argument (semaphores can only travel at spawn time).

    Producer: ``attach_producer()``, then per request ``buf = acquire_write(seq)`` (a
    ``[max_rows, hidden]`` view of the slot), write rows ``0..n``, ``beat()`` while working,
    ``commit(seq, n)``. Consumer: ``attach_consumer()``, then ``view = wait_full(seq)`` (a
    ``[rows, hidden]`` view, valid until ``release(seq)``), ``release(seq)``.
    """

    def __init__(self, max_rows: int, hidden: int, *, n_slots: int = 2, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", ctx=None):
        if n_slots < 2:
            raise ValueError(f"n_slots={n_slots}: at least 2 slots are needed to overlap teacher and student")
        if max_rows < 1 or hidden < 1:
            raise ValueError(f"channel shape must be positive, got max_rows={max_rows}, hidden={hidden}")
        self.max_rows, self.hidden, self.n_slots, self.dtype = int(max_rows), int(hidden), int(n_slots), dtype
        self.device = torch.device(device)
        nbytes = self.n_slots * self.max_rows * self.hidden * torch.empty((), dtype=dtype).element_size()
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ChannelError("Channel(device='cuda') needs CUDA, and torch.cuda.is_available() is False")
            self.data = torch.empty((self.n_slots, self.max_rows, self.hidden), dtype=dtype, device=self.device)
        elif self.device.type == "cpu":
            free = shm_free_bytes()
            if free is not None and nbytes > free:
                raise ChannelError(
                    f"the channel needs {nbytes / 2**20:.0f} MiB of shared memory but /dev/shm has "
                    f"{free / 2**20:.0f} MiB free: lower max_rows (micro-batch tokens) or enlarge /dev/shm "
                    f"(docker run --shm-size)")
            self.data = torch.empty((self.n_slots, self.max_rows, self.hidden), dtype=dtype).share_memory_()
        else:
            raise ValueError(f"channel device must be cpu or cuda, got '{device}'")
        self.nbytes = nbytes
        self.header = torch.zeros((self.n_slots, 4), dtype=torch.int64).share_memory_()
        self.control = torch.zeros(5, dtype=torch.int64).share_memory_()
        if ctx is None:
            import torch.multiprocessing as tmp

            ctx = tmp.get_context("spawn")
        self._free = [ctx.Semaphore(1) for _ in range(self.n_slots)]
        self._full = [ctx.Semaphore(0) for _ in range(self.n_slots)]
        self._init_local()

    def _init_local(self) -> None:
        # Per-process bookkeeping, never shared: which sequence numbers this side holds.
        self._held: set[int] = set()  # consumer: read but not released
        self._writing: Optional[int] = None  # producer: acquired but not committed

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_held", None)
        state.pop("_writing", None)
        state.pop("_control_np", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_local()

    # ------------------------------------------------------------------ common

    def slot_of(self, seq: int) -> int:
        return seq % self.n_slots

    def slot_tensor(self, slot: int) -> torch.Tensor:
        """The whole ``[max_rows, hidden]`` buffer of a slot (a view)."""
        return self.data[slot]

    @property
    def closed(self) -> bool:
        return bool(self.control[_CLOSED])

    def close(self) -> None:
        """Mark the channel closed; waits on either side end with :class:`ChannelClosed`."""
        self.control[_CLOSED] = 1

    def attach_producer(self) -> None:
        self.control[_PRODUCER_PID] = os.getpid()

    def attach_consumer(self) -> None:
        self.control[_CONSUMER_PID] = os.getpid()

    def beat(self) -> None:
        """Producer progress mark (cheap, ~0.2 us through a numpy view; call it often)."""
        control = self.__dict__.get("_control_np")
        if control is None:
            control = self._control_np = self.control.numpy()
        control[_PRODUCER_BEAT] += 1

    @property
    def producer_pid(self) -> int:
        return int(self.control[_PRODUCER_PID])

    @property
    def consumer_pid(self) -> int:
        return int(self.control[_CONSUMER_PID])

    def _wait(self, sem, *, what: str, peer_alive: Callable[[], bool], dead: Callable[[], Exception],
              progress_timeout: Optional[float], beat_index: int) -> None:
        last_beat = int(self.control[beat_index])
        last_change = time.monotonic()
        while True:
            if sem.acquire(True, POLL_S):
                return
            if self.closed:
                raise ChannelClosed(f"channel closed while {what}")
            if not peer_alive():
                # The peer may have posted just before exiting: take that before declaring it dead.
                if sem.acquire(False):
                    return
                raise dead()
            if progress_timeout is not None:
                beat = int(self.control[beat_index])
                now = time.monotonic()
                if beat != last_beat:
                    last_beat, last_change = beat, now
                elif now - last_change > progress_timeout:
                    raise ChannelTimeout(f"no progress from the peer for {progress_timeout:.0f} s while {what} "
                                         f"(it is alive but hung)")

    # ------------------------------------------------------------------ producer

    def acquire_write(self, seq: int, *, peer_alive: Optional[Callable[[], bool]] = None) -> torch.Tensor:
        """Wait until the slot of ``seq`` is free; return its ``[max_rows, hidden]`` buffer.

        Raises :class:`PeerDiedError` when the consumer dies meanwhile, :class:`ChannelClosed`
        when the channel is closed.
        """
        if self._writing is not None:
            raise ChannelError(f"acquire_write({seq}) while request {self._writing} is not committed")
        slot = self.slot_of(seq)
        alive = peer_alive or (lambda: pid_alive(self.consumer_pid))
        self._wait(self._free[slot], what=f"waiting for slot {slot} to be released (request {seq})",
                   peer_alive=alive, dead=lambda: PeerDiedError(f"consumer process (pid {self.consumer_pid}) died"),
                   progress_timeout=None, beat_index=_CONSUMER_BEAT)
        self._writing = seq
        return self.data[slot]

    def commit(self, seq: int, rows: int) -> None:
        """Publish ``rows`` rows of the slot of ``seq`` (written after ``acquire_write``)."""
        if self._writing != seq:
            raise ChannelError(f"commit({seq}) without acquire_write({seq})")
        if not 0 <= rows <= self.max_rows:
            raise ChannelError(f"commit({seq}): {rows} rows do not fit a slot of {self.max_rows}")
        slot = self.slot_of(seq)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # payload complete before "full"
        self.header[slot, _ROWS] = rows
        self.header[slot, _COLS] = self.hidden
        self.header[slot, _SEQ] = seq
        self.header[slot, _STATE] = FULL
        self._writing = None
        self.beat()
        self._full[slot].release()

    # ------------------------------------------------------------------ consumer

    def wait_full(self, seq: int, *, peer_alive: Optional[Callable[[], bool]] = None,
                  dead: Optional[Callable[[], Exception]] = None,
                  progress_timeout: Optional[float] = PROGRESS_TIMEOUT_S) -> torch.Tensor:
        """Wait for request ``seq``; return its ``[rows, hidden]`` view (valid until release).

        Raises :class:`TeacherDiedError` when the producer dies (``dead()`` builds the error
        when given), :class:`ChannelTimeout` when it makes no progress for
        ``progress_timeout`` seconds (None: wait as long as it lives).
        """
        slot = self.slot_of(seq)
        if seq in self._held:
            raise ChannelError(f"request {seq} was already read; read its view again instead of waiting twice")
        blocking = [s for s in self._held if self.slot_of(s) == slot]
        if blocking:
            raise ChannelError(f"request {seq} needs slot {slot}, still held by request {blocking[0]}: release it first")
        alive = peer_alive or (lambda: pid_alive(self.producer_pid))
        died = dead or (lambda: TeacherDiedError(f"teacher process (pid {self.producer_pid}) died"))
        self._wait(self._full[slot], what=f"waiting for request {seq} (slot {slot})", peer_alive=alive,
                   dead=died, progress_timeout=progress_timeout, beat_index=_PRODUCER_BEAT)
        got = int(self.header[slot, _SEQ])
        if got != seq:
            self._full[slot].release()  # leave the protocol as it was
            raise ChannelError(f"slot {slot} holds request {got}, expected {seq}: requests read out of order")
        self._held.add(seq)
        return self.view(seq)

    def view(self, seq: int) -> torch.Tensor:
        """The ``[rows, cols]`` view of a request already read (no copy; same storage)."""
        slot = self.slot_of(seq)
        rows, cols = int(self.header[slot, _ROWS]), int(self.header[slot, _COLS])
        return self.data[slot, :rows, :cols]

    def release(self, seq: int) -> None:
        """Give the slot of ``seq`` back to the producer. Views of it must not be used after."""
        if seq not in self._held:
            raise ChannelError(f"release({seq}): request {seq} is not held (never read, or released twice)")
        slot = self.slot_of(seq)
        self._held.discard(seq)
        self.header[slot, _STATE] = FREE
        self.control[_CONSUMER_BEAT] += 1
        self._free[slot].release()

    def held(self) -> set[int]:
        return set(self._held)


__all__ = [
    "Channel", "ChannelError", "PeerDiedError", "TeacherDiedError", "ChannelTimeout", "ChannelClosed",
    "pid_alive", "shm_free_bytes", "PROGRESS_TIMEOUT_S", "POLL_S",
]
