"""The ``sglang`` teacher engine: an SGLang server prefills, the student reads hidden rows.

**Status: written against SGLang 0.5.23's source and never run.** Nothing in this module has
executed on a GPU or against a live SGLang server (the development machines have no GPU, and
SGLang does not install there). Everything that runs without SGLang — request building, row
bookkeeping, server flags, version/CUDA/architecture checks, the status protocol, the hook's
row writing (on CPU tensors), the post-norm check, optimizer offload — is tested on CPU in
``tests/test_sglang_engine.py``; ``bench/gpu_check.sh`` part (b) is the first real run.

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
  kdflow registers a *SGLang plugin* (entry point group ``sglang.srt.plugins``, SGLang's own
  mechanism, loaded by every server process; inert unless ``KDFLOW_SGLANG_HOOK=1`` is set in
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
  kdflow's channel slots across a sleep. :class:`kdcore.teacher.colocation.Colocation` wraps a
  teacher phase (the trainer runs one per step), optionally moving the student's optimizer
  state to the host meanwhile.
"""

from __future__ import annotations

import atexit
import base64
import difflib
import io
import json
import logging
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

from kdcore.channel import Channel, ChannelClosed, ChannelTimeout, TeacherDiedError
from kdcore.teacher import HiddenRequest, TeacherEngine, TeacherError, Ticket
# engine-agnostic; re-exported here for the GPU check script and the tests
from kdcore.teacher.colocation import Colocation, offload_optimizer_state

log = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"  # the one version this module was written against (pyproject's extra pins it)
HOOK_ENV = "KDFLOW_SGLANG_HOOK"  # "1" in a server's environment activates kdflow's plugin there
ANY_VERSION_ENV = "KDFLOW_SGLANG_ANY_VERSION"  # "1": try another sglang version anyway (unsupported)
ANY_ARCH_ENV = "KDFLOW_SGLANG_ANY_ARCH"  # "1": accept an unverified architecture (the probe still checks)
HOOK_TARGET = ("sglang.srt.managers.scheduler_components.batch_result_processor."
               "SchedulerBatchResultProcessor._append_prefill_hidden_states")

# Architectures whose SGLang 0.5.23 model class hands the final-norm output to the logits
# processor (llama.py, mistral.py (a LlamaForCausalLM), qwen2.py, qwen3.py, qwen3_moe.py).
VERIFIED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                          "Qwen3MoeForCausalLM")

# sglang 0.5.23 srt/arg_groups/choices.py QUANTIZATION_CHOICES, so recipes fail at validation
# rather than minutes later at server start.
SGLANG_QUANTIZATIONS = (
    "awq", "fp8", "mxfp8", "gptq", "gptq_marlin", "awq_marlin", "bitsandbytes", "gguf", "modelopt", "modelopt_fp8",
    "modelopt_fp4", "nvfp4_online", "modelopt_mixed", "petit_nvfp4", "w8a8_int8", "w8a8_fp8", "moe_wna16", "w4afp8",
    "mxfp4", "auto-round", "auto-round-int8", "compressed-tensors", "modelslim", "mxfp_w4a8", "quark",
    "quark_int4fp8_moe", "quark_mxfp4", "mlx_q4", "mlx_q8", "unquant", "humming",
)

# Server arguments the hidden-state path depends on; a recipe's server_args may not change them.
TEACHER_FIXED_ARGS: dict[str, Any] = {
    "skip_tokenizer_init": True,  # token ids in, no text out: kdflow never sends text
    "enable_return_hidden_states": True,  # capture the hidden state of every prompt position
    "disable_radix_cache": True,  # a cached prefix is not recomputed: its positions would be missing
    "chunked_prefill_size": -1,  # a chunked prompt only stores its last chunk's states
    "disable_overlap_schedule": True,  # overlap copies hidden states to host before the hook sees them
}
# Defaults a recipe may override: a prefill-only teacher never decodes, and capturing CUDA
# graphs costs start-up time and memory for nothing (the prefill graph is off as well: its
# interaction with full hidden-state capture is unverified).
TEACHER_DEFAULT_ARGS: dict[str, Any] = {"disable_decode_cuda_graph": True, "disable_prefill_cuda_graph": True}
MIN_PREFILL_TOKENS = 16384  # sglang's own default max_prefill_tokens; raised to a whole micro-batch

