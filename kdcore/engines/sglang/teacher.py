"""The ``sglang`` teacher engine: an SGLang server prefills, the student reads hidden rows.

**Status: never run; its contracts are checked against sglang 0.5.23's own code on CPU**
(tests/integration/test_sglang_contracts.py; what that covers: ``README.md`` in this folder; the
first real run: ``checks/gpu/gpu_check_sglang.py``).

How it works (all facts below were read from the sglang 0.5.23 wheel; line references are to
that source):

- **One server per node.** kdflow starts ``python -m sglang.launch_server`` in its own
  session (or connects to ``teacher.sglang.server_url``) and talks HTTP to it. SGLang never
  enters the trainer process: importing it patches transformers, forces the ``spawn`` start
  method and installs uvloop, none of which the student should inherit.
- **Requests are token ids, prefill only.** ``/generate`` with ``input_ids`` (padding removed,
  one prompt per sample that has loss positions), ``return_hidden_states: true``. The server
  runs with ``--skip-tokenizer-init`` (ids in, no text out), ``--enable-return-hidden-states``,
  ``--disable-radix-cache`` (a cached prefix is not recomputed, so its positions would be
  missing: ``extend_input_len`` excludes it), ``--chunked-prefill-size -1`` (for a chunked
  prompt ``_append_prefill_hidden_states`` stores only the last chunk: middle chunks run with
  ``store=False``) and ``--disable-overlap-schedule`` (overlap scheduling copies the hidden
  states to host memory before results are processed, ``GenerationBatchResult.copy_to_cpu``).
- **Which states.** For Llama/Mistral/Qwen2/Qwen3(-MoE) the model passes
  ``residual_batch.final_norm(...)`` output to the logits processor, which stores it as
  ``hidden_states``: after the final norm, before ``lm_head`` — what kdflow needs. Models with a
  ``hidden_states_before_norm`` path (DeepSeek-V4, MiMo-V2, ...) return pre-norm states
  instead, so only the verified architectures are accepted (:data:`VERIFIED_ARCHITECTURES`),
  and at start a probe checks that returned rows have unit RMS once divided by the final
  norm's weight (:func:`check_post_norm`), which pre-norm residual streams do not.
- **Transport ``hook`` (fast; the default when available).** SGLang's own return path turns
  every hidden state into Python floats (``.cpu().clone().tolist()`` per request), pickles
  them through two processes and JSON-encodes them: ~100x the cost of the prefill itself. So
  kdflow registers a *SGLang plugin* (``kdflow_sglang_plugin`` = :mod:`kdcore.engines.sglang.hook`; entry point group
  ``sglang.srt.plugins``, SGLang's own mechanism, loaded by every server process; inert unless ``KDFLOW_SGLANG_HOOK=1`` is set in
  the server's environment and the installed version is the pinned one). It wraps exactly one
  method, ``SchedulerBatchResultProcessor._append_prefill_hidden_states``: for requests that
  carry kdflow's ``custom_params`` it gathers the requested positions from the GPU tensor and
  copies them into the destination named in the request — the student's channel slot, opened
  through a CUDA IPC handle (same node) — writes a per-sample status word, synchronises, and
  returns without storing anything; every other request goes to SGLang's original method.
  So rows go GPU to GPU in one gather+copy, never through the host.
- **Transport ``lists``** (no plugin needed, exact, slow): the same request with
  ``max_new_tokens: 1`` (with 0, the output streamer cuts the stored states to the finished
  length 0) and rows parsed from ``meta_info.hidden_states``. ``auto`` probes the hook at start
  and falls back to lists, with a warning, when the server does not run it.
- **Colocation.** With ``teacher.sglang.colocate`` the server runs with SGLang's memory saver
  (``--enable-memory-saver --enable-weights-cpu-backup``): :meth:`SGLangTeacher.sleep` /
  :meth:`~SGLangTeacher.wake` call ``/release_memory_occupation`` / ``/resume_memory_occupation``
  (weights are backed up in host memory, the KV cache is dropped); rows already read stay in
  kdflow's channel slots across a sleep. :class:`kdcore.engines.colocation.Colocation` wraps a
  teacher phase (the trainer runs one per step), optionally moving the student's optimizer
  state to the host meanwhile.
"""

