"""The run folder (``train.output_dir``): never overwritten silently, always holding its recipe.

A fresh run into a folder that already holds a run (``metrics.jsonl``, ``checkpoints/``,
``hf/`` or a saved ``recipe.yaml``) is refused with one line offering ``--resume`` or
``--overwrite``. ``--overwrite`` moves the old run aside to ``<dir>.old-<timestamp>``: it is
moved, never deleted, so nothing is lost. Every run (fresh or resumed) writes its resolved
recipe to ``<dir>/recipe.yaml`` atomically before training starts. On resume the metrics log
is cut back to the checkpoint's step, so re-run steps are not logged twice.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"
RECIPE = "recipe.yaml"
RUN_MARKERS = (METRICS, "checkpoints", "hf", RECIPE)  # what makes a folder hold a run


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked; the message says what to do instead."""


def run_markers(out_dir: str | os.PathLike) -> list[str]:
    """The names in ``out_dir`` that show a run was written there (empty: free to use)."""
    d = Path(out_dir)
    found = []
    for name in RUN_MARKERS:
        p = d / name
        if p.is_file() or (p.is_dir() and any(p.iterdir())):
            found.append(name + ("/" if p.is_dir() else ""))
    return found


def move_aside(out_dir: str | os.PathLike) -> Path:
    """Rename ``out_dir`` to a free ``<dir>.old-<timestamp>[-n]`` beside it; return the new path."""
    d = Path(out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = d.with_name(f"{d.name}.old-{stamp}")
    n = 1
    while target.exists():
        target = d.with_name(f"{d.name}.old-{stamp}-{n}")
        n += 1
    os.replace(d, target)
    return target


def prepare(out_dir: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path | None:
    """Make ``out_dir`` ready for a run; return where an old run was moved (``--overwrite``).

    Raises :class:`RunFolderError` for a fresh run into a folder holding a run, for
    ``--resume`` together with ``--overwrite``, and for an output path that is a file.
    """
    d = Path(out_dir)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: pick one")
    if d.exists() and not d.is_dir():
        raise RunFolderError(f"train.output_dir '{d}' is a file, not a folder")
    moved = None
    if not resume:
        markers = run_markers(d)
        if markers and not overwrite:
            raise RunFolderError(
                f"'{d}' already holds a run ({', '.join(markers)}); continue it with --resume, or start over "
                f"with --overwrite (the old run is moved to '{d.name}.old-<timestamp>', not deleted)")
        if markers:
            cwd = Path.cwd().resolve()
            if d.resolve() == cwd or d.resolve() in cwd.parents:
                # relative paths (data, recipes) would then resolve inside the moved folder
                raise RunFolderError(f"--overwrite: train.output_dir '{d}' is the working directory or holds it; "
                                     "give the run its own folder")
            moved = move_aside(d)
    d.mkdir(parents=True, exist_ok=True)
    return moved


def save_recipe(out_dir: str | os.PathLike, recipe: Any) -> Path:
    """Write the resolved recipe (a DictConfig or plain dict) to ``<out_dir>/recipe.yaml``
    atomically: the file is either the old or the new recipe, never half of one."""
    from omegaconf import OmegaConf

    path = Path(out_dir) / RECIPE
    text = OmegaConf.to_yaml(OmegaConf.create(one_teacher_form(recipe_dict(recipe))))
    _write_atomic(path, text)
    return path


def load_saved_recipe(out_dir: str | os.PathLike) -> dict | None:
    from omegaconf import OmegaConf

    path = Path(out_dir) / RECIPE
    if not path.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def one_teacher_form(recipe: dict | None) -> dict | None:
    """The resolved recipe holds both ``teacher`` (the first teacher, or the only one) and
    ``teachers`` (empty for one teacher); a recipe may give only one of them, so the saved file
    keeps the one the run used and ``kdcore eval RUN`` or a new run can load it back."""
    if not isinstance(recipe, dict):  # no saved recipe: nothing to reshape
        return recipe
    drop = "teacher" if recipe.get("teachers") else "teachers"
    return {k: v for k, v in recipe.items() if k != drop}


def recipe_dict(recipe: Any) -> dict:
    """A plain, JSON-able dict of a recipe (DictConfig or mapping)."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(recipe, DictConfig):
        return OmegaConf.to_container(recipe, resolve=True)
    return json.loads(json.dumps(dict(recipe)))


def trim_metrics(path: str | os.PathLike, step: int) -> int:
    """Drop the records of steps after ``step`` (re-run after a resume from that step's
    checkpoint) and a torn last line; return how many lines were dropped. Records without a
    step are kept."""
    p = Path(path)
    if not p.is_file():
        return 0
    kept, dropped = [], 0
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            dropped += 1  # a line cut short by the crash
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        _write_atomic(p, "".join(line + "\n" for line in kept))
    return dropped


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def saved_run_recipe(out_dir: str | os.PathLike) -> tuple[dict | None, str]:
    """The recipe a resumed run continues: the newest checkpoint's, else the folder's
    ``recipe.yaml``; with where it was found."""
    from kdcore.checkpoint import latest_recipe

    saved, ckpt = latest_recipe(Path(out_dir) / "checkpoints")  # verified first: the one --resume loads
    if saved is not None:
        return saved, str(ckpt)
    return load_saved_recipe(out_dir), str(Path(out_dir) / RECIPE)


def prepare_collective(out_dir: str | os.PathLike, recipe: Any, *, resume: bool, overwrite: bool) -> None:
    """:func:`prepare`, on ``--resume`` the recipe check against the saved run
    (:func:`kdcore.resume.check_resume`), and :func:`save_recipe`, on rank 0 before any
    model is loaded; the outcome is shared with every rank (so all ranks raise the same
    one-line error, and none waits for a rank that stopped)."""
    import sys

    from kdcore import distributed as kdist
    from kdcore.resume import ResumeMismatchError, check_resume

    problem = None
    if kdist.is_main():
        try:
            moved = prepare(out_dir, resume=resume, overwrite=overwrite)
            if moved is not None:
                print(f"kdcore: moved the previous run in '{out_dir}' to '{moved}'", file=sys.stderr)
            if resume:
                saved, where = saved_run_recipe(out_dir)
                changed = check_resume(one_teacher_form(saved), one_teacher_form(recipe_dict(recipe)), where)
                if changed:
                    print(f"kdcore: resuming with changed settings: {'; '.join(changed)}", file=sys.stderr)
            save_recipe(out_dir, recipe)
        except (RunFolderError, ResumeMismatchError) as exc:
            problem = str(exc)
        except OSError as exc:  # read-only or foreign folder, disk full
            problem = f"cannot write to train.output_dir '{out_dir}': {exc.strerror or exc}"
    problem = kdist.broadcast_object(problem)
    if problem:
        raise RunFolderError(problem)