# Status words the hook writes per sample (>= 0: rows written).
ST_PENDING = -1  # untouched: the hook did not run on the server
ST_PARTIAL = -2  # the prefill covered part of the prompt (chunked prefill or a cached prefix)
ST_BAD_POSITION = -3  # a requested position is outside the prompt
ST_FAILED = -4  # the hook raised (the server log has the traceback)
ST_NOT_FULL = -5  # the server captured only the last position (return_hidden_states_mode 'last')

# custom_params keys (SGLang carries them to the scheduler untouched; JSON scalars/int lists)
K_DEST, K_SLOT, K_ROW, K_SAMPLE, K_POS, K_LEN = ("kdflow_dest", "kdflow_slot", "kdflow_row", "kdflow_sample",
                                                 "kdflow_pos", "kdflow_len")

START_TIMEOUT_S = 1800.0  # first start downloads/compiles kernels and loads a large model
REQUEST_TIMEOUT_S = 600.0  # one micro-batch, including first-request JIT compilation
CLOSE_GRACE_S = 30.0  # for the server to release its GPUs after SIGTERM before SIGKILL
POST_NORM_TOL = 0.15  # |mean((h / w)^2) - 1| allowed for final-norm outputs in bf16


# ============================================================================ checks


def installed_version(dist: str = "sglang") -> Optional[str]:
    """Version of an installed distribution, read from its metadata (never imports it)."""
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_version(found: Optional[str], pin: str = SGLANG_VERSION) -> None:
    """Raise :class:`TeacherError` unless ``found`` is the pinned SGLang version."""
    if found is None:
        raise TeacherError(f"the sglang engine needs sglang=={pin}, which is not installed here: "
                           f"`pip install 'kdflow[sglang]'` on a CUDA machine (it does not install on CPU-only ones)")
    if found != pin and os.environ.get(ANY_VERSION_ENV) != "1":
        raise TeacherError(f"kdflow's sglang engine is written against sglang=={pin}, found {found}: install the "
                           f"pinned version (`pip install 'kdflow[sglang]'`), or set {ANY_VERSION_ENV}=1 to try "
                           f"anyway (the hidden-state hook then stays off and the slow 'lists' transport is used)")


def check_cuda() -> None:
    if not torch.cuda.is_available():
        raise TeacherError("teacher.engine 'sglang' needs a CUDA GPU, and torch.cuda.is_available() is False here; "
                           "use teacher.engine=hf on CPU")


def check_architecture(config: Mapping[str, Any], where: str = "the teacher") -> str:
    """The model's architecture name; :class:`TeacherError` unless SGLang's hidden states for
    it are known to be post-norm (override with ``KDFLOW_SGLANG_ANY_ARCH=1``)."""
    archs = list(config.get("architectures") or [])
    arch = archs[0] if archs else str(config.get("model_type", "?"))
    if arch not in VERIFIED_ARCHITECTURES and os.environ.get(ANY_ARCH_ENV) != "1":
        raise TeacherError(
            f"{where} is a {arch}; kdflow has only verified that SGLang {SGLANG_VERSION} returns post-norm hidden "
            f"states for {', '.join(VERIFIED_ARCHITECTURES)} (some models return pre-norm states). Use "
            f"teacher.engine=hf, or set {ANY_ARCH_ENV}=1 to rely on the start-up post-norm probe alone")
    return arch