from __future__ import annotations

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch

from kdcore.infra.channel import Channel, ChannelClosed, TeacherDiedError
from kdcore.engines.colocation import Colocation
from kdcore.engines.protocol import HiddenRequest, TeacherEngine, TeacherError, Ticket
from kdcore.engines.sglang.config import (HOOK_ENV, SGLANG_VERSION, SGLangConfig, check_architecture, check_cuda,
                                          check_version, installed_version)
from kdcore.engines.sglang.hook import (ACTIVE_LINE, K_DEST, K_LEN, K_POS, K_ROW, K_SAMPLE, K_SLOT,
                                        ST_BAD_POSITION, ST_FAILED, ST_NOT_FULL, ST_PARTIAL, ST_PENDING)
from kdcore.engines.sglang.ipc import cuda_ipc_payload, push_weights
from kdcore.engines.sglang.server import (REQUEST_TIMEOUT_S, START_TIMEOUT_S, SGLangServer, cut_at_eos, free_port,
                                          local_rank_and_world, read_config, sampling_params,
                                          server_kwargs)

log = logging.getLogger(__name__)

POST_NORM_TOL = 0.15  # |mean((h / w)^2) - 1| allowed for final-norm outputs in bf16


# ============================================================================ requests


@dataclass
class PromptBatch:
    """A :class:`HiddenRequest` as SGLang prompts.

    prompts      token ids of each sent sample, padding removed (samples without loss
                 positions are not sent at all)
    positions    per sent sample, indices into its prompt, in the request's order
    row_offsets  first output row of each sent sample (rows follow HiddenRequest order)
    samples      index in the request of each sent sample
    rows         total output rows ``N``
    """

    prompts: list[list[int]]
    positions: list[list[int]]
    row_offsets: list[int]
    samples: list[int]
    rows: int


def build_prompts(request: HiddenRequest) -> PromptBatch:
    """Unpadded prompts and prompt-relative positions for a (validated) request.

    A position ``p`` of sample ``b`` becomes the index of token ``p`` among the sample's real
    tokens (``cumsum(mask) - 1``): left, right or interior padding all map to the same prompt,
    as the hf engine's ``position_ids = cumsum(mask) - 1`` computes the same states.
    """
    ids = request.input_ids.detach().to("cpu", torch.int64)
    mask = request.attention_mask.detach().to("cpu").bool()
    rank = mask.to(torch.int64).cumsum(-1) - 1
    prompts, positions, offsets, samples = [], [], [], []
    row = 0
    for b, pos in enumerate(request.positions):
        pos = [int(p) for p in pos]
        if not pos:
            continue
        prompts.append(ids[b][mask[b]].tolist())
        positions.append(rank[b, torch.tensor(pos, dtype=torch.int64)].tolist())
        offsets.append(row)
        samples.append(b)
        row += len(pos)
    return PromptBatch(prompts, positions, offsets, samples, row)


def reference_rows(states: Sequence[torch.Tensor], batch: PromptBatch) -> torch.Tensor:
    """``[N, H]``: each sent sample's full ``[len(prompt), H]`` states gathered at its positions,
    stacked in row order (what the channel slot must hold)."""
    parts = [s[torch.tensor(p, dtype=torch.int64, device=s.device)] for s, p in zip(states, batch.positions)]
    if not parts:
        return torch.zeros(0, 0)
    return torch.cat(parts)


def hidden_request_body(batch: PromptBatch, *, transport: str, dest: Optional[str] = None, slot: int = 0) -> dict:
    """The ``/generate`` JSON body for one micro-batch (``transport`` ``hook`` or ``lists``)."""
    if transport not in ("hook", "lists"):
        raise ValueError(f"transport must be 'hook' or 'lists', got '{transport}'")
    params = []
    for k, (prompt, pos) in enumerate(zip(batch.prompts, batch.positions)):
        if transport == "hook":
            # max_new_tokens 0: prefill only, no sampling; the hook has written rows by then
            params.append({"max_new_tokens": 0, "custom_params": {
                K_DEST: dest, K_SLOT: int(slot), K_ROW: int(batch.row_offsets[k]), K_SAMPLE: k,
                K_POS: [int(p) for p in pos], K_LEN: len(prompt)}})
        else:
            # 1, not 0: the output streamer keeps hidden_states[:finished_len] (0 for a prefill-only request)
            params.append({"max_new_tokens": 1, "temperature": 0.0})
    return {"input_ids": batch.prompts, "sampling_params": params, "return_hidden_states": True}


