"""LoRA students (student.lora with peft): only adapters train under FSDP2, resume is exact,
export writes a merged model and an adapter folder, bad sections fail at build time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("peft")

from helpers.assets import DIST_SCRIPTS  # noqa: E402
from dist_scripts.common import VOCAB, kd_token_losses, teacher_logits, tiny_llama  # noqa: E402
from kdcore.recipe.loading import Recipe, validate_raw  # noqa: E402
from kdcore.modeling.student import Student, build_student, student_head_weight, student_hidden  # noqa: E402

pytestmark = pytest.mark.usefixtures("cpu_process_group")


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def lora_recipe(path, **lora):
    r = OmegaConf.structured(Recipe)
    r.teacher.path = str(path)
    r.student.lora.enabled = True
    r.student.lora.r = 4
    r.student.lora.dropout = 0.0
    for k, v in lora.items():
        setattr(r.student.lora, k, v)
    r.train.lr, r.train.warmup_steps, r.train.max_steps = 1e-2, 0, 8
    return r


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_base")
    tiny_llama(seed=4, tie_word_embeddings=True).save_pretrained(d)
    return d


def batch(seed=0, length=9):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (2, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def train_step(st, ids, mask) -> float:
    st.begin_micro_batch(True)
    h = student_hidden(st.model, ids, mask)
    loss = kd_token_losses(h, student_head_weight(st.model), teacher_logits(ids), mask).sum() / mask.sum()
    loss.backward()
    assert st.step().stepped
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# training


def test_only_adapters_train_and_base_weights_stay_bitwise(tiny_dir):
    st = Student.from_recipe(lora_recipe(tiny_dir))
    st.train()
    params = dict(st.model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x 4 attention projections x (A, B)
    assert len(trainable) == 2 * 4 * 2
    in_opt = {id(p) for g in st.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(params[n]) for n in trainable}
    before = {n: full(p).detach().clone() for n, p in params.items()}
    plain = tiny_llama(seed=4, tie_word_embeddings=True)
    ids, mask = batch(1)
    with torch.no_grad():  # lora_B starts at zero: the wrapped student is the base model at first
        want = plain.model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = student_hidden(st.model, ids, mask)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(full(student_head_weight(st.model)), plain.lm_head.weight)
    losses = [train_step(st, *batch(1)) for _ in range(6)]
    for n, p in params.items():
        if n in trainable and ".lora_B." in n:
            assert not torch.equal(full(p), before[n]), f"adapter {n} did not change"
        elif n not in trainable:
            assert torch.equal(full(p), before[n]), f"frozen {n} changed"
    assert losses[-1] < losses[0], losses


def test_bf16_mixed_precision_trains_fp32_adapters(tiny_dir):
    r = lora_recipe(tiny_dir)
    r.train.precision = "bf16"
    st = Student.from_recipe(r)
    st.train()
    adapters = {n: p for n, p in st.model.named_parameters() if p.requires_grad}
    assert all(full(p).dtype == torch.float32 for p in adapters.values())  # fp32 masters
    ids, mask = batch(2)
    assert student_hidden(st.model, ids, mask).dtype == torch.bfloat16
    before = {n: full(p).detach().clone() for n, p in adapters.items()}
    train_step(st, ids, mask)
    assert any(not torch.equal(full(p), before[n]) for n, p in adapters.items())


def test_gradient_checkpointing_gives_the_same_adapter_gradients(tiny_dir):
    grads = []
    for gc in (False, True):
        r = lora_recipe(tiny_dir)
        r.student.gradient_checkpointing = gc
        st = Student.from_recipe(r)
        st.train()
        ids, mask = batch(3)
        h = student_hidden(st.model, ids, mask)
        kd_token_losses(h, student_head_weight(st.model), teacher_logits(ids), mask).sum().backward()
        named = [(n, p) for n, p in st.model.named_parameters() if p.requires_grad]
        assert all(p.grad is not None for _, p in named)
        grads.append({n: full(p.grad).clone() for n, p in named})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7), n


@pytest.mark.long  # kept out of the default command (README, Tests)
def test_world_size_two_under_torchrun_matches_reference(tiny_dir):
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory(prefix="kdflow_lora_ws2_") as d:
        work = Path(d)
        out = work / "result.json"
        env = dict(os.environ, OMP_NUM_THREADS="1")
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             str(DIST_SCRIPTS / "lora_two_ranks.py"), str(tiny_dir), str(work), str(out)],
            capture_output=True, text=True, timeout=240, env=env, cwd=work)
        if proc.returncode != 0:
            pytest.fail(f"torchrun exited {proc.returncode}\n" + proc.stderr[-4000:])
        res = json.loads(out.read_text())
        assert res["max_grad_err"] < 1e-6
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(res["export_dir"])(input_ids=torch.tensor(res["probe_ids"])).logits
        want = torch.tensor(res["ref_logits"])
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()
        assert (Path(res["adapter_dir"]) / "adapter_config.json").is_file()


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_resume_is_bitwise_exact_and_holds_only_adapters(tiny_dir, tmp_path):
    from kdcore.storage.checkpoint import load_checkpoint, save_checkpoint
    from kdcore.storage.safe_dcp import SafeFileSystemReader

    r = lora_recipe(tiny_dir, dropout=0.1)  # dropout draws from the RNG the checkpoint restores
    st = Student.from_recipe(r)
    st.train()
    batches = [batch(10 + i) for i in range(5)]
    straight = []
    for i, b in enumerate(batches):
        straight.append(train_step(st, *b))
        if i == 1:
            save_checkpoint(tmp_path / "ck", 2, model=st.model, optimizer=st.optimizer, scheduler=st.scheduler)
    saved = SafeFileSystemReader(str(tmp_path / "ck" / "step_2")).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(".lora_" in k for k in model_keys), model_keys[:5]

    r2 = lora_recipe(tiny_dir, dropout=0.1)
    r2.train.seed = 99  # other fresh adapters: everything must come from the checkpoint
    st2 = Student.from_recipe(r2)
    st2.train()
    rs = load_checkpoint(tmp_path / "ck" / "step_2", model=st2.model, optimizer=st2.optimizer,
                         scheduler=st2.scheduler)
    assert rs.step == 2
    resumed = [train_step(st2, *b) for b in batches[2:]]
    assert resumed == straight[2:]  # bitwise: same floats, not merely close


def test_checkpoint_of_another_adapter_shape_is_refused(tiny_dir, tmp_path):
    from kdcore.storage.checkpoint import CheckpointError, load_checkpoint, save_checkpoint

    st = Student.from_recipe(lora_recipe(tiny_dir))
    save_checkpoint(tmp_path / "ck", 1, model=st.model, optimizer=st.optimizer, scheduler=st.scheduler)
    other = Student.from_recipe(lora_recipe(tiny_dir, target_modules=["q_proj"]))
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "ck" / "step_1", model=other.model, optimizer=other.optimizer,
                        scheduler=other.scheduler)


def test_resume_refuses_a_change_of_the_lora_section():
    from kdcore.storage.resume import ResumeMismatchError, check_resume

    saved = {"student": {"lora": {"enabled": True, "r": 16, "target_modules": ["q_proj"]}}}
    for key, val in (("r", 8), ("enabled", False), ("target_modules", ["q_proj", "v_proj"])):
        new = json.loads(json.dumps(saved))
        new["student"]["lora"][key] = val
        with pytest.raises(ResumeMismatchError, match=f"student.lora.{key}"):
            check_resume(saved, new, "run")


# ---------------------------------------------------------------------------------------------
# export


def test_export_writes_merged_model_and_adapter_folder(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from kdcore.storage.checkpoint import export_hf

    st = Student.from_recipe(lora_recipe(tiny_dir))
    st.train()
    for i in range(3):
        train_step(st, *batch(30 + i))
    st.train(False)
    probe = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        peft_logits = st.model(input_ids=probe).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_dir)(input_ids=probe).logits
    assert not torch.allclose(peft_logits, base_logits, atol=1e-4), "the adapters did not learn anything"

    out = export_hf(st.model, None, tmp_path / "run" / "hf")
    assert out == tmp_path / "run" / "hf"
    cfg = json.loads((out / "config.json").read_text())
    assert "peft" not in json.dumps(cfg).lower()
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        merged_logits = merged(input_ids=probe).logits
    assert torch.allclose(merged_logits, peft_logits, rtol=1e-5, atol=1e-5), (merged_logits - peft_logits).abs().max()

    adapter_dir = tmp_path / "run" / "hf_adapter"
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), str(adapter_dir))
    loaded.eval()
    with torch.no_grad():
        adapter_logits = loaded(input_ids=probe).logits
    assert torch.allclose(adapter_logits, peft_logits, rtol=1e-5, atol=1e-5)


def test_rollout_weights_of_a_lora_student_are_merged_under_base_names(tiny_dir):
    from transformers import AutoModelForCausalLM

    from kdcore.training.weight_sync import full_weights, head_name

    st = Student.from_recipe(lora_recipe(tiny_dir, alpha=12.0))
    st.train()
    train_step(st, *batch(40))
    weights = full_weights(st.model)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert set(weights) == set(plain.state_dict())  # a plain copy loads them by name
    layer = st.model.get_base_model().model.layers[1].self_attn.v_proj
    a, b = full(layer.lora_A["default"].weight), full(layer.lora_B["default"].weight)
    want = full(layer.base_layer.weight) + (12.0 / 4) * b @ a  # W + alpha/r * B A
    assert torch.allclose(weights["model.layers.1.self_attn.v_proj.weight"], want, atol=1e-6)
    assert not torch.allclose(want, full(layer.base_layer.weight))
    assert torch.equal(weights[head_name(st.model)], full(student_head_weight_of(st.model)))


def student_head_weight_of(model):
    return model.get_output_embeddings().weight


# ---------------------------------------------------------------------------------------------
# bad sections


@pytest.mark.parametrize("lora, match", [
    ({"r": 0}, r"student\.lora\.r must be an integer >= 1"),
    ({"alpha": 0.0}, r"student\.lora\.alpha must be > 0"),
    ({"dropout": 1.0}, r"student\.lora\.dropout must be within \[0, 1\)"),
    ({"target_modules": []}, r"student\.lora\.target_modules must be a non-empty list"),
    ({"target_modules": ["q_proj", "qkv_proj"]}, r"'qkv_proj' matches no module of LlamaForCausalLM .*q_proj"),
    ({"target_modules": ["lm_head"]}, r"'lm_head' is the embedding or lm_head"),
])
def test_bad_lora_section_is_one_line_at_build_time(tiny_dir, lora, match):
    with pytest.raises(ValueError, match=match) as info:
        build_student(lora_recipe(tiny_dir, **lora))
    assert "\n" not in str(info.value)


def test_recipe_validation_checks_lora_ranges(tiny_dir):
    raw = {"teacher": {"path": str(tiny_dir)}, "data": {"train": "x.jsonl"},
           "student": {"lora": {"enabled": True, "r": 0, "dropout": 1.5, "rank": 4}}}
    errors = validate_raw(raw)
    assert any(e.startswith("student.lora.r: must be >= 1") for e in errors), errors
    assert any(e.startswith("student.lora.dropout: must be within [0, 1)") for e in errors), errors
    assert any(e.startswith("student.lora.rank: unknown key") for e in errors), errors


def test_lora_off_builds_the_plain_model_without_peft(tiny_dir):
    r = lora_recipe(tiny_dir)
    r.student.lora.enabled = False
    model = build_student(r)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# end to end through `kdcore train`


@pytest.mark.long  # kept out of the default command (README, Tests)
def test_kdcore_train_with_lora_exports_both_folders_and_resumes_bit_for_bit(tmp_path, tiny_teacher):
    import shutil

    import yaml

    from helpers.assets import PYDOC, ROOT

    out = tmp_path / "out"
    recipe = {
        "teacher": {"path": str(tiny_teacher)},
        "student": {"init": "config", "config_overrides": {"hidden_size": 32, "intermediate_size": 64,
                                                             "num_hidden_layers": 1},
                    "lora": {"enabled": True, "r": 4}},  # dropout left at 0.05: the RNG must resume too
        "data": {"train": str(PYDOC), "limit": 32, "max_length": 48, "eval_size": 0},
        "distill": {"loss": "fkl"},
        "train": {"output_dir": str(out), "max_steps": 4, "micro_batch_size": 4, "lr": 1e-2, "warmup_steps": 1,
                  "eval_every": 0},
        "checkpoint": {"every": 2, "keep": 3},
        "logging": {"progress": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "kdcore", "train", str(path), *extra], capture_output=True,
                              text=True, timeout=300, cwd=ROOT)

    def losses():
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in recs if "loss" in r}

    res = run()
    assert res.returncode == 0, res.stderr[-3000:]
    unbroken = losses()
    assert (out / "hf" / "config.json").is_file() and (out / "hf_adapter" / "adapter_config.json").is_file()

    shutil.rmtree(out / "checkpoints" / "step_4")
    (out / "metrics.jsonl").unlink()
    res = run("student.lora.r=8", "--resume")
    assert res.returncode != 0 and "student.lora.r: 4 → 8" in res.stderr, res.stderr[-2000:]
    res = run("--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = losses()
    assert sorted(resumed) == [3, 4]
    assert resumed[3] == unbroken[3] and resumed[4] == unbroken[4]  # bitwise on CPU, world size 1
