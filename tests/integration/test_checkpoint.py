"""Resumable checkpoints (bitwise resume, atomic writes, pruning) and the Hugging Face export."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from helpers.assets import DIST_SCRIPTS
from dist_scripts.common import HIDDEN, VOCAB, kd_token_losses, teacher_logits, tiny_llama, tiny_llama_config, tiny_tokenizer
from dist_scripts.toy_train import run as toy_run
from kdcore.storage import checkpoint as ck
from kdcore.modeling.student import build_optimizer, build_scheduler, shard_student, student_head_weight, student_hidden
from helpers.checkpoints import assert_same, full, snapshot, trained_setup

pytestmark = pytest.mark.usefixtures("cpu_process_group")


@pytest.fixture
def work():
    # a private temp dir: pytest's basetemp rotation by concurrent sessions must not pull it away
    with tempfile.TemporaryDirectory(prefix="kdflow_ckpt_") as d:
        yield Path(d)


# ---------------------------------------------------------------------------------------------
# resume exactness


def test_resume_gives_the_same_loss_trajectory_bitwise(work):
    tiny_llama_config().save_pretrained(work / "cfg")
    cfg = str(work / "cfg")
    unbroken = toy_run(cfg, str(work / "a"), steps=6)
    first = toy_run(cfg, str(work / "b"), steps=6, stop_after=3)
    assert (work / "b" / "step_3").is_dir() and (work / "b" / ck.LATEST).read_text().strip() == "step_3"
    # the second half in a fresh process with freshly built objects
    proc = subprocess.run([sys.executable, str(DIST_SCRIPTS / "toy_train.py"), cfg, str(work / "b"),
                           "--steps", "6", "--resume", "--out", str(work / "resumed.json")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = json.loads((work / "resumed.json").read_text())

    assert len(unbroken["losses"]) == 6 and len(set(unbroken["losses"])) == 6
    assert first["losses"] == unbroken["losses"][:3]
    assert resumed["start"] == 3
    assert resumed["losses"] == unbroken["losses"][3:]  # float.hex strings: bit for bit
    assert resumed["lrs"] == unbroken["lrs"][3:] and resumed["norms"] == unbroken["norms"][3:]
    assert resumed["digest"] == unbroken["digest"]  # final weights identical too
    assert any(n > 0.02 for n in unbroken["norms"])  # clipping took part in the trajectory


# ---------------------------------------------------------------------------------------------
# atomic writes


def test_crash_mid_write_keeps_the_latest_good_checkpoint(work, monkeypatch):
    import torch.distributed.checkpoint as dcp

    model, proj, opt, sched = trained_setup(steps=1)
    good = snapshot(model, proj, opt)
    ck.save_checkpoint(work, 1, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj],
                       data_state={"cursor": 11})
    ids = torch.randint(3, VOCAB, (2, 8))
    kd_token_losses(proj(student_hidden(model, ids, None)), student_head_weight(model), teacher_logits(ids),
                    torch.ones_like(ids)).mean().backward()
    opt.step()
    sched.step()

    real_save = dcp.save

    def dying_save(state, storage_writer=None, **kw):
        # leave a half-written shard behind, as a kill during the write would
        (Path(storage_writer.path) / "__0_0.distcp").write_bytes(b"\x00" * 1000)
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(dcp, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(work, 2, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj])
    monkeypatch.setattr(dcp, "save", real_save)
    assert (work / "step_2.tmp").is_dir() and not (work / "step_2").exists()
    assert (work / ck.LATEST).read_text().strip() == "step_1"
    assert ck.find_latest(work) == work / "step_1"
    assert [s for s, _ in ck.list_checkpoints(work)] == [1]

    m2, p2, o2, s2 = trained_setup(seed=5, steps=0)
    rs = ck.load_latest(work, model=m2, optimizer=o2, scheduler=s2, extra_modules=[p2])
    assert rs.step == 1 and rs.data_state == {"cursor": 11}
    assert_same(snapshot(m2, p2, o2), good)
    assert s2.last_epoch == 1

    # the next save sweeps the stale .tmp folder
    ck.save_checkpoint(work, 2, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj])
    assert not (work / "step_2.tmp").exists() and ck.find_latest(work) == work / "step_2"


def test_crash_between_rename_and_pointer_and_bad_pointers(work, monkeypatch):
    model, proj, opt, sched = trained_setup(steps=1)
    ck.save_checkpoint(work, 1, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj])

    def dying_pointer(path, data):
        raise KeyboardInterrupt("killed before the pointer moved")

    monkeypatch.setattr(ck, "_write_atomic_bytes", dying_pointer)
    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(work, 2, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj])
    monkeypatch.undo()
    # step_2 is complete but unannounced: the pointer still names a good checkpoint
    assert ck.find_latest(work) == work / "step_1"

    (work / "step_7").mkdir()  # a folder without meta.json (e.g. a copy interrupted by hand)
    (work / "step_7" / "junk").write_text("x")
    (work / ck.LATEST).write_text("step_99\n")  # pointer to nothing
    assert ck.find_latest(work) == work / "step_2"  # newest *complete* one
    (work / ck.LATEST).unlink()
    assert ck.find_latest(work) == work / "step_2"
    assert ck.find_latest(work / "nothing_here") is None
    m2, p2, o2, s2 = trained_setup(steps=0)
    assert ck.load_latest(work / "nothing_here", model=m2, optimizer=o2, scheduler=s2, extra_modules=[p2]) is None


def test_keep_newest_and_drop_abandoned_branch(work):
    model, proj, opt, sched = trained_setup(steps=1)
    for step in (1, 2, 3, 4):
        ck.save_checkpoint(work, step, model=model, optimizer=opt, scheduler=sched, keep=2,
                           extra_modules=[proj])
    assert [s for s, _ in ck.list_checkpoints(work)] == [3, 4]
    assert ck.find_latest(work) == work / "step_4"
    # resumed from step 3 and saved again: the old step_4 belongs to an abandoned branch
    ck.save_checkpoint(work, 3, model=model, optimizer=opt, scheduler=sched, keep=2, extra_modules=[proj])
    assert [s for s, _ in ck.list_checkpoints(work)] == [3]
    assert (work / ck.LATEST).read_text().strip() == "step_3"
    assert not list(work.glob("*.tmp"))


def test_loading_into_a_different_model_is_a_clear_error(work):
    model, proj, opt, sched = trained_setup(steps=1)
    path = ck.save_checkpoint(work, 1, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj])
    other = tiny_llama(hidden_size=48, intermediate_size=64)
    shard_student(other, "fp32")
    oproj = torch.nn.Linear(HIDDEN, HIDDEN)
    oopt = build_optimizer(other, 1e-2, 0.01, [oproj])
    with pytest.raises(ck.CheckpointError, match="step_1"):
        ck.load_checkpoint(path, model=other, optimizer=oopt, extra_modules=[oproj])
    with pytest.raises(ck.CheckpointError, match="not a complete checkpoint"):
        ck.load_checkpoint(work / "step_9", model=other, optimizer=oopt)


@pytest.mark.parametrize("saved_sharded", [True, False])
def test_a_checkpoint_moves_between_the_sharded_and_the_plain_student(work, saved_sharded):
    """One rank trains the plain module, several ranks the FSDP2-sharded one
    (kdcore.modeling.student.uses_fsdp), and runs saved before 2026-12-07 hold the sharded one's
    state: a checkpoint of either restores into the other, weights and AdamW moments bit for bit."""
    model, proj, opt, sched = trained_setup(seed=3, tied=True, steps=2, sharded=saved_sharded)
    path = ck.save_checkpoint(work, 2, model=model, optimizer=opt, scheduler=sched, extra_modules=[proj])
    other, oproj, oopt, osched = trained_setup(seed=4, tied=True, steps=0, sharded=not saved_sharded)
    assert not torch.equal(full(next(other.parameters())), full(next(model.parameters())))
    ck.load_checkpoint(path, model=other, optimizer=oopt, scheduler=osched, extra_modules=[oproj])
    assert_same(snapshot(model, proj, opt), snapshot(other, oproj, oopt))
    assert osched.last_epoch == sched.last_epoch == 2


# ---------------------------------------------------------------------------------------------
# Hugging Face export


@pytest.mark.parametrize("tied", [False, True])
def test_export_hf_reloads_with_same_logits(work, tied):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, proj, opt, sched = trained_setup(seed=3, tied=tied, steps=2)
    tok = tiny_tokenizer()
    (work / "hf").mkdir()
    (work / "hf" / "stale.txt").write_text("old export")  # replaced as a whole
    out = ck.export_hf(model, tok, work / "hf")
    assert not (out / "stale.txt").exists() and not list(work.glob("*.tmp"))
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in cfg

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert (reloaded.lm_head.weight is reloaded.model.embed_tokens.weight) == tied
    ids = torch.randint(3, VOCAB, (2, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    assert torch.equal(got, expected)
    rtok = AutoTokenizer.from_pretrained(out)
    assert rtok("w1 w5 w7")["input_ids"] == tok("w1 w5 w7")["input_ids"]

    out16 = ck.export_hf(model, None, work / "hf16", dtype=torch.bfloat16)
    with safe_open(str(out16 / "model.safetensors"), "pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    r16 = AutoModelForCausalLM.from_pretrained(out16, dtype=torch.bfloat16)
    assert torch.equal(r16.model.norm.weight, full(model.model.norm.weight).to(torch.bfloat16))
