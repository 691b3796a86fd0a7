"""A sharded tiny student with optimizer and schedule after real steps, and snapshot comparison."""

from __future__ import annotations

from dist_scripts.common import HIDDEN, VOCAB, kd_token_losses, teacher_logits, tiny_llama

import torch

from kdcore.modeling.student import build_optimizer, build_scheduler, shard_student, student_head_weight, student_hidden


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def trained_setup(seed=0, tied=False, steps=1, sharded=True):
    """A tiny student (FSDP2-sharded unless ``sharded`` is false) + projector + AdamW + schedule
    after ``steps`` real steps."""
    model = tiny_llama(seed=seed, tie_word_embeddings=tied)
    if sharded:
        shard_student(model, "fp32")
    proj = torch.nn.Linear(HIDDEN, HIDDEN)
    opt = build_optimizer(model, 1e-2, 0.01, [proj])
    sched = build_scheduler(opt, 1, 10, 0.1)
    for s in range(steps):
        ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(s))
        mask = torch.ones_like(ids)
        h = proj(student_hidden(model, ids, mask))
        kd_token_losses(h, student_head_weight(model), teacher_logits(ids), mask).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, proj, opt, sched


def snapshot(model, proj, opt):
    params = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    params.update({f"proj.{n}": p.detach().clone() for n, p in proj.named_parameters()})
    moments = [full(v).clone() for p in list(model.parameters()) + list(proj.parameters())
               for k, v in sorted(opt.state[p].items())]
    return params, moments


def assert_same(a, b):
    pa, ma = a
    pb, mb = b
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert len(ma) == len(mb) and all(torch.equal(x, y) for x, y in zip(ma, mb))
