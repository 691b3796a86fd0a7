"""Resumable checkpoints (torch.distributed.checkpoint) and the final Hugging Face export.

Layout of a checkpoint directory::

    <dir>/step_<n>/          one resumable state, complete once it has this name
        .metadata, __<r>_0.distcp   DCP: student model + optimizer + extra modules (sharded)
        rank_<r>.pt                 this rank's RNG states (python, numpy, torch, cuda)
        trainer_state.pt            step, scheduler, data position, trainer extras (rank 0)
        meta.json                   step, world size, versions; written last
    <dir>/step_<n>.tmp/      a save in progress (or killed); never read, removed by the next save
    <dir>/latest             "step_<n>", replaced atomically after the rename

A save writes everything into ``step_<n>.tmp`` (files fsynced), renames it to ``step_<n>``, then
replaces ``latest`` with ``os.replace``: a kill at any point leaves the previous good checkpoint
and a ``latest`` that names a complete one. :func:`find_latest` trusts ``latest`` when it names a
complete checkpoint and otherwise falls back to the highest complete ``step_<n>``.

Resuming restores parameters, optimizer moments, schedule, RNG streams and the data position
exactly, so a resumed run continues bit for bit (CPU, same world size). Model and optimizer go
through DCP, so they also reshard to a different world size; per-rank RNG streams then come from
rank ``r mod old_world_size``.
"""

from __future__ import annotations

import copy
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

from kdcore import distributed as kdist

