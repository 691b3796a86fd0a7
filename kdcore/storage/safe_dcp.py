"""Reading torch.distributed.checkpoint (DCP) folders without running code from them.

DCP itself (torch 2.13) unpickles a checkpoint's ``.metadata`` with a plain ``pickle.load``
(``FileSystemReader.read_metadata``) and loads every non-tensor value with
``torch.load(..., weights_only=False)`` (``DefaultLoadPlanner.load_bytes``): a planted file
could run code on load.

kdflow writes DCP's metadata as JSON instead (``dcp.json``, :func:`metadata_to_json`) and
deletes DCP's pickled ``.metadata``; :class:`SafeFileSystemReader` builds the metadata back from
that JSON with fixed types, no name looked up from the file. A checkpoint written before
(``.metadata`` only) is unpickled by :class:`_MetadataUnpickler`, which resolves an exact list
of (module, name) pairs and nothing else: no dotted names (pickle protocol 4 walks them through
modules, e.g. ``torch.utils.collect_env.subprocess.Popen``), no functions, no other class of a
module. Either way :func:`check_metadata` then checks every field's type and confines every
storage path to a shard file name inside the folder. :class:`SafeLoadPlanner` loads non-tensor
values with ``weights_only=True`` (DCP reads tensors with ``weights_only=True`` itself).
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex, StorageMeta, TensorProperties,
    TensorStorageMetadata,
)

JSON_NAME = "dcp.json"  # DCP's metadata as JSON, written by kdflow in place of the pickled ".metadata"
PICKLED_NAME = ".metadata"
SHARD_RE = re.compile(r"^__\d{1,6}_\d{1,6}\.distcp$")  # the only files a storage entry may name
_MAX_DIMS = 64


class MetadataError(ValueError):
    """DCP metadata that kdflow will not use: a refused name, a wrong type, a path outside."""


# ---------------------------------------------------------------------------------------------
# the legacy pickled ".metadata": an exact allow-list

_DTYPES = {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)}
_LAYOUTS = {"strided": torch.strided}
_MEMORY_FORMATS = {str(v).removeprefix("torch."): v for v in
                   (torch.contiguous_format, torch.channels_last, torch.channels_last_3d, torch.preserve_format)}
_META = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    (_META, "Metadata"), (_META, "TensorStorageMetadata"), (_META, "BytesStorageMetadata"),
    (_META, "ChunkStorageMetadata"), (_META, "TensorProperties"), (_META, "MetadataIndex"),
    (_META, "StorageMeta"), (_META, "_MEM_FORMAT_ENCODING"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"), ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id, dropped on load
    ("torch.serialization", "_get_layout"),  # maps a layout's name to the layout; nothing else
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves exactly the pairs in :data:`_ALLOWED` and torch's dtypes/layouts/memory formats
    by their plain names; refuses everything else before it is looked up."""

    def find_class(self, module: str, name: str) -> Any:
        if "." not in name:  # protocol 4 resolves "a.b.c" attribute by attribute: never here
            if (module, name) in _ALLOWED:
                return super().find_class(module, name)
            if module == "torch":
                if name in _DTYPES:
                    return _DTYPES[name]
                if name in _LAYOUTS:
                    return _LAYOUTS[name]
                if name in _MEMORY_FORMATS:
                    return _MEMORY_FORMATS[name]
        raise pickle.UnpicklingError(f"refusing to load {_clip(module)}.{_clip(name)} from checkpoint metadata")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing a persistent id in checkpoint metadata")


def _clip(text: str, n: int = 80) -> str:
    text = str(text).encode("unicode_escape").decode("ascii")
    return text if len(text) <= n else text[:n] + "..."


def safe_load_metadata(stream) -> Any:
    """The legacy pickled ``.metadata`` through :class:`_MetadataUnpickler` (not yet checked:
    :func:`check_metadata` does that)."""
    return _MetadataUnpickler(stream).load()


# ---------------------------------------------------------------------------------------------
# checking a Metadata object, whatever it was read from


def _int(v: Any, what: str, lo: int = 0) -> int:
    if type(v) is not int or v < lo:
        raise MetadataError(f"{what} must be an integer >= {lo}, got {_clip(repr(v))}")
    return v


def _ints(v: Any, what: str) -> list[int]:
    if not isinstance(v, (list, tuple)) or len(v) > _MAX_DIMS:
        raise MetadataError(f"{what} must be a list of at most {_MAX_DIMS} integers")
    return [_int(x, what) for x in v]


