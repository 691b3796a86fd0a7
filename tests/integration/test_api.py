"""The Python API (kdcore.train / evaluate / cache_teacher, kdcore/commands/api.py) and its worked example,
examples/custom_loss.py, run as written on a tiny teacher."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers.assets import ROOT
from helpers.train import write_recipe

TINY = {"threads": 1}


@pytest.mark.long  # ~35 s quiet, 2+ min loaded; test_the_example_calls_the_api_as_documented is its fast twin
def test_the_example_runs_as_written(tmp_path, tiny_teacher):
    """The example's exact text: an in-process loss registered, trained, evaluated."""
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 2, "eval_batches": 1, "micro_batch_size": 2,
                                                         **TINY},
                          teacher=TINY, data={"limit": 8, "max_length": 48}, eval={"evaluators": ["answer_words"]})
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_loss.py"), str(recipe),
                          f"train.output_dir={out}", "train.max_steps=2"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"{out}: 2 steps; teacher-KL " in res.stdout
    assert "answer_words_student" in res.stdout and "eval_teacher_kl" in res.stdout
    # the recipe the run kept names the example's loss: the plugin's loss trained, not fkl
    assert "loss: hellinger" in (out / "recipe.yaml").read_text()
    report = json.loads((out / "eval.json").read_text())
    assert report["metrics"]["answer_words_student"] >= 0 and "training" in report


def test_the_example_calls_the_api_as_documented(monkeypatch, capsys):
    """The example's exact text with kdcore.commands.api's train / evaluate replaced by stand-ins that
    check each call against the real signature and see the registered loss work; the real
    run of the same text is the long test above."""
    import inspect
    import runpy
    from pathlib import Path

    import torch

    import kdcore
    from kdcore.commands import api

    calls = []

    def fake_train(recipe, overrides=None, **options):
        inspect.signature(api.train).bind(recipe, overrides, **options)
        loss = kdcore.load_registry().get("loss", "hellinger")  # registered by the example, in this process
        s, t = torch.randn(3, 11), torch.randn(3, 11)
        p, q = torch.softmax(t, -1), torch.softmax(s, -1)
        assert torch.allclose(loss.fn(s, t, temperature=1.0), 1 - (p * q).sqrt().sum(-1), atol=1e-6)
        calls.append(("train", recipe, list(overrides)))
        return api.TrainRun(run_dir=Path("runs/x"), steps=10, figures={"eval_teacher_kl": 2.0},
                            evals=[{"step": 0, "eval_teacher_kl": 9.0}], metrics_file=Path("runs/x/metrics.jsonl"))

    def fake_evaluate(run, overrides=None, **options):
        inspect.signature(api.evaluate).bind(run, overrides, **options)
        calls.append(("evaluate", run))
        return api.EvalReport(run_dir=Path(run), figures={"rouge_l_vs_reference": 0.25}, report={},
                              json_path=Path(run) / "eval.json")

    monkeypatch.setattr(api, "train", fake_train)
    monkeypatch.setattr(api, "evaluate", fake_evaluate)
    monkeypatch.setattr("sys.argv", ["custom_loss.py"])
    runpy.run_path(str(ROOT / "examples" / "custom_loss.py"), run_name="__main__")
    assert calls == [("train", "quickstart", ["train.max_steps=10", "train.eval_every=5",
                                              "train.output_dir=outputs/custom_loss", "distill.loss=hellinger"]),
                     ("evaluate", Path("runs/x"))]
    out = capsys.readouterr().out
    assert "runs/x: 10 steps; teacher-KL 9.000 -> 2.000" in out and "rouge_l_vs_reference" in out
    with pytest.raises(Exception):
        kdcore.load_registry().get("loss", "hellinger")  # unregistered at the end


def test_api_errors_are_the_commands(tmp_path, tiny_teacher):
    import kdcore

    recipe = write_recipe(tmp_path, tiny_teacher, train=TINY)
    with pytest.raises(kdcore.RecipeError, match="train.max_stepz"):
        kdcore.train(recipe, ["train.max_stepz=3"])
    with pytest.raises(TypeError, match="not one string"):
        kdcore.train(recipe, "train.max_steps=3")
    from kdcore.commands.evaluate import EvalInputError

    with pytest.raises(EvalInputError, match="does not exist"):
        kdcore.evaluate(recipe)  # its output_dir holds no run yet


def test_the_api_functions_stay_after_the_command_modules_load():
    """kdcore.train / evaluate / cache_teacher stay the functions once the command modules load,
    and `import kdcore` loads no torch."""
    res = subprocess.run([sys.executable, "-c", "import kdcore, sys\n"
                          "assert 'torch' not in sys.modules\n"
                          "import kdcore.commands.evaluate, kdcore.commands.cache_teacher, kdcore.commands.api\n"
                          "for name in ('train', 'evaluate', 'cache_teacher'):\n"
                          "    f = getattr(kdcore, name)\n"
                          "    assert callable(f) and f.__module__ == 'kdcore', (name, f)\n"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 0, res.stderr
