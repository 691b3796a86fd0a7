"""World-size-2 check of a LoRA student under FSDP2 against an unsharded single-process reference
(run by tests/integration/test_lora.py under ``python -m torch.distributed.run --nproc_per_node 2``).

Every rank builds the student from the same recipe (same seed: same adapters everywhere) and an
unsharded reference that sees the global batch with an exact token-mean loss. Checked on every
rank: only adapters get gradients and optimizer state, their gradients and updated values match
the reference, base weights stay bitwise equal, and a checkpoint round trip at world size 2
restores the adapters. Rank 0 exports (merged + adapter folder) and writes a JSON summary with
probe logits of the reference, for the test process to reload and compare.

    python -m torch.distributed.run --nproc_per_node 2 lora_two_ranks.py MODEL_DIR WORK_DIR RESULT_JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import VOCAB, kd_token_losses, teacher_logits  # noqa: E402


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def recipe(model_dir: str):
    from omegaconf import OmegaConf

    from kdcore.recipe.loading import Recipe

    r = OmegaConf.structured(Recipe)
    r.teacher.path = model_dir
    r.student.lora.enabled = True
    r.student.lora.r = 4
    r.student.lora.dropout = 0.0  # the reference sees other batches: dropout masks would differ
    r.train.lr, r.train.warmup_steps, r.train.max_steps = 1e-2, 0, 4
    return r


def batch(rank: int):
    g = torch.Generator().manual_seed(20 + rank)
    ids = torch.randint(3, VOCAB, (2, 8 + rank), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : 1 + rank] = 0
    return ids, mask


def main() -> None:
    from kdcore.infra import distributed as kdist
    from kdcore.storage.checkpoint import export_hf, load_checkpoint, save_checkpoint
    from kdcore.modeling.student import (Student, build_optimizer, build_student, clip_gradients, loss_scale,
                                student_head_weight, student_hidden)

    env = kdist.init_distributed("cpu")
    kdist.setup_threads(1)
    assert env.world_size == 2, f"expected 2 ranks, got {env.world_size}"
    model_dir, work, result = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    r = recipe(model_dir)

    st = Student.from_recipe(r)
    ref = build_student(r)  # unsharded, same seed: the same adapters
    ref_opt = build_optimizer(ref, r.train.lr, r.train.weight_decay)
    base_before = {n: full(p).detach().clone() for n, p in st.model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in st.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable), sorted(trainable)[:5]
    in_opt = {id(p) for g in st.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in st.model.parameters() if p.requires_grad}, "optimizer holds frozen params"

    every = [batch(q) for q in range(env.world_size)]
    n_global = sum(int(m.sum()) for _, m in every)
    ids, mask = every[env.rank]
    st.begin_micro_batch(True)
    h = student_hidden(st.model, ids, mask)
    loss = kd_token_losses(h, student_head_weight(st.model), teacher_logits(ids), mask).sum() * loss_scale(n_global)
    loss.backward()
    for q_ids, q_mask in every:
        ref_h = ref.get_base_model().model(input_ids=q_ids, attention_mask=q_mask).last_hidden_state
        w = ref.get_output_embeddings().weight
        (kd_token_losses(ref_h, w, teacher_logits(q_ids), q_mask).sum() / n_global).backward()

    ref_params = dict(ref.named_parameters())
    max_err = 0.0
    for n, p in st.model.named_parameters():
        q = ref_params[n]
        if not p.requires_grad:
            assert p.grad is None, f"frozen {n} got a gradient"
            continue
        err = (full(p.grad) - q.grad).abs().max().item()
        max_err = max(max_err, err)
        assert torch.allclose(full(p.grad), q.grad, rtol=1e-4, atol=1e-6), f"grad mismatch {n}: {err}"
    assert st.step().stepped
    clip_gradients(ref, [], r.train.max_grad_norm)
    ref_opt.step()
    for n, p in st.model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(full(p), ref_params[n], rtol=1e-5, atol=1e-6), f"adapter differs after step: {n}"
        else:
            assert torch.equal(full(p), base_before[n]), f"frozen {n} changed"
    changed = sum(not torch.equal(full(p), torch.zeros_like(full(p))) for n, p in st.model.named_parameters()
                  if ".lora_B." in n)
    assert changed > 0, "lora_B (zero-initialised) did not move"

    ckpt = work / "ckpt"
    save_checkpoint(ckpt, 1, model=st.model, optimizer=st.optimizer, scheduler=st.scheduler)
    r2 = recipe(model_dir)
    r2.train.seed = 7  # other initial adapters: the checkpoint must overwrite them
    st2 = Student.from_recipe(r2)
    load_checkpoint(ckpt / "step_1", model=st2.model, optimizer=st2.optimizer, scheduler=st2.scheduler)
    for (n, p), (_, q) in zip(st.model.named_parameters(), st2.model.named_parameters()):
        assert torch.equal(full(p), full(q)), f"not restored at world size 2: {n}"

    export_hf(st.model, None, work / "hf")
    probe = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    ref.eval()
    with torch.no_grad():
        ref_logits = ref(input_ids=probe).logits
    if env.rank == 0:
        result.write_text(json.dumps({"max_grad_err": max_err, "export_dir": str(work / "hf"),
                                      "adapter_dir": str(work / "hf_adapter"), "probe_ids": probe.tolist(),
                                      "ref_logits": ref_logits.tolist()}))
    kdist.barrier()  # leave together: a peer closing its sockets mid-collective aborts gloo
    kdist.teardown()


if __name__ == "__main__":
    main()