def parse_lists(outputs: Sequence[Mapping[str, Any]], batch: PromptBatch) -> list[torch.Tensor]:
    """``[len(prompt), H]`` float32 states per sent sample from SGLang's ``meta_info``.

    Raises :class:`TeacherError` when SGLang returned states for fewer tokens than the prompt
    (chunked prefill, a cached prefix) or none at all.
    """
    if len(outputs) != len(batch.prompts):
        raise TeacherError(f"sglang returned {len(outputs)} outputs for {len(batch.prompts)} prompts")
    states = []
    for k, out in enumerate(outputs):
        hs = (out.get("meta_info") or {}).get("hidden_states")
        if not hs:
            raise TeacherError(f"sglang returned no hidden states for prompt {k} (server started without "
                               f"--enable-return-hidden-states?)")
        block = torch.tensor(hs[0], dtype=torch.float32)
        n = len(batch.prompts[k])
        if block.dim() != 2 or block.shape[0] != n:
            raise TeacherError(f"sglang returned hidden states of shape {tuple(block.shape)} for a prompt of {n} tokens "
                               f"(chunked prefill or a radix-cached prefix drops positions: the server needs "
                               f"--chunked-prefill-size -1 --disable-radix-cache)")
        states.append(block)
    return states


def check_status(codes: Sequence[int], batch: PromptBatch) -> None:
    """Raise :class:`TeacherError` naming the first sample the hook did not fill completely."""
    for k, (code, pos) in enumerate(zip(codes, batch.positions)):
        code = int(code)
        if code == len(pos):
            continue
        sample = batch.samples[k]
        if code == ST_PENDING:
            raise TeacherError(f"the SGLang server did not run kdflow's hidden-state hook (sample {sample}): install "
                               f"kdflow in the server's environment and start it with {HOOK_ENV}=1 "
                               f"(`python -m kdcore.engines.sglang.cli serve ...` does both), or set "
                               f"teacher.sglang.transport=lists (slow)")
        if code == ST_PARTIAL:
            raise TeacherError(f"sample {sample}: the server prefilled only part of the prompt (chunked prefill or a "
                               f"radix-cached prefix); it must run with --chunked-prefill-size -1 --disable-radix-cache")
        if code == ST_BAD_POSITION:
            raise TeacherError(f"sample {sample}: a requested position lies outside its {len(batch.prompts[k])}-token prompt")
        if code == ST_NOT_FULL:
            raise TeacherError("the server captures only the last position's hidden state; start it with "
                               "--enable-return-hidden-states (or --return-hidden-states-mode full)")
        if code == ST_FAILED:
            raise TeacherError(f"sample {sample}: kdflow's hook failed inside the SGLang server (see the server log)")
        raise TeacherError(f"sample {sample}: the hook wrote {code} rows, {len(pos)} were asked for")


def hook_diagnosis(log_text: str, log_path: Optional[str] = None) -> str:
    """Why the server did not run kdflow's hook, from its log: SGLang's own plugin-loader
    errors ("Failed to load plugin ...", with the traceback's last line), the plugin's own
    warnings, or the absence of its :data:`ACTIVE_LINE`. One line."""
    lines = log_text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if "kdflow" in line or "Failed to load plugin" in line or "Failed to execute general plugin" in line \
                or "Failed to apply hooks" in line:
            if ACTIVE_LINE in line:
                continue
            found.append(line.strip())
            tail = next((x.strip() for x in lines[i + 1:i + 60] if x and not x.startswith((" ", "Traceback"))), None)
            if tail and "Error" in tail:
                found.append(tail)
    where = f" (server log {log_path})" if log_path else ""
    if found:
        return "the sglang server did not run kdflow's hidden-state hook; its log says: " + " | ".join(found[:4]) + where
    if ACTIVE_LINE in log_text:
        return ("the sglang server registered kdflow's hidden-state hook but did not run it for the probe request "
                f"(--enable-return-hidden-states missing?){where}")
    return (f"the sglang server did not run kdflow's hidden-state hook: no '{ACTIVE_LINE}' line in its log{where}: "
            f"install kdflow in the server's environment and start it with {HOOK_ENV}=1 "
            f"(`python -m kdcore.engines.sglang.cli serve ...` does both)")


