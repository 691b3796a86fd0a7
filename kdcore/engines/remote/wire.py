"""The remote teacher's wire format: what ``kdcore serve-teacher`` and the ``remote`` engine send.

Transport: ZeroMQ, the server's ROUTER socket and one DEALER socket per client engine. Every
message is multipart; its first frame is a small JSON header (UTF-8), the other frames are raw
little-endian arrays. Nothing is pickled, so a peer can never make the other side run code.

Header fields every message carries: ``v`` (:data:`PROTOCOL_VERSION`), ``type``. Client
messages add ``client`` (an id naming the trainer, host and pid), ``token`` (the shared secret,
checked on every message) and ``rid`` (request id: the ticket number, unique per client).

==========  ==================================================  =================================
type        client -> server                                    server -> client
==========  ==================================================  =================================
hello       ``fingerprint`` of the teacher it expects            ``fingerprint``, ``dtype``,
                                                                 ``max_rows``, ``max_tokens``,
                                                                 ``max_request_bytes``
hidden      ``batch``, ``length``, ``rows`` + frames ids          ``shape`` [rows, H], ``dtype`` +
            (int32 [B*L]), mask (uint8 [B*L]), counts (int32     one frame: the hidden states'
            [B]: positions per sample), positions (int32 [N])    raw bytes (row-major)
bye         (the client is closing)                             (no reply)
busy        --                                                  ``waiting``: this connection's
                                                                 requests not answered yet (sent
                                                                 every few seconds while any wait)
error       --                                                  ``error`` (one line), ``rid``
==========  ==================================================  =================================

Version history: 1, the first; 2 adds ``max_tokens`` to the hello reply (tokens ``batch x
length`` one request may carry) and the ``busy`` keepalive, so a client sharing a server whose
engine is busy or restarting is not mistaken for one sharing a dead server.

Requests are idempotent (the same token ids always give the same hidden states), so a client
that lost its server may resend them to a new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING, Any, Optional
from kdcore.engines.protocol import HiddenRequest
from kdcore.modeling import models

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from kdcore.engines.protocol import HiddenRequest

PROTOCOL_VERSION = 2  # see the version history above; both sides refuse any other
MAX_HEADER_BYTES = 64 * 1024  # a header holds a few numbers and names; anything larger is garbage
WIRE_DTYPES = ("float32", "bfloat16", "float16")  # what a teacher engine may produce
_VOLATILE_CONFIG_KEYS = ("_name_or_path", "transformers_version", "torch_dtype", "dtype")  # not the model itself


class WireError(ValueError):
    """A message that does not follow the wire format (the text names what is wrong)."""


def printable(value: Any, limit: int = 120) -> str:
    """``value`` as text safe for a log line: control characters (newlines included) escaped
    the way ``repr`` does, and cut to ``limit`` characters with the length said.

    Everything a peer sends may end up in the server's log; a name holding a newline would
    otherwise start a forged line of its own."""
    text = value if isinstance(value, str) else repr(value)
    size = len(text)
    if size > limit:
        text = text[:limit]
    if not text.isprintable():
        text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return f"{text}... ({size} characters)" if size > limit else text


def encode_header(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":")).encode()


def decode_header(frame: Any) -> dict:
    """The header dict of a frame; :class:`WireError` for anything but a small JSON object."""
    raw = bytes(frame)
    if len(raw) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(raw)} bytes is larger than {MAX_HEADER_BYTES}")
    try:
        header = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"header is not JSON ({exc})") from None
    except RecursionError:  # '[[[[...' : 64 KB of nesting overflows the parser, and it must not crash us
        raise WireError("header nests too deeply to be a header") from None
    if not isinstance(header, dict):
        raise WireError(f"header is a JSON {type(header).__name__}, not an object")
    return header


# ----------------------------------------------------------------------------- fingerprint


def _config_digest(spec: str) -> str:
    """sha256 of the model's config (canonical JSON, without keys that name files or versions)."""
    kind, where = models.locate(spec)
    if kind == "gguf":
        kv, tensors = models.gguf_index(where)
        small = {k: v for k, v in kv.items() if isinstance(v, (int, float, str, bool))}  # no vocab arrays
        config = {"gguf": small, "tensors": {k: list(v[0]) for k, v in sorted(tensors.items())}}
    else:
        if kind == "folder":
            path = os.path.join(where, "config.json")
        else:
            from transformers.utils import cached_file

            path = cached_file(where, "config.json")
        with open(path) as f:
            config = json.load(f)
        for key in _VOLATILE_CONFIG_KEYS:
            config.pop(key, None)
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def teacher_fingerprint(spec: str) -> dict:
    """What both sides compare at connect: model name and path, config hash, hidden and vocab size.

    Paths differ between machines (mount points), so only the model's *name* (last path part,
    or the hub id) must match; the config hash and the sizes say it is the same model.
    """
    dims = models.model_dims(spec)
    name = os.path.basename(os.path.normpath(os.path.expanduser(str(spec)))) or str(spec)
    return {"model": name, "path": str(spec), "config_sha256": _config_digest(spec),
            "hidden_size": int(dims["hidden_size"]), "vocab_size": int(dims["vocab_size"])}


