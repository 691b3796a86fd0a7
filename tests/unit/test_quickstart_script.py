"""scripts/quickstart.sh run twice (issue 28: the second run failed, "already holds a run"): it
keeps the earlier run and numbers the new folder, or passes --overwrite / --resume through.
The script runs in a copy of scripts/ with stubs for setup.sh and the kdcore command, which
record what they were asked."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "quickstart.sh", tmp_path / "scripts" / "quickstart.sh")
    (tmp_path / "scripts" / "setup.sh").write_text("exit 0\n")
    bin_dir = tmp_path / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    stub = bin_dir / "kdcore"
    # a train stub that leaves a run behind in the folder it was given, as kdcore train does
    stub.write_text('#!/usr/bin/env bash\necho "$@" >> "$(dirname "$0")/../calls"\n'
                    'if [ "$1" = train ]; then out=outputs/quickstart\n'
                    '  for a in "$@"; do case "$a" in train.output_dir=*) out=${a#train.output_dir=};; esac; done\n'
                    '  mkdir -p "$out" && touch "$out/metrics.jsonl"; fi\n')
    stub.chmod(0o755)
    return tmp_path


def _run(tree, *args):
    done = subprocess.run(["bash", str(tree / "scripts" / "quickstart.sh"), *args], capture_output=True, text=True,
                          env={"VENV": str(tree / "venv"), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = (tree / "venv" / "calls").read_text().splitlines()
    (tree / "venv" / "calls").unlink()
    return done.stdout, calls


def test_second_run_gets_a_numbered_folder(tree):
    _, calls = _run(tree)
    assert calls == ["train quickstart", "eval outputs/quickstart --samples 3"]
    said, calls = _run(tree, "train.max_steps=5")
    assert calls == ["train quickstart train.max_steps=5 train.output_dir=outputs/quickstart-2",
                     "eval outputs/quickstart-2 --samples 3"]
    assert "outputs/quickstart holds an earlier run (kept)" in said and "--overwrite" in said
    _, calls = _run(tree)
    assert calls[1] == "eval outputs/quickstart-3 --samples 3"


def test_overwrite_and_resume_go_to_the_same_folder(tree):
    _run(tree)
    for flag in ("--overwrite", "--resume"):
        said, calls = _run(tree, flag)
        assert calls == [f"train quickstart {flag}", "eval outputs/quickstart --samples 3"] and not said
