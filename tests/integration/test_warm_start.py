"""A student loaded from an export (a warm start: ``student.path=<run>/hf student.init=pretrained``),
and ``student.num_layers`` never ignored silently."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from helpers.assets import save_tiny_llama
from helpers.train import evals, run_train, write_recipe

pytestmark = pytest.mark.usefixtures("cpu_process_group")


def recipe_for(path, **student):
    from kdcore.recipe.loading import Recipe

    r = OmegaConf.structured(Recipe)
    r.teacher.path = str(path)
    for k, v in student.items():
        setattr(r.student, k, v)
    return r


@pytest.fixture(scope="module")
def three_layers(tmp_path_factory, smollm2_tokenizer):
    return save_tiny_llama(tmp_path_factory.mktemp("three"), smollm2_tokenizer, hidden=32, layers=3, inter=64)


@pytest.mark.parametrize("init", ["pretrained", "config"])
def test_num_layers_that_would_be_ignored_is_refused_in_one_line(init, three_layers):
    from kdcore.modeling.student import build_student

    with pytest.raises(ValueError, match=rf"student.num_layers=2, but the init={init} student from .* has 3 layers"):
        build_student(recipe_for(three_layers, init=init, num_layers=2))
    # stating the student's own count is fine (a truncate recipe switched to a warm start)
    assert len(build_student(recipe_for(three_layers, init=init, num_layers=3)).model.layers) == 3
    assert len(build_student(recipe_for(three_layers, init="truncate", num_layers=2)).model.layers) == 2


def test_a_run_continues_from_another_runs_export(tmp_path, tiny_teacher):
    """Train, export, then a second run from that export: its step-0 evaluation is the first
    run's final one (same weights, same held-out batches), and the recipe needs only
    student.path and student.init."""
    first = write_recipe(tmp_path / "first", tiny_teacher, distill={"loss": "fkl", "kd_ratio": 0.0},
                         train={"max_steps": 3, "threads": 1}, teacher={"threads": 1})
    res = run_train(first)
    assert res.returncode == 0, res.stderr[-3000:]
    export = tmp_path / "first" / "out" / "hf"
    warm = write_recipe(tmp_path / "warm", tiny_teacher, distill={"loss": "fkl"},
                        train={"max_steps": 1, "threads": 1}, teacher={"threads": 1},
                        student={"path": str(export), "init": "pretrained", "config_overrides": {}})
    res = run_train(warm, "student.num_layers=2")  # the export has 1 layer
    assert res.returncode == 2 and "student.num_layers=2, but the init=pretrained student" in res.stderr
    assert "unexpected" not in res.stderr
    res = run_train(warm, "student.num_layers=1", "--overwrite")
    assert res.returncode == 0, res.stderr[-3000:]
    before, after = evals(tmp_path / "first" / "out")[-1], evals(tmp_path / "warm" / "out")[0]
    assert after["step"] == 0
    for key in ("eval_teacher_kl", "eval_ppl", "eval_top1_agreement"):
        assert after[key] == pytest.approx(before[key], rel=1e-5), key
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    assert loaded.config.num_hidden_layers == 1