def check_recipe_section(teacher: Mapping[str, Any], prefix: str = "teacher") -> list[str]:
    """Problems with a recipe's ``teacher`` section when ``engine: sglang`` (one string each)."""
    errors = []
    if teacher.get("device") == "cpu":
        errors.append(f"{prefix}.device: 'cpu' cannot run the sglang engine (CUDA only); use 'cuda' or 'auto'")
    s = teacher.get("sglang") or {}
    if not isinstance(s, Mapping):
        return errors
    q = s.get("quantization")
    if isinstance(q, str) and q not in SGLANG_QUANTIZATIONS:
        near = difflib.get_close_matches(q, SGLANG_QUANTIZATIONS, n=1)
        errors.append(f"{prefix}.sglang.quantization: '{q}' is not a quantization sglang {SGLANG_VERSION} knows"
                      + (f"; did you mean '{near[0]}'?" if near else f" ({', '.join(SGLANG_QUANTIZATIONS)})"))
    url = s.get("server_url")
    if isinstance(url, str) and not url.startswith(("http://", "https://")):
        errors.append(f"{prefix}.sglang.server_url: '{url}' must start with http:// or https://")
    extra = s.get("server_args") or {}
    if isinstance(extra, Mapping):
        for k in extra:
            if not (isinstance(k, str) and k.isidentifier()):
                errors.append(f"{prefix}.sglang.server_args: '{k}' is not an sglang ServerArgs name (use_underscores)")
            elif k in TEACHER_FIXED_ARGS and extra[k] != TEACHER_FIXED_ARGS[k]:
                errors.append(f"{prefix}.sglang.server_args.{k}: kdflow's hidden-state path needs "
                              f"{k}={TEACHER_FIXED_ARGS[k]!r}")
            elif k in ("tp_size", "dp_size", "mem_fraction_static", "quantization", "port", "base_gpu_id",
                       "model_path", "dtype", "enable_memory_saver"):
                errors.append(f"{prefix}.sglang.server_args.{k}: set it through the recipe "
                              f"({prefix}.sglang / {prefix}.dtype / {prefix}.path), not server_args")
    return errors


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
                               f"(`python -m kdcore.teacher.sglang serve ...` does both), or set "
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


# ============================================================================ server arguments


def server_kwargs(scfg: Any, *, model_path: str, dtype: str, max_rows: int, port: int, host: str = "127.0.0.1",
                  seed: int = 0, role: str = "teacher") -> dict[str, Any]:
    """sglang ``ServerArgs`` keywords for a recipe's ``sglang`` section.

    ``role`` ``teacher``: prefill with full hidden-state capture (:data:`TEACHER_FIXED_ARGS`);
    ``rollout``: sampling, random (``dummy``) weights until the first sync from the student.
    The recipe's ``server_args`` come last (checked by :func:`check_recipe_section`).
    """
    if role not in ("teacher", "rollout"):
        raise ValueError(f"role must be 'teacher' or 'rollout', got '{role}'")
    kw: dict[str, Any] = {
        "model_path": str(model_path), "host": host, "port": int(port), "dtype": dtype,
        "tp_size": int(scfg.tp_size), "dp_size": int(scfg.dp_size),
        "mem_fraction_static": float(scfg.mem_fraction_static), "base_gpu_id": int(getattr(scfg, "base_gpu_id", 0)),
        "random_seed": int(seed), "skip_tokenizer_init": True,
        "log_level": "warning",  # the server log file keeps warnings and errors, not per-request lines
    }
    if getattr(scfg, "quantization", None):
        kw["quantization"] = scfg.quantization
    if getattr(scfg, "colocate", False):
        kw["enable_memory_saver"] = True
        # the teacher's weights must survive sleep; the rollout copy is re-synced after wake anyway
        kw["enable_weights_cpu_backup"] = role == "teacher"
    if role == "teacher":
        kw.update(TEACHER_DEFAULT_ARGS)
        kw["max_prefill_tokens"] = max(MIN_PREFILL_TOKENS, int(max_rows))  # a whole micro-batch in one forward
        kw.update(TEACHER_FIXED_ARGS)
    else:
        kw["load_format"] = "dummy"  # no checkpoint needed: the student's weights arrive by update
    extra = dict(getattr(scfg, "server_args", None) or {})
    if role == "teacher":
        bad = [k for k in extra if k in TEACHER_FIXED_ARGS and extra[k] != TEACHER_FIXED_ARGS[k]]
        if bad:
            raise TeacherError(f"sglang server_args {', '.join(bad)} cannot change: the hidden-state path needs "
                               + ", ".join(f"{k}={TEACHER_FIXED_ARGS[k]!r}" for k in bad))
    kw.update(extra)
    return kw


def launch_command(kwargs: Mapping[str, Any], python: str = sys.executable) -> list[str]:
    """``python -m sglang.launch_server`` argv for ``ServerArgs`` keywords (bools as flags)."""
    argv = [python, "-m", "sglang.launch_server"]
    for k, v in kwargs.items():
        flag = "--" + k.replace("_", "-")
        if v is None or v is False:
            continue  # sglang's defaults for absent flags are None/False
        if v is True:
            argv.append(flag)
        elif isinstance(v, (dict, list)) and not (isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v)):
            argv += [flag, json.dumps(v)]
        elif isinstance(v, list):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    return argv


