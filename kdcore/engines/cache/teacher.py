"""The ``cache`` teacher engine: :class:`HiddenRequest` s answered from a ``kdcore cache-teacher``
folder (format and checks: :mod:`kdcore.engines.cache.format`).

``submit`` looks each sample's key up in the shards' indexes and copies its rows into the
ticket's slot, converting to the head's dtype in that copy; the shards stay memory-mapped
(``safe_open`` tensors are views of a private, never-written file mapping: measured, opening a
230 MB shard and taking its tensor adds ~1 MB of resident memory), so many runs share one
cache through the page cache. Errors during a run are :class:`CacheRunError`, a
:class:`kdcore.infra.channel.ChannelError`: the trainer reports them as one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from kdcore.infra.channel import ChannelError
from kdcore.engines.cache.format import CacheError, check_shard_files, read_manifest, sample_keys, weights_fingerprint
from kdcore.engines.protocol import HiddenRequest, TeacherEngine, TeacherError, Ticket
from kdcore.modeling.models import load_lm_head


class CacheRunError(CacheError, ChannelError):
    """The cache cannot serve this run: a damaged shard, other teacher weights, a sample it lacks."""




class _Slots:
    """The slot ring the shared ticket helpers read and release: ``n`` buffers of
    ``[max_rows, H]`` in the head's dtype, each holding one request's rows until released."""

    def __init__(self, n: int, max_rows: int, hidden: int, dtype):
        self.buffers = [torch.empty(max_rows, hidden, dtype=dtype) for _ in range(n)]
        self.rows: dict[int, int] = {}

    def buffer(self, seq: int):
        return self.buffers[seq % len(self.buffers)]

    def view(self, seq: int):
        return self.buffer(seq)[: self.rows[seq]]

    def release(self, seq: int) -> None:
        self.rows.pop(seq, None)


class CacheTeacher(TeacherEngine):
    """Serves :class:`HiddenRequest` s from a cache folder; ``submit`` finishes the copy at once."""

    def __init__(self, folder: str | os.PathLike, *, teacher_path: str, dtype: str = "float32",
                 max_rows: int, n_slots: int = 2):
        self.folder = Path(folder)
        self.teacher_path = teacher_path
        self.dtype_name = dtype
        self.max_rows = int(max_rows)
        self.n_slots = int(n_slots)
        self._shards: list = []
        self._index: dict[bytes, tuple[int, int, int]] = {}
        self.started = False
        self._init_tickets()

    def start(self) -> "CacheTeacher":
        if self.started:
            return self
        from safetensors import safe_open

        try:
            manifest = self.manifest = read_manifest(self.folder)
            check_shard_files(self.folder, manifest)
        except CacheError as exc:
            raise CacheRunError(str(exc)) from None
        found = weights_fingerprint(self.teacher_path)
        if found != manifest["identity"]["teacher weights"]:
            raise CacheRunError(f"teacher.cache: built for teacher weights {manifest['identity']['teacher weights']!r} "
                             f"({manifest['teacher_path']}), teacher.path {self.teacher_path} has {found!r}")
        self.hidden_size = int(manifest["hidden_size"])
        self.vocab_size = int(manifest["vocab_size"])
        dtype = getattr(torch, self.dtype_name)
        for no, s in enumerate(manifest["shards"]):
            handle = safe_open(str(self.folder / s["file"]), framework="pt", device="cpu")
            keys = handle.get_tensor("keys").numpy()
            offsets = handle.get_tensor("offsets").tolist()
            self._shards.append(handle.get_tensor("hidden"))  # a view of the file mapping
            for i in range(keys.shape[0]):
                self._index.setdefault(keys[i].tobytes(), (no, offsets[i], offsets[i + 1]))
        self.channel = _Slots(self.n_slots, self.max_rows, self.hidden_size, dtype)
        self.started = True
        return self

    def close(self) -> None:
        self._shards, self._index, self.started = [], {}, False

    def submit(self, request: HiddenRequest) -> Ticket:
        if not self.started:
            raise TeacherError("the cache engine is not started")
        self._check_capacity()
        request.validate(vocab_size=self.vocab_size, max_rows=self.max_rows)
        ticket = self._new_ticket(request)
        out = self.channel.buffer(ticket.seq)
        row = 0
        for b, (key, pos) in enumerate(zip(sample_keys(request.input_ids, request.attention_mask, request.positions),
                                           request.positions)):
            hit = self._index.get(key)
            if hit is None:
                raise CacheRunError(self._miss(b, request, key))
            shard, lo, hi = hit
            if hi - lo != len(pos):  # equal keys hash equal positions: only a damaged index gets here
                raise CacheRunError(f"teacher.cache: sample {b} of the request has {len(pos)} positions, its cached "
                                 f"entry {hi - lo} rows (damaged shard {self.manifest['shards'][shard]['file']})")
            out[row:row + len(pos)].copy_(self._shards[shard][lo:hi])  # converts to the head's dtype
            row += len(pos)
        self.channel.rows[ticket.seq] = row
        return self._track(ticket)

    def _miss(self, b: int, request: HiddenRequest, key: bytes) -> str:
        n_ids = int(request.attention_mask[b].sum())
        return (f"teacher.cache: sample {b} of the request ({n_ids} teacher tokens, {len(request.positions[b])} "
                f"positions, key {key.hex()[:12]}) is not in {self.folder}: the run's data, tokenizers, "
                f"data.max_length or aligner differ from the build's (rebuild with `kdcore cache-teacher`)")

    def result(self, ticket: Ticket, timeout: Optional[float] = None):
        return self._ticket_view(ticket, lambda: self.channel.view(ticket.seq))

    def release(self, ticket: Ticket) -> None:
        self._release_ticket(ticket)

    def lm_head(self, dtype=None):
        return load_lm_head(self.teacher_path, dtype=dtype or self.dtype_name)


__all__ = ["CacheTeacher", "CacheRunError"]
