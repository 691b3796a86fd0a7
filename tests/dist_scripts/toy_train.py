"""A toy trainer loop over the real student/checkpoint code, for the resume-exactness test.

It mimics the trainer: seeds everything, builds the student from a recipe (init=config, with
dropout so the torch RNG matters), uses the numpy and python RNGs for batch shapes, keeps a data
cursor in ``data_state``, accumulates 2 micro-batches per step, clips, schedules, and can stop
after a step with a checkpoint or resume from the latest one.

    python toy_train.py MODEL_DIR CKPT_DIR --steps 6 [--stop-after 3] [--resume] --out result.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HIDDEN, VOCAB, kd_token_losses, teacher_logits  # noqa: E402


def make_recipe(model_dir: str, precision: str = "fp32"):
    from omegaconf import OmegaConf

    from kdcore.recipe.loading import Recipe

    r = OmegaConf.structured(Recipe)
    r.teacher.path = model_dir
    r.student.init = "config"
    r.student.config_overrides = {"attention_dropout": 0.1}  # forward consumes the torch RNG
    r.train.seed = 7
    r.train.lr = 3e-3
    r.train.warmup_steps = 2
    r.train.max_steps = 6
    r.train.min_lr_ratio = 0.1
    r.train.max_grad_norm = 0.02  # small enough that clipping is active
    r.train.weight_decay = 0.01
    r.train.precision = precision
    return r


def params_digest(model, extras) -> str:
    from kdcore.storage.checkpoint import full_state_dict

    h = hashlib.sha256()
    for k, v in sorted(full_state_dict(model).items()):
        h.update(k.encode())
        h.update(v.float().numpy().tobytes())
    for m in extras:
        for k, v in sorted(m.state_dict().items()):
            h.update(v.numpy().tobytes())
    return h.hexdigest()


def run(model_dir: str, ckpt_dir: str, steps: int, stop_after: int | None = None, resume: bool = False,
        precision: str = "fp32", grad_accum: int = 2) -> dict:
    from kdcore.infra import distributed as kdist
    from kdcore.storage.checkpoint import load_latest, save_checkpoint
    from kdcore.modeling.student import Student, loss_scale, student_head_weight, student_hidden

    owns_group = not kdist.is_initialized()
    kdist.init_distributed("cpu")
    threads_before = torch.get_num_threads()
    kdist.setup_threads(1)  # same threads in every process: CPU reductions depend on the split
    recipe = make_recipe(model_dir, precision)
    seed = recipe.train.seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    projector = torch.nn.Linear(HIDDEN, HIDDEN)  # an aligner-style extra trainable module
    student = Student.from_recipe(recipe, extra_modules=[projector], extra_lr=1e-3)
    student.train()
    start, data_state = 0, {"cursor": 0}
    if resume:
        rs = load_latest(ckpt_dir, model=student.model, optimizer=student.optimizer,
                         scheduler=student.scheduler, extra_modules=student.extra_modules)
        assert rs is not None, f"no checkpoint in {ckpt_dir}"
        start, data_state = rs.step, dict(rs.data_state)
    losses, lrs, norms = [], [], []
    for step in range(start, steps):
        batches = []
        for _ in range(grad_accum):
            g = torch.Generator().manual_seed(1000 + data_state["cursor"])
            data_state["cursor"] += 1
            length = int(np.random.randint(6, 12))  # numpy RNG: must be restored on resume
            ids = torch.randint(3, VOCAB, (2, length), generator=g)
            mask = torch.ones_like(ids)
            mask[1, : random.randint(1, 4)] = 0  # python RNG: left padding of the second row
            batches.append((ids, mask))
        n_tokens = sum(int(m.sum()) for _, m in batches)
        total = 0.0
        for i, (ids, mask) in enumerate(batches):
            student.begin_micro_batch(i == grad_accum - 1)
            h = student_hidden(student.model, ids, mask)
            w = student_head_weight(student.model)
            h = projector(h.float()).to(h.dtype)
            loss = kd_token_losses(h, w, teacher_logits(ids), mask).sum() * loss_scale(n_tokens)
            loss.backward()
            total += float(loss.detach())
        stats = student.step()
        losses.append(total)
        lrs.append(stats.lr)
        norms.append(stats.grad_norm)
        if stop_after is not None and step + 1 == stop_after:
            save_checkpoint(ckpt_dir, step + 1, model=student.model, optimizer=student.optimizer,
                            scheduler=student.scheduler, extra_modules=student.extra_modules,
                            data_state=data_state, keep=2)
            break
    result = {"start": start, "losses": [x.hex() for x in losses], "lrs": lrs, "norms": norms,
              "digest": params_digest(student.model, student.extra_modules)}
    torch.set_num_threads(threads_before)
    if owns_group:
        kdist.teardown()
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("ckpt_dir")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--stop-after", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    res = run(a.model_dir, a.ckpt_dir, a.steps, a.stop_after, a.resume, a.precision)
    Path(a.out).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
