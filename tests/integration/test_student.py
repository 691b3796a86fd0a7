"""Student build (pretrained / truncate / config), FSDP2 wrapping and the loss-driver interface,
optimizer, schedule, clipping and accumulation — against unsharded references."""

from __future__ import annotations

import copy
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers.assets import DIST_SCRIPTS
from dist_scripts.common import HIDDEN, VOCAB, kd_token_losses, teacher_logits, tiny_llama
from kdcore.recipe.loading import Recipe
from kdcore.modeling.student import (Student, uses_fsdp, build_optimizer, build_scheduler, build_student, clip_gradients,
                            evenly_spaced, lr_factor, set_grad_sync, shard_student, student_head_weight,
                            student_hidden, truncate_layers)

pytestmark = pytest.mark.usefixtures("cpu_process_group")


def recipe_for(path: str, **student):
    r = OmegaConf.structured(Recipe)
    r.teacher.path = path
    for k, v in student.items():
        setattr(r.student, k, v)
    return r


def batch(seed=0, b=2, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, length), generator=g)
    mask = torch.ones_like(ids)
    if b > 1:
        mask[1, :3] = 0  # left padding in the second row
    return ids, mask


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# ---------------------------------------------------------------------------------------------
# building


@pytest.mark.parametrize("total,keep", [(12, 4), (30, 5), (7, 7), (6, 2), (5, 1), (24, 6)])
def test_evenly_spaced_layers(total, keep):
    idx = evenly_spaced(total, keep)
    assert len(idx) == keep and len(set(idx)) == keep and idx == sorted(idx)
    assert idx[0] == 0
    if keep > 1:
        assert idx[-1] == total - 1
        gaps = [b - a for a, b in zip(idx, idx[1:])]
        assert max(gaps) - min(gaps) <= 1  # as even as integers allow
        ideal = (total - 1) / (keep - 1)
        assert all(abs(i - k * ideal) <= 0.5 for k, i in enumerate(idx))


def test_evenly_spaced_rejects_bad_counts():
    with pytest.raises(ValueError, match=r"num_layers must be within \[1, 4\]"):
        evenly_spaced(4, 5)
    with pytest.raises(ValueError):
        evenly_spaced(4, 0)


def test_truncate_keeps_chosen_layers_and_kv_cache_works(tmp_path):
    src = tiny_llama(seed=1, num_hidden_layers=6, layer_types=["full_attention"] * 6)
    src.save_pretrained(tmp_path / "src")
    model = build_student(recipe_for(str(tmp_path / "src"), init="truncate", num_layers=3))
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    assert list(model.config.layer_types) == ["full_attention"] * 3
    kept = evenly_spaced(6, 3)
    assert kept == [0, 3, 5]
    src_sd = src.state_dict()
    for new_i, old_i in enumerate(kept):
        for k, v in model.model.layers[new_i].state_dict().items():
            assert torch.equal(v, src_sd[f"model.layers.{old_i}.{k}"]), (new_i, k)
        assert model.model.layers[new_i].self_attn.layer_idx == new_i
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(model.state_dict()[k], src_sd[k])

    # a working model: incremental decoding with the KV cache equals a full forward
    model.eval()
    ids, _ = batch(1, b=1, length=8)
    cache_kw = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        out = model(input_ids=ids[:, :5], use_cache=True)
        cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        assert cache.get_seq_length() == 5
        step_logits = [out.logits]
        for t in range(5, 8):
            out = model(input_ids=ids[:, t:t + 1], use_cache=True, **{cache_kw: cache})
            step_logits.append(out.logits)
    inc = torch.cat(step_logits, dim=1)
    assert torch.allclose(inc, ref, atol=1e-5), (inc - ref).abs().max()

    # and it is exactly a 3-layer model holding the chosen source layers
    from transformers import LlamaForCausalLM

    manual = LlamaForCausalLM(type(src.config).from_dict({**src.config.to_dict(), "num_hidden_layers": 3,
                                                          "layer_types": ["full_attention"] * 3}))
    renamed = {}
    for k, v in src_sd.items():
        if k.startswith("model.layers."):
            i = int(k.split(".")[2])
            if i in kept:
                renamed[k.replace(f"model.layers.{i}.", f"model.layers.{kept.index(i)}.", 1)] = v
        else:
            renamed[k] = v
    manual.load_state_dict(renamed, strict=True)
    manual.eval()
    with torch.no_grad():
        assert torch.equal(manual(input_ids=ids, use_cache=False).logits, ref)


