"""CUDA IPC payloads: tensors handed to the SGLang server by handle (same node, no copy)."""

from __future__ import annotations

import base64
import io
import pickle
import threading
from contextlib import nullcontext
from typing import Any, Callable, Mapping, Optional

import torch

from kdcore.engines.protocol import TeacherError
from kdcore.engines.sglang.server import SGLangServer, check_reply, weight_update_session


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


def push_weights(server: SGLangServer, state_dict: Mapping[str, torch.Tensor], *, tp_size: int,
                 device: torch.device, dtype: torch.dtype, lock: Optional[threading.Lock] = None,
                 flush_cache: bool = True, session: bool = True) -> int:
    """Send full tensors to ``/update_weights_from_tensor`` by CUDA IPC handle (one payload per
    server TP rank: sglang deserialises only its own, so the producer's IPC ref counts stay
    right). Tensors are cast to ``dtype`` on ``device`` when they are not already there.

    ``session`` True: inside a weight-update session of its own (sglang 0.5.23 refuses the
    update outside one), holding ``lock``; False: the caller has opened the session
    (:func:`weight_update_session`, several pushes in one) and holds the lock."""
    named = []
    for name, t in state_dict.items():
        t = t.detach()
        if t.device != device or (t.is_floating_point() and t.dtype != dtype):
            t = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        named.append((name, t.contiguous()))
    payloads = [cuda_ipc_payload(named) for _ in range(max(1, tp_size))]
    torch.cuda.synchronize(device)  # the values exist before the server reads them
    body = update_weights_body(payloads, flush_cache=flush_cache)
    with (weight_update_session(server, lock) if session else nullcontext()):
        check_reply(server.call("/update_weights_from_tensor", body), "the weight update")
    return len(named)


def update_weights_body(payloads: list[str], *, flush_cache: bool) -> dict:
    """The ``/update_weights_from_tensor`` JSON body (sglang's ``UpdateWeightsFromTensorReqInput``)."""
    return {"serialized_named_tensors": list(payloads), "flush_cache": bool(flush_cache)}
