"""The run folder (``train.output_dir``): never overwritten silently, always holding its recipe.

A fresh run into a folder that already holds a run (``metrics.jsonl``, ``checkpoints/``,
``hf/`` or a saved ``recipe.yaml``) is refused with one line offering ``--resume`` or
``--overwrite``. ``--overwrite`` moves the old run aside to ``<dir>.old-<timestamp>``: it is
moved, never deleted, so nothing is lost. Every run (fresh or resumed) writes its resolved
recipe to ``<dir>/recipe.yaml`` atomically before training starts. On resume the metrics log
is cut back to the checkpoint's step, so re-run steps are not logged twice.

One run at a time: rank 0 takes an exclusive ``flock`` on ``<dir>/.kdcore.lock`` before it
writes anything and holds it for the run's life; a second ``train`` or ``--resume`` into the
folder is refused with one line naming the holder's pid and host. The kernel drops the lock
when its process dies, so a killed run (SIGKILL, OOM, a lost node's restarted job on the same
host) never blocks the next one; the file stays, with the last holder's pid for the message.
``flock`` is per host on some network file systems: two hosts writing one NFS folder are not
kept apart.

What a folder must not be: ``/``, the home folder, a system folder, or an existing folder
with files of something else (:func:`output_dir_problem`, checked at validation).

The data's fingerprint (:data:`DATA_RECORD`) is recorded at the start of a run; ``--resume``
refuses a data file that changed at the same path (the saved position would index other
samples) unless ``--allow-data-change`` is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from kdcore.infra.exceptions import clip
from kdcore.infra import distributed as kdist
from kdcore.modeling.paths import resolve
from kdcore.recipe.secret import mask_secrets
from kdcore.storage.resume import ResumeMismatchError, check_resume

METRICS = "metrics.jsonl"
RECIPE = "recipe.yaml"
RUN_MARKERS = (METRICS, "checkpoints", "hf", RECIPE)  # what makes a folder hold a run
LOCK = ".kdcore.lock"
DATA_RECORD = "data_fingerprint.json"
# what kdcore itself leaves in a folder before it holds a run (a lock, a crash log of a run that
# failed early, atomic-write leftovers, loggers' folders): a folder of only these is free to use
OWN_NAMES = (LOCK, DATA_RECORD, "eval.json", "tensorboard", "wandb")
OWN_PATTERNS = ("kdcore-crash-*.log", "*.tmp")
# never a run folder, even when empty: writing there damages the system or the user's home
SYSTEM_DIRS = ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt", "/opt",
               "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/tmp")
VIRTUAL_DIRS = ("/proc", "/sys", "/dev")  # nothing under these is a folder of files


class RunFolderError(RuntimeError):
    """The output folder cannot be used as asked; the message says what to do instead."""


class RunFolderBusyError(RunFolderError):
    """Another live process holds the run folder's lock."""


_locks: dict[Path, int] = {}  # resolved run folder -> the open lock file this process holds


