"""`kdcore eval`: a student export scored against its teacher on the recipe's held-out set.

Token metrics against a dense computation with plain torch (full logits of both models at the
loss positions) and against the training-time evaluation of the same weights; cross-tokenizer
KL through the aligner equal to training's; ROUGE-L against the rouge-score package called
directly; the evaluator hook (an in-process plugin); each bad input's one line.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.assets import ROOT
from helpers.train import evals, run_train, write_recipe
from helpers.xtok import MISTRAL_V1, xtok_recipe
from helpers.eval_cmd import KDCORE, dense_reference, run_eval

TINY = {"threads": 1}


def one_line_error(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    return lines[0]


@pytest.fixture(scope="module")
def same_vocab_run(tmp_path_factory, tiny_teacher):
    """A 2-step run with an export, then `kdcore eval <run folder>` (every answer kept in the JSON)."""
    tmp = tmp_path_factory.mktemp("eval_same")
    recipe = write_recipe(tmp, tiny_teacher, train={"max_steps": 2, "eval_batches": 2, "micro_batch_size": 3, **TINY},
                          teacher=TINY, eval={"max_new_tokens": 6, "samples": 100})
    res = run_train(recipe)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp / "out"
    shutil.copy(recipe, out / "recipe.yaml")  # what a run folder keeps of its recipe
    res = run_eval(out)
    assert res.returncode == 0, res.stderr[-3000:]
    return recipe, out, json.loads((out / "eval.json").read_text()), res.stdout


def test_token_metrics_match_a_dense_computation_and_training(same_vocab_run):
    recipe, out, report, _ = same_vocab_run
    got = report["metrics"]
    want = dense_reference(recipe, out / "hf")
    assert got["eval_tokens"] == want["eval_tokens"]
    for key in ("eval_teacher_kl", "eval_ppl", "eval_top1_agreement"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    # the run's final evaluation scored the weights it exported, with the same machinery
    final = evals(out)[-1]
    for key in ("eval_teacher_kl", "eval_kd", "eval_ppl", "eval_top1_agreement"):
        assert got[key] == pytest.approx(final[key], rel=1e-6), key


def test_generation_scores_are_rouge_l_of_the_answers_shown(same_vocab_run):
    from rouge_score import rouge_scorer

    _, out, report, stdout = same_vocab_run
    samples = report["samples"]
    assert len(samples) == 6  # every prompt of the 2 x 3 held-out samples (samples: 100 keeps them all)
    scorer = rouge_scorer.RougeScorer(["rougeL"])

    def mean(pairs):
        return sum(scorer.score(t, p)["rougeL"].fmeasure for t, p in pairs) / len(pairs)

    m = report["metrics"]
    assert m["rouge_l_vs_reference"] == pytest.approx(mean([(s["reference"], s["student"]) for s in samples]))
    assert m["rouge_l_vs_teacher"] == pytest.approx(mean([(s["teacher"], s["student"]) for s in samples]))
    assert m["rouge_l_teacher_vs_reference"] == pytest.approx(mean([(s["reference"], s["teacher"]) for s in samples]))
    held_out = [json.loads(line) for line in Path(yaml.safe_load((out / "recipe.yaml").read_text())["data"]["eval"])
                .read_text().splitlines()]
    assert samples[0]["reference"] == held_out[0]["messages"][-1]["content"]
    assert "rouge_l_vs_reference" in stdout and "reference" in stdout  # the table and the side-by-side answers


def test_student_answers_are_its_greedy_continuations(same_vocab_run):
    import torch
    from transformers import AutoModelForCausalLM

    from kdcore.modeling.tokenizers import load_tokenizer

    _, out, report, _ = same_vocab_run
    tok = load_tokenizer(str(out / "hf"))
    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    first = report["samples"][0]
    prompt = tok.apply_chat_template([{"role": "user", "content": first["prompt"]}], tokenize=False,
                                     add_generation_prompt=True)
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    assert first["student"] == tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.long  # kept out of the default command (README, Tests)
def test_cross_tokenizer_kl_through_the_aligner_equals_training(tmp_path, tiny_teacher):
    recipe = xtok_recipe(tmp_path, tiny_teacher, "overlap", train={"max_steps": 2, "output_dir": str(tmp_path / "out")},
                         checkpoint={"export_hf": True})
    res = run_train(recipe)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    res = run_eval(recipe, "eval.evaluators=[]", "--student", out / "hf", "--json", tmp_path / "x.json")
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads((tmp_path / "x.json").read_text())["metrics"]
    final = evals(out)[-1]
    assert got["eval_teacher_kl"] == pytest.approx(final["eval_teacher_kl"], rel=1e-6)
    assert got["eval_align_ratio"] == pytest.approx(final["eval_align_ratio"], rel=1e-9)
    assert "eval_top1_agreement" not in got  # two vocabularies: no token-wise agreement
    assert not any(k.startswith("rouge_l") for k in got)


# ------------------------------------------------------------------------------ evaluators


def generations(**over):
    from kdcore.commands.evaluate import Generations

    base = dict(prompts=["p1", "p2"], references=["the cat sat on the mat", "a quick brown fox"],
                student=["the cat on a mat", "quick fox jumps"], teacher=["the cat sat on a mat", "the quick brown fox"],
                student_ids=[[1], [2]], teacher_ids=[[1], [2]], student_tokenizer=None, teacher_tokenizer=None)
    base.update(over)
    return Generations(**base)


def test_rouge_l_equals_the_package_scorer():
    from rouge_score import rouge_scorer

    from kdcore import load_registry

    entry = load_registry().get("evaluator", "rouge_l")
    g = generations()
    for stem in (False, True):
        got = entry.fn(g, entry.make_options({"use_stemmer": stem}))
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)
        f = [scorer.score(r, s)["rougeL"].fmeasure for r, s in zip(g.references, g.student)]
        assert got["vs_reference"] == pytest.approx(sum(f) / 2)
        f = [scorer.score(t, s)["rougeL"].fmeasure for t, s in zip(g.teacher, g.student)]
        assert got["vs_teacher"] == pytest.approx(sum(f) / 2)
    assert 0 < got["vs_reference"] < got["teacher_vs_reference"] < 1


def test_answer_words_counts_words_and_empty_student_answers():
    from kdcore import load_registry

    entry = load_registry().get("evaluator", "answer_words")
    got = entry.fn(generations(student=["the cat on a mat", "  "]), entry.make_options({}))
    # student: 5 and 0 words; teacher: 6 and 4; references: 6 and 4
    assert got == {"student": 2.5, "teacher": 5.0, "reference": 5.0, "student_empty": 0.5, "student_distinct": 1.0}
    # one template for every prompt (up to spacing) is one distinct answer of three
    template = entry.fn(generations(student=["Return the object.", "Return  the object.", "Return the object. "]),
                        entry.make_options({}))
    assert template["student_distinct"] == pytest.approx(1 / 3) and template["student_empty"] == 0.0


def register_evaluators(register):
    """A third-party plugin's evaluators: the student's mean answer length, and a broken one."""

    def answer_length(generations, options):
        """Mean generated tokens per student answer."""
        return {"student_tokens": sum(map(len, generations.student_ids)) / len(generations.student_ids)}

    def broken(generations, options):
        return {"bad": float("nan")}

    register("answer_length", answer_length)
    register("broken", broken)


@pytest.fixture
def plugin_registry():
    import types

    from kdcore import hookimpl, load_registry, register_plugin, unregister_plugin

    register_plugin(types.SimpleNamespace(register_evaluators=hookimpl(register_evaluators)), "answer_length_test")
    try:
        yield load_registry()
    finally:
        unregister_plugin("answer_length_test")


def test_plugin_evaluators_run_beside_the_builtin_with_prefixed_names(plugin_registry):
    from omegaconf import OmegaConf

    from kdcore.recipe.loading import EvalConfig
    from kdcore.commands.evaluate import EvaluatorError, run_evaluators

    cfg = OmegaConf.create({"eval": OmegaConf.structured(EvalConfig(evaluators=["rouge_l", "answer_length"]))})
    out = run_evaluators(cfg, plugin_registry, generations(student_ids=[[1, 2, 3], [4]]))
    assert out["answer_length_student_tokens"] == 2.0
    assert set(out) == {"answer_length_student_tokens", "rouge_l_vs_reference", "rouge_l_vs_teacher",
                        "rouge_l_teacher_vs_reference"}
    cfg = OmegaConf.create({"eval": OmegaConf.structured(EvalConfig(evaluators=["broken"]))})
    with pytest.raises(EvaluatorError, match="evaluator 'broken': metric 'bad' is nan, not a finite float"):
        run_evaluators(cfg, plugin_registry, generations())


def test_recipe_evaluators_are_checked_against_the_registry(tmp_path, tiny_teacher):
    from kdcore import load_registry
    from kdcore.recipe.loading import load_raw, validate_raw

    recipe = write_recipe(tmp_path, tiny_teacher, eval={"evaluators": ["rouge_k"], "options": {"bleu": {}},
                                                         "max_new_tokens": 0})
    errors = validate_raw(load_raw(str(recipe))[1], load_registry())
    assert any("eval.evaluators[0]: unknown evaluator 'rouge_k' (did you mean 'rouge_l'?)" in e for e in errors), errors
    assert any(e.startswith("eval.options.bleu: 'bleu' is not in eval.evaluators") for e in errors), errors
    assert any(e.startswith("eval.max_new_tokens: must be > 0") for e in errors), errors
    recipe = write_recipe(tmp_path, tiny_teacher, eval={"options": {"rouge_l": {"use_stemer": True}}})
    errors = validate_raw(load_raw(str(recipe))[1], load_registry())
    assert any("eval.options.rouge_l.use_stemer: unknown key; did you mean 'eval.options.rouge_l.use_stemmer'" in e
               for e in errors), errors


def test_list_algorithms_lists_evaluators():
    res = subprocess.run(KDCORE + ["list-algorithms", "--kind", "evaluator", "--json"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert sorted((r["name"], r["kind"], r["options"]) for r in rows) == [
        ("answer_words", "evaluator", {}), ("draft", "evaluator", {"gamma": 4}),
        ("repetition", "evaluator", {"n": 4}), ("rouge_l", "evaluator", {"use_stemmer": False})]


# ------------------------------------------------------------------------------ bad input


def test_a_folder_that_is_not_a_model(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher)
    (tmp_path / "empty").mkdir()
    line = one_line_error(run_eval(recipe, "--student", tmp_path / "empty"))
    assert line == f"kdcore: error: student '{tmp_path / 'empty'}' is not a model folder (no config.json): give a " \
                   f"Hugging Face export such as <run>/hf"
    line = one_line_error(run_eval(tmp_path / "empty"))  # as a run folder: no recipe.yaml
    assert f"run folder '{tmp_path / 'empty'}' has no recipe.yaml" in line


def test_a_missing_teacher(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tmp_path / "gone")
    line = one_line_error(run_eval(recipe, "--student", tiny_teacher))
    assert line.startswith("kdcore: error: ") and "teacher.path: model " in line and "no such file or folder" in line and "gone" in line


def test_mismatched_tokenizers(tmp_path, tiny_teacher):
    # the export speaks SmolLM2's tokenizer; the recipe's student speaks Mistral v1's
    recipe = xtok_recipe(tmp_path, tiny_teacher, "overlap")
    line = one_line_error(run_eval(recipe, "--student", tiny_teacher))
    assert line == (f"kdcore: error: the tokenizer of student '{tiny_teacher}' differs from the recipe's ('{MISTRAL_V1}'): "
                    f"evaluate with the recipe the student was trained with")


def test_a_recipe_without_held_out_data(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, data={"eval": None, "eval_size": 0})
    line = one_line_error(run_eval(recipe, "--student", tiny_teacher))
    assert line == "kdcore: error: the recipe has no held-out data: set data.eval (a file) or data.eval_size > 0"


@pytest.mark.long  # ~13 s; tests/unit/test_run_summary.py checks the table fast
def test_eval_of_a_run_ends_with_its_before_and_after(same_vocab_run):
    """issue 28: the ending says whether distillation worked (step 0 -> last evaluation, from
    the run's metrics.jsonl) and what the answers can be expected to look like; no silent
    generation: prompts done / total and tokens/s."""
    recipe, out, report, stdout = same_vocab_run
    first, last = evals(out)[0], evals(out)[-1]
    rows = {r["metric"]: r for r in report["training"]["rows"]}
    assert report["training"]["first_step"] == 0 and report["training"]["last_step"] == last["step"] == 2
    for key in ("eval_teacher_kl", "eval_ppl", "eval_top1_agreement"):
        assert rows[key]["before"] == first[key] and rows[key]["after"] == last[key]
    assert "did distillation work?" in stdout and "At this budget (2 steps" in stdout
    res = run_eval(out, "--against", out)  # a run beside itself: every figure equal, never "better"
    assert res.returncode == 0, res.stderr[-3000:]
    assert "(last)" in res.stdout and "this run better" not in res.stdout
    assert "student's greedy answers (up to 6 tokens each): done (" in res.stderr and "tok/s" in res.stderr
    missing = run_eval(out, "--against", out / "nowhere")
    assert "--against" in one_line_error(missing)