def check_post_norm(rows: torch.Tensor, norm_weight: torch.Tensor, tol: float = POST_NORM_TOL) -> float:
    """Check ``[n, H]`` rows look like RMSNorm outputs with weight ``norm_weight`` ``[H]``.

    ``y = x / rms(x) * w`` gives ``mean((y / w)^2) = 1`` per row (minus a tiny eps term); a
    pre-norm residual stream has no reason to. Channels with ``|w|`` under 1% of its largest
    entry are left out (dividing by them amplifies rounding). Returns the worst deviation;
    raises :class:`TeacherError` above ``tol``. A sanity check, not a proof: a pre-norm stream
    that happens to have unit RMS would pass.
    """
    w = norm_weight.detach().float().reshape(-1)
    r = rows.detach().float().reshape(-1, w.numel())
    keep = w.abs() > 0.01 * w.abs().max()
    ms = ((r[:, keep] / w[keep]) ** 2).mean(-1)
    dev = float((ms - 1).abs().max()) if ms.numel() else 0.0
    if dev > tol:
        raise TeacherError(f"the server's hidden states are not final-norm outputs (mean((h/w)^2) per row: "
                           f"{[round(float(v), 3) for v in ms[:4]]}, expected 1): this architecture returns "
                           f"pre-norm states in SGLang {SGLANG_VERSION}; use teacher.engine=hf")
    return dev