def resolve_model_folder(spec: str, cache_dir: Optional[str] = None) -> str:
    """A local HF folder SGLang can load: GGUFs are converted once (cached), hub ids pass through."""
    from kdcore import models

    kind, where = models.locate(spec)
    if kind == "gguf":
        return str(models.gguf_to_hf_folder(where, cache_dir))
    return where


def read_config(folder_or_id: str) -> dict:
    path = os.path.join(folder_or_id, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder_or_id).to_dict()


# ============================================================================ CUDA IPC payloads


def _device_uuid(index: int) -> str:
    return str(torch.cuda.get_device_properties(index).uuid)


def with_device_uuid(reduce_args: tuple, uuid_of: Optional[Callable[[int], str]] = None) -> tuple:
    """torch's ``rebuild_cuda_tensor`` arguments with the device index (argument 6) replaced by
    the GPU's UUID, which sglang's patched rebuild (``monkey_patch_torch_reductions``) maps back
    to the receiving process's own index: processes may number GPUs differently
    (``CUDA_VISIBLE_DEVICES``)."""
    args = list(reduce_args)
    args[6] = (uuid_of or _device_uuid)(int(args[6]))
    return tuple(args)


class _IpcPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor):
            if not obj.is_cuda:
                raise TeacherError("only CUDA tensors travel to the sglang server by handle; got a "
                                   f"{obj.device} tensor")
            from torch.multiprocessing import reductions

            fn, args = reductions.reduce_tensor(obj.detach())
            return fn, with_device_uuid(args)
        return NotImplemented


def cuda_ipc_payload(obj: Any) -> str:
    """Base64 pickle of ``obj`` whose CUDA tensors travel as IPC handles (no data copied).

    The format is sglang's ``MultiprocessingSerializer`` (a pickle the server reads with its
    ``SafeUnpickler``, whose allow-list covers torch's ``rebuild_cuda_tensor``), built without
    importing sglang here. The tensors must stay alive until the server is done with them.
    """
    buf = io.BytesIO()
    _IpcPickler(buf, protocol=4).dump(obj)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# ============================================================================ HTTP and the server


class ServerError(TeacherError):
    """The SGLang server failed or refused a request."""


