"""A stand-in for torchvision, for importing sglang's Python modules on a CPU machine (contract tests only).

sglang 0.5.23 imports ``torchvision.transforms`` at the top of its multimodal helpers, which
its request structs import; PyPI's torchvision wheel needs the CUDA build of torch and a CPU
one would mean another torch-bound install. Like the triton stub beside it: on ``sys.path``
only in the contract tests' subprocess, only when no real torchvision is importable, no
distribution metadata (so transformers does not think torchvision is installed), and
**nothing computed by torchvision is ever checked through it**.
"""

import sys

from triton import _Anything, _make_finder  # the shared inert placeholders (stubs/triton)

__version__ = "0.0.0"
sys.meta_path.append(_make_finder("torchvision"))


def __getattr__(item):
    if item.startswith("__") and item.endswith("__"):
        raise AttributeError(item)
    return _Anything(f"torchvision.{item}")
