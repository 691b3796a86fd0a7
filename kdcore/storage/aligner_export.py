"""Aligners trained with the student (DSKD's projectors) beside its Hugging Face export.

An export (:func:`kdcore.storage.checkpoint.export_hf`) holds the student for
``from_pretrained``; an aligner that trains parameters of its own is part of what the run
learned too, and ``kdcore eval`` needs it to score the export as training did. Each is written
as ``aligners/<teacher name>.safetensors`` (its state dict; safetensors only, nothing read is
code), and read back into the recipe's aligner by name, strictly (every key, every shape).
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from kdcore.storage.checkpoint_files import CheckpointError

ALIGNERS_DIR = "aligners"  # in an export: <teacher name>.safetensors per aligner trained with the student


def save_aligners(aligners: dict[str, nn.Module], export_dir: Path) -> None:
    """Each aligner's state dict (fp32, as trained) as ``<export_dir>/aligners/<name>.safetensors``."""
    from safetensors.torch import save_file

    folder = export_dir / ALIGNERS_DIR
    if aligners:
        folder.mkdir(exist_ok=True)
    for name, aligner in aligners.items():
        # recipe teacher names match ^[A-Za-z0-9_.-]+$ (no separator): the file stays in the folder
        state = {k: v.detach().cpu().contiguous() for k, v in aligner.state_dict().items()}
        save_file(state, str(folder / f"{name}.safetensors"))


def load_aligner(aligner: nn.Module, export_dir: str | os.PathLike, name: str) -> bool:
    """Restore the trained aligner of teacher ``name`` from an export (what :func:`save_aligners`
    wrote): False when the export holds none; :class:`CheckpointError` naming the file when it
    does not fit the aligner (another recipe's, or a damaged file). Safetensors only."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(export_dir) / ALIGNERS_DIR / f"{name}.safetensors"
    if not path.is_file():
        return False
    try:
        state = load_file(str(path))
        aligner.load_state_dict(state, strict=True)
    except (SafetensorError, RuntimeError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: does not fit the recipe's aligner for teacher '{name}': {first}") from exc
    return True