def http_json(url: str, path: str, body: Optional[dict] = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
    """POST ``body`` as JSON (GET when None) and return the decoded reply (None when empty)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:2000]
        raise ServerError(f"sglang server {url}{path}: HTTP {exc.code}: {detail}") from exc
    return json.loads(raw) if raw else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


_SERVERS: "weakref.WeakSet[SGLangServer]" = weakref.WeakSet()


@atexit.register
def _close_servers() -> None:
    for s in list(_SERVERS):
        if s.owner == os.getpid():
            s.close()


class SGLangServer:
    """An SGLang HTTP server: started here (``start``) or already running (``connect``)."""

    def __init__(self, url: str, proc: Optional[subprocess.Popen] = None, log_path: Optional[str] = None):
        self.url, self.proc, self.log_path = url, proc, log_path
        self.owner = os.getpid()

    @classmethod
    def start(cls, kwargs: Mapping[str, Any], *, timeout: float = START_TIMEOUT_S,
              env: Optional[Mapping[str, str]] = None) -> "SGLangServer":
        """Launch ``python -m sglang.launch_server`` in its own session with the hook enabled,
        wait until ``/ready`` answers, and return the handle (its log: ``log_path``)."""
        host, port = kwargs["host"], int(kwargs["port"])
        fd, log_path = tempfile.mkstemp(prefix=f"kdflow-sglang-{port}-", suffix=".log")
        full_env = dict(os.environ, **{HOOK_ENV: "1", "PYTHONUNBUFFERED": "1"}, **(env or {}))
        with os.fdopen(fd, "w") as logf:
            # cwd outside the repository: `python -m` puts the cwd first on sys.path, and a stale
            # kdflow.egg-info in a source checkout would hide the installed plugin entry point
            proc = subprocess.Popen(launch_command(kwargs), stdout=logf, stderr=subprocess.STDOUT, env=full_env,
                                    cwd=tempfile.gettempdir(), start_new_session=True, preexec_fn=_die_with_parent)
        server = cls(f"http://{host}:{port}", proc, log_path)
        _SERVERS.add(server)
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.close()
            raise
        return server

    @classmethod
    def connect(cls, url: str, *, timeout: float = START_TIMEOUT_S) -> "SGLangServer":
        server = cls(url.rstrip("/"))
        server.wait_ready(timeout)
        return server

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not os.path.isfile(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def death_error(self, what: str = "") -> TeacherDiedError:
        code = None if self.proc is None else self.proc.poll()
        how = "is unreachable" if code is None else f"exited with code {code}"
        tail = self.log_tail()
        return TeacherDiedError(f"sglang server {self.url} {how}{what}" + (f"; log {self.log_path}:\n{tail}" if tail else ""))

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise self.death_error(" while starting")
            try:
                urllib.request.urlopen(self.url + "/ready", timeout=5).close()
                return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ChannelTimeout(f"sglang server {self.url} not ready within {timeout:.0f} s"
                                     + (f"; log {self.log_path}:\n{self.log_tail()}" if self.log_path else ""))
            time.sleep(1.0)

    def call(self, path: str, body: Optional[dict] = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        try:
            return http_json(self.url, path, body, timeout)
        except ServerError:
            raise
        except (urllib.error.URLError, OSError, ConnectionError) as exc:
            if not self.alive() or isinstance(getattr(exc, "reason", exc), ConnectionRefusedError):
                raise self.death_error(f" ({exc})") from exc
            raise ChannelTimeout(f"sglang server {self.url}{path}: {exc}") from exc

    def close(self) -> None:
        """Stop a server this process started (SIGTERM to its session, SIGKILL after a grace)."""
        _SERVERS.discard(self)
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(CLOSE_GRACE_S)
        except ProcessLookupError:
            pass


# ============================================================================ the engine


def _local_rank() -> tuple[int, int]:
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


class SGLangTeacher(TeacherEngine):
    """Teacher engine backed by an SGLang server (see the module docstring).

    Args:
        teacher_cfg: the recipe's ``teacher`` section (path, dtype, ``sglang`` sub-section).
        max_rows: rows per channel slot = the most hidden states one request may ask for.
        n_slots: channel depth (2: the server fills batch k+1 while the student uses k).
        device: where the channel lives = the student's device (default: the current CUDA
            device, which :func:`kdcore.distributed.init_distributed` sets per rank).
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
        from kdcore.config import SGLangConfig
        from kdcore.models import torch_dtype

        self.cfg = teacher_cfg
        self.scfg = getattr(teacher_cfg, "sglang", None) or SGLangConfig()
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
        from kdcore import models

        self.folder = resolve_model_folder(self.spec, self.cache_dir)
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
        local_rank, local_world = _local_rank()
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
            if codes[0] == ST_PENDING and self.transport == "auto":
                log.warning("the sglang server does not run kdflow's hidden-state hook: falling back to the slow "
                            "'lists' transport (install kdflow in the server's environment and set %s=1)", HOOK_ENV)
                self.transport = "lists"
            else:
                check_status(codes, batch)
                self.transport = "hook"
                rows = self._dest[slot, :batch.rows].float().cpu()
        if self.transport == "lists":
            rows = reference_rows(parse_lists(self._post_hidden(batch, "lists", 0), batch), batch)
        norm = load_norm_weight(self.folder) if os.path.isdir(self.folder or "") else None
        dev = check_post_norm(rows, norm) if norm is not None else None
        self.info = {"architecture": arch, "transport": self.transport, "url": self.server.url,
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
        including the first EOS. Same contract as :meth:`kdcore.teacher.hf.HFTeacher.generate`,
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
        if _local_rank()[0] == 0:
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
        from kdcore import models

        if self._head is None:
            self._head = models.load_lm_head(self.folder or self.spec, dtype=self.dtype)
        return self._head if dtype is None else self._head.to(models.torch_dtype(dtype))


# ============================================================================ shared by teacher and rollout


def sampling_params(*, max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                    eos_ids: Sequence[int] = (), seed: Optional[int] = None) -> dict:
    """SGLang sampling parameters (temperature 0 = greedy; top_k 0 = no cut)."""
    p: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
                         "top_p": float(top_p), "top_k": int(top_k) if top_k and top_k > 0 else -1,
                         "skip_special_tokens": False, "no_stop_trim": True}
    if eos_ids:
        p["stop_token_ids"] = sorted({int(e) for e in eos_ids})
    else:
        p["ignore_eos"] = True  # no stop ids given: only the length limit ends a sample
    if seed is not None:
        p["sampling_seed"] = int(seed) % (2 ** 63)
    return p