def _str(v: Any, what: str) -> str:
    if type(v) is not str:
        raise MetadataError(f"{what} must be a string, got {type(v).__name__}")
    return v


def shard_name(relative_path: Any) -> str:
    """A storage entry's file: a plain shard name inside the checkpoint folder, nothing else."""
    name = _str(relative_path, "a storage path")
    if not SHARD_RE.match(name):
        raise MetadataError(f"storage path '{_clip(name)}' is not a shard file inside the checkpoint folder")
    return name


def check_metadata(md: Any) -> Metadata:
    """``md`` if it is DCP metadata made only of the expected types, with every storage entry
    naming a shard file inside the folder; else :class:`MetadataError`."""
    if type(md) is not Metadata or not isinstance(md.state_dict_metadata, dict) \
            or not isinstance(md.storage_data, dict):
        raise MetadataError(f"not DCP metadata: {type(md).__name__}")
    for fqn, item in md.state_dict_metadata.items():
        _str(fqn, "a state key")
        if type(item) is BytesStorageMetadata:
            continue
        if type(item) is not TensorStorageMetadata or type(item.properties) is not TensorProperties:
            raise MetadataError(f"entry '{_clip(fqn)}' is a {type(item).__name__}, not tensor or bytes metadata")
        if item.properties.dtype not in _DTYPES.values() or item.properties.layout is not torch.strided:
            raise MetadataError(f"entry '{_clip(fqn)}' has an unsupported dtype or layout")
        _ints(item.size, f"entry '{_clip(fqn)}' size")
        if not isinstance(item.chunks, list):
            raise MetadataError(f"entry '{_clip(fqn)}' chunks must be a list")
        for c in item.chunks:
            if type(c) is not ChunkStorageMetadata:
                raise MetadataError(f"entry '{_clip(fqn)}' has a chunk of type {type(c).__name__}")
            _ints(c.offsets, "chunk offsets")
            _ints(c.sizes, "chunk sizes")
    for idx, info in md.storage_data.items():
        if type(idx) is not MetadataIndex or type(info) is not _StorageInfo:
            raise MetadataError("storage entries must map a MetadataIndex to a _StorageInfo")
        _str(idx.fqn, "a storage key")
        shard_name(info.relative_path)
        _int(info.offset, "a storage offset")
        _int(info.length, "a storage length")
        if info.transform_descriptors:  # kdflow writes none; a transform is code DCP would run
            raise MetadataError(f"storage transforms are not supported: {_clip(repr(info.transform_descriptors))}")
    md.storage_meta = StorageMeta()  # its saved paths and ids are never used
    return md


# ---------------------------------------------------------------------------------------------
# the JSON form kdflow writes


def metadata_to_json(md: Metadata) -> dict:
    """DCP metadata as plain JSON data (what :func:`metadata_from_json` reads back)."""
    state: dict[str, Any] = {}
    for fqn, item in md.state_dict_metadata.items():
        if isinstance(item, BytesStorageMetadata):
            state[fqn] = {"bytes": True}
            continue
        p = item.properties
        if p.layout is not torch.strided:
            raise MetadataError(f"cannot checkpoint '{fqn}': layout {p.layout} (strided tensors only)")
        state[fqn] = {"dtype": str(p.dtype).removeprefix("torch."), "requires_grad": bool(p.requires_grad),
                      "memory_format": str(p.memory_format).removeprefix("torch."), "size": list(item.size),
                      "chunks": [{"offsets": list(c.offsets), "sizes": list(c.sizes)} for c in item.chunks]}
    storage = [{"fqn": idx.fqn, "offset": None if idx.offset is None else list(idx.offset), "index": idx.index,
                "file": info.relative_path, "pos": info.offset, "length": info.length}
               for idx, info in md.storage_data.items()]
    planner = md.planner_data if isinstance(md.planner_data, dict) else None
    return {"format": 1, "version": md.version, "state": state, "storage": storage,
            "planner": {k: list(v) for k, v in planner.items()} if planner is not None else None}


def _lookup(table: dict, name: Any) -> Any:
    return table.get(name) if type(name) is str else None


