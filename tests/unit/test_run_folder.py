"""The run folder: refused when it holds a run, moved aside on --overwrite, recipe saved,
metrics cut back on resume."""

from __future__ import annotations

import json
import os

import pytest
from omegaconf import OmegaConf

from kdcore import run_folder as rf


def _old_run(d):
    (d / "checkpoints" / "step_2").mkdir(parents=True)
    (d / "checkpoints" / "step_2" / "meta.json").write_text("{}")
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    (d / "hf").mkdir()
    (d / "hf" / "model.safetensors").write_bytes(b"w")


def test_an_empty_or_missing_folder_is_free(tmp_path):
    assert rf.prepare(tmp_path / "new", resume=False, overwrite=False) is None
    assert (tmp_path / "new").is_dir()
    (tmp_path / "empty_ckpts" / "checkpoints").mkdir(parents=True)  # an empty checkpoints/ holds nothing
    assert rf.run_markers(tmp_path / "empty_ckpts") == []


@pytest.mark.parametrize("marker", ["metrics.jsonl", "checkpoints", "hf", "recipe.yaml"])
def test_a_fresh_run_into_a_folder_holding_a_run_is_refused(tmp_path, marker):
    d = tmp_path / "run"
    d.mkdir()
    if marker in ("checkpoints", "hf"):
        (d / marker).mkdir()
        (d / marker / "x").write_text("x")
    else:
        (d / marker).write_text("x")
    with pytest.raises(rf.RunFolderError) as err:
        rf.prepare(d, resume=False, overwrite=False)
    msg = str(err.value)
    assert "\n" not in msg and "--resume" in msg and "--overwrite" in msg and marker in msg
    assert (d / marker).exists()  # untouched
    assert rf.prepare(d, resume=True, overwrite=False) is None  # resuming it is fine


def test_overwrite_moves_the_old_run_aside_and_loses_nothing(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    _old_run(d)
    before = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    moved = rf.prepare(d, resume=False, overwrite=True)
    assert moved.parent == tmp_path and moved.name.startswith("run.old-")
    assert sorted(str(p.relative_to(moved)) for p in moved.rglob("*")) == before
    assert d.is_dir() and not any(d.iterdir())
    _old_run(d)
    moved2 = rf.prepare(d, resume=False, overwrite=True)  # same second: a distinct name
    assert moved2 != moved and moved.is_dir() and moved2.is_dir()


def test_overwrite_never_moves_the_working_directory(tmp_path, monkeypatch):
    _old_run(tmp_path)
    (tmp_path / "sub").mkdir()
    for cwd in (tmp_path, tmp_path / "sub"):
        monkeypatch.chdir(cwd)
        with pytest.raises(rf.RunFolderError, match="working directory"):
            rf.prepare(tmp_path, resume=False, overwrite=True)
    assert (tmp_path / "metrics.jsonl").is_file()


def test_resume_with_overwrite_and_a_file_as_folder_are_refused(tmp_path):
    with pytest.raises(rf.RunFolderError, match="contradict"):
        rf.prepare(tmp_path, resume=True, overwrite=True)
    (tmp_path / "f").write_text("x")
    with pytest.raises(rf.RunFolderError, match="is a file"):
        rf.prepare(tmp_path / "f", resume=False, overwrite=False)


def test_recipe_is_saved_atomically_and_reads_back(tmp_path, monkeypatch):
    cfg = OmegaConf.create({"train": {"lr": 1e-4, "max_steps": 3}, "student": {"path": None}})
    path = rf.save_recipe(tmp_path, cfg)
    assert path == tmp_path / "recipe.yaml"
    assert rf.load_saved_recipe(tmp_path) == {"train": {"lr": 1e-4, "max_steps": 3}, "student": {"path": None}}

    def dying_replace(src, dst):
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        rf.save_recipe(tmp_path, {"train": {"lr": 9.0}})
    monkeypatch.undo()
    assert rf.load_saved_recipe(tmp_path)["train"]["lr"] == 1e-4  # the old recipe, whole


def test_trim_metrics_drops_re_run_steps_and_a_torn_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    recs = [{"step": 0, "eval_kd": 1.0}, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
            {"step": 2, "eval_kd": 0.5}, {"step": 3, "loss": 1.5}, {"note": "no step"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 4, "lo')
    assert rf.trim_metrics(p, 2) == 2
    kept = [json.loads(line) for line in p.read_text().splitlines()]
    assert kept == [recs[0], recs[1], recs[2], recs[3], recs[5]]
    assert rf.trim_metrics(p, 2) == 0
    assert rf.trim_metrics(tmp_path / "absent.jsonl", 2) == 0


def test_resume_refuses_a_changed_student_before_writing_the_recipe(tmp_path, cpu_process_group):
    d = tmp_path / "run"
    d.mkdir()
    saved = {"student": {"num_layers": 4}, "train": {"max_steps": 10, "lr": 1e-4, "output_dir": str(d)}}
    rf.save_recipe(d, saved)
    new = {"student": {"num_layers": 2}, "train": {"max_steps": 20, "lr": 1e-4, "output_dir": str(d)}}
    with pytest.raises(rf.RunFolderError, match=r"student.num_layers: 4 → 2") as err:
        rf.prepare_collective(d, new, resume=True, overwrite=False)
    assert "max_steps" not in str(err.value)
    assert rf.load_saved_recipe(d) == saved  # the saved run's recipe is kept
    new["student"]["num_layers"] = 4
    rf.prepare_collective(d, new, resume=True, overwrite=False)
    assert rf.load_saved_recipe(d)["train"]["max_steps"] == 20
