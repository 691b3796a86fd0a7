"""What the README's Status table listed as "not on several ranks", each run on two ranks
(torchrun --nproc_per_node 2, gloo on CPU): the teacher cache, several teachers, resume with
fallback from a damaged checkpoint, and `kdcore eval` of a run trained on two ranks.

Each test starts two-rank runs (a minute or more on a shared 2-core machine): `long`."""

from __future__ import annotations

import json
import shutil

import pytest

from helpers.checkpoint_edits import _cut_recipe, _rewrite_manifest
from helpers.eval_cmd import dense_reference, run_eval
from helpers.multi_teacher import mistral_teacher, recipe as multi_recipe, tiny_student, two_teachers  # noqa: F401
from helpers.teacher_cache import build, cached
from helpers.train import evals, run_train, train_steps, write_recipe

pytestmark = pytest.mark.long

TWO = {"max_steps": 2, "micro_batch_size": 2, "threads": 1}


def ok(res) -> None:
    assert res.returncode == 0, res.stderr[-3000:]


def test_a_cache_read_on_two_ranks_trains_like_the_live_teacher(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, train=TWO, teacher={"threads": 1},
                          checkpoint={"every": 0, "export_hf": False})
    ok(build(recipe, tmp_path / "cache", "--dtype", "float32"))
    ok(run_train(recipe, f"train.output_dir={tmp_path / 'live'}", nproc=2, timeout=400))
    ok(run_train(recipe, f"train.output_dir={tmp_path / 'cached'}", *cached(tmp_path / "cache"), nproc=2,
                 timeout=400))
    live, cache = train_steps(tmp_path / "live"), train_steps(tmp_path / "cached")
    assert len(cache) == 2 and [(r["loss"], r["kd_loss"]) for r in cache] == [(r["loss"], r["kd_loss"]) for r in live]
    # evaluation on two ranks: equal to ~1e-7 (one rank: bitwise, tests/integration/test_teacher_cache.py)
    for x, y in zip(evals(tmp_path / "live"), evals(tmp_path / "cached")):
        assert x["eval_teacher_kl"] == pytest.approx(y["eval_teacher_kl"], rel=1e-6), (x, y)


def test_several_teachers_on_two_ranks_match_one_rank(tmp_path, tiny_teacher, mistral_teacher, tiny_student):  # noqa: F811
    """Same global batch: 2 ranks x 1 micro-batch of 2 == 1 rank x 2 micro-batches of 2."""
    teachers = two_teachers(tiny_teacher, mistral_teacher)
    one = multi_recipe(tmp_path / "one", tiny_student, teachers, train={"max_steps": 2, "micro_batch_size": 2,
                                                                        "grad_accum": 2})
    two = multi_recipe(tmp_path / "two", tiny_student, teachers, train={"max_steps": 2, "micro_batch_size": 2,
                                                                        "grad_accum": 1})
    ok(run_train(one))
    ok(run_train(two, nproc=2, timeout=400))
    a, b = train_steps(tmp_path / "one" / "out"), train_steps(tmp_path / "two" / "out")
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5), (a, b)
        assert x["tokens"] == y["tokens"]


def test_resume_on_two_ranks_falls_back_past_a_damaged_checkpoint(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, train={**TWO, "max_steps": 4}, teacher={"threads": 1},
                          checkpoint={"every": 2, "keep": 3, "export_hf": False})
    out = tmp_path / "out"
    ok(run_train(recipe, nproc=2, timeout=400))
    unbroken = {r["step"]: r["loss"] for r in train_steps(out)}
    newest = out / "checkpoints" / "step_4"
    _cut_recipe(newest)  # damaged, with a manifest that matches: only the content check catches it
    _rewrite_manifest(newest)
    (out / "metrics.jsonl").unlink()
    res = run_train(recipe, "--resume", nproc=2, timeout=400)
    ok(res)
    assert f"skipping checkpoint '{newest}'" in res.stderr, res.stderr[-3000:]
    resumed = {r["step"]: r["loss"] for r in train_steps(out)}
    assert sorted(resumed) == [3, 4] and [resumed[3], resumed[4]] == [unbroken[3], unbroken[4]], (unbroken, resumed)


def test_eval_of_a_run_trained_on_two_ranks(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, train={**TWO, "eval_batches": 2}, teacher={"threads": 1},
                          eval={"max_new_tokens": 4, "samples": 2})
    out = tmp_path / "out"
    ok(run_train(recipe, nproc=2, timeout=400))
    shutil.copy(recipe, out / "recipe.yaml")
    ok(run_eval(out))
    got = json.loads((out / "eval.json").read_text())["metrics"]
    want = dense_reference(recipe, out / "hf")  # the export gathered from both ranks' shards
    assert got["eval_tokens"] == want["eval_tokens"]
    for key in ("eval_teacher_kl", "eval_ppl", "eval_top1_agreement"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    final = evals(out)[-1]  # the two-rank run's own final evaluation, of the same weights
    for key in ("eval_teacher_kl", "eval_ppl", "eval_top1_agreement"):
        assert got[key] == pytest.approx(final[key], rel=1e-5), key