def test_truncate_direct_call_returns_indices():
    model = tiny_llama(num_hidden_layers=5)
    assert truncate_layers(model, 2) == [0, 4]
    assert [l.self_attn.layer_idx for l in model.model.layers] == [0, 1]


def test_config_init_overrides_and_seed(tmp_path):
    tiny_llama(num_hidden_layers=4).config.save_pretrained(tmp_path / "cfg")
    r = recipe_for(str(tmp_path / "cfg"), init="config", config_overrides={"num_hidden_layers": 1, "intermediate_size": 48})
    a, b = build_student(r), build_student(r)
    assert a.config.num_hidden_layers == 1 and len(a.model.layers) == 1
    assert a.model.layers[0].mlp.up_proj.weight.shape == (48, HIDDEN)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    r.train.seed = 1
    c = build_student(r)
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    rng_before = torch.get_rng_state()
    build_student(r)
    assert torch.equal(rng_before, torch.get_rng_state())  # init does not disturb the caller's RNG

    bad = recipe_for(str(tmp_path / "cfg"), init="config", config_overrides={"num_hiden_layers": 1})
    with pytest.raises(ValueError, match="did you mean 'num_hidden_layers'"):
        build_student(bad)


def test_config_init_resizes_per_layer_lists(tmp_path):
    from transformers import Qwen3Config

    base = dict(hidden_size=HIDDEN, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, vocab_size=VOCAB, num_hidden_layers=4)
    Qwen3Config(**base).save_pretrained(tmp_path / "uniform")
    model = build_student(recipe_for(str(tmp_path / "uniform"), init="config",
                                     config_overrides={"num_hidden_layers": 2}))
    assert len(model.model.layers) == 2 and len(model.config.layer_types) == 2
    ids, mask = batch(2)
    assert torch.isfinite(model(input_ids=ids, attention_mask=mask).logits).all()
    mixed = ["sliding_attention", "full_attention"] * 2
    Qwen3Config(**base, layer_types=mixed, use_sliding_window=True, sliding_window=4).save_pretrained(tmp_path / "mixed")
    with pytest.raises(ValueError, match="also needs 'layer_types'"):
        build_student(recipe_for(str(tmp_path / "mixed"), init="config", config_overrides={"num_hidden_layers": 2}))


def test_pretrained_init_loads_weights_and_missing_path_is_clear(tmp_path):
    src = tiny_llama(seed=4)
    src.save_pretrained(tmp_path / "m")
    model = build_student(recipe_for(str(tmp_path / "m")))
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), src.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_student(recipe_for(str(tmp_path / "nowhere")))


# ---------------------------------------------------------------------------------------------
# FSDP2 wrapping and the hidden/head interface


def _loss(model, ids, mask, proj=None, scale=1.0):
    h = student_hidden(model, ids, mask)
    if proj is not None:
        h = proj(h.float()).to(h.dtype)
    return kd_token_losses(h, student_head_weight(model), teacher_logits(ids), mask).sum() * scale


def _ref_loss(ref, ids, mask, proj=None, scale=1.0):
    h = ref.model(input_ids=ids, attention_mask=mask).last_hidden_state
    if proj is not None:
        h = proj(h)
    return kd_token_losses(h, ref.get_output_embeddings().weight, teacher_logits(ids), mask).sum() * scale


