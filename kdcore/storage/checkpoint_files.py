"""What a checkpoint folder may hold, and the checks it passes before any of it is used.

A checkpoint ``step_<n>`` written by this kdflow holds exactly these files, each listed with
its size and sha256 in ``manifest.json`` (the manifest itself excepted):

    dcp.json                 DCP's metadata as JSON (:mod:`kdcore.storage.safe_dcp`)
    __<r>_0.distcp           DCP's shards (tensors read with ``weights_only=True``)
    rank_<r>.safetensors     each rank's RNG streams
    trainer_state.json       step, scheduler, data position, trainer extras
    recipe.json              the resolved recipe of the run that wrote it
    meta.json                step, world size, versions
    ema_teacher.safetensors  an EMA teacher's average (only with ``teacher.ema``)

:func:`verify_checkpoint` checks the manifest (every listed file present with its size and
hash, no file that is not listed, every name a plain file name in the folder);
:func:`read_checked` then reads the JSON files and refuses impossible values (a step that does
not match the folder's name, beyond the run's planned ``train.max_steps`` or absurd, a world
size below 1, wrong types). The hashes catch damage, not an attacker (who can rewrite them):
what keeps a planted file harmless is that nothing read is code (JSON, safetensors, DCP through
:mod:`kdcore.storage.safe_dcp`) and that every value is checked before use.

Checkpoints written before this layout (pickled DCP ``.metadata``, a manifest without
``meta.json``) are still read, through the same checks and DCP's allow-list unpickler.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcore.storage.safe_dcp import JSON_NAME, PICKLED_NAME

STEP_PREFIX = "step_"
TMP_SUFFIX = ".tmp"
LATEST = "latest"
META = "meta.json"
TRAINER_STATE = "trainer_state.json"
RECIPE = "recipe.json"
MANIFEST = "manifest.json"
EMA_FILE = "ema_teacher.safetensors"  # kdcore.training.ema writes it (into the folder before it is sealed)
RNG_SUFFIX = ".safetensors"
MANIFEST_FORMAT = 2  # 2: meta.json listed, nothing unlisted; absent: an older kdflow's
LEGACY_TRAINER_STATE = "trainer_state.pt"  # pickles, written before kdflow stopped using them
LEGACY_REASON = ("written by an older kdflow as pickles (trainer_state.pt, rank_*.pt), which can run code when "
                 "loaded; kdflow does not load them: start a fresh run (--overwrite)")
MAX_STEP = 10**12  # no run takes this many optimizer steps: a larger one is damage
MAX_WORLD = 1 << 20
STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d{{1,13}})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run, named in the message."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint whose files are damaged (truncated, altered, unreadable): an older one may do."""


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def is_complete(path: Path) -> bool:
    return (path / META).is_file() and ((path / JSON_NAME).is_file() or (path / PICKLED_NAME).is_file())


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``ckpt_dir`` as ``(step, path)``, oldest first
    (``.tmp`` leftovers and incomplete folders are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names if complete, else the highest
    complete ``step_<n>``, else None."""
    d = Path(ckpt_dir)
    pointer = d / LATEST
    if pointer.is_file():
        try:
            name = pointer.read_text(errors="replace").strip()
        except OSError:
            name = ""
        cand = d / name
        if STEP_RE.match(name) and cand.is_dir() and not cand.is_symlink() and is_complete(cand):
            return cand
    ckpts = list_checkpoints(d)
    return ckpts[-1][1] if ckpts else None


# --------------------------------------------------------------------------------------------
# the manifest


def file_record(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def write_manifest(folder: Path, write_json) -> None:
    # sha256 of every file: catches bit rot and truncation alike; costs one read of the
    # checkpoint per save and per resume (about a second per GB), small next to training
    files = {p.name: file_record(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json({"format": MANIFEST_FORMAT, "files": files}, folder / MANIFEST, "manifest")


def _plain_name(name: Any) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def _manifest_files(p: Path) -> tuple[dict, bool] | str:
    """``(files, legacy)`` of a well-formed manifest, or what is wrong with it."""
    try:
        obj = json.loads((p / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        return f"unreadable {MANIFEST} ({type(exc).__name__})"
    files = obj.get("files") if isinstance(obj, dict) else None
    if not isinstance(files, dict):
        return f"{MANIFEST} lists no files"
    for name, rec in files.items():
        if not _plain_name(name) or name == MANIFEST:
            return f"{MANIFEST} names '{_clip(name)}', not a file of the checkpoint folder"
        if not (isinstance(rec, dict) and type(rec.get("size")) is int and isinstance(rec.get("sha256"), str)):
            return f"{MANIFEST} has no size and sha256 for {_clip(name)}"
    legacy = obj.get("format") is None
    if not legacy and obj.get("format") != MANIFEST_FORMAT:
        return f"{MANIFEST} is of format {_clip(repr(obj.get('format')))}, not {MANIFEST_FORMAT}"
    return files, legacy


def verify_checkpoint(path: str | os.PathLike) -> str | None:
    """What is wrong with a checkpoint folder (one phrase), or None when it holds exactly the
    files its manifest lists, each with its recorded size and sha256."""
    p = Path(path)
    if not is_complete(p):
        return f"incomplete (no {META} or DCP metadata)"
    if not (p / MANIFEST).is_file():
        if (p / LEGACY_TRAINER_STATE).exists():
            return LEGACY_REASON
        return f"no {MANIFEST}"
    got = _manifest_files(p)
    if isinstance(got, str):
        return got
    files, legacy = got
    # older manifests were written before meta.json and the EMA average
    unlisted_ok = {MANIFEST} | ({META, EMA_FILE} if legacy else set())
    for entry in sorted(p.iterdir()):
        if entry.name not in files and entry.name not in unlisted_ok:
            return f"holds '{_clip(entry.name)}', which its {MANIFEST} does not list (not written by kdflow)"
        if entry.is_symlink() or not entry.is_file():
            return f"'{_clip(entry.name)}' is not a plain file"
    required = [TRAINER_STATE, "rank_0" + RNG_SUFFIX] + ([] if legacy else [META])
    required.append(JSON_NAME if (p / JSON_NAME).exists() or not legacy else PICKLED_NAME)
    for name in required:
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    for name, rec in files.items():
        f = p / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != rec["size"]:
            return f"{name} is {size} bytes, {rec['size']} were written (truncated or damaged)"
        if file_record(f)["sha256"] != rec["sha256"]:
            return f"{name} does not match the sha256 recorded when it was written"
    return None


# --------------------------------------------------------------------------------------------
# the JSON files, with their values checked


@dataclass
class CheckedFiles:
    step: int
    world_size: int
    trainer_state: dict  # the whole trainer_state.json: step, data_state, trainer_state, scheduler
    recipe: dict | None


def _clip(text: Any, n: int = 80) -> str:
    text = str(text).encode("unicode_escape").decode("ascii")
    return text if len(text) <= n else text[:n] + "..."


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CorruptCheckpointError(f"'{path}' is unreadable: {type(exc).__name__}: {_clip(exc, 200)}") from exc


def _count(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ValueError(f"{what} is {_clip(repr(value))}, not an integer in [{lo}, {hi}]")
    return value


def read_checked(path: str | os.PathLike) -> CheckedFiles:
    """meta.json, trainer_state.json and recipe.json of a verified checkpoint, their values
    checked; :class:`CorruptCheckpointError` naming the file and the value otherwise."""
    p = Path(path)
    m = STEP_RE.match(p.name)
    folder_step = int(m.group(1)) if m else None
    meta, ts = _read_json(p / META), _read_json(p / TRAINER_STATE)
    recipe = _read_json(p / RECIPE) if (p / RECIPE).is_file() else None
    where = p / META
    try:
        if not isinstance(meta, dict):
            raise ValueError("is not a mapping")
        step = _count(meta.get("step"), "step", 0, MAX_STEP)
        world = _count(meta.get("world_size", 1), "world_size", 1, MAX_WORLD)
        where = p / TRAINER_STATE
        if not isinstance(ts, dict):
            raise ValueError("is not a mapping")
        _count(ts.get("step"), "step", 0, MAX_STEP)
        if ts["step"] != step or (folder_step is not None and step != folder_step):
            raise ValueError(f"step is {ts['step']}, but {META} says {step} and the folder {p.name}")
        for key in ("data_state", "trainer_state", "scheduler"):  # None: not saved
            if ts.get(key) is not None and not isinstance(ts[key], dict):
                raise ValueError(f"{key} is not a mapping")
        where = p / RECIPE
        if recipe is not None:
            if not isinstance(recipe, dict) or not isinstance(recipe.get("train", {}), dict):
                raise ValueError("is not a recipe mapping")
            planned = recipe.get("train", {}).get("max_steps")
            if type(planned) is int and step > planned:
                raise ValueError(f"step {step} is beyond the run's planned train.max_steps {planned}")
    except ValueError as exc:
        raise CorruptCheckpointError(f"'{where}': {exc}") from exc
    return CheckedFiles(step=step, world_size=world, trainer_state=ts, recipe=recipe)


def check(path: str | os.PathLike) -> CheckedFiles:
    """:func:`verify_checkpoint`, then :func:`read_checked`: what a load may use."""
    p = Path(path)
    problem = verify_checkpoint(p)
    if problem == LEGACY_REASON:
        raise CheckpointError(f"'{p}': {LEGACY_REASON}")
    if problem:
        raise CorruptCheckpointError(f"'{p}' is damaged: {problem}")
    return read_checked(p)
