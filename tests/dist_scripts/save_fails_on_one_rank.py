"""torchrun --nproc_per_node 2 save_fails_on_one_rank.py WORK OUT.json

A save that fails on one rank must stop every rank promptly with one line naming that rank and
the cause, leaving ``latest`` and the previous checkpoint alone: step 2 fails on rank 1 while
writing its shards' RNG file (the disk is full there), step 3 on rank 0 while sealing the folder.
Before, the healthy rank waited at the save's barrier until the process group timed out. Rank 0
removes the partial folder slowly here: every rank's error comes only once it is gone (it says so)."""

from __future__ import annotations

import errno
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import tiny_llama  # noqa: E402


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def main() -> None:
    from kdcore.storage import checkpoint as ckpt_mod
    from kdcore.infra import distributed as kdist
    from kdcore.storage.checkpoint import CheckpointError, save_checkpoint
    from kdcore.modeling.student import shard_student

    env = kdist.init_distributed("cpu", timeout_s=60.0)  # a hang shows as a timeout well inside the test's
    kdist.setup_threads(1)
    work = Path(sys.argv[1])
    model = tiny_llama(seed=3)
    shard_student(model, "fp32")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    d = work / "ckpt"
    save_checkpoint(d, 1, model=model, optimizer=opt)
    res = {}
    if env.rank == 0:  # a slow removal of the partial folder: no rank may say it is gone before it is
        real_rmtree = shutil.rmtree

        def slow_rmtree(path, *args, **kwargs):
            time.sleep(0.5)
            real_rmtree(path, *args, **kwargs)

        shutil.rmtree = slow_rmtree
    for step, bad_rank, name in ((2, 1, "_write_rng_file"), (3, 0, "write_manifest")):
        real = getattr(ckpt_mod, name)
        if env.rank == bad_rank:
            setattr(ckpt_mod, name, full_disk)
        t0 = time.monotonic()
        try:
            save_checkpoint(d, step, model=model, optimizer=opt)
            res[step] = {"error": None}
        except CheckpointError as exc:
            res[step] = {"error": str(exc), "seconds": time.monotonic() - t0,
                         "partial_left": (d / f"step_{step}.tmp").exists()}  # before any barrier here
        setattr(ckpt_mod, name, real)
        kdist.barrier()  # every rank's save (and rank 0's removal of the partial folder) is over
        if env.rank == 1:
            time.sleep(0.3)  # rank 1 looks late, as it does under load (the race below, made certain)
        res[step]["latest"] = (d / "latest").read_text().strip()
        res[step]["folders"] = sorted(p.name for p in d.iterdir())
        # and nobody starts the next save before every rank has looked: rank 0 would otherwise
        # create step_3.tmp while a slow rank 1 still lists the folder after step 2 (the leftover
        # `step_3.tmp` the test once failed on under load was this, not a left partial folder)
        kdist.barrier()
    (Path(sys.argv[2]).parent / f"rank{env.rank}.json").write_text(json.dumps(res))
    kdist.barrier()
    kdist.teardown()


if __name__ == "__main__":
    main()
