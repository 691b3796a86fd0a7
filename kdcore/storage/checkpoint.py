"""Resumable checkpoints (torch.distributed.checkpoint) and the final Hugging Face export.

Layout of a checkpoint directory::

    <dir>/step_<n>/          one resumable state, complete once it has this name
        dcp.json, __<r>_0.distcp    DCP: student model + optimizer + extra modules (sharded);
                                    DCP's metadata as JSON, its pickled .metadata deleted
        rank_<r>.safetensors        this rank's RNG states (torch, cuda, numpy; python's as JSON)
        trainer_state.json          step, scheduler, data position, trainer extras (rank 0)
        recipe.json                 the resolved recipe of the run that wrote it
        meta.json                   step, world size, versions
        manifest.json               size and sha256 of every file above; written last
    <dir>/step_<n>.tmp/      a save in progress (or killed); never read, removed by the next save
    <dir>/latest             "step_<n>", replaced atomically after the rename

A save writes everything into ``step_<n>.tmp`` (files fsynced), renames it to ``step_<n>``, then
replaces ``latest`` with ``os.replace``: a kill at any point leaves the previous good checkpoint
and a ``latest`` that names a complete one. :func:`find_latest` trusts ``latest`` when it names a
complete checkpoint and otherwise falls back to the highest complete ``step_<n>``. A save or
export that fails for an OS reason (disk full), however a library wrapped it, removes its
``.tmp`` folder, leaves ``latest`` alone and raises one line with the reason.

Loading never runs code from the folder: no pickles are written or read (JSON and
safetensors; DCP's metadata is JSON, an older checkpoint's pickled ``.metadata`` goes through an
exact allow-list, see :mod:`kdcore.storage.safe_dcp`). What a folder may hold and the checks it passes
before any of it is read (manifest, then values) are :mod:`kdcore.storage.checkpoint_files`';
:func:`load_latest` falls back to the newest checkpoint that passes.

Resuming restores parameters, optimizer moments, schedule, RNG streams and the data position
exactly, so a resumed run continues bit for bit (CPU, same world size). Model and optimizer go
through DCP, so they also reshard to a different world size; per-rank RNG streams then come from
rank ``r mod old_world_size``.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from kdcore.infra import distributed as kdist
from kdcore.storage.checkpoint_files import (  # noqa: F401  (re-exported: kdcore.storage.checkpoint is the API)
    LATEST, LEGACY_REASON, LEGACY_TRAINER_STATE, MANIFEST, META, RECIPE, RNG_SUFFIX, STEP_PREFIX, TMP_SUFFIX,
    TRAINER_STATE, CheckpointError, CorruptCheckpointError, check, file_record as _file_record, find_latest,
    is_complete as _is_complete, list_checkpoints, read_checked, step_dir_name, verify_checkpoint, write_manifest,
)
from kdcore.infra.exceptions import find_in_chain
from kdcore.storage.aligner_export import save_aligners
from kdcore.data.images import processor_for
from kdcore.modeling.vision import model_class
from kdcore.storage.safe_dcp import write_json_metadata, JSON_NAME, PICKLED_NAME, read_metadata, SafeFileSystemReader, SafeLoadPlanner


@dataclass
class ResumeState:
    """What a trainer needs back from a checkpoint besides the restored objects."""

    step: int  # optimizer steps completed when it was saved
    data_state: dict  # the opaque data position the trainer saved
    trainer_state: dict = field(default_factory=dict)  # any other trainer-owned state
    path: Path | None = None
    recipe: dict | None = None  # the resolved recipe saved with it (None for checkpoints without one)


# --------------------------------------------------------------------------------------------
# small filesystem helpers


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not allow opening directories; rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


_OS_ERRNO_RE = re.compile(r"os error (\d+)")
NEARLY_FULL = 64 << 20  # free bytes under which a failed write is put down to a full filesystem


def os_reason(exc: BaseException, folder: Path | None = None) -> str | None:
    """The operating system's reason behind a failed write, however a library wrapped it: an
    ``OSError`` in the chain (DCP's CheckpointException included), safetensors' "os error 28";
    torch's own writer drops the errno ("unexpected pos 704 vs 598"), so a failure while
    ``folder``'s filesystem is nearly full is called what it is. None otherwise."""
    found = find_in_chain(exc, OSError)
    if found is not None:
        return found.strerror or str(found)
    todo, seen = [exc], set()
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        m = _OS_ERRNO_RE.search(str(e))
        if m:
            return os.strerror(int(m.group(1)))
        todo += [e.__cause__, e.__context__]
        for failure in (getattr(e, "failures", None) or {}).values():
            todo.append(failure[0] if isinstance(failure, tuple) else failure)
    if folder is not None:
        try:
            st = os.statvfs(folder)
        except OSError:
            return None
        free = st.f_bavail * st.f_frsize
        if free < NEARLY_FULL:
            return f"{os.strerror(errno.ENOSPC)} ({free >> 10} KiB free)"
    return None


# --------------------------------------------------------------------------------------------
# state gathering


class _Holder(nn.Module):
    """One module tree over the student and the extra modules, so a single optimizer state
    dict maps every parameter (extras included) to a stable name."""

    def __init__(self, model: nn.Module, extra_modules: Sequence[nn.Module]):
        super().__init__()
        self.student = model
        self.extra = nn.ModuleList(list(extra_modules))


def _rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's RNG streams as (tensors for safetensors, JSON-able values)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, t in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = t
    values = {"python": [py_version, list(py_state), py_gauss],
              "numpy": [np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]}
    return tensors, values


def _set_rng_state(tensors: dict[str, torch.Tensor], values: dict) -> None:
    version, state, gauss = values["python"]
    random.setstate((version, tuple(state), gauss))
    name, pos, has_gauss, cached = values["numpy"]
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda_")), key=lambda k: int(k.split("_")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])


def _write_rng_file(path: Path, world: int) -> None:
    from safetensors.torch import save

    tensors, values = _rng_state()
    data = save(tensors, metadata={"values": json.dumps(values), "world_size": str(world)})
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _read_rng_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            values = json.loads((f.metadata() or {})["values"])
    except Exception as exc:
        raise CorruptCheckpointError(f"'{path}' is unreadable: {type(exc).__name__}: {exc}") from exc
    return tensors, values


def _state_options():
    """A LoRA student's checkpoint holds only what trains (adapters, extras): its frozen base is
    rebuilt from the recipe, whose student section a resume may not change. Loading is then not
    strict in torch's sense; :func:`_check_model_keys` checks the saved and wanted keys instead."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=True, strict=False)


def _app_state(model, optimizer, extra_modules):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from kdcore.modeling.lora import is_lora_model

    holder = _Holder(model, extra_modules)
    options = _state_options() if is_lora_model(model) else None
    msd, osd = get_state_dict(holder, optimizer, options=options)
    if options is not None:  # torch drops frozen parameters by name, not a tied head's second name
        for name, p in holder.named_parameters(remove_duplicate=False):
            if not p.requires_grad:
                msd.pop(name, None)
    return holder, {"model": msd, "optim": osd}, options


def _write_json_synced(obj: Any, path: Path, what: str) -> None:
    try:
        text = json.dumps(obj)
    except (TypeError, ValueError) as exc:  # checkpoints hold JSON, never pickles
        raise CheckpointError(f"{what} must be JSON-serialisable to be checkpointed: {exc}") from exc
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------------------------
# save / load


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler=None,
                    extra_modules: Sequence[nn.Module] = (), data_state: dict | None = None,
                    trainer_state: dict | None = None, recipe: dict | None = None,
                    keep: int = 2, write_extra=None) -> Path:
    """Write ``<ckpt_dir>/step_<step>`` atomically and point ``latest`` at it; keep the newest
    ``keep`` checkpoints. Collective: every rank calls it with its own shards.

    ``data_state``/``trainer_state``/``recipe``: JSON-able dicts, identical on every rank
    (rank 0's are saved). ``write_extra(folder)``: rank 0 writes more files into the folder
    before it is sealed (so the manifest lists them). Checkpoints of a later step than ``step``
    (an abandoned branch of a run that was resumed from an older checkpoint) are removed. A save
    that fails for an OS reason (disk full, read-only folder; however DCP or safetensors wrapped
    it) removes its partial ``.tmp`` folder, keeps ``latest`` and the previous checkpoints and
    raises :class:`CheckpointError` with the OS's reason. Returns the final path.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    d = Path(ckpt_dir)
    final = d / step_dir_name(step)
    tmp = d / (step_dir_name(step) + TMP_SUFFIX)
    try:
        _save_into(tmp, final, step, model=model, optimizer=optimizer, scheduler=scheduler,
                   extra_modules=extra_modules, data_state=data_state, trainer_state=trainer_state,
                   recipe=recipe, keep=keep, write_extra=write_extra)
    except (Exception, _dcp_exception()) as exc:
        if find_in_chain(exc, KeyboardInterrupt) is not None:  # Ctrl-C inside DCP's writer comes back wrapped
            raise KeyboardInterrupt(f"interrupted while saving {final.name}") from exc
        reason = str(exc) if isinstance(exc, PeerSaveError) else os_reason(exc, d)
        if reason is None:
            raise
        where = ": "
        if kdist.get_world_size() > 1:  # every rank's line names the rank that failed
            where = " on " if isinstance(exc, PeerSaveError) else f" on rank {kdist.get_rank()}: "
        if kdist.get_rank() == 0:  # the one writer of the folder's layout (and of `latest`, left untouched)
            shutil.rmtree(tmp, ignore_errors=True)
        kept = find_latest(d)
        kept_text = f"the last good checkpoint '{kept}' is kept" if kept else "no earlier checkpoint exists"
        raise CheckpointError(f"saving checkpoint {final.name} in '{d}' failed{where}{reason}; removed the partial "
                              f"{tmp.name}, {kept_text}") from None
    return final


def _dcp_exception() -> type:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException  # a BaseException: named explicitly to be caught


def _save_into(tmp: Path, final: Path, step: int, *, model, optimizer, scheduler, extra_modules,
               data_state, trainer_state, recipe, keep, write_extra=None) -> None:
    import torch.distributed.checkpoint as dcp

    d = final.parent
    rank, world = kdist.get_rank(), kdist.get_world_size()

    def prepare() -> None:
        if rank == 0:
            d.mkdir(parents=True, exist_ok=True)
            for stale in d.glob(f"{STEP_PREFIX}*{TMP_SUFFIX}"):
                shutil.rmtree(stale, ignore_errors=True)  # killed saves; only one writer per directory
            tmp.mkdir()

    _agreed(prepare, d, tmp)
    metadata = {}

    def write_shards() -> None:
        _, state, _ = _app_state(model, optimizer, extra_modules)
        metadata["dcp"] = dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
        _write_rng_file(tmp / f"rank_{rank}{RNG_SUFFIX}", world)

    _agreed(write_shards, d, tmp)  # every shard and RNG file is on disk before rank 0 seals the folder
    _agreed(lambda: _seal(tmp, final, step, metadata["dcp"], data_state=data_state, trainer_state=trainer_state,
                          scheduler=scheduler, recipe=recipe, keep=keep, write_extra=write_extra), d, tmp)


class PeerSaveError(RuntimeError):
    """Another rank's part of a save failed; the text names the rank and its cause."""


def _agreed(part, d: Path, tmp: Path) -> None:
    """Run ``part`` on every rank, then agree: when it failed on any rank, every rank raises
    (the failing one its own error, the others :class:`PeerSaveError` naming the first failing
    rank and its cause), instead of waiting at a barrier until the process group times out.
    Rank 0 removes the partial ``tmp`` first, so no rank says it is gone before it is."""
    err = None
    try:
        part()
    except (Exception, _dcp_exception()) as exc:
        if find_in_chain(exc, KeyboardInterrupt) is not None or kdist.get_world_size() == 1:
            raise
        err = exc
    if kdist.get_world_size() == 1:
        return
    why = "" if err is None else (os_reason(err, d) or f"{type(err).__name__}: {err}".splitlines()[0])
    reasons = kdist.all_gather_text(why)
    failed = [(r, text) for r, text in enumerate(reasons) if text]
    if failed:  # every rank knows now: a barrier all of them reach, not a hang
        if kdist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        kdist.barrier()  # a rank that raised first might exit, and torchrun stop rank 0 mid-removal
    if err is not None:
        raise err
    if failed:
        raise PeerSaveError(f"rank {failed[0][0]}: {failed[0][1]}")


def _seal(tmp: Path, final: Path, step: int, metadata, *, data_state, trainer_state, scheduler, recipe, keep,
          write_extra) -> None:
    """Rank 0: the JSON files, the manifest, the rename and ``latest`` (the last thing written)."""
    d, world = final.parent, kdist.get_world_size()
    if kdist.get_rank() == 0:
        write_json_metadata(tmp, metadata)  # JSON instead of DCP's pickle: nothing to unpickle on load
        _write_json_synced({"step": step, "data_state": dict(data_state or {}),
                            "trainer_state": dict(trainer_state or {}),
                            "scheduler": scheduler.state_dict() if scheduler is not None else None},
                           tmp / TRAINER_STATE, "the trainer state")
        if recipe is not None:
            _write_json_synced(recipe, tmp / RECIPE, "the recipe")
        if write_extra is not None:
            write_extra(tmp)
        _write_json_synced({"step": step, "world_size": world, "time": time.time(), "torch": torch.__version__},
                           tmp / META, "meta")
        write_manifest(tmp, _write_json_synced)
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step: move the old one aside, never leave neither
            old = d / (final.name + ".old" + TMP_SUFFIX)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(d)
        _write_atomic_bytes(d / LATEST, f"{final.name}\n".encode())
        _prune(d, step, keep)


def _prune(d: Path, current: int, keep: int) -> None:
    ckpts = list_checkpoints(d)
    for s, p in ckpts:
        if s > current:
            shutil.rmtree(p, ignore_errors=True)
    older = [p for s, p in ckpts if s <= current]
    for p in older[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def _check_model_keys(p: Path, model_state: dict) -> None:
    """DCP loads only the keys the new model asks for and ignores the rest: a 4-layer
    checkpoint would load into a 2-layer student without a word. Both sides must match.
    Reading the metadata also checks it (:func:`kdcore.storage.safe_dcp.read_metadata`)."""
    try:
        saved_meta = read_metadata(p).state_dict_metadata
    except Exception as exc:  # nothing in the reader runs code from the file: whatever fails, the file is bad
        name = JSON_NAME if (p / JSON_NAME).is_file() else PICKLED_NAME
        raise CorruptCheckpointError(f"'{p / name}' is refused: {type(exc).__name__}: {exc}") from exc
    saved = {k[len("model."):] for k in saved_meta if k.startswith("model.")}
    wanted = set(model_state)
    missing, unexpected = sorted(wanted - saved), sorted(saved - wanted)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise CheckpointError(f"'{p}' does not fit this run's model: parameters {'; '.join(parts)}")


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler=None, extra_modules: Sequence[nn.Module] = (), verify: bool = True) -> ResumeState:
    """Restore model, optimizer, extra modules, scheduler and this rank's RNG streams from a
    checkpoint folder in place; return the step and the trainer's saved states. Collective.

    Nothing read can run code: JSON, safetensors, and DCP read through
    :mod:`kdcore.storage.safe_dcp`. Every file is checked against the manifest first (``verify``;
    :func:`kdcore.storage.checkpoint_files.check`) and the JSON files' values after: a damaged one
    raises :class:`CorruptCheckpointError` before anything is restored. The model's parameter
    names must equal the checkpoint's (strict).

    The objects must be built as for the saved run (same model, optimizer parameter groups,
    extra modules); call it before any gradients exist (a fresh optimizer's state is created by
    DCP with a zero-lr step, which it skips when gradients are present).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    p = Path(path)
    if not p.is_dir() or not _is_complete(p):
        raise CheckpointError(f"not a complete checkpoint: '{p}'")
    if (p / LEGACY_TRAINER_STATE).exists() and not (p / TRAINER_STATE).exists():
        raise CheckpointError(f"'{p}': {LEGACY_REASON}")
    files = check(p) if verify else read_checked(p)
    ts = files.trainer_state
    # own stream when the world size is unchanged; otherwise borrow one so ranks still differ
    rng = _read_rng_file(p / f"rank_{kdist.get_rank() % files.world_size}{RNG_SUFFIX}")
    holder, state, options = _app_state(model, optimizer, extra_modules)
    _check_model_keys(p, state["model"])
    try:
        dcp.load(state, storage_reader=SafeFileSystemReader(str(p)), planner=SafeLoadPlanner())
        set_state_dict(holder, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=options)
    except (Exception, _dcp_exception()) as exc:
        raise CheckpointError(f"'{p}' does not fit this run's model/optimizer: {_short(exc)}") from exc

    if scheduler is not None:
        if ts.get("scheduler") is None:
            raise CheckpointError(f"'{p}' holds no scheduler state")
        scheduler.load_state_dict(ts["scheduler"])
    _set_rng_state(*rng)
    return ResumeState(step=files.step, data_state=ts.get("data_state") or {},
                       trainer_state=ts.get("trainer_state") or {}, path=p, recipe=files.recipe)


def _short(exc: BaseException) -> str:
    """One line per failing rank instead of DCP's full remote tracebacks."""
    failures = getattr(exc, "failures", None)
    if failures:
        return "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, (e, _tb) in sorted(failures.items()))
    return f"{type(exc).__name__}: {exc}"


def _candidates(ckpt_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, the one ``latest`` names first, then newest to oldest."""
    first = find_latest(ckpt_dir)
    rest = [p for _, p in reversed(list_checkpoints(ckpt_dir)) if p != first]
    return ([first] if first else []) + rest


def _warn(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


def _problem(cand: Path, validate=None) -> str | None:
    """What keeps a checkpoint from being used (rank 0's view), or None."""
    try:
        files = check(cand)
        if validate is not None:
            try:
                validate(files.trainer_state)
            except (ValueError, TypeError) as exc:
                raise CorruptCheckpointError(f"'{cand / TRAINER_STATE}': {exc}") from exc
    except CorruptCheckpointError as exc:
        return str(exc)
    except CheckpointError as exc:  # an older kdflow's pickles: no checkpoint of the folder is used
        raise CheckpointError(str(exc)) from None
    return None


def load_latest(ckpt_dir: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler=None, extra_modules: Sequence[nn.Module] = (), warn=_warn,
                validate=None) -> ResumeState | None:
    """:func:`load_checkpoint` of the newest checkpoint that verifies (``None`` when there is
    none at all). Damaged ones are skipped with one ``warn`` line each naming the folder and
    what is wrong; when every one is damaged, :class:`CheckpointError` says so.
    ``validate(trainer_state_json)``: the caller's check of its own saved values, raising
    ``ValueError`` for one it cannot use (that checkpoint is then skipped too)."""
    # rank 0 decides, so every rank loads the same checkpoint even if the folder changes meanwhile
    candidates = kdist.broadcast_object(_candidates(ckpt_dir) if kdist.is_main() else None)
    for cand in candidates:
        problem = kdist.broadcast_object(_problem(cand, validate) if kdist.is_main() else None)
        if problem is None:
            try:
                return load_checkpoint(cand, model=model, optimizer=optimizer, scheduler=scheduler,
                                       extra_modules=extra_modules, verify=False)
            except CorruptCheckpointError as exc:
                problem = str(exc)
        if kdist.is_main():
            warn(f"kdcore: warning: skipping checkpoint '{cand}': {problem}")
    if candidates:
        raise CheckpointError(f"no usable checkpoint in '{ckpt_dir}': all {len(candidates)} are damaged")
    return None


def latest_recipe(ckpt_dir: str | os.PathLike) -> tuple[dict | None, Path | None]:
    """The recipe saved in the checkpoint :func:`load_latest` will resume from (the newest
    that passes every check; damaged ones are skipped silently here, :func:`load_latest` names
    them), with its folder; ``(None, None)`` when none passes."""
    for cand in _candidates(ckpt_dir):
        try:
            files = check(cand)
        except CheckpointError:  # damaged, or an older kdflow's pickles: load_latest says which
            continue
        return files.recipe, cand
    return None, None


# --------------------------------------------------------------------------------------------
# Hugging Face export


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict of a (possibly FSDP2-sharded) model on rank 0; ``{}`` on other
    ranks. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _clean_config(config):
    cfg = type(config).from_dict(config.to_dict())
    if hasattr(cfg, "quantization_config"):  # GGUF-loaded sources; save_pretrained refuses them
        del cfg.quantization_config
    cfg.use_cache = True  # exported models are for inference
    return cfg


def write_folder(out: Path, save) -> None:
    """Write a folder through ``save(tmp)`` beside it, then swap it in, so a reader of ``out``
    never sees half an export (the old folder stays whole until the swap). A write that fails
    for an OS reason (disk full) removes ``<out>.tmp`` and raises :class:`CheckpointError` with
    the reason; ``out`` is left as it was."""
    tmp = out.with_name(out.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        save(tmp)
    except Exception as exc:
        reason = os_reason(exc, tmp.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        kept = f"the previous '{out.name}' is kept" if out.exists() else f"no '{out.name}' was written"
        raise CheckpointError(f"writing '{out}' failed: {reason}; removed the partial {tmp.name}, {kept}") from None
    if out.exists():
        old = out.with_name(out.name + ".old" + TMP_SUFFIX)
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def export_hf(model: nn.Module, tokenizer, out_dir: str | os.PathLike,
              dtype: torch.dtype | None = None, adapter_dir: str | os.PathLike | None = None,
              aligners: dict[str, nn.Module] | None = None) -> Path:
    """Write ``model`` (sharded or not) as a ``from_pretrained``-loadable folder: safetensors
    weights + config (+ generation config) + ``tokenizer`` (when given). Collective; rank 0
    writes. ``dtype`` casts floating weights (default: as trained, fp32 master weights).

    ``aligners``: teacher name -> an aligner trained with the student (DSKD's projectors; kept
    equal on every rank), written as ``aligners/<name>.safetensors`` (its state dict, fp32 as
    trained) so that ``kdcore eval`` scores the export as training did
    (:mod:`kdcore.storage.aligner_export`).

    A LoRA student is written merged (plain transformers loads it), and its adapters (fp32, as
    trained) to ``adapter_dir`` (default ``<out_dir>_adapter``) for ``PeftModel.from_pretrained``.

    Written to ``<out_dir>.tmp`` and renamed, so ``out_dir`` is either the old or the new export.
    """
    from kdcore.modeling import lora

    sd = full_state_dict(model)
    out = Path(out_dir)
    if kdist.is_main():
        if lora.is_lora_model(model):
            sd = lora.merge_for_export(model, sd, adapter_dir or out.with_name(out.name + "_adapter"),
                                       write_folder=write_folder)
            model = lora.unwrap(model)
        cfg = _clean_config(model.config)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        wdtype = dtype or next(v.dtype for v in sd.values() if v.is_floating_point())
        # meta init: no random init of weights that are overwritten right away
        with torch.device("meta"):
            clean = model_class(cfg).from_config(cfg)
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        missing, unexpected = clean.load_state_dict(sd, strict=False, assign=True)
        if tied:
            clean.tie_weights()
            missing = [k for k in missing if clean.get_output_embeddings() is None
                       or k != _param_name(clean, clean.get_output_embeddings().weight)]
        if missing or unexpected:
            raise CheckpointError(f"export_hf: state dict does not fit {type(clean).__name__}: "
                                  f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        gen = getattr(model, "generation_config", None)
        if gen is not None:  # keep the source model's sampling defaults (chat models ship some)
            clean.generation_config = copy.deepcopy(gen)
        if hasattr(clean.config, "dtype"):
            clean.config.dtype = wdtype
        else:
            clean.config.torch_dtype = wdtype

        def save(tmp: Path) -> None:
            clean.save_pretrained(str(tmp), safe_serialization=True)
            if tokenizer is not None:
                # a VL student's processor (image processor, template) goes with it; it saves the tokenizer too
                (processor_for(tokenizer) or tokenizer).save_pretrained(str(tmp))
            save_aligners(aligners or {}, tmp)

        write_folder(out, save)
    kdist.barrier()
    return out


def _param_name(module: nn.Module, param: torch.Tensor) -> str | None:
    for name, p in module.named_parameters(remove_duplicate=False):
        if p is param:
            return name
    return None