def metadata_from_json(obj: Any) -> Metadata:
    """:class:`Metadata` from :func:`metadata_to_json`'s data; every value's type is checked
    and every name is looked up in a fixed table."""
    if not isinstance(obj, dict) or obj.get("format") != 1:
        raise MetadataError(f"{JSON_NAME} is not kdflow's DCP metadata (format 1)")
    state_in, storage_in = obj.get("state"), obj.get("storage")
    if not isinstance(state_in, dict) or not isinstance(storage_in, list):
        raise MetadataError(f"{JSON_NAME} needs a 'state' mapping and a 'storage' list")
    state: dict[str, Any] = {}
    for fqn, e in state_in.items():
        if not isinstance(e, dict):
            raise MetadataError(f"entry '{_clip(fqn)}' must be a mapping")
        if e.get("bytes") is True:
            state[fqn] = BytesStorageMetadata()
            continue
        dtype, fmt = _lookup(_DTYPES, e.get("dtype")), _lookup(_MEMORY_FORMATS, e.get("memory_format"))
        if dtype is None or fmt is None or type(e.get("requires_grad")) is not bool:
            raise MetadataError(f"entry '{_clip(fqn)}' has an unknown dtype or memory format")
        chunks = e.get("chunks")
        if not isinstance(chunks, list) or not all(isinstance(c, dict) for c in chunks):
            raise MetadataError(f"entry '{_clip(fqn)}' chunks must be a list of mappings")
        props = TensorProperties(dtype=dtype, layout=torch.strided, requires_grad=e["requires_grad"],
                                 memory_format=fmt)
        state[fqn] = TensorStorageMetadata(
            properties=props, size=torch.Size(_ints(e.get("size"), "size")),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(_ints(c.get("offsets"), "offsets")),
                                         sizes=torch.Size(_ints(c.get("sizes"), "sizes"))) for c in chunks])
    storage = {}
    for s in storage_in:
        if not isinstance(s, dict):
            raise MetadataError("storage entries must be mappings")
        offset, index = s.get("offset"), s.get("index")
        idx = MetadataIndex(fqn=_str(s.get("fqn"), "a storage key"),
                            offset=None if offset is None else torch.Size(_ints(offset, "offset")),
                            index=None if index is None else _int(index, "index"))
        storage[idx] = _StorageInfo(relative_path=shard_name(s.get("file")), offset=_int(s.get("pos"), "pos"),
                                    length=_int(s.get("length"), "length"))
    planner = obj.get("planner")
    if planner is not None:
        if not isinstance(planner, dict) or not all(
                isinstance(v, list) and all(type(x) in (str, int) for x in v) for v in planner.values()):
            raise MetadataError("'planner' must map keys to lists of names and indices")
        planner = {_str(k, "a planner key"): tuple(v) for k, v in planner.items()}
    version = obj.get("version")
    md = Metadata(state_dict_metadata=state, planner_data=planner, storage_data=storage,
                  version=version if isinstance(version, str) else None)
    return check_metadata(md)


def write_json_metadata(folder: Path, md: Metadata) -> None:
    """Replace DCP's pickled ``.metadata`` in ``folder`` by :data:`JSON_NAME` (fsynced)."""
    import os

    with open(folder / JSON_NAME, "w") as f:
        json.dump(metadata_to_json(md), f)
        f.flush()
        os.fsync(f.fileno())
    (folder / PICKLED_NAME).unlink(missing_ok=True)


def read_metadata(folder: str | Path) -> Metadata:
    """A checkpoint folder's DCP metadata, from :data:`JSON_NAME` or (older checkpoints) the
    pickled ``.metadata`` through the allow-list; checked either way (:class:`MetadataError`,
    or ``pickle.UnpicklingError`` for a refused name)."""
    folder = Path(folder)
    if (folder / JSON_NAME).is_file():
        try:
            obj = json.loads((folder / JSON_NAME).read_text())
        except ValueError as exc:
            raise MetadataError(f"{JSON_NAME} is not JSON: {exc}") from exc
        return metadata_from_json(obj)
    with open(folder / PICKLED_NAME, "rb") as f:
        return check_metadata(safe_load_metadata(f))


class SafeFileSystemReader(dcp.FileSystemReader):
    """:class:`dcp.FileSystemReader` whose metadata is :func:`read_metadata`'s: nothing in it
    runs code, and it reads only shard files inside the folder."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        metadata = read_metadata(Path(str(self.path)))
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        # metadata may come from another rank: its paths are checked here too, where they are used
        for info in metadata.storage_data.values():
            shard_name(info.relative_path)
        super().set_up_storage_reader(metadata, is_coordinator, *args, **kwargs)


class SafeLoadPlanner(DefaultLoadPlanner):
    """Loads non-tensor values (optimizer hyperparameters) with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
