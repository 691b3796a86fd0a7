"""End to end: `kdcore train` on tiny models (real tokenizer, real data, real teacher process)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers.assets import PYDOC, PYDOC_EVAL, ROOT
from helpers.train import KDCORE, _children, assert_resume_after_step_2_is_exact, evals, run_train, train_steps, write_recipe


def test_off_policy_run_learns_logs_and_exports(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 12, "eval_every": 6})
    res = run_train(recipe)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    steps = train_steps(out)
    assert [r["step"] for r in steps] == list(range(1, 13))
    for r in steps:
        assert {"step", "loss", "kd_loss", "ce_loss", "lr", "tokens_per_s"} <= set(r)
        assert r["tokens_per_s"] > 0
    ev = evals(out)
    assert [e["step"] for e in ev] == [0, 6, 12]
    for e in ev:
        assert {"eval_teacher_kl", "eval_ppl", "eval_top1_agreement"} <= set(e)
    assert ev[-1]["eval_teacher_kl"] < 0.9 * ev[0]["eval_teacher_kl"], ev
    # the export loads with plain transformers and matches the student's vocabulary
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 1
    assert (out / "hf" / "tokenizer.json").exists()
    assert (out / "checkpoints" / "latest").exists()


def test_resume_continues_bit_for_bit(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 4}, checkpoint={"every": 2, "keep": 3,
                                                                                        "export_hf": False})
    res = run_train(recipe)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_resume_after_step_2_is_exact(recipe, tmp_path / "out")


def test_two_ranks_match_one_rank(tmp_path, tiny_teacher):
    """Token-mean exactness across data parallelism: 2 ranks x 1 micro-batch == 1 rank x 2."""
    one = write_recipe(tmp_path / "one", tiny_teacher, train={"max_steps": 2, "micro_batch_size": 2,
                                                              "grad_accum": 2, "threads": 1},
                       teacher={"threads": 1}, checkpoint={"export_hf": False})
    two = write_recipe(tmp_path / "two", tiny_teacher, train={"max_steps": 2, "micro_batch_size": 2,
                                                              "grad_accum": 1, "threads": 1},
                       teacher={"threads": 1}, checkpoint={"export_hf": False})
    r1 = run_train(one)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_train(two, nproc=2, timeout=400)
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = train_steps(tmp_path / "one" / "out"), train_steps(tmp_path / "two" / "out")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (a, b)
        assert x["tokens"] == y["tokens"]


def test_nan_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 6, "lr": 1e30, "warmup_steps": 0,
                                                         "max_grad_norm": 1.0},
                          checkpoint={"every": 1, "keep": 5})
    res = run_train(recipe)
    assert res.returncode == 1
    assert "non-finite" in res.stderr and "last good checkpoint" in res.stderr
    out = tmp_path / "out"
    bad_step = int(res.stderr.split("at step ")[1].split()[0])
    assert bad_step >= 2
    assert (out / "checkpoints" / f"step_{bad_step - 1}").is_dir()
    assert not (out / "checkpoints" / f"step_{bad_step}").exists()


def test_dead_teacher_is_a_clear_error_without_orphans(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 10_000, "eval_batches": 1},
                          checkpoint={"export_hf": False}, teacher={"engine": "hf"})  # a teacher process to kill
    proc = subprocess.Popen(KDCORE + ["train", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)
    out = tmp_path / "out"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "metrics.jsonl").exists() or not train_steps(out):
            time.sleep(0.5)
            assert proc.poll() is None, proc.stderr.read()[-3000:]
        kids = _children(proc.pid)
        assert kids, "the teacher runs in its own process"
        for k in kids:
            os.kill(k, signal.SIGKILL)
        t0 = time.time()
        _, err = proc.communicate(timeout=60)
        assert time.time() - t0 < 30
        assert proc.returncode == 1
        assert "teacher" in err.lower()
        assert all(not Path(f"/proc/{k}").exists() or "zombie" in Path(f"/proc/{k}/status").read_text().lower()
                   for k in kids)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("section,values,message", [
    ("teacher", {"path": "/nonexistent/teacher"}, "/nonexistent/teacher"),
    ("data", {"train": "/nonexistent/data.jsonl"}, "/nonexistent/data.jsonl"),
    ("data", {"max_length": 4096}, "max_position_embeddings"),
])
def test_bad_inputs_are_one_clear_error(tmp_path, tiny_teacher, section, values, message):
    recipe = write_recipe(tmp_path, tiny_teacher, **{section: values})
    res = run_train(recipe)
    assert res.returncode in (1, 2)
    assert message in res.stderr
    assert "Traceback" not in res.stderr


def test_quickstart_recipe_smoke_on_the_real_smollm2_teacher(tmp_path):
    """The shipped quickstart, shortened: the real GGUF teacher, a truncated student, 3 steps."""
    res = run_train(ROOT / "recipes" / "quickstart.yaml", f"train.output_dir={tmp_path / 'out'}",
                    "train.max_steps=3", "train.micro_batch_size=4", "data.limit=24", "train.eval_every=0",
                    "train.eval_batches=1", "checkpoint.every=0", "checkpoint.export_hf=false",
                    "logging.progress=false", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = train_steps(tmp_path / "out")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in steps)
    ev = evals(tmp_path / "out")
    assert [e["step"] for e in ev] == [0, 3]
    assert ev[1]["eval_teacher_kl"] < ev[0]["eval_teacher_kl"]
