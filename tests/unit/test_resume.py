"""--resume: which recipe changes are refused and which applied; the schedule continues under
new settings."""

from __future__ import annotations

import copy

import pytest
import torch

from kdcore.storage.resume import ResumeMismatchError, check_resume, compare_recipes
from kdcore.modeling.student import build_optimizer, build_scheduler, lr_factor, reschedule, reschedule_for_recipe

SAVED = {
    "teacher": {"path": "t", "tokenizer": None, "threads": 0, "device": "auto", "sglang": {"port": 0}},
    "student": {"path": None, "init": "truncate", "num_layers": 4, "config_overrides": {}},
    "data": {"train": "a.jsonl", "max_length": 512},
    "distill": {"loss": "fkl", "loss_options": {}, "aligner": "same_vocab", "temperature": 1.0, "chunk_size": 256},
    "train": {"seed": 0, "max_steps": 10, "lr": 1e-4, "micro_batch_size": 4, "grad_accum": 1,
              "eval_every": 0, "output_dir": "out"},
    "checkpoint": {"every": 0}, "logging": {"log_every": 1},
}


def changed(**dotted):
    new = copy.deepcopy(SAVED)
    for key, value in dotted.items():
        node = new
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return new


def test_identical_recipes_differ_in_nothing():
    assert compare_recipes(SAVED, copy.deepcopy(SAVED)) == ([], [])


@pytest.mark.parametrize("key,value", [
    ("student__num_layers", 2), ("student__path", "other"), ("student__init", "config"),
    ("teacher__path", "t2"), ("teacher__tokenizer", "tok"), ("data__train", "b.jsonl"),
    ("data__max_length", 256), ("distill__loss", "rkl"), ("distill__loss_options__beta", 0.3),
    ("distill__temperature", 2.0), ("train__seed", 1), ("train__micro_batch_size", 2),
    ("train__grad_accum", 2), ("student__config_overrides__hidden_size", 8), ("newsection__x", 1),
])
def test_keys_that_change_what_is_trained_are_refused(key, value):
    refused, applied = compare_recipes(SAVED, changed(**{key: value}))
    assert applied == [] and len(refused) == 1
    assert refused[0].startswith(key.replace("__", ".") + ":") and repr(value) in refused[0]


def test_keys_about_length_pace_and_place_are_applied():
    new = changed(train__max_steps=20, train__lr=2e-4, train__eval_every=5, teacher__threads=2,
                  teacher__device="cpu", teacher__sglang__port=3000, checkpoint__every=2,
                  logging__log_every=5, distill__chunk_size=128, train__output_dir="elsewhere")
    refused, applied = compare_recipes(SAVED, new)
    assert refused == []
    assert applied == ["checkpoint.every: 0 → 2", "distill.chunk_size: 256 → 128", "logging.log_every: 1 → 5",
                       "teacher.device: 'auto' → 'cpu'", "teacher.sglang.port: 0 → 3000",
                       "teacher.threads: 0 → 2", "train.eval_every: 0 → 5", "train.lr: 0.0001 → 0.0002",
                       "train.max_steps: 10 → 20"]


def test_check_resume_names_old_and_new_values_in_one_line():
    with pytest.raises(ResumeMismatchError) as err:
        check_resume(SAVED, changed(student__num_layers=2, train__max_steps=20), "ckpt/step_5")
    msg = str(err.value)
    assert "\n" not in msg and "student.num_layers: 4 → 2" in msg and "ckpt/step_5" in msg
    assert "max_steps" not in msg
    assert check_resume(SAVED, changed(train__max_steps=20), "x") == ["train.max_steps: 10 → 20"]
    assert check_resume(None, SAVED, "x") == []


def _sched(lr=1.0, warmup=2, max_steps=10, floor=0.1, steps=0):
    opt = build_optimizer(torch.nn.Linear(2, 2), lr, 0.0, [torch.nn.Linear(2, 2)], extra_lr=lr * 10)
    sched = build_scheduler(opt, warmup, max_steps, floor)
    for _ in range(steps):
        opt.step()
        sched.step()
    return opt, sched


def _restored(steps, **saved):
    """A scheduler state saved after ``steps`` steps, loaded into a fresh one (as on resume)."""
    _, old = _sched(steps=steps, **saved)
    opt, fresh = _sched(**saved)
    fresh.load_state_dict(old.state_dict())
    for g, lr in zip(opt.param_groups, old.get_last_lr()):
        g["lr"] = lr  # the optimizer's groups come back through DCP
    return opt, fresh


def test_a_longer_run_after_resume_leaves_the_floor():
    opt, sched = _restored(10, max_steps=10)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)  # at its floor, as saved
    reschedule(sched, warmup_steps=2, max_steps=20, min_lr_ratio=0.1)
    for step in range(10, 20):
        want = lr_factor(step, 2, 20, 0.1)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12)
        assert opt.param_groups[-1]["lr"] == pytest.approx(10 * want, rel=1e-12)  # the extra modules' ratio
        opt.step()
        sched.step()
    assert lr_factor(10, 2, 20, 0.1) > 0.5


def test_a_new_peak_lr_scales_every_group_from_the_resumed_step():
    from omegaconf import OmegaConf

    opt, sched = _restored(4, lr=1.0)
    train = OmegaConf.create({"lr": 3.0, "warmup_steps": 2, "max_steps": 10, "min_lr_ratio": 0.1})
    reschedule_for_recipe(sched, train, {"lr": 1.0})
    assert opt.param_groups[0]["lr"] == pytest.approx(3.0 * lr_factor(4, 2, 10, 0.1))
    assert opt.param_groups[-1]["lr"] == pytest.approx(30.0 * lr_factor(4, 2, 10, 0.1))
    assert sched.get_last_lr()[0] == opt.param_groups[0]["lr"]
    _, same = _restored(4)
    before = [g["lr"] for g in same.optimizer.param_groups]
    reschedule_for_recipe(same, OmegaConf.create({"lr": 1.0, "warmup_steps": 2, "max_steps": 10,
                                                  "min_lr_ratio": 0.1}), {"lr": 1.0})
    assert [g["lr"] for g in same.optimizer.param_groups] == before  # unchanged settings: bit for bit