STEP_PREFIX = "step_"
TMP_SUFFIX = ".tmp"
LATEST = "latest"
META = "meta.json"
TRAINER_STATE = "trainer_state.pt"
_STEP_RE = re.compile(rf"^{STEP_PREFIX}(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the run, named in the message."""


@dataclass
class ResumeState:
    """What a trainer needs back from a checkpoint besides the restored objects."""

    step: int  # optimizer steps completed when it was saved
    data_state: dict  # the opaque data position the trainer saved
    trainer_state: dict = field(default_factory=dict)  # any other trainer-owned state
    path: Path | None = None


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
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _torch_save_synced(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step}"


def _is_complete(path: Path) -> bool:
    return (path / META).is_file() and (path / ".metadata").is_file()


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``ckpt_dir`` as ``(step, path)``, oldest first
    (``.tmp`` leftovers and incomplete folders are ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and _is_complete(p):
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_latest(ckpt_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names if complete, else the highest
    complete ``step_<n>``, else None."""
    d = Path(ckpt_dir)
    pointer = d / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        cand = d / name
        if _STEP_RE.match(name) and cand.is_dir() and _is_complete(cand):
            return cand
    ckpts = list_checkpoints(d)
    return ckpts[-1][1] if ckpts else None


# --------------------------------------------------------------------------------------------
# state gathering


class _Holder(nn.Module):
    """One module tree over the student and the extra modules, so a single optimizer state
    dict maps every parameter (extras included) to a stable name."""

    def __init__(self, model: nn.Module, extra_modules: Sequence[nn.Module]):
        super().__init__()
        self.student = model
        self.extra = nn.ModuleList(list(extra_modules))


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _app_state(model, optimizer, extra_modules):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    holder = _Holder(model, extra_modules)
    msd, osd = get_state_dict(holder, optimizer)
    return holder, {"model": msd, "optim": osd}


# --------------------------------------------------------------------------------------------
# save / load


def save_checkpoint(ckpt_dir: str | os.PathLike, step: int, *, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler=None,
                    extra_modules: Sequence[nn.Module] = (), data_state: dict | None = None,
                    trainer_state: dict | None = None, keep: int = 2) -> Path:
    """Write ``<ckpt_dir>/step_<step>`` atomically and point ``latest`` at it; keep the newest
    ``keep`` checkpoints. Collective: every rank calls it with its own shards.

    ``data_state``/``trainer_state``: picklable dicts, identical on every rank (rank 0's are
    saved). Checkpoints of a later step than ``step`` (an abandoned branch of a run that was
    resumed from an older checkpoint) are removed. Returns the final path.
    """
    import torch.distributed.checkpoint as dcp

    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    d = Path(ckpt_dir)
    final = d / step_dir_name(step)
    tmp = d / (step_dir_name(step) + TMP_SUFFIX)
    rank, world = kdist.get_rank(), kdist.get_world_size()
    if rank == 0:
        d.mkdir(parents=True, exist_ok=True)
        for stale in d.glob(f"{STEP_PREFIX}*{TMP_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)  # killed saves; only one writer per directory
        tmp.mkdir()
    kdist.barrier()

    _, state = _app_state(model, optimizer, extra_modules)
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp), sync_files=True))
    _torch_save_synced({"rng": _rng_state(), "world_size": world}, tmp / f"rank_{rank}.pt")
    kdist.barrier()  # every shard and RNG file is on disk before rank 0 seals the folder

    if rank == 0:
        _torch_save_synced({"step": step, "data_state": dict(data_state or {}),
                            "trainer_state": dict(trainer_state or {}),
                            "scheduler": scheduler.state_dict() if scheduler is not None else None},
                           tmp / TRAINER_STATE)
        meta = {"step": step, "world_size": world, "time": time.time(), "torch": torch.__version__}
        with open(tmp / META, "w") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
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
    kdist.barrier()
    return final


def _prune(d: Path, current: int, keep: int) -> None:
    ckpts = list_checkpoints(d)
    for s, p in ckpts:
        if s > current:
            shutil.rmtree(p, ignore_errors=True)
    older = [p for s, p in ckpts if s <= current]
    for p in older[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler=None, extra_modules: Sequence[nn.Module] = ()) -> ResumeState:
    """Restore model, optimizer, extra modules, scheduler and this rank's RNG streams from a
    checkpoint folder in place; return the step and the trainer's saved states. Collective.

    The objects must be built as for the saved run (same model, optimizer parameter groups,
    extra modules); call it before any gradients exist (a fresh optimizer's state is created by
    DCP with a zero-lr step, which it skips when gradients are present).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import set_state_dict

    p = Path(path)
    if not p.is_dir() or not _is_complete(p):
        raise CheckpointError(f"not a complete checkpoint: '{p}'")
    meta = json.loads((p / META).read_text())
    holder, state = _app_state(model, optimizer, extra_modules)
    try:
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(p)))
        set_state_dict(holder, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    except (Exception, CheckpointException) as exc:  # DCP's CheckpointException is a BaseException
        raise CheckpointError(f"'{p}' does not fit this run's model/optimizer: {_short(exc)}") from exc

    ts = torch.load(p / TRAINER_STATE, map_location="cpu", weights_only=False)
    if scheduler is not None:
        if ts.get("scheduler") is None:
            raise CheckpointError(f"'{p}' holds no scheduler state")
        scheduler.load_state_dict(ts["scheduler"])
    saved_world = int(meta.get("world_size", 1))
    rank = kdist.get_rank()
    # own stream when the world size is unchanged; otherwise borrow one so ranks still differ
    rank_file = p / f"rank_{rank % saved_world}.pt"
    _set_rng_state(torch.load(rank_file, map_location="cpu", weights_only=False)["rng"])
    return ResumeState(step=int(ts["step"]), data_state=ts.get("data_state") or {},
                       trainer_state=ts.get("trainer_state") or {}, path=p)


def _short(exc: BaseException) -> str:
    """One line per failing rank instead of DCP's full remote tracebacks."""
    failures = getattr(exc, "failures", None)
    if failures:
        return "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, (e, _tb) in sorted(failures.items()))
    return f"{type(exc).__name__}: {exc}"


def load_latest(ckpt_dir: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler=None, extra_modules: Sequence[nn.Module] = ()) -> ResumeState | None:
    """:func:`load_checkpoint` of :func:`find_latest` (``None`` when there is no checkpoint)."""
    # rank 0 decides, so every rank loads the same checkpoint even if the folder changes meanwhile
    found = kdist.broadcast_object(find_latest(ckpt_dir) if kdist.is_main() else None)
    if found is None:
        return None
    return load_checkpoint(found, model=model, optimizer=optimizer, scheduler=scheduler,
                           extra_modules=extra_modules)


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


def export_hf(model: nn.Module, tokenizer, out_dir: str | os.PathLike,
              dtype: torch.dtype | None = None) -> Path:
    """Write ``model`` (sharded or not) as a ``from_pretrained``-loadable folder: safetensors
    weights + config (+ generation config) + ``tokenizer`` (when given). Collective; rank 0
    writes. ``dtype`` casts floating weights (default: as trained, fp32 master weights).

    Written to ``<out_dir>.tmp`` and renamed, so ``out_dir`` is either the old or the new export.
    """
    from transformers import AutoModelForCausalLM

    sd = full_state_dict(model)
    out = Path(out_dir)
    if kdist.is_main():
        cfg = _clean_config(model.config)
        if dtype is not None:
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        wdtype = dtype or next(v.dtype for v in sd.values() if v.is_floating_point())
        # meta init: no random init of weights that are overwritten right away
        with torch.device("meta"):
            clean = AutoModelForCausalLM.from_config(cfg)
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
        tmp = out.with_name(out.name + TMP_SUFFIX)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        clean.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if out.exists():
            old = out.with_name(out.name + ".old" + TMP_SUFFIX)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    kdist.barrier()
    return out


def _param_name(module: nn.Module, param: torch.Tensor) -> str | None:
    for name, p in module.named_parameters(remove_duplicate=False):
        if p is param:
            return name
    return None