@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_hidden_head_and_gradients_match_unsharded(tied):
    model = tiny_llama(seed=2, tie_word_embeddings=tied)
    ref = copy.deepcopy(model)
    proj = torch.nn.Linear(HIDDEN, HIDDEN)
    ref_proj = copy.deepcopy(proj)
    shard_student(model, "fp32")
    assert type(model).__name__.startswith("FSDP")
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, mask = batch(3)

    h = student_hidden(model, ids, mask)
    w = student_head_weight(model)
    assert h.shape == (2, 9, HIDDEN) and w.shape == (VOCAB, HIDDEN)
    with torch.no_grad():
        ref_logits = ref(input_ids=ids, attention_mask=mask).logits
    # hidden is after the final norm: h @ W^T reproduces the model's own logits
    assert torch.allclose(h @ w.T, ref_logits, atol=1e-5)

    loss = kd_token_losses(proj(h), w, teacher_logits(ids), mask).sum() / mask.sum()
    loss.backward()
    ref_loss = _ref_loss(ref, ids, mask, ref_proj, 1 / mask.sum())
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.grad is not None, n
        assert torch.allclose(full(p.grad), q.grad, rtol=1e-5, atol=1e-7), n
    head_grad = full(model.get_output_embeddings().weight.grad)
    assert head_grad.abs().sum() > 0  # the head learns through the out-of-forward matmul
    for p, q in zip(proj.parameters(), ref_proj.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-7)


def test_head_weight_before_forward_is_a_clear_error():
    model = shard_student(tiny_llama(), "fp32")
    with pytest.raises(RuntimeError, match="call student_hidden"):
        student_head_weight(model)


def test_bf16_mixed_precision_computes_in_bf16_keeps_fp32_masters():
    model = tiny_llama(seed=5)
    ref = copy.deepcopy(model)
    shard_student(model, "bf16")
    ids, mask = batch(4)
    h = student_hidden(model, ids, mask)
    w = student_head_weight(model)
    assert h.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
    loss = kd_token_losses(h, w, teacher_logits(ids), mask).mean()
    assert loss.dtype == torch.float32
    loss.backward()
    _ref_loss(ref, ids, mask, scale=1 / mask.sum()).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, n
        g, r = full(p.grad), q.grad
        # bf16 compute: direction and scale of the gradient agree with fp32 to bf16 precision
        cos = torch.nn.functional.cosine_similarity(g.flatten(), r.flatten(), dim=0)
        assert cos > 0.98 and abs(g.norm() / r.norm() - 1) < 0.1, (n, float(cos))


def test_gradient_accumulation_without_sync_equals_one_big_batch():
    model = tiny_llama(seed=6)
    ref = copy.deepcopy(model)
    shard_student(model, "fp32")
    mbs = [batch(10), batch(11)]
    n = sum(int(m.sum()) for _, m in mbs)
    for i, (ids, mask) in enumerate(mbs):
        set_grad_sync(model, i == len(mbs) - 1)
        _loss(model, ids, mask, scale=1 / n).backward()
    set_grad_sync(model, True)
    ids = torch.cat([mbs[0][0], mbs[1][0]])
    mask = torch.cat([mbs[0][1], mbs[1][1]])
    _ref_loss(ref, ids, mask, scale=1 / n).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(full(p.grad), q.grad, rtol=1e-5, atol=1e-7), name


def test_gradient_checkpointing_composes_with_fsdp(tmp_path):
    tiny_llama(seed=7).save_pretrained(tmp_path / "m")
    ref = build_student(recipe_for(str(tmp_path / "m")))
    model = build_student(recipe_for(str(tmp_path / "m"), gradient_checkpointing=True))
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    shard_student(model, "fp32")
    model.train()
    ref.train()
    ids, mask = batch(12)
    _loss(model, ids, mask).backward()
    _ref_loss(ref, ids, mask).backward()
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        assert torch.allclose(full(p.grad), q.grad, rtol=1e-5, atol=1e-6), name


# ---------------------------------------------------------------------------------------------
# optimizer, schedule, clipping


