"""World-size-2 check of the FSDP2 student against a single-process reference (run by
tests/integration/test_student.py under ``python -m torch.distributed.run --nproc_per_node 2``).

Every rank also builds an unsharded reference model that sees the *global* batch (both ranks'
micro-batches) with an exact global token-mean loss. The sharded student sees only its rank's
share, 2 micro-batches with gradient accumulation, scaled by ``loss_scale``. Checked on every
rank: gathered gradients, extra-module gradients, grad norm, parameters after a clipped AdamW
step, a DCP checkpoint round trip into fresh objects, and (rank 0) an HF export gathered from
both ranks. The same gradient check for a vision-language student (a tiny LLaVA with pixel
inputs; its tower frozen, and training). Rank 0 writes a JSON summary to argv[2]; any mismatch
raises (non-zero exit).

    python -m torch.distributed.run --nproc_per_node 2 fsdp_two_ranks.py WORK_DIR RESULT_JSON
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HIDDEN, VOCAB, kd_token_losses, teacher_logits, tiny_llama  # noqa: E402


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def micro_batches(rank: int):
    """Rank-specific micro-batches with different token counts per rank and micro-batch."""
    out = []
    for j in range(2):
        g = torch.Generator().manual_seed(10 * rank + j)
        ids = torch.randint(3, VOCAB, (2, 9 + 2 * j + rank), generator=g)
        mask = torch.ones_like(ids)
        mask[0, : 1 + rank + j] = 0  # left padding differs per rank
        out.append((ids, mask))
    return out


def check(tied: bool, work: Path, rank: int, world: int) -> dict:
    from kdcore.infra import distributed as kdist
    from kdcore.storage.checkpoint import export_hf, load_checkpoint, save_checkpoint
    from kdcore.modeling.student import (Student, build_optimizer, build_scheduler, clip_gradients, loss_scale,
                                shard_student, student_head_weight, student_hidden, sync_extra_modules)

    model = tiny_llama(seed=3, tie_word_embeddings=tied, num_hidden_layers=3)
    ref = copy.deepcopy(model)
    torch.manual_seed(100 + rank)  # extras start different on each rank: sync must fix that
    proj = torch.nn.Linear(HIDDEN, HIDDEN)
    shard_student(model, "fp32")
    sync_extra_modules([proj])
    src = kdist.broadcast_object({k: v.clone() for k, v in proj.state_dict().items()})
    assert all(torch.equal(v, src[k]) for k, v in proj.state_dict().items()), "extras differ after sync"
    ref_proj = copy.deepcopy(proj)

    opt = build_optimizer(model, 1e-2, 0.01, [proj], extra_lr=5e-3)
    sched = build_scheduler(opt, 1, 4, 0.1)
    st = Student(model, opt, sched, [proj], max_grad_norm=0.05)

    mine = micro_batches(rank)
    every = [mb for r in range(world) for mb in micro_batches(r)]
    n_global = sum(int(m.sum()) for _, m in every)

    for i, (ids, mask) in enumerate(mine):
        st.begin_micro_batch(i == len(mine) - 1)
        h = proj(student_hidden(model, ids, mask))
        loss = kd_token_losses(h, student_head_weight(model), teacher_logits(ids), mask).sum() * loss_scale(n_global)
        loss.backward()

    ref_total = 0.0
    for ids, mask in every:
        h = ref_proj(ref.model(input_ids=ids, attention_mask=mask).last_hidden_state)
        ref_loss = kd_token_losses(h, ref.lm_head.weight, teacher_logits(ids), mask).sum() / n_global
        ref_loss.backward()
        ref_total += float(ref_loss.detach())

    max_err = 0.0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        err = (full(p.grad) - q.grad).abs().max().item()
        max_err = max(max_err, err)
        assert torch.allclose(full(p.grad), q.grad, rtol=1e-4, atol=1e-6), f"grad mismatch {n}: {err}"
    # the extras' gradient is only averaged at step(); check it through the norm and update below

    ref_opt = build_optimizer(ref, 1e-2, 0.01, [ref_proj], extra_lr=5e-3)
    ref_sched = build_scheduler(ref_opt, 1, 4, 0.1)
    ref_norm = clip_gradients(ref, [ref_proj], 0.05)
    stats = st.step()
    ref_opt.step()
    ref_sched.step()
    assert abs(stats.grad_norm - ref_norm) <= 1e-5 * ref_norm, f"grad norm {stats.grad_norm} vs {ref_norm}"
    assert stats.grad_norm > 0.05, "clipping was not exercised"
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(full(p), q, rtol=1e-5, atol=1e-6), f"param mismatch after step: {n}"
    for p, q in zip(proj.parameters(), ref_proj.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), "extra module differs from reference after step"
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight, "tie lost under fully_shard"

    # DCP round trip at world size 2 into freshly built objects
    ckpt = work / f"ckpt_tied{int(tied)}"
    save_checkpoint(ckpt, 1, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj],
                    data_state={"cursor": 4})
    model2 = tiny_llama(seed=99, tie_word_embeddings=tied, num_hidden_layers=3)
    shard_student(model2, "fp32")
    proj2 = torch.nn.Linear(HIDDEN, HIDDEN)
    opt2 = build_optimizer(model2, 1e-2, 0.01, [proj2], extra_lr=5e-3)
    sched2 = build_scheduler(opt2, 1, 4, 0.1)
    rs = load_checkpoint(ckpt / "step_1", model=model2, optimizer=opt2, scheduler=sched2, extra_modules=[proj2])
    assert rs.step == 1 and rs.data_state == {"cursor": 4}
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(full(p), full(q)), f"param not restored: {n}"
        s1, s2 = opt.state[p], opt2.state[q]
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(full(s1[k]), full(s2[k])), f"optimizer {k} not restored: {n}"
    assert all(torch.equal(a, b) for a, b in zip(proj.parameters(), proj2.parameters()))
    assert sched2.last_epoch == sched.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]

    # HF export gathered from both ranks
    out = export_hf(model, None, work / f"hf_tied{int(tied)}")
    # The reload happens in the test process, not here: from_pretrained's loader threads beside
    # live gloo threads aborted this process now and then ("terminate called without an active
    # exception"), which says nothing about the export itself.
    ids = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref_logits = ref(input_ids=ids).logits
    return {"max_grad_err": max_err, "grad_norm": stats.grad_norm, "ref_loss": ref_total,
            "export_dir": str(out), "probe_ids": ids.tolist(), "ref_logits": ref_logits.tolist()}


IMAGE_ID, IMAGE, PATCH = VOCAB - 1, 16, 8  # a 16x16 image in 8x8 patches: 4 image tokens


def tiny_llava(seed: int):
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from common import tiny_llama_config

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE, patch_size=PATCH, projection_dim=16)
    cfg = LlavaConfig(vision_config=vision, text_config=tiny_llama_config(), image_token_id=IMAGE_ID,
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlavaForConditionalGeneration(cfg).float()


def vl_micro_batch(rank: int, j: int):
    """Ids with the 4 image tokens after a first token, a right-padded second row, the pixels."""
    g = torch.Generator().manual_seed(50 + 10 * rank + j)
    ids = torch.randint(3, VOCAB - 1, (2, 10 + rank + j), generator=g)
    ids[:, 1:1 + (IMAGE // PATCH) ** 2] = IMAGE_ID
    mask = torch.ones_like(ids)
    mask[1, -(1 + rank):] = 0
    return ids, mask, torch.randn(2, 3, IMAGE, IMAGE, generator=g)


def check_vl(train_vision: bool, rank: int, world: int) -> float:
    """A vision-language student (tiny LLaVA) sharded over both ranks, its tower frozen or
    training: the gradients of each rank's share of a global batch with images equal those of
    one unsharded model over the whole batch. Returns the largest difference."""
    from kdcore.modeling.student import loss_scale, shard_student, student_head_weight, student_hidden
    from kdcore.modeling.vision import freeze_vision

    model = tiny_llava(seed=7)
    if not train_vision:
        freeze_vision(model)
    ref = copy.deepcopy(model)
    shard_student(model, "fp32")
    every = [vl_micro_batch(r, j) for r in range(world) for j in range(2)]
    n_global = sum(int(m.sum()) for _, m, _ in every)
    for ids, mask, pixels in every[2 * rank:2 * rank + 2]:
        h = student_hidden(model, ids, mask, pixel_values=pixels)
        loss = kd_token_losses(h, student_head_weight(model), teacher_logits(ids), mask).sum() * loss_scale(n_global)
        loss.backward()
    for ids, mask, pixels in every:
        h = ref.model(input_ids=ids, attention_mask=mask, pixel_values=pixels).last_hidden_state
        (kd_token_losses(h, ref.lm_head.weight, teacher_logits(ids), mask).sum() / n_global).backward()
    max_err, tower = 0.0, 0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        if "vision_tower" in n:
            tower += 1
            if not train_vision:
                assert p.grad is None and q.grad is None, f"frozen tower parameter {n} got a gradient"
                continue
        if q.grad is None:  # not on the path (the tower's post_layernorm: LLaVA reads the layer before)
            assert p.grad is None, f"{n}: a gradient on two ranks, none on one"
            continue
        err = (full(p.grad) - q.grad).abs().max().item()
        max_err = max(max_err, err)
        assert torch.allclose(full(p.grad), q.grad, rtol=1e-4, atol=1e-6), f"VL grad mismatch {n}: {err}"
    assert tower, "the tiny LLaVA has no vision tower parameters"
    return max_err


def main() -> None:
    from kdcore.infra import distributed as kdist

    env = kdist.init_distributed("cpu")
    kdist.setup_threads(1)
    assert env.world_size == 2, f"expected 2 ranks, got {env.world_size}"
    work = Path(sys.argv[1])
    res = {f"tied={t}": check(t, work, env.rank, env.world_size) for t in (False, True)}
    res.update({f"vl_train_vision={t}": check_vl(t, env.rank, env.world_size) for t in (False, True)})
    # collectives helpers
    t = torch.tensor([float(env.rank + 1)])
    assert kdist.all_reduce_sum(t).item() == 3.0
    assert kdist.broadcast_object({"r": env.rank} if env.rank == 0 else None) == {"r": 0}
    if env.rank == 0:
        Path(sys.argv[2]).write_text(json.dumps(res))
    kdist.barrier()  # leave together: a peer closing its sockets mid-collective aborts gloo
    kdist.teardown()


if __name__ == "__main__":
    main()
