"""Running `kdcore train` in a subprocess and reading what it wrote: tiny recipes, metrics records,
free ports, child processes."""

from __future__ import annotations

from pathlib import Path
import json
import subprocess
import sys

import yaml

from helpers.assets import PYDOC, PYDOC_EVAL, ROOT


KDCORE = [sys.executable, "-m", "kdcore"]


def write_recipe(tmp_path: Path, teacher_path: Path, **sections) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = {
        "teacher": {"path": str(teacher_path)},
        "student": {"init": "config", "config_overrides": {"hidden_size": 32, "intermediate_size": 64,
                                                             "num_hidden_layers": 1}},
        "data": {"train": str(PYDOC), "eval": str(PYDOC_EVAL), "limit": 48, "max_length": 64},
        "distill": {"loss": "fkl"},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 6, "micro_batch_size": 4, "lr": 1e-2,
                  "warmup_steps": 1, "eval_batches": 2},
        "checkpoint": {"every": 0},
        "logging": {"progress": False},
    }
    return dump_recipe(tmp_path, recipe, sections)


def dump_recipe(tmp_path: Path, recipe: dict, sections: dict) -> Path:
    """``recipe`` with each of ``sections`` merged into its section, as ``tmp_path/recipe.yaml``."""
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_steps(out: Path) -> list[dict]:
    return [r for r in records(out) if "loss" in r]


def evals(out: Path) -> list[dict]:
    return [r for r in records(out) if "eval_teacher_kl" in r]


def free_port() -> int:
    """A port nobody listens on now: a fixed one collides with TIME_WAIT sockets of earlier runs."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_command(recipe: Path, *overrides: str, resume=False) -> list[str]:
    return KDCORE + ["train", str(recipe), *overrides] + (["--resume"] if resume else [])


def run_train(recipe: Path, *overrides: str, resume=False, timeout=300, nproc=1):
    if nproc == 1:
        cmd = _train_command(recipe, *overrides, resume=resume)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "kdcore", "train", str(recipe), *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def run_train_together(*recipes: Path, timeout=300) -> list[subprocess.CompletedProcess]:
    """``run_train`` for independent runs at once: each spends most of its seconds importing and
    loading in one thread, so on a 2-core machine three overlap in little more than one's time."""
    procs = [subprocess.Popen(_train_command(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT) for r in recipes]
    done = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def assert_resume_after_step_2_is_exact(recipe: Path, out: Path) -> None:
    """A finished 4-step run (checkpoints every 2) is cut back to a run killed after step 2 (the
    step-4 checkpoint and the metrics log removed); ``--resume`` must redo steps 3 and 4 bitwise."""
    import shutil

    unbroken = {r["step"]: r["loss"] for r in train_steps(out)}
    shutil.rmtree(out / "checkpoints" / "step_4")
    (out / "metrics.jsonl").unlink()
    res = run_train(recipe, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = {r["step"]: r["loss"] for r in train_steps(out)}
    assert sorted(resumed) == [3, 4]
    assert resumed[3] == unbroken[3] and resumed[4] == unbroken[4]  # bitwise on CPU, world size 1


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]