def test_lr_schedule_against_formula():
    warm, total, lo = 4, 14, 0.1
    assert [lr_factor(s, warm, total, lo) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, warm, total, lo) == pytest.approx(1.0)
    assert lr_factor(9, warm, total, lo) == pytest.approx(lo + (1 - lo) / 2)  # half way down
    assert lr_factor(14, warm, total, lo) == pytest.approx(lo)
    assert lr_factor(40, warm, total, lo) == pytest.approx(lo)  # stays at the floor
    for s in range(warm, total):  # monotone decay after warmup
        assert lr_factor(s + 1, warm, total, lo) <= lr_factor(s, warm, total, lo)
    assert lr_factor(0, 0, 10, 0.0) == pytest.approx(1.0)  # no warmup starts at peak

    model = tiny_llama()
    opt = build_optimizer(model, 2e-3, 0.1)
    sched = build_scheduler(opt, warm, total, lo)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2e-3 * lr_factor(s, warm, total, lo) for s in range(total)])


def test_optimizer_groups_decay_and_extra_lr():
    model = tiny_llama()
    proj = torch.nn.Linear(HIDDEN, HIDDEN)
    opt = build_optimizer(model, 1e-3, 0.05, [proj], extra_lr=7e-4)
    by_param = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_param[id(model.model.layers[0].self_attn.q_proj.weight)]["weight_decay"] == 0.05
    assert by_param[id(model.model.norm.weight)]["weight_decay"] == 0.0
    assert by_param[id(proj.weight)]["lr"] == 7e-4 and by_param[id(proj.bias)]["weight_decay"] == 0.0
    n_model = sum(1 for _ in model.parameters())
    assert len(by_param) == n_model + 2
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")


def test_clip_norm_matches_reference_and_clips():
    model = tiny_llama(seed=8)
    ref = copy.deepcopy(model)
    proj = torch.nn.Linear(HIDDEN, HIDDEN)
    ref_proj = copy.deepcopy(proj)
    shard_student(model, "fp32")
    ids, mask = batch(13)
    _loss(model, ids, mask, proj).backward()
    _ref_loss(ref, ids, mask, ref_proj).backward()
    grads = [p.grad for p in list(ref.parameters()) + list(ref_proj.parameters())]
    expected = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))
    norm = clip_gradients(model, [proj], max_norm=expected / 4)
    assert norm == pytest.approx(expected, rel=1e-5)
    after = math.sqrt(sum(float(full(p.grad).double().pow(2).sum()) for p in model.parameters())
                      + sum(float(p.grad.double().pow(2).sum()) for p in proj.parameters()))
    assert after == pytest.approx(expected / 4, rel=1e-4)


def test_student_step_skips_non_finite_gradients_and_resets_sync():
    model = tiny_llama(seed=9)
    shard_student(model, "fp32")
    opt = build_optimizer(model, 1e-2)
    st = Student(model, opt, build_scheduler(opt, 0, 10, 0.1), [], max_grad_norm=1.0)
    before = [full(p).clone() for p in model.parameters()]
    ids, mask = batch(14)
    st.begin_micro_batch(True)
    (_loss(model, ids, mask) * float("nan")).backward()
    stats = st.step()
    assert not stats.stepped and math.isnan(stats.grad_norm)
    assert all(torch.equal(b, full(p)) for b, p in zip(before, model.parameters()))
    assert st.scheduler.last_epoch == 0
    st.begin_micro_batch(True)
    _loss(model, ids, mask).backward()
    stats = st.step()
    assert stats.stepped and stats.lr == pytest.approx(1e-2) and stats.grad_norm > 0
    assert any(not torch.equal(b, full(p)) for b, p in zip(before, model.parameters()))