def fingerprint_mismatch(client: Any, server: Any) -> Optional[str]:
    """One line naming both sides when the two fingerprints are not the same teacher; else None."""
    if not isinstance(client, dict) or not isinstance(server, dict):
        return f"malformed fingerprint (client {client!r}, server {server!r})"
    for key in ("hidden_size", "vocab_size", "config_sha256", "model"):
        if client.get(key) != server.get(key):
            short = (lambda v: str(v)[:12]) if key == "config_sha256" else str
            return (f"teacher mismatch on {key}: the client expects {short(client.get(key))} "
                    f"('{client.get('path')}'), the server has {short(server.get(key))} ('{server.get('path')}')")
    return None


def version_mismatch(theirs: Any, side: str) -> Optional[str]:
    """One line naming both versions when ``theirs`` (the ``side`` peer's) is not ours."""
    if theirs == PROTOCOL_VERSION:
        return None
    other = "client" if side == "client" else "server"
    me = "server" if side == "client" else "client"
    return f"protocol version mismatch: the {other} speaks {theirs!r}, the {me} speaks {PROTOCOL_VERSION}"


# ----------------------------------------------------------------------------- hidden requests


def pack_request(request: "HiddenRequest") -> tuple[dict, list[bytes]]:
    """The ``hidden`` header fields and payload frames of a request (padding ids zeroed)."""
    import torch

    mask = request.attention_mask.to(torch.int64)
    ids = request.input_ids.to(torch.int64).masked_fill(mask == 0, 0)  # any pad id embeds safely
    counts = [len(p) for p in request.positions]
    positions = [torch.as_tensor(p, dtype=torch.int64).reshape(-1) for p in request.positions]
    flat_pos = torch.cat(positions) if positions else torch.zeros(0, dtype=torch.int64)
    B, L = ids.shape
    fields = {"type": "hidden", "batch": int(B), "length": int(L), "rows": int(sum(counts))}
    frames = [ids.to(torch.int32).cpu().numpy().tobytes(), mask.to(torch.uint8).cpu().numpy().tobytes(),
              torch.tensor(counts, dtype=torch.int32).numpy().tobytes(), flat_pos.to(torch.int32).numpy().tobytes()]
    return fields, frames


_INT32_MAX = 2**31 - 1  # ids and positions travel as int32


def _int_field(header: dict, key: str, limit: int) -> int:
    value = header.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
        raise WireError(f"header field '{key}' must be an integer within [0, {limit}], got {value!r}")
    return value


