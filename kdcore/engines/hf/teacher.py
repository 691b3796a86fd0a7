"""The embedded ``hf`` teacher engine: transformers in a spawned process, CPU or CUDA.

The parent (student process) owns a :class:`kdcore.infra.channel.Channel`, spawns the child with
``torch.multiprocessing``'s *spawn* context (a fresh interpreter: no forked torch thread pools
or CUDA state) and talks to it through two queues: requests go down with token ids (small
numpy arrays, pickled), hidden states come back through the channel (shared memory, no
pickling), and only acknowledgements and errors go up the response queue.

Child process setup, and why:

- Its environment is set before it starts — glibc reads ``MALLOC_*`` once, at the first
  allocation, and OpenMP sizes its pool from ``OMP_NUM_THREADS`` at torch import, so neither
  can be changed from inside the child: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``
  (keep freed activation buffers in the heap instead of page-faulting fresh ones every batch),
  ``OMP_NUM_THREADS=threads``, progress bars and info logs off.
- ``torch.set_num_threads(threads)``: by default all of the rank's cores
  (:func:`kdcore.infra.distributed.default_threads`), like the student: the two overlap and wait
  passively, so each may use every core while the other waits (docs/performance.md).
- A watchdog thread exits the child within 0.5 s when its parent is gone (even SIGKILLed), so
  a crashed trainer leaves no orphan teacher; the ``daemon`` flag and an ``atexit`` hook stop
  it on a normal or exceptional parent exit.
- A forward hook on each leaf module of the decoder bumps the channel's progress beat, so a
  hung teacher is told apart from a slow one (:class:`kdcore.infra.channel.ChannelTimeout` after
  ``progress_timeout`` seconds without a finished linear/norm/... module).
- Any exception in the child is fatal: its traceback is sent up, the child exits, and the
  parent's next wait raises :class:`kdcore.infra.channel.TeacherDiedError` carrying it.

The child computes the decoder (``model.get_decoder()``: its ``last_hidden_state`` is after
the final norm; no logits, no per-layer hidden states kept, no KV cache) and gathers the
requested positions with ``index_select(..., out=slot)`` directly into the channel slot.

A vision-language teacher (:mod:`kdcore.modeling.vision`) computes its whole backbone instead, with the
request's pixel inputs (``HiddenRequest.vision``, sent down the queue beside the ids); the
channel still carries only the rows at the requested (text) positions.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import time
import weakref
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

import torch

from kdcore.infra.channel import (POLL_S, PROGRESS_TIMEOUT_S, Channel, ChannelTimeout,
                            TeacherDiedError, describe_exit)
from kdcore.engines.hf.child import child_main
from kdcore.engines.hf.model import image_inputs, resolve_device
from kdcore.engines.protocol import HiddenRequest, TeacherEngine, TeacherError, Ticket
from kdcore.infra.distributed import default_threads
from kdcore.infra.process_env import ALLOCATOR_ENV, THREAD_ENV
from kdcore.modeling import models
from kdcore.modeling.models import torch_dtype

START_TIMEOUT_S = 1800.0  # loading may include a one-time GGUF conversion of a large model
COMMAND_TIMEOUT_S = 600.0  # weight updates / sleep / wake of a live teacher (dead ones fail fast)
CLOSE_GRACE_S = 5.0  # time to finish the current batch and exit before the child is killed

_ENV_LOCK = threading.Lock()
_LIVE: "weakref.WeakSet[HFTeacher]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:  # runs before multiprocessing's own exit hook (registered earlier)
    for engine in list(_LIVE):
        if engine._owner == os.getpid():  # not in a forked copy of the process that started it
            engine.close()


def child_env(threads: int) -> dict[str, str]:
    """Environment the teacher process starts with (see the module docstring)."""
    # a user's own choice wins
    env = {k: os.environ.get(k, v) for k, v in {**ALLOCATOR_ENV, **THREAD_ENV}.items()}
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",  # the child never tokenizes; keep its pool out of the way
        "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no bars from a background process
        "TRANSFORMERS_VERBOSITY": os.environ.get("TRANSFORMERS_VERBOSITY", "error"),
    })
    return env


@contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    # spawn starts the child with this process's environment at Process.start() time.
    with _ENV_LOCK:
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


class HFTeacher(TeacherEngine):
    """transformers teacher in a spawned process. Use it from one thread.

    Text and vision-language models (``AutoModelForImageTextToText``; pixel inputs travel in
    ``HiddenRequest.vision``).

    Args:
        spec: hub id, local folder, ``.gguf`` file or ``pkg://`` spec (GGUFs are converted once
            into a cached HF folder, see :func:`kdcore.modeling.models.gguf_to_hf_folder`).
        dtype: compute dtype of the teacher, and of the hidden states in the channel.
        device: ``cpu``, ``cuda[:i]`` or ``auto`` (cuda when available).
        threads: torch threads in the child; None = :func:`kdcore.infra.distributed.default_threads`
            (all of this rank's cores).
        max_rows: rows per channel slot = the most hidden states one request may ask for.
        n_slots: channel depth; 2 lets the teacher fill batch k+1 while the student uses k.
        progress_timeout: seconds without a finished module (a linear, a norm) before a live
            teacher counts as hung (:class:`ChannelTimeout`).
        start_timeout: seconds allowed for the child to load the model.
        cache_dir: where converted GGUF folders live (default ``~/.cache/kdflow``).
    """

    accepts_vision = True

    def __init__(self, spec: str, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
                 threads: Optional[int] = None,
                 max_rows: int = 8192,  # e.g. 16 sequences x 512 loss positions; 19 MiB a slot at H=576, fp32
                 n_slots: int = 2,
                 progress_timeout: float = PROGRESS_TIMEOUT_S, start_timeout: float = START_TIMEOUT_S,
                 cache_dir: Optional[str] = None, attn_implementation: Optional[str] = None):
        self.spec = str(spec)
        self.dtype = torch_dtype(dtype)
        self.device = device
        if not threads:
            threads = default_threads(int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
        self.threads = int(threads)
        self.max_rows = int(max_rows)
        self.n_slots = int(n_slots)
        self.progress_timeout = progress_timeout
        self.start_timeout = start_timeout
        self.cache_dir = cache_dir
        self.attn_implementation = attn_implementation
        self._proc = None
        self._owner = os.getpid()
        self._started = False
        self._closed = False
        self._asleep = False
        self._hung = False
        self._init_tickets()
        self._next_rid = 0
        self._replies: dict[int, tuple] = {}
        self._fatal: Optional[str] = None
        self._head: Optional[torch.Tensor] = None
        self.info: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle

    def start(self, wait: bool = True) -> "HFTeacher":
        """Spawn the child; with ``wait=False`` return while it loads (the student can be built
        meanwhile) — the first request, or :meth:`wait_ready`, waits for it."""
        if self._started:
            return self.wait_ready() if wait else self
        if self._closed:
            raise TeacherError("this teacher engine was closed; build a new one")

        self.device = resolve_device(self.device)
        dims = models.model_dims(self.spec)  # config / GGUF metadata only: the parent never loads weights
        self.hidden_size, self.vocab_size = dims["hidden_size"], dims["vocab_size"]
        self.channel = Channel(self.max_rows, self.hidden_size, n_slots=self.n_slots, dtype=self.dtype,
                               device=self.device if self.device.startswith("cuda") else "cpu")
        self.channel.attach_consumer()
        ctx = torch.multiprocessing.get_context("spawn")
        self._requests = ctx.Queue()
        self._responses = ctx.Queue()
        options = {"spec": self.spec, "dtype": self.dtype, "device": self.device, "threads": self.threads,
                   "cache_dir": self.cache_dir, "attn_implementation": self.attn_implementation}
        self._proc = ctx.Process(target=child_main, name="kdflow-teacher", daemon=True,
                                 args=(options, self.channel, self._requests, self._responses, os.getpid()))
        with _environment(child_env(self.threads)):
            self._proc.start()
        self._started = True
        _LIVE.add(self)
        return self.wait_ready() if wait else self

    def wait_ready(self) -> "HFTeacher":
        """Block until the child has loaded the model (raises if it died doing so)."""
        if self.info:
            return self
        if not self._started or self._closed:
            raise TeacherError("the teacher engine is not running (call start())")
        try:
            info = self._await_reply("ready", what="loading the teacher", timeout=self.start_timeout)
        except BaseException:
            self.close()
            raise
        if info["hidden_size"] != self.hidden_size:
            self.close()
            raise TeacherError(f"teacher '{self.spec}': model hidden size {info['hidden_size']} differs from "
                               f"its config's {self.hidden_size}")
        self.vocab_size = info["vocab_size"]
        self.info = info
        return self

    def close(self) -> None:
        """Stop the child (asks, then kills it after ``CLOSE_GRACE_S``) and reap it. Idempotent.

        The child holds no state worth saving, so a hung or stopped one is simply SIGKILLed.
        """
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        proc = self._proc
        if proc is None:
            return
        try:
            self.channel.close()  # wakes a child blocked on a full ring
            if proc.is_alive() and not self._hung:
                self._requests.put(("close",))
                proc.join(CLOSE_GRACE_S)
            if proc.is_alive():  # busy or hung: stop it now
                proc.kill()
                proc.join(CLOSE_GRACE_S)
        finally:
            for q in (self._requests, self._responses):
                q.cancel_join_thread()  # never block exit on data a dead child will not read
                q.close()

    @property
    def pid(self) -> Optional[int]:
        return self._proc.pid if self._proc is not None else None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.is_alive()

    def _check_usable(self) -> None:
        if not self._started:
            raise TeacherError("the teacher engine is not started (call start() or use it as a context manager)")
        if self._closed:
            raise TeacherError("the teacher engine is closed")
        self.wait_ready()

    # ------------------------------------------------------------------ errors and replies

    def _death_error(self) -> TeacherDiedError:
        """The error for a dead child, with its traceback when it managed to send one."""
        deadline = time.monotonic() + 1.0
        while self._fatal is None and time.monotonic() < deadline:
            if not self._drain_one(0.1):
                break
        # a child that sent its traceback is on its way out (running exit finalizers)
        self._proc.join(CLOSE_GRACE_S if self._fatal is not None else 1.0)
        code = self._proc.exitcode
        how = "failed" if code is None and self._fatal is not None else describe_exit(code)
        msg = f"teacher process (pid {self._proc.pid}, '{self.spec}') {how}"
        if self._fatal:
            msg += f":\n{self._fatal.rstrip()}"
        return TeacherDiedError(msg)

    def _drain_one(self, timeout: float) -> bool:
        try:
            msg = self._responses.get(timeout=timeout)
        except queue.Empty:
            return False
        except (EOFError, OSError):  # the pipe broke with the child
            return False
        if msg[0] == "fatal":
            self._fatal = msg[1]
        elif msg[0] == "ready":
            self._replies[-1] = msg
        else:
            self._replies[msg[1]] = msg
        return True

    def _await_reply(self, rid_or_ready, *, what: str, timeout: float) -> Any:
        key = -1 if rid_or_ready == "ready" else rid_or_ready
        deadline = time.monotonic() + timeout
        while key not in self._replies:
            if self._fatal is not None or not self._proc.is_alive():
                while key not in self._replies and self._drain_one(0.1):
                    pass  # a reply may have left just before the child did
                if key in self._replies:
                    break
                raise self._death_error()
            if time.monotonic() > deadline:
                raise ChannelTimeout(f"teacher '{self.spec}' did not finish {what} within {timeout:.0f} s")
            self._drain_one(POLL_S)
        msg = self._replies.pop(key)
        if msg[0] == "failed":
            raise TeacherError(msg[2])
        return msg[1] if key == -1 else msg[2]

    def _command(self, kind: str, *payload, what: str, timeout: float = COMMAND_TIMEOUT_S) -> Any:
        self._check_usable()
        rid = self._next_rid
        self._next_rid += 1
        self._requests.put((kind, rid, *payload))
        return self._await_reply(rid, what=what, timeout=timeout)

    # ------------------------------------------------------------------ hidden states

    def submit(self, request: HiddenRequest) -> Ticket:
        """Validate and queue a request; returns at once. See :class:`HiddenRequest`."""
        self._check_usable()
        if self._asleep:
            raise TeacherError("the teacher is asleep: call wake() before asking for hidden states")
        self._check_capacity()
        if not self._proc.is_alive():
            raise self._death_error()
        request.validate(vocab_size=self.vocab_size, max_rows=self.max_rows)
        mask = request.attention_mask.to(torch.int64)
        ids = request.input_ids.to(torch.int64).masked_fill(mask == 0, 0)  # any pad id embeds safely
        vision = image_inputs(request, mask, vision_teacher=bool(self.info.get("vision")), spec=self.spec)
        if vision is not None:
            vision = {k: v.detach().cpu().numpy() for k, v in vision.items()}
        ticket = self._new_ticket(request)
        self._requests.put(("hidden", ticket.seq, ids.cpu().numpy(), mask.cpu().numpy(),
                            request.flat_index().numpy(), vision))
        return self._track(ticket)

    def result(self, ticket: Ticket, timeout: Optional[float] = None) -> torch.Tensor:
        """The ``[rows, hidden]`` view of a ticket's slot (no copy), valid until ``release``."""
        self._check_usable()

        def wait() -> torch.Tensor:
            try:
                return self.channel.wait_full(
                    ticket.seq, peer_alive=self._proc.is_alive, dead=self._death_error,
                    progress_timeout=self.progress_timeout if timeout is None else timeout)
            except ChannelTimeout:
                self._hung = True  # close() will not wait for a graceful exit
                raise

        return self._ticket_view(ticket, wait)

    def release(self, ticket: Ticket) -> None:
        self._check_usable()
        self._release_ticket(ticket)

    # ------------------------------------------------------------------ other services

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int = 128,
                 do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: Optional[int] = None, eos_token_id: Optional[int | list[int]] = None) -> list[list[int]]:
        """Continue each prompt (``[B, L]`` ids + mask, any padding side) in the teacher.

        Returns the new token ids per sample, up to and including the first EOS. ``seed``
        makes sampling reproducible. Runs between hidden-state requests, in submission order.
        """
        # generation would queue behind outstanding tickets anyway; refusing keeps the order explicit
        self._check_no_tickets("generate()")
        HiddenRequest(input_ids, attention_mask, [[] for _ in range(input_ids.shape[0])]).validate(vocab_size=self.vocab_size)
        kwargs = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample), "temperature": float(temperature),
                  "top_p": float(top_p), "top_k": int(top_k), "seed": seed, "eos_token_id": eos_token_id}
        return self._command("generate", input_ids.to(torch.int64).cpu().numpy(),
                             attention_mask.to(torch.int64).cpu().numpy(), kwargs, what="generating",
                             timeout=COMMAND_TIMEOUT_S * 6)

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        """Copy tensors into the teacher's parameters/buffers of the same names (any subset).

        The values travel packed in one shared buffer (one copy, one file descriptor, however
        many tensors). Unknown names or shape mismatches raise :class:`TeacherError` and change
        nothing. Returns the number of tensors updated.
        """
        self._check_usable()
        self._check_no_tickets("update_weights()")
        names, shapes, offsets, total = [], [], [], 0
        for name, t in state_dict.items():
            names.append(name)
            shapes.append(tuple(t.shape))
            offsets.append(total)
            total += t.numel()
        if self.device.startswith("cuda"):
            flat = torch.empty(total, dtype=self.dtype, device=self.device)
        else:
            flat = torch.empty(total, dtype=self.dtype).share_memory_()
        for t, off in zip(state_dict.values(), offsets):
            flat[off:off + t.numel()].copy_(t.detach().reshape(-1))
        return self._command("update", flat, list(zip(names, shapes, offsets)), what="updating weights")

    def sleep(self) -> None:
        """On CUDA: move the weights to CPU and free the cache (colocation). On CPU: nothing
        would be freed, so it only marks the engine asleep (hidden-state requests refused)."""
        self._command("sleep", what="going to sleep")
        self._asleep = True

    def wake(self) -> None:
        self._command("wake", what="waking up")
        self._asleep = False

    def lm_head(self, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """``[V, H]`` head read alone from the checkpoint (from the converted folder for GGUFs,
        which is faster than dequantizing), cached per engine."""
        if self._head is None:
            # A GGUF teacher's converted folder is faster to read than dequantizing; use it once
            # the child has made it, else read the checkpoint itself (no need to wait for the load).
            self._head = models.load_lm_head(self.info.get("folder") or self.spec, dtype=self.dtype)
        return self._head if dtype is None else self._head.to(models.torch_dtype(dtype))