def cut_at_eos(ids: Sequence[int], eos: Sequence[int]) -> list[int]:
    ids = [int(t) for t in ids]
    stop = set(int(e) for e in eos)
    cut = next((i + 1 for i, t in enumerate(ids) if t in stop), len(ids))
    return ids[:cut]


def push_weights(server: SGLangServer, state_dict: Mapping[str, torch.Tensor], *, tp_size: int,
                 device: torch.device, dtype: torch.dtype, lock: Optional[threading.Lock] = None,
                 flush_cache: bool = True) -> int:
    """Send full tensors to ``/update_weights_from_tensor`` by CUDA IPC handle (one payload per
    server TP rank: sglang deserialises only its own, so the producer's IPC ref counts stay
    right). Tensors are cast to ``dtype`` on ``device`` when they are not already there."""
    named = []
    for name, t in state_dict.items():
        t = t.detach()
        if t.device != device or (t.is_floating_point() and t.dtype != dtype):
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        named.append((name, t.contiguous()))
    payloads = [cuda_ipc_payload(named) for _ in range(max(1, tp_size))]
    torch.cuda.synchronize(device)  # the values exist before the server reads them
    body = {"serialized_named_tensors": payloads, "flush_cache": flush_cache}
    with (lock or threading.Lock()):
        reply = server.call("/update_weights_from_tensor", body)
    if isinstance(reply, dict) and reply.get("success") is False:
        raise ServerError(f"sglang rejected the weight update: {reply.get('message')}")
    return len(named)


# ============================================================================ the SGLang plugin (server side)


def sglang_plugin() -> None:
    """Entry point of group ``sglang.srt.plugins`` (pyproject), run by SGLang in each of its
    processes. Inert unless ``KDFLOW_SGLANG_HOOK=1`` and the installed sglang is the pinned
    version; then registers :func:`capture_prefill_hidden` around :data:`HOOK_TARGET`."""
    if os.environ.get(HOOK_ENV) != "1":
        return
    found = installed_version()
    if found != SGLANG_VERSION:
        log.warning("kdflow: sglang %s is not the pinned %s; the hidden-state hook stays off", found, SGLANG_VERSION)
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(HOOK_TARGET, capture_prefill_hidden, HookType.AROUND)


_DESTINATIONS: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}


def _open_destination(payload: str) -> tuple[torch.Tensor, torch.Tensor]:
    hit = _DESTINATIONS.get(payload)
    if hit is None:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions

        monkey_patch_torch_reductions()  # device UUIDs in the payload -> this process's indices
        hit = _DESTINATIONS[payload] = MultiprocessingSerializer.deserialize(payload)
    return hit


def _writes_output() -> bool:
    """Only the rank that streams outputs (attention-TP rank 0 of its replica) writes rows;
    the other TP ranks hold the same (all-reduced) states."""
    try:
        from sglang.srt.runtime_context import get_parallel

        return int(get_parallel().attn_tp_rank) == 0
    except Exception:  # noqa: BLE001 - unknown layout: writing twice writes the same values
        return True


def write_rows(hidden: torch.Tensor, params: Mapping[str, Any], prompt_len: int, dest: torch.Tensor,
               status: torch.Tensor) -> int:
    """The hook's core: gather ``params[kdflow_pos]`` rows of one prompt's ``[n, H]`` states
    into ``dest[slot, row:row+k]`` and record ``k`` (or an error code) in
    ``status[slot, sample]``. Returns the status word. Device-agnostic (tested on CPU)."""
    slot, row, sample = int(params[K_SLOT]), int(params[K_ROW]), int(params[K_SAMPLE])
    n = hidden.shape[0]
    if n != prompt_len or int(params.get(K_LEN, n)) != n:
        code = ST_PARTIAL
    else:
        pos = torch.as_tensor(params[K_POS], dtype=torch.int64)
        k = pos.numel()
        if k and (int(pos.min()) < 0 or int(pos.max()) >= n or row + k > dest.shape[1]):
            code = ST_BAD_POSITION
        else:
            out = dest[slot, row:row + k]
            pos = pos.to(hidden.device)
            if out.device == hidden.device and out.dtype == hidden.dtype:
                torch.index_select(hidden, 0, pos, out=out)  # one kernel, straight into the slot
            else:
                out.copy_(hidden.index_select(0, pos))
            code = k
    status[slot, sample] = code
    if dest.is_cuda:
        torch.cuda.synchronize(dest.device)  # rows and status land before the reply leaves
    if hidden.is_cuda and hidden.device != dest.device:
        torch.cuda.synchronize(hidden.device)
    return code


