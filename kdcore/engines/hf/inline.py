"""The ``inline`` teacher engine: the transformers teacher in the trainer's own process.

The ``hf`` engine runs the teacher in a second process, so that its forward for micro-batch
k+1 overlaps the student's step on k. That process is a second interpreter with torch and
transformers: about 0.35 GB before it holds a weight (``bench/README.md``, memory breakdown).
This engine loads the same :class:`kdcore.engines.hf.model.TeacherModel` in the trainer's
process instead and computes each request when it is submitted: no second runtime, no channel,
no overlap. It is the default teacher engine (:data:`kdcore.engines.factory.DEFAULT_TEACHER_ENGINE`
says why); ``bench/README.md`` measures both.

The teacher's work shares the process's RNG and thread pool with the student, so the engine
keeps each to itself: ``generate`` samples under a forked RNG (a seeded teacher sample leaves the
trainer's random stream as the ``hf`` engine's would), and ``threads`` (``teacher.threads``) is
set only around the teacher's own calls. The head the teacher computes with is offered to the
trainer (:meth:`resident_head`), so a tied teacher's ``[V, H]`` matrix is held once.

The ticket contract is the protocol's (at most ``n_slots`` outstanding, each result valid until
release), so the trainer's schedule drives both engines alike. Results are plain tensors that
no autograd graph saves (computed under ``no_grad``), released by dropping them.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Optional

import torch

from kdcore.engines.hf.model import TeacherModel, image_inputs, resolve_device
from kdcore.engines.protocol import HiddenRequest, TeacherEngine, TeacherError, Ticket
from kdcore.modeling import models
from kdcore.modeling.models import torch_dtype


class InlineTeacher(TeacherEngine):
    """transformers teacher in this process: text and vision-language models, CPU or CUDA.

    Args:
        spec: hub id, local folder, ``.gguf`` file or ``pkg://`` spec, as for ``hf``.
        dtype: compute dtype of the teacher and of its hidden states.
        device: ``cpu``, ``cuda[:i]``.
        threads: torch threads for the teacher's calls (None or 0: this process's own).
        max_rows: the most hidden-state rows one request may ask for (as ``hf``'s slots hold).
        n_slots: results held at once (2: the schedule submits k+1 before releasing k).
        cache_dir: where converted GGUF folders live (default ``~/.cache/kdflow``).
    """

    accepts_vision = True

    def __init__(self, spec: str, *, dtype: str | torch.dtype = "float32", device: str = "cpu",
                 threads: Optional[int] = None, max_rows: int = 8192, n_slots: int = 2,
                 cache_dir: Optional[str] = None, attn_implementation: Optional[str] = None):
        self.spec = str(spec)
        self.dtype = torch_dtype(dtype)
        self.device = device
        self.threads = int(threads or 0)
        self.max_rows = int(max_rows)
        self.n_slots = int(n_slots)
        self.cache_dir = cache_dir
        self.attn_implementation = attn_implementation
        self._teacher: Optional[TeacherModel] = None
        self._closed = False
        self._init_tickets()
        self._rows: dict[int, torch.Tensor] = {}
        self.info: dict[str, Any] = {}

    def start(self) -> "InlineTeacher":
        if self._closed:
            raise TeacherError("this teacher engine was closed; build a new one")
        if self._teacher is None:
            self.device = resolve_device(self.device)
            with self._own_threads():
                self._teacher = TeacherModel(self.spec, dtype=self.dtype, device=self.device,
                                             cache_dir=self.cache_dir, attn_implementation=self.attn_implementation)
            self.hidden_size, self.vocab_size = self._teacher.hidden_size, self._teacher.vocab_size
            self.info = {"hidden_size": self.hidden_size, "vocab_size": self.vocab_size, "folder": self._teacher.folder,
                         "device": self.device, "threads": self.threads or torch.get_num_threads(),
                         "vision": self._teacher.vision, "in_process": True}
        return self

    @contextmanager
    def _own_threads(self) -> Iterator[None]:
        """``threads`` for the teacher's call, the trainer's count back after it."""
        before = torch.get_num_threads()
        if not self.threads or self.threads == before:
            yield
            return
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def close(self) -> None:
        """Drop the model and every result; idempotent."""
        self._closed = True
        self._teacher = None
        self._rows.clear()
        self._outstanding.clear()
        self._read.clear()

    def _model(self) -> TeacherModel:
        if self._closed:
            raise TeacherError("the teacher engine is closed")
        if self._teacher is None:
            raise TeacherError("the teacher engine is not started (call start() or use it as a context manager)")
        return self._teacher

    def submit(self, request: HiddenRequest) -> Ticket:
        """Validate and compute a request now; the rows wait for :meth:`result`."""
        teacher = self._model()
        self._check_capacity()
        request.validate(vocab_size=self.vocab_size, max_rows=self.max_rows)
        mask = request.attention_mask.to(torch.int64)
        ids = request.input_ids.to(torch.int64).masked_fill(mask == 0, 0)  # any pad id embeds safely
        images = image_inputs(request, mask, vision_teacher=teacher.vision, spec=self.spec)
        dev = self.device if self.device != "cpu" else None
        if dev:
            ids, mask = ids.to(dev), mask.to(dev)
        flat = request.flat_index().to(ids.device)
        # no_grad, not inference_mode: an aligner may use the rows in its own autograd graph
        with torch.no_grad(), self._own_threads():
            h = teacher.last_hidden(ids, mask, images)
            rows = h.reshape(-1, h.shape[-1]).index_select(0, flat)
        del h
        ticket = self._new_ticket(request)
        self._rows[ticket.seq] = rows
        return self._track(ticket)

    def result(self, ticket: Ticket, timeout: Optional[float] = None) -> torch.Tensor:
        """The ticket's ``[rows, hidden]`` tensor, valid until ``release`` (``timeout`` is moot:
        the rows were computed at submit)."""
        self._model()
        self._check_outstanding(ticket, "released already, or from another engine")
        self._read.add(ticket.seq)
        return self._rows[ticket.seq]

    def release(self, ticket: Ticket) -> None:
        self._model()
        self._check_outstanding(ticket, "released twice?")
        del self._rows[ticket.seq], self._outstanding[ticket.seq]
        self._read.discard(ticket.seq)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int = 128,
                 do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: Optional[int] = None, eos_token_id: Optional[int | list[int]] = None) -> list[list[int]]:
        """As :meth:`kdcore.engines.hf.teacher.HFTeacher.generate`."""
        teacher = self._model()
        self._check_no_tickets("generate()")
        HiddenRequest(input_ids, attention_mask, [[] for _ in range(input_ids.shape[0])]).validate(vocab_size=self.vocab_size)
        kw = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample), "temperature": float(temperature),
              "top_p": float(top_p), "top_k": int(top_k), "seed": seed, "eos_token_id": eos_token_id}
        index = None if self.device == "cpu" else torch.device(self.device).index
        on_gpu = [] if self.device == "cpu" else [torch.cuda.current_device() if index is None else index]
        with torch.random.fork_rng(devices=on_gpu), self._own_threads():
            return teacher.generate(input_ids.to(torch.int64).cpu(), attention_mask.to(torch.int64).cpu(), kw)

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        """As :meth:`kdcore.engines.hf.teacher.HFTeacher.update_weights` (values are copied)."""
        teacher = self._model()
        self._check_no_tickets("update_weights()")
        error, count = teacher.update((name, t.detach()) for name, t in state_dict.items())
        if error:
            raise TeacherError(error)
        return count

    def lm_head(self, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """``[V, H]`` head read alone from the checkpoint, as the ``hf`` engine gives it."""
        head = models.load_lm_head(self.info.get("folder") or self.spec, dtype=self.dtype)
        return head if dtype is None else head.to(torch_dtype(dtype))

    def resident_head(self) -> torch.Tensor:
        """The output projection the teacher computes with (no copy, no gradient)."""
        return self._model().model.get_output_embeddings().weight.detach()


__all__ = ["InlineTeacher"]