def load_norm_weight(folder: str) -> Optional[torch.Tensor]:
    """The final norm's weight ``[H]`` read alone from a safetensors folder (None when absent)."""
    from safetensors import safe_open

    names = ("model.norm.weight", "model.language_model.norm.weight", "norm.weight")
    index = os.path.join(folder, "model.safetensors.index.json")
    files = []
    if os.path.isfile(index):
        with open(index) as f:
            wmap = json.load(f).get("weight_map", {})
        files = [(n, os.path.join(folder, wmap[n])) for n in names if n in wmap]
    elif os.path.isfile(os.path.join(folder, "model.safetensors")):
        files = [(n, os.path.join(folder, "model.safetensors")) for n in names]
    for name, path in files:
        with safe_open(path, framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    return None


# ============================================================================ the engine


class SGLangTeacher(TeacherEngine):
    """Teacher engine backed by an SGLang server (see the module docstring).

    Args:
        teacher_cfg: the recipe's ``teacher`` section (path, dtype, ``sglang`` sub-section).
        max_rows: rows per channel slot = the most hidden states one request may ask for.
        n_slots: channel depth (2: the server fills batch k+1 while the student uses k).
        device: where the channel lives = the student's device (default: the current CUDA
            device, which :func:`kdcore.infra.distributed.init_distributed` sets per rank).
        progress_timeout: seconds one request may take before it counts as hung.
        start_timeout: seconds for the server to come up.

    With several ranks on a node, local rank 0 starts the server on ``teacher.sglang.port``
    (which must then be set) and every rank connects to it; or all connect to
    ``teacher.sglang.server_url``. Each rank has its own channel; the hook writes each rank's
    rows into that rank's slot.
    """

    def __init__(self, teacher_cfg: Any, *, max_rows: int, n_slots: int = 2, device: Optional[str] = None,
                 progress_timeout: float = REQUEST_TIMEOUT_S, start_timeout: float = START_TIMEOUT_S,
                 seed: int = 0, cache_dir: Optional[str] = None):
        from kdcore.modeling.models import torch_dtype

        self.cfg = teacher_cfg
        self.scfg = getattr(teacher_cfg, "sglang", None) or SGLangConfig()
        # teacher.sglang.colocate: the server shares the GPUs with the student and is woken for
        # teacher phases only (sleep/wake release and resume its memory)
        self.colocated = bool(getattr(self.scfg, "colocate", False))
        self.offloads_optimizer = self.colocated and bool(getattr(self.scfg, "offload_optimizer", False))
        self.spec = str(teacher_cfg.path)
        self.dtype = torch_dtype(getattr(teacher_cfg, "dtype", "bfloat16"))
        self.max_rows = int(max_rows)
        self.n_slots = int(n_slots)
        self.device = device
        self.progress_timeout = progress_timeout
        self.start_timeout = start_timeout
        self.seed = seed
        self.cache_dir = cache_dir
        self.transport = str(getattr(self.scfg, "transport", "auto"))
        self.server: Optional[SGLangServer] = None
        self.owns_server = False
        self.folder: Optional[str] = None
        self._started = self._closed = self._asleep = False
        self._init_tickets()
        self._jobs: "queue.Queue[Optional[tuple]]" = queue.Queue()
        self._worker: Optional[threading.Thread] = None
        self._fatal: Optional[BaseException] = None
        self._head: Optional[torch.Tensor] = None
        self._lock = threading.Lock()  # one HTTP conversation at a time (worker vs generate/sleep/...)
        self.info: dict[str, Any] = {}
        self.stats = {"requests": 0, "prompt_tokens": 0, "server_s": 0.0}

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "SGLangTeacher":
        if self._started:
            return self
        if self._closed:
            raise TeacherError("this teacher engine was closed; build a new one")
        check_cuda()
        if self.scfg.server_url is None:
            check_version(installed_version())
        from kdcore.modeling import models

        self.folder = models.loadable_path(self.spec, self.cache_dir)[0]
        config = read_config(self.folder)
        arch = check_architecture(config.get("text_config") or config, f"teacher '{self.spec}'")
        dims = models.model_dims(self.folder)
        self.hidden_size, self.vocab_size = dims["hidden_size"], dims["vocab_size"]
        dev = torch.device(self.device) if self.device else torch.device("cuda", torch.cuda.current_device())
        self.channel = Channel(self.max_rows, self.hidden_size, n_slots=self.n_slots, dtype=self.dtype, device=dev)
        self.channel.attach_consumer()
        self.channel.attach_producer()  # the worker thread of this process fills the slots
        # the hook writes into a CUDA buffer: the channel itself on GPU, else a staging copy of it
        self._dest = self.channel.data if dev.type == "cuda" else torch.empty_like(self.channel.data, device="cuda")
        self._status = torch.full((self.n_slots, self.max_rows), ST_PENDING, dtype=torch.int64, device=self._dest.device)
        self._payload = cuda_ipc_payload((self._dest, self._status))
        self._connect()
        self._started = True
        try:
            self._probe(arch)
        except BaseException:
            self.close()
            raise
        self._worker = threading.Thread(target=self._work, name="kdflow-sglang-teacher", daemon=True)
        self._worker.start()
        return self

    def _connect(self) -> None:
        s = self.scfg
        local_rank, local_world = local_rank_and_world()
        if s.server_url:
            self.server = SGLangServer.connect(s.server_url, timeout=self.start_timeout)
            return
        if local_world > 1 and not s.port:
            raise TeacherError(f"{local_world} ranks on this node share one sglang server: set teacher.sglang.port "
                               f"(local rank 0 starts it there) or teacher.sglang.server_url")
        port = int(s.port) or free_port()
        if local_rank == 0:
            dtype = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[self.dtype]
            kw = server_kwargs(s, model_path=self.folder, dtype=dtype, max_rows=self.max_rows * max(1, local_world),
                               port=port, seed=self.seed, role="teacher")
            self.server = SGLangServer.start(kw, timeout=self.start_timeout)
            self.owns_server = True
        else:
            self.server = SGLangServer.connect(f"http://127.0.0.1:{port}", timeout=self.start_timeout)

    def _probe(self, arch: str) -> None:
        """One tiny request: decide the transport (auto) and check the states are post-norm."""
        n = min(8, self.vocab_size - 1, self.max_rows)
        ids = torch.arange(1, n + 1).unsqueeze(0)
        req = HiddenRequest(ids, torch.ones_like(ids), [list(range(n))])
        batch = build_prompts(req)
        rows = None
        if self.transport in ("auto", "hook"):
            slot = self.channel.slot_of(0)
            self._status[slot].fill_(ST_PENDING)
            torch.cuda.synchronize(self._status.device)
            self._post_hidden(batch, "hook", slot)
            codes = self._status[slot, :len(batch.prompts)].tolist()
            if codes[0] == ST_PENDING:
                why = hook_diagnosis(self.server.log_tail(2000), self.server.log_path)
                if self.transport == "hook":
                    raise TeacherError(f"teacher.sglang.transport=hook, but {why}")
                log.warning("KDFLOW HOOK NOT LOADED: %s. Falling back to the 'lists' transport (exact, ~100x "
                            "slower); set teacher.sglang.transport=hook to make this an error", why)
                self.info["hook_error"] = why
                self.transport = "lists"
            else:
                check_status(codes, batch)
                self.transport = "hook"
                rows = self._dest[slot, :batch.rows].float().cpu()
        if self.transport == "lists":
            rows = reference_rows(parse_lists(self._post_hidden(batch, "lists", 0), batch), batch)
        norm = load_norm_weight(self.folder) if os.path.isdir(self.folder or "") else None
        dev = check_post_norm(rows, norm) if norm is not None else None
        self.info = {**self.info, "architecture": arch, "transport": self.transport, "url": self.server.url,
                     "owns_server": self.owns_server, "post_norm_deviation": dev, "folder": self.folder,
                     "log": self.server.log_path}

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._started:
            self.channel.close()
            self._jobs.put(None)
        if self.server is not None and self.owns_server:
            self.server.close()
        if self._worker is not None:
            self._worker.join(5.0)

    def _check_usable(self) -> None:
        if not self._started:
            raise TeacherError("the teacher engine is not started (call start() or use it as a context manager)")
        if self._closed:
            raise TeacherError("the teacher engine is closed")

    # ------------------------------------------------------------------ the worker (producer side)

    def _post_hidden(self, batch: PromptBatch, transport: str, slot: int) -> list:
        body = hidden_request_body(batch, transport=transport, dest=self._payload, slot=slot)
        t0 = time.perf_counter()
        with self._lock:
            out = self.server.call("/generate", body, timeout=self.progress_timeout)
        self.stats["server_s"] += time.perf_counter() - t0
        self.stats["requests"] += 1
        self.stats["prompt_tokens"] += sum(len(p) for p in batch.prompts)
        return out if isinstance(out, list) else [out]

    def _work(self) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                seq, batch = job
                buf = self.channel.acquire_write(seq)  # the slot must be free before the server writes it
                slot = self.channel.slot_of(seq)
                if batch.prompts:
                    if self.transport == "hook":
                        self._status[slot, :len(batch.prompts)].fill_(ST_PENDING)
                        torch.cuda.synchronize(self._status.device)
                        self._post_hidden(batch, "hook", slot)
                        check_status(self._status[slot, :len(batch.prompts)].tolist(), batch)
                        if self._dest.data_ptr() != self.channel.data.data_ptr():
                            buf[:batch.rows].copy_(self._dest[slot, :batch.rows])  # CPU channel: one D2H copy
                    else:
                        states = parse_lists(self._post_hidden(batch, "lists", slot), batch)
                        buf[:batch.rows].copy_(reference_rows(states, batch))
                self.channel.commit(seq, batch.rows)
        except ChannelClosed:
            return
        except BaseException as exc:  # noqa: BLE001 - reported to the consumer by _death_error
            self._fatal = exc

    def _worker_alive(self) -> bool:
        return self._fatal is None and self._worker is not None and self._worker.is_alive() and self.server.alive()

    def _death_error(self) -> Exception:
        if self._fatal is not None:
            if isinstance(self._fatal, TeacherDiedError):
                return self._fatal
            return TeacherDiedError(f"sglang teacher failed: {type(self._fatal).__name__}: {self._fatal}")
        if not self.server.alive():
            return self.server.death_error()
        return TeacherDiedError("the sglang teacher's worker thread stopped")

    # ------------------------------------------------------------------ hidden states (consumer side)

    def submit(self, request: HiddenRequest) -> Ticket:
        self._check_usable()
        if self._asleep:
            raise TeacherError("the teacher is asleep: call wake() before asking for hidden states")
        self._check_capacity()
        if not self._worker_alive():
            raise self._death_error()
        request.validate(vocab_size=self.vocab_size, max_rows=self.max_rows)
        ticket = self._new_ticket(request)
        self._jobs.put((ticket.seq, build_prompts(request)))
        return self._track(ticket)

    def result(self, ticket: Ticket, timeout: Optional[float] = None) -> torch.Tensor:
        self._check_usable()
        return self._ticket_view(ticket, lambda: self.channel.wait_full(
            ticket.seq, peer_alive=self._worker_alive, dead=self._death_error,
            progress_timeout=self.progress_timeout if timeout is None else timeout))

    def release(self, ticket: Ticket) -> None:
        self._check_usable()
        self._release_ticket(ticket)

    # ------------------------------------------------------------------ other services

    def _idle(self, what: str) -> None:
        self._check_usable()
        self._check_no_tickets(what)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *, max_new_tokens: int = 128,
                 do_sample: bool = True, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
                 seed: Optional[int] = None, eos_token_id: Optional[int | list[int]] = None) -> list[list[int]]:
        """Continue each prompt in the teacher (SeqKD); new ids per sample, up to and
        including the first EOS. Same contract as :meth:`kdcore.engines.hf.HFTeacher.generate`,
        except that ``seed`` only takes effect when the server runs SGLang's deterministic mode
        (``server_args: {enable_deterministic_inference: true}``)."""
        self._idle("generate()")
        HiddenRequest(input_ids, attention_mask, [[] for _ in range(input_ids.shape[0])]).validate(
            vocab_size=self.vocab_size)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        params = [sampling_params(max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                                  top_p=top_p, top_k=top_k, eos_ids=eos,
                                  seed=None if seed is None else seed + i) for i in range(len(prompts))]
        if not eos:  # like the hf engine: no ids given = the model's own EOS (sglang's default)
            for p in params:
                p.pop("ignore_eos", None)
        with self._lock:
            out = self.server.call("/generate", {"input_ids": prompts, "sampling_params": params},
                                   timeout=self.progress_timeout * 6)
        return [cut_at_eos(o["output_ids"], eos) for o in (out if isinstance(out, list) else [out])]

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        """Copy tensors (HF names, any subset) into the served teacher through SGLang's
        ``/update_weights_from_tensor``; CPU tensors are moved to the channel's GPU first.
        With several ranks per server, every rank calls it (collective) and local rank 0
        sends; the others wait until the server has the new weights."""
        self._idle("update_weights()")
        if local_rank_and_world()[0] == 0:
            push_weights(self.server, state_dict, tp_size=int(self.scfg.tp_size), device=self._dest.device,
                         dtype=self.dtype, lock=self._lock)
        Colocation._barrier()
        return len(state_dict)

    def sleep(self) -> None:
        """Release the server's GPU memory (weights backed up in host memory, KV cache dropped).
        Only with ``teacher.sglang.colocate`` and only by the rank that started the server
        (other ranks: no-op; synchronise ranks around it, see :class:`Colocation`)."""
        # rows already read stay valid: the channel slots are kdflow's, not SGLang's memory pool
        self._check_usable()
        self._check_all_read("sleep()")
        if self.scfg.colocate and self.owns_server and not self._asleep:
            with self._lock:
                self.server.call("/release_memory_occupation", {"tags": None})
        self._asleep = True

    def wake(self) -> None:
        self._check_usable()
        if self.scfg.colocate and self.owns_server and self._asleep:
            with self._lock:
                self.server.call("/resume_memory_occupation", {"tags": None})
        self._asleep = False

    def lm_head(self, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        from kdcore.modeling import models

        if self._head is None:
            self._head = models.load_lm_head(self.folder or self.spec, dtype=self.dtype)
        return self._head if dtype is None else self._head.to(models.torch_dtype(dtype))