def lock(out_dir: str | os.PathLike) -> None:
    """Take the run folder's exclusive lock for this process (creating the folder); a no-op
    when this process holds it already (a second run in one process, e.g. a notebook).

    Raises :class:`RunFolderBusyError` naming the holder when another process has it."""
    import fcntl

    d = Path(out_dir)
    key = d.resolve()
    if key in _locks:
        return
    d.mkdir(parents=True, exist_ok=True)
    # O_CLOEXEC: a spawned teacher or tracker process must not keep a dead run's folder locked
    fd = os.open(d / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = _holder_text(fd)
        os.close(fd)
        if isinstance(exc, BlockingIOError):
            raise RunFolderBusyError(
                f"'{clip(str(d))}' is in use by another kdcore run ({holder}); wait for it to end, stop it, "
                f"or give this run another train.output_dir") from None
        raise
    info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _locks[key] = fd


def _holder_text(fd: int) -> str:
    """``pid N on HOST since T`` from the lock file, written by the holder right after it took
    the lock: a run that lost a start race may read it in that instant, so it waits a little."""
    for _ in range(20):
        try:
            info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            return f"pid {int(info['pid'])} on {info['host']!s:.100} since {info['since']!s:.40}"
        except (OSError, ValueError, KeyError, TypeError):
            time.sleep(0.05)
    return "a process that is starting"


def unlock(out_dir: str | os.PathLike) -> None:
    """Release the lock :func:`lock` took (the file stays: deleting it would let a third process
    lock a new file while a second still holds the old one)."""
    fd = _locks.pop(Path(out_dir).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the only descriptor drops the flock


def output_dir_problem(out_dir: str, cwd: str | os.PathLike | None = None) -> str | None:
    """Why ``out_dir`` cannot be a run folder, or None: empty; ``/``, the home folder, a system
    folder or anything under /proc, /sys, /dev; an existing file; an existing folder holding
    files that are not a run's (a project, the working directory)."""
    if not out_dir.strip():
        return "train.output_dir: empty; give the run its own folder, e.g. outputs/my-run"
    if "\0" in out_dir:
        return f"train.output_dir: '{clip(repr(out_dir)[1:-1])}' is not a path (it holds a NUL character)"
    d = Path(cwd or os.getcwd()) / Path(out_dir).expanduser()
    resolved = Path(os.path.abspath(d))
    home = Path(os.path.expanduser("~")).resolve()
    for cand in {resolved, d.resolve()}:
        system = str(cand) in SYSTEM_DIRS or any(str(cand).startswith(v + "/") for v in VIRTUAL_DIRS)
        if system or cand == home:
            what = "the home folder" if cand == home else "a system folder"
            return (f"train.output_dir: '{clip(out_dir)}' is {what} ('{cand}'); give the run its own folder, "
                    f"e.g. outputs/my-run")
    if d.exists() and not d.is_dir():
        return f"train.output_dir: '{clip(out_dir)}' is a file, not a folder"
    if d.is_dir():
        try:
            names = [p.name for p in d.iterdir()]
        except OSError:
            return None  # unreadable: the write itself says why, in one line
        foreign = [n for n in names if not _is_own(n)]
        if foreign and not run_markers(d):
            # names are shown escaped and cut: a folder's names are anyone's text
            shown = ", ".join(clip(repr(n)[1:-1], 60) for n in sorted(foreign)[:3])
            shown += ", ..." if len(foreign) > 3 else ""
            return (f"train.output_dir: '{clip(out_dir)}' holds files that are not a kdcore run ({shown}); give the "
                    f"run its own folder (a new or empty one)")
    return None


def _is_own(name: str) -> bool:
    import fnmatch

    return name in OWN_NAMES or name in RUN_MARKERS or any(fnmatch.fnmatch(name, p) for p in OWN_PATTERNS)


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
        problem = output_dir_problem(str(d))  # also for a recipe built in code, never validated
        if problem:
            raise RunFolderError(problem)
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
            held = _locks.pop(d.resolve(), None)  # the old run's lock moves aside with it
            moved = move_aside(d)
            if held is not None:
                try:
                    lock(d)  # the new folder's, before the old one's is let go: no moment unlocked
                finally:
                    os.close(held)
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
    """A plain, JSON-able dict of a recipe (DictConfig or mapping), secrets masked
    (:func:`kdcore.recipe.secret.mask_secrets`): this is what run folders and checkpoints store."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(recipe, DictConfig):
        return mask_secrets(OmegaConf.to_container(recipe, resolve=True))
    return mask_secrets(json.loads(json.dumps(dict(recipe))))


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
    # lazy: `kdcore validate` reaches this module through the recipe checks (output_dir_problem)
    # and need not load the checkpoint, data and vision modules for that
    from kdcore.storage.checkpoint import latest_recipe

    saved, ckpt = latest_recipe(Path(out_dir) / "checkpoints")  # verified first: the one --resume loads
    if saved is not None:
        return saved, str(ckpt)
    return load_saved_recipe(out_dir), str(Path(out_dir) / RECIPE)


def prepare_collective(out_dir: str | os.PathLike, recipe: Any, *, resume: bool, overwrite: bool,
                       allow_data_change: bool = False) -> None:
    """On rank 0, before any model is loaded: take the folder's lock (:func:`lock`, held until
    :func:`unlock`), :func:`prepare`, on ``--resume`` the recipe check against the saved run
    (:func:`kdcore.storage.resume.check_resume`) and the data check (:func:`check_data`), then
    :func:`save_recipe` and the data record. The outcome is shared with every rank (so all
    ranks raise the same one-line error, and none waits for a rank that stopped)."""
    import sys

    problem = None
    if kdist.is_main():
        try:
            d = Path(out_dir)
            if resume and overwrite:
                raise RunFolderError("--resume and --overwrite contradict each other: pick one")
            if d.exists() and not d.is_dir():
                raise RunFolderError(f"train.output_dir '{d}' is a file, not a folder")
            lock(d)  # before anything is written, moved or compared
            moved = prepare(out_dir, resume=resume, overwrite=overwrite)
            if moved is not None:
                print(f"kdcore: moved the previous run in '{out_dir}' to '{moved}'", file=sys.stderr)
            data = data_fingerprints(recipe)
            if resume:
                saved, where = saved_run_recipe(out_dir)
                changed = check_resume(one_teacher_form(saved), one_teacher_form(recipe_dict(recipe)), where)
                if changed:
                    print(f"kdcore: resuming with changed settings: {'; '.join(changed)}", file=sys.stderr)
                for line in check_data(out_dir, data, allow=allow_data_change):
                    print(f"kdcore: warning: {line}", file=sys.stderr)
            save_recipe(out_dir, recipe)
            _write_atomic(Path(out_dir) / DATA_RECORD, json.dumps(data, indent=1, sort_keys=True) + "\n")
        except (RunFolderError, ResumeMismatchError) as exc:
            problem = str(exc)
        except OSError as exc:  # read-only or foreign folder, disk full
            problem = f"cannot write to train.output_dir '{out_dir}': {exc.strerror or exc}"
        if problem:
            unlock(out_dir)  # this run stops here; a lock another process holds is not ours to drop
    problem = kdist.broadcast_object(problem)
    if problem:
        raise RunFolderError(problem)


# ------------------------------------------------------------------------------ the data record


WHOLE_FILE_BYTES = 64 << 20  # data files up to this are hashed whole; larger ones by SAMPLES blocks
SAMPLES, SAMPLE_BYTES = 64, 1 << 20


def data_fingerprints(recipe: Any) -> dict[str, str | None]:
    """``{"train": fp, "eval": fp}`` of the recipe's data sources: a local file's content (the
    whole file up to 64 MiB, else its size and 64 evenly spaced 1 MiB blocks), a folder's files,
    or ``id:<name>`` for a hub dataset (nothing local to compare)."""
    data = recipe_dict(recipe).get("data") or {}
    out: dict[str, str | None] = {}
    for split in ("train", "eval"):
        spec = data.get(split)
        if not isinstance(spec, str) or not spec:
            out[split] = None
            continue
        try:
            p = Path(os.path.expanduser(resolve(spec)))
            if p.is_file():
                out[split] = _file_fingerprint(p)
            elif p.is_dir():
                h = hashlib.sha256()
                for f in sorted(x for x in p.rglob("*") if x.is_file()):
                    h.update(f"{f.relative_to(p).as_posix()}={_file_fingerprint(f)};".encode())
                out[split] = h.hexdigest()[:16]
            else:
                out[split] = f"id:{spec}"
        except Exception:  # unreadable or an uninstalled pkg://: the data loader names it in one line
            out[split] = None
    return out


def _file_fingerprint(p: Path) -> str:
    size = p.stat().st_size
    h = hashlib.sha256(f"{size};".encode())
    with open(p, "rb") as f:
        if size <= WHOLE_FILE_BYTES:
            for block in iter(lambda: f.read(SAMPLE_BYTES), b""):
                h.update(block)
        else:
            step = (size - SAMPLE_BYTES) // (SAMPLES - 1)
            for i in range(SAMPLES):
                f.seek(i * step)
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def check_data(out_dir: str | os.PathLike, data: dict, *, allow: bool) -> list[str]:
    """Compare ``data`` with the fingerprints recorded when the run started. A changed file is
    refused (:class:`RunFolderError`): the checkpoint's data position counts samples of the old
    file, so the rest of the run would read other rows than the saved run planned — and silently.
    With ``allow`` the change is applied and returned as warning lines. A run folder without a
    record (from an older kdflow) checks nothing."""
    path = Path(out_dir) / DATA_RECORD
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    if not isinstance(saved, dict):
        return []
    changed = [split for split in ("train", "eval") if saved.get(split) != data.get(split)]
    if not changed:
        return []
    what = " and ".join(f"data.{s}" for s in changed)
    if not allow:
        raise RunFolderError(
            f"--resume: the content of {what} changed since the run started (fingerprint {saved.get(changed[0])} → "
            f"{data.get(changed[0])}); restore it, start a fresh run with --overwrite, or continue on the new data "
            f"with --allow-data-change")
    return [f"{what} changed since the run started; continuing on the new content (--allow-data-change): the "
            f"remaining steps read other samples than the saved run would have"]
