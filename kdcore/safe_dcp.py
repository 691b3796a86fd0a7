"""Reading torch.distributed.checkpoint (DCP) folders without running code from them.

DCP itself (torch 2.13) unpickles a checkpoint's ``.metadata`` with a plain ``pickle.load``
(``FileSystemReader.read_metadata``) and loads every non-tensor value with
``torch.load(..., weights_only=False)`` (``DefaultLoadPlanner.load_bytes``): a planted file
could run code on load. :class:`SafeFileSystemReader` unpickles ``.metadata`` through an
unpickler that builds only DCP's own metadata classes and a few torch constants, and
:class:`SafeLoadPlanner` loads non-tensor values with ``weights_only=True``.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

# DCP's metadata is made of the dataclasses and enums of its metadata module (plain data, so
# any of them may be built) and the file index of the filesystem writer; that module's other
# classes (readers, writers) do things when built, so they are not allowed
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
    ("torch.serialization", "_get_layout"),  # looks a layout up by name on the torch module; nothing else
}


def _torch_constant(name: str) -> Any:
    """dtype, layout and memory-format objects pickle as ``torch.<name>``; nothing else may."""
    value = getattr(torch, name, None)
    if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
        return value
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module == _DCP_METADATA_MODULE:
            found = super().find_class(module, name)
            if isinstance(found, type):  # classes only: no functions reached through the module
                return found
        if module == "torch":
            const = _torch_constant(name)
            if const is not None:
                return const
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from checkpoint metadata")


def safe_load_metadata(stream) -> Any:
    return _MetadataUnpickler(stream).load()


class SafeFileSystemReader(dcp.FileSystemReader):
    """:class:`dcp.FileSystemReader` whose ``.metadata`` unpickling cannot run code."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = safe_load_metadata(f)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Loads non-tensor values (optimizer hyperparameters) with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