def capture_prefill_hidden(original, self, *args, **kwargs):
    """AROUND hook on ``_append_prefill_hidden_states`` (keyword-only in 0.5.23). kdflow
    requests: write rows, store nothing, return the advanced offset like the original."""
    req = kwargs.get("req")
    params = getattr(getattr(req, "sampling_params", None), "custom_params", None)
    if args or not isinstance(params, dict) or K_DEST not in params:
        return original(self, *args, **kwargs)
    mode = kwargs["capture_hidden_mode"]
    start = int(kwargs["hidden_state_offset"])
    if not mode.is_full():
        end = start + 1 if mode.is_last() else start
        if kwargs.get("store", True) and _writes_output():
            _, status = _open_destination(params[K_DEST])
            status[int(params[K_SLOT]), int(params[K_SAMPLE])] = ST_NOT_FULL
        return end
    end = start + int(kwargs["extend_input_len"])
    if not kwargs.get("store", True) or not _writes_output():
        return end
    dest, status = _open_destination(params[K_DEST])
    try:
        hidden = kwargs["logits_output"].hidden_states[start:end]
        write_rows(hidden, params, len(req.origin_input_ids), dest, status)
    except Exception:  # noqa: BLE001 - the client reads ST_FAILED; the server keeps serving
        log.exception("kdflow: writing hidden rows failed")
        status[int(params[K_SLOT]), int(params[K_SAMPLE])] = ST_FAILED
        torch.cuda.synchronize(status.device)
    return end


# ============================================================================ command line


def serve_command(recipe: str, overrides: Sequence[str] = (), *, port: int = 30000, host: str = "127.0.0.1",
                  max_rows: int = 65536) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the per-node teacher server a recipe needs (multi-node runs)."""
    from kdcore.config import load_recipe

    cfg = load_recipe(recipe, list(overrides))
    folder = resolve_model_folder(cfg.teacher.path)
    kw = server_kwargs(cfg.teacher.sglang, model_path=folder, dtype=cfg.teacher.dtype, max_rows=max_rows, port=port,
                       host=host, seed=cfg.train.seed, role="teacher")
    return launch_command(kw), {HOOK_ENV: "1"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m kdcore.teacher.sglang serve RECIPE [key=value ...] [--port N] [--print]``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m kdcore.teacher.sglang")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("serve", help="start this node's teacher server for a recipe (hook enabled)")
    sp.add_argument("recipe")
    sp.add_argument("overrides", nargs="*")
    sp.add_argument("--port", type=int, default=30000)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--max-rows", type=int, default=65536, help="tokens of the largest micro-batch, all ranks")
    sp.add_argument("--print", action="store_true", help="print the command instead of running it")
    a = ap.parse_args(argv)
    cmd, env = serve_command(a.recipe, a.overrides, port=a.port, host=a.host, max_rows=a.max_rows)
    if a.print:
        print(" ".join(f"{k}={v}" for k, v in env.items()), " ".join(cmd))
        return 0
    check_version(installed_version())
    os.environ.update(env)
    os.execv(cmd[0], cmd)
    return 0  # pragma: no cover


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = [
    "SGLANG_VERSION", "HOOK_ENV", "VERIFIED_ARCHITECTURES", "SGLANG_QUANTIZATIONS", "TEACHER_FIXED_ARGS",
    "installed_version", "check_version", "check_cuda", "check_architecture", "check_recipe_section",
    "PromptBatch", "build_prompts", "reference_rows", "hidden_request_body", "parse_lists", "check_status",
    "check_post_norm", "load_norm_weight", "server_kwargs", "launch_command", "cuda_ipc_payload",
    "with_device_uuid", "SGLangServer", "ServerError", "SGLangTeacher", "sampling_params", "cut_at_eos",
    "push_weights", "offload_optimizer_state", "Colocation", "sglang_plugin", "capture_prefill_hidden",
    "write_rows", "serve_command", "main",
]