def unpack_request(header: dict, frames: list, *, max_tokens: int, max_rows: Optional[int] = None) -> "HiddenRequest":
    """Rebuild a :class:`HiddenRequest` from a ``hidden`` message; :class:`WireError` when the
    frames do not match the header (the request's values are checked by ``validate`` later)."""
    import numpy as np
    import torch

    if len(frames) != 4:
        raise WireError(f"a hidden request has 4 payload frames (ids, mask, counts, positions), got {len(frames)}")
    B = _int_field(header, "batch", _INT32_MAX)
    L = _int_field(header, "length", _INT32_MAX)
    N = _int_field(header, "rows", _INT32_MAX)
    if B * L > max_tokens:
        raise WireError(f"a request of {B} x {L} = {B * L} tokens is more than this server takes in one request "
                        f"({max_tokens} tokens, its --max-tokens); send smaller micro-batches")
    if not B or not L:  # B x 0 passes the token cap with any B: a cheap way to make us build huge lists
        raise WireError(f"a request of {B} x {L} tokens is empty")
    if max_rows is not None and N > max_rows:  # before any work proportional to N is done
        raise WireError(f"a request for {N} hidden-state rows is more than this server takes ({max_rows}, its "
                        f"--max-rows)")
    expected = {"ids": B * L * 4, "mask": B * L, "counts": B * 4, "positions": N * 4}
    for (name, size), frame in zip(expected.items(), frames):
        if len(frame) != size:
            raise WireError(f"frame '{name}' has {len(frame)} bytes, the header implies {size}")
    arrays = [np.frombuffer(memoryview(f), dtype=d) for f, d in zip(frames, ("<i4", "u1", "<i4", "<i4"))]
    ids, mask, counts, positions = (torch.from_numpy(a.astype(np.int64)) for a in arrays)
    if bool((counts < 0).any()) or int(counts.sum()) != N:
        raise WireError(f"positions per sample {counts.tolist()[:8]} do not add up to rows={N}")
    return HiddenRequest(ids.reshape(B, L), mask.reshape(B, L), torch.split(positions, counts.tolist()))


def pack_hidden(hidden: "torch.Tensor") -> tuple[dict, Any]:
    """Header fields and the payload (a buffer the caller owns) of a ``[rows, H]`` reply."""
    import torch

    name = str(hidden.dtype).removeprefix("torch.")
    if name not in WIRE_DTYPES:
        raise WireError(f"hidden states of dtype {name} cannot be sent (one of {', '.join(WIRE_DTYPES)})")
    owned = hidden.detach().to("cpu", copy=True).contiguous()  # the engine's slot is reused at release
    return {"type": "hidden", "shape": list(owned.shape), "dtype": name}, owned.view(torch.uint8).numpy()


def unpack_hidden_into(header: dict, frame: Any, out: "torch.Tensor") -> None:
    """Copy a ``hidden`` reply into ``out`` ([rows, H]; converts the dtype when it differs)."""
    import torch

    name = header.get("dtype")
    if name not in WIRE_DTYPES:
        raise WireError(f"reply dtype {name!r} is not one of {', '.join(WIRE_DTYPES)}")
    shape = header.get("shape")
    if shape != list(out.shape):
        raise WireError(f"reply shape {shape} differs from the request's {list(out.shape)}")
    dtype = getattr(torch, name)
    buf = memoryview(frame)
    if len(buf) != out.numel() * dtype.itemsize:
        raise WireError(f"reply payload has {len(buf)} bytes, shape {shape} in {name} needs "
                        f"{out.numel() * dtype.itemsize}")
    if out.numel():
        import warnings

        with warnings.catch_warnings():  # read-only frame: torch warns, but the view is only read
            warnings.simplefilter("ignore", UserWarning)
            out.copy_(torch.frombuffer(buf, dtype=dtype).view(out.shape))


__all__ = ["PROTOCOL_VERSION", "WireError", "encode_header", "decode_header", "teacher_fingerprint",
           "fingerprint_mismatch", "version_mismatch", "pack_request", "unpack_request", "pack_hidden",
           "unpack_hidden_into", "printable"]
