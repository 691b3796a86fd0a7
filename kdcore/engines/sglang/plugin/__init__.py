"""The code that runs inside the SGLang server: kdflow's ``sglang.srt.plugins`` entry point.

Installed as the top-level package ``kdflow_sglang_plugin`` (pyproject maps it to this
folder), so SGLang loads it **without** ``kdcore/__init__`` (omegaconf, pluggy, ...), which an
SGLang environment need not have: this module imports the standard library, torch and sglang
only (``tests/integration/test_sglang_engine.py`` checks it under an import blocker). kdflow's
own code reaches it as :mod:`kdcore.engines.sglang.hook` (a re-export of this module, never a
second copy).

SGLang loads this module in each of its server processes; it stays inert unless
``KDFLOW_SGLANG_HOOK=1`` is set in the server's environment and the installed sglang is the
pinned version. It wraps exactly one method,
``SchedulerBatchResultProcessor._append_prefill_hidden_states``: for requests that carry
kdflow's ``custom_params`` it gathers the requested positions from the GPU tensor into the
student's channel slot (opened through a CUDA IPC handle), writes a per-sample status word,
synchronises, and stores nothing; every other request goes to SGLang's original method.

The status words and ``custom_params`` keys below are the wire protocol between this hook and
the client in :mod:`kdcore.engines.sglang.teacher`.
"""

from __future__ import annotations

import logging
import os
from importlib import metadata
from typing import Any, Mapping, Optional

import torch

log = logging.getLogger(__name__)

# the same values as kdcore.engines.sglang.config (not imported: see the module docstring;
# a test keeps the two equal)
HOOK_ENV = "KDFLOW_SGLANG_HOOK"
SGLANG_VERSION = "0.5.23"
# what the plugin prints when it registers (WARNING, so `--log-level warning` keeps it): the
# teacher engine quotes the server log when its probe finds the hook did not run
ACTIVE_LINE = "kdflow: hidden-state hook registered"


def installed_version(dist: str = "sglang") -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


HOOK_TARGET = ("sglang.srt.managers.scheduler_components.batch_result_processor."
               "SchedulerBatchResultProcessor._append_prefill_hidden_states")

# Status words the hook writes per sample (>= 0: rows written).
ST_PENDING = -1  # untouched: the hook did not run on the server
ST_PARTIAL = -2  # the prefill covered part of the prompt (chunked prefill or a cached prefix)
ST_BAD_POSITION = -3  # a requested position is outside the prompt
ST_FAILED = -4  # the hook raised (the server log has the traceback)
ST_NOT_FULL = -5  # the server captured only the last position (return_hidden_states_mode 'last')

# custom_params keys (SGLang carries them to the scheduler untouched; JSON scalars/int lists)
K_DEST, K_SLOT, K_ROW, K_SAMPLE, K_POS, K_LEN = ("kdflow_dest", "kdflow_slot", "kdflow_row", "kdflow_sample",
                                                 "kdflow_pos", "kdflow_len")


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
    log.warning("%s on %s (pid %d)", ACTIVE_LINE, HOOK_TARGET.rsplit(".", 2)[-2], os.getpid())


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
