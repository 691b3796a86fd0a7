"""What a hostile or broken file system does to a checkpoint folder: a planted file re-listed in the
manifest, a cut recipe."""

from __future__ import annotations

from pathlib import Path
import json

from kdcore.storage import checkpoint as ck


def _rewrite_manifest(path: Path, legacy: bool = False) -> None:
    """What whoever plants a file does next: list every file with its new size and hash."""
    files = {f.name: ck._file_record(f) for f in sorted(path.iterdir()) if f.is_file() and f.name != "manifest.json"}
    (path / "manifest.json").write_text(json.dumps({"files": files} if legacy else {"format": 2, "files": files}))


def _cut_recipe(path: Path) -> None:
    text = (path / "recipe.json").read_text()
    (path / "recipe.json").write_text(text[: len(text) // 2])