def test_student_from_recipe_trains_on_a_token_mean(tmp_path):
    tiny_llama(seed=10).save_pretrained(tmp_path / "m")
    r = recipe_for(str(tmp_path / "m"), init="truncate", num_layers=1)
    r.train.lr, r.train.warmup_steps, r.train.max_steps = 1e-2, 0, 8
    st = Student.from_recipe(r)
    st.train()
    ids, mask = batch(15)
    losses = []
    for _ in range(8):
        st.begin_micro_batch(True)
        loss = _loss(st.model, ids, mask, scale=1 / mask.sum())
        loss.backward()
        losses.append(float(loss.detach()))
        assert st.step().stepped
    assert losses[-1] < 0.8 * losses[0], losses  # it actually learns the pseudo-teacher


def test_one_rank_trains_the_plain_module_as_fsdp_would(tmp_path):
    """One rank in fp32: no FSDP2 (nothing to shard or cast; bench/fsdp_one_rank.py measures the
    copy it would hold), with the arithmetic of the FSDP2-wrapped student, step for step."""
    tiny_llama(seed=11).save_pretrained(tmp_path / "m")
    r = recipe_for(str(tmp_path / "m"), init="truncate", num_layers=1)
    r.train.lr, r.train.warmup_steps, r.train.max_steps = 1e-2, 0, 3
    plain = Student.from_recipe(r)
    assert not type(plain.model).__name__.startswith("FSDP")
    model = shard_student(build_student(r), "fp32")
    opt = build_optimizer(model, r.train.lr, r.train.weight_decay)
    wrapped = Student(model, opt, build_scheduler(opt, 0, 3, r.train.min_lr_ratio), [], r.train.max_grad_norm)
    for step in range(3):
        ids, mask = batch(20 + step)
        for st in (plain, wrapped):
            st.begin_micro_batch(True)
            _loss(st.model, ids, mask, scale=1 / mask.sum()).backward()
            assert st.step().stepped
    for (n, p), (_, q) in zip(plain.model.named_parameters(), wrapped.model.named_parameters()):
        assert torch.equal(p.detach(), full(q).detach()), n
    assert any(not torch.equal(p, q) for p, q in zip(plain.model.parameters(), build_student(r).parameters()))
    r.train.precision = "bf16"  # a compute dtype to cast to: FSDP2's mixed precision, on one rank too
    assert type(Student.from_recipe(r).model).__name__.startswith("FSDP")
    assert uses_fsdp(2, "fp32") and uses_fsdp(1, "bf16") and not uses_fsdp(1, "fp32")


# ---------------------------------------------------------------------------------------------
# world size 2 under torchrun


def test_torchrun_two_ranks_match_single_process_reference():
    # a private temp dir: pytest's basetemp rotation by concurrent sessions must not pull it away
    with tempfile.TemporaryDirectory(prefix="kdflow_ws2_") as d:
        work = Path(d)
        out = work / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(DIST_SCRIPTS / "fsdp_two_ranks.py"), str(work), str(out)],
            capture_output=True, text=True, timeout=600, env=env, cwd=work)
        if proc.returncode != 0:
            log = Path(tempfile.gettempdir()) / "kdflow_torchrun_failure.log"  # full output for diagnosis
            log.write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
            pytest.fail(f"torchrun exited {proc.returncode} (full log: {log})\n" + proc.stderr[-4000:])
        res = json.loads(out.read_text())
        from transformers import AutoModelForCausalLM

        for tied in ("tied=False", "tied=True"):  # the export gathered from both ranks reloads exactly
            reloaded = AutoModelForCausalLM.from_pretrained(res[tied]["export_dir"])
            with torch.no_grad():
                got = reloaded(input_ids=torch.tensor(res[tied]["probe_ids"])).logits
            want = torch.tensor(res[tied]["ref_logits"])
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), f"export logits differ: {(got - want).abs().max()}"
    for train_vision in (False, True):  # a VL student (tiny LLaVA, pixel inputs) on two ranks
        assert res[f"vl_train_vision={train_vision}"] < 1e-6
    for tied in ("tied=False", "tied=True"):
        assert res[tied]["max_grad_err"] < 1e-6
        assert res[tied]["grad_norm"] > 0.05  # clipping exercised in the 2-rank step
