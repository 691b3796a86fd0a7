"""Building a teacher cache with `kdcore cache-teacher` and the overrides that train from it."""

from __future__ import annotations

from pathlib import Path
from helpers.train import KDCORE
import subprocess

from helpers.assets import ROOT


SHARD_MB = "0.05"  # ~50 KiB: the tiny runs' ~0.4 MiB cache spreads over several shards


def build(recipe: Path, out: Path, *extra: str, timeout=300):
    cmd = KDCORE + ["cache-teacher", str(recipe), "--out", str(out), "--shard-mb", SHARD_MB, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def cached(cache: Path) -> list[str]:
    return ["teacher.engine=cache", f"teacher.cache={cache}"]
