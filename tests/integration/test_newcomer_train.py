"""What a tiny run prints when its output is not a terminal, and skipping the step-0
evaluation (issue 28): plain lines every logging.print_every steps, a line per evaluation
phase with its time, and train.eval_at_start=false starting step 1 without the baseline."""

from __future__ import annotations

import pytest

from helpers.train import evals, run_train, write_recipe


@pytest.mark.long  # ~11 s; tests/unit/test_newcomer_output.py checks the plain lines fast
def test_plain_progress_lines_and_no_step0_evaluation(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 4, "eval_at_start": False},
                          logging={"progress": True, "print_every": 2})
    res = run_train(recipe)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [e["step"] for e in evals(tmp_path / "out")] == [4]  # no step-0 record
    lines = res.stderr.splitlines()
    assert [x.split()[1] for x in lines if x.startswith("step ")] == ["2/4", "4/4"]
    assert any(x.startswith("held-out evaluation (step 4), batches: done (2/2, ") for x in lines), res.stderr
    assert not any("(step 0)" in x for x in lines)
