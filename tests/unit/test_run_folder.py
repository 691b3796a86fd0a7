"""The run folder: refused when it holds a run, moved aside on --overwrite, recipe saved,
metrics cut back on resume."""

from __future__ import annotations

import json
import os

import pytest
from omegaconf import OmegaConf

from kdcore.storage import run_folder as rf


@pytest.fixture(autouse=True)
def _release_locks():
    """A run folder this test process locked (prepare_collective) is let go after each test, as
    the trainer's close does."""
    yield
    for d in list(rf._locks):
        rf.unlock(d)


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


# ------------------------------------------------------------------ one run per folder (flock)

_HOLD = """
import sys, time
from kdcore.storage import run_folder as rf
rf.lock(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def _holder(d):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(d)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_folder_locked_by_a_live_run_is_refused_naming_its_pid(tmp_path, cpu_process_group):
    import socket

    d = tmp_path / "run"
    proc = _holder(d)
    try:
        with pytest.raises(rf.RunFolderBusyError) as err:
            rf.lock(d)
        msg = str(err.value)
        assert "\n" not in msg and f"pid {proc.pid} on {socket.gethostname()}" in msg
        # the whole start of a run: refused before anything is written
        with pytest.raises(rf.RunFolderError, match=f"in use by another kdcore run \\(pid {proc.pid} "):
            rf.prepare_collective(d, {"train": {"output_dir": str(d)}}, resume=False, overwrite=False)
        assert sorted(p.name for p in d.iterdir()) == [rf.LOCK]
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_holder_is_free_and_released_locks_are_free(tmp_path):
    d = tmp_path / "run"
    proc = _holder(d)
    proc.kill()  # SIGKILL: no cleanup ran; the file with its pid stays
    proc.wait()
    assert json.loads((d / rf.LOCK).read_text())["pid"] == proc.pid
    rf.lock(d)
    try:
        assert json.loads((d / rf.LOCK).read_text())["pid"] == os.getpid()
        rf.lock(d)  # this process holds it already: a no-op
    finally:
        rf.unlock(d)
    proc = _holder(d)  # released: another process takes it
    proc.kill()
    proc.wait()


def test_overwrite_keeps_the_folder_locked_while_moving_the_old_run(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    _old_run(d)
    rf.lock(d)
    try:
        moved = rf.prepare(d, resume=False, overwrite=True)
        assert (moved / rf.LOCK).is_file()
        assert json.loads((d / rf.LOCK).read_text())["pid"] == os.getpid()  # the new folder is held
        assert d.resolve() in rf._locks
    finally:
        rf.unlock(d)


# ------------------------------------------------------------------ what may be a run folder


def test_output_folders_that_are_not_run_folders_are_refused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "code").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    (home / "code" / "src").mkdir()
    monkeypatch.chdir(home / "code" / "src")
    (home / "code" / "main.py").write_text("")
    (home / "code" / "src" / "main.py").write_text("")
    for out, says in (("/", "is a system folder"), ("/etc", "is a system folder"), ("/usr", "is a system folder"),
                      ("/proc/self", "is a system folder"), ("~", "is the home folder"), (str(home), "home folder"),
                      ("", "empty"), (".", "holds files that are not a kdcore run (main.py)"),
                      ("..", "holds files that are not a kdcore run (main.py, src)"), ("../..", "home folder")):
        problem = rf.output_dir_problem(out)
        assert problem and says in problem and "\n" not in problem, (out, problem)
    monkeypatch.chdir(home / "code")
    assert rf.output_dir_problem("runs/new") is None
    (home / "code" / "runs" / "empty").mkdir(parents=True)
    assert rf.output_dir_problem("runs/empty") is None
    own = home / "code" / "runs" / "crashed"  # a run that failed before it wrote a marker
    own.mkdir()
    (own / rf.LOCK).write_text("{}")
    (own / "kdcore-crash-20260101-000000-1.log").write_text("x")
    assert rf.output_dir_problem(str(own)) is None
    _old_run(home / "code" / "runs" / "empty")
    (home / "code" / "runs" / "empty" / "notes.txt").write_text("mine")  # a run folder with a note is a run folder
    assert rf.output_dir_problem("runs/empty") is None
    with pytest.raises(rf.RunFolderError, match="holds files that are not a kdcore run"):
        rf.prepare(".", resume=False, overwrite=False)  # a recipe built in code is checked too


def test_home_is_expanded_in_every_path_of_a_recipe(tmp_path, monkeypatch):
    from kdcore.recipe.loading import load_raw, validate_raw

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: {path: ~/t, tokenizer: ~/tok, cache: ~/c, remote: {token_file: ~/tf}}\n"
                      "student: {path: ~/s, tokenizer: ~/stok}\n"
                      "data: {train: ~/d.jsonl, eval: ~/e.jsonl}\ntrain: {output_dir: ~/out}\n")
    _, raw = load_raw(str(recipe))
    h = str(tmp_path)
    assert raw["train"]["output_dir"] == f"{h}/out"
    assert raw["data"] == {"train": f"{h}/d.jsonl", "eval": f"{h}/e.jsonl"}
    assert {k: raw["teacher"][k] for k in ("path", "tokenizer", "cache")} == {"path": f"{h}/t", "tokenizer": f"{h}/tok",
                                                                           "cache": f"{h}/c"}
    assert raw["teacher"]["remote"]["token_file"] == f"{h}/tf"
    assert (raw["student"]["path"], raw["student"]["tokenizer"]) == (f"{h}/s", f"{h}/stok")
    recipe.write_text("teachers: [{name: a, path: ~/t1}, {name: b, path: ~/t2}]\ndata: {train: x}\n")
    _, raw = load_raw(str(recipe), ["train.output_dir=~/o"])
    assert [t["path"] for t in raw["teachers"]] == [f"{h}/t1", f"{h}/t2"] and raw["train"]["output_dir"] == f"{h}/o"
    _, raw = load_raw(str(recipe), ["train.output_dir=/"])
    assert any(e.startswith("train.output_dir: '/' is a system folder") for e in validate_raw(raw, recipe_dir=tmp_path))


# ------------------------------------------------------------------ the data record


def test_a_changed_data_file_is_refused_on_resume_unless_allowed(tmp_path, cpu_process_group):
    d = tmp_path / "run"
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n{"text": "b"}\n')
    recipe = {"data": {"train": str(data)}, "train": {"output_dir": str(d)}}
    rf.prepare_collective(d, recipe, resume=False, overwrite=False)
    rf.unlock(d)
    record = json.loads((d / rf.DATA_RECORD).read_text())
    assert record["train"] and record["eval"] is None
    rf.prepare_collective(d, recipe, resume=True, overwrite=False)  # unchanged: fine
    rf.unlock(d)
    data.write_text('{"text": "b"}\n{"text": "a"}\n')  # same size, same rows, other order
    with pytest.raises(rf.RunFolderError) as err:
        rf.prepare_collective(d, recipe, resume=True, overwrite=False)
    msg = str(err.value)
    assert "data.train changed since the run started" in msg and "--allow-data-change" in msg and "\n" not in msg
    assert json.loads((d / rf.DATA_RECORD).read_text()) == record  # kept
    assert d.resolve() not in rf._locks  # a refused run lets the folder go
    rf.prepare_collective(d, recipe, resume=True, overwrite=False, allow_data_change=True)
    rf.unlock(d)
    assert json.loads((d / rf.DATA_RECORD).read_text())["train"] != record["train"]  # the new content, from now on


# ------------------------------------------------------------------ secrets


def test_tokens_are_masked_in_every_recipe_a_run_writes_and_read_back_from_memory_env_or_file(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from kdcore.recipe import secret
    from kdcore.recipe.loading import load_raw, validate_raw
    from kdcore.engines.protocol import TeacherError

    recipe = tmp_path / "r.yaml"
    recipe.write_text("teacher: {path: m, engine: remote, remote: {address: '10.0.0.5:5555'}}\ndata: {train: x}\n")
    _, raw = load_raw(str(recipe), ["teacher.remote.token=hunter2-secret"])
    assert raw["teacher"]["remote"]["token"] == secret.MASK  # gone from the recipe as soon as it is loaded
    rf.save_recipe(tmp_path, raw)
    assert "hunter2" not in (tmp_path / "recipe.yaml").read_text()
    assert secret.remote_token(OmegaConf.create(raw["teacher"]["remote"])) == "hunter2-secret"  # this process
    # a recipe built in code, with the literal: every writer masks it
    literal = {"teachers": [{"name": "a", "remote": {"token": "hunter2-secret", "address": "h:1"}}]}
    assert "hunter2" not in json.dumps(rf.recipe_dict(literal))
    # read back from a saved run in another process: the mask falls back to the file or the variable
    masked = {"token": secret.MASK, "address": "elsewhere:1"}
    monkeypatch.delenv("KDFLOW_TEACHER_TOKEN", raising=False)
    assert secret.remote_token(masked) is None
    monkeypatch.setenv("KDFLOW_TEACHER_TOKEN", "from-env")
    assert secret.remote_token(masked) == "from-env"
    monkeypatch.setenv("MY_TOKEN", "named-env")
    assert secret.remote_token({**masked, "token_env": "MY_TOKEN"}) == "named-env"
    (tmp_path / "tok").write_text("from-file\n")
    assert secret.remote_token({**masked, "token_file": str(tmp_path / "tok")}) == "from-file"
    with pytest.raises(TeacherError, match="NOT_SET_ANYWHERE is not set"):
        secret.remote_token({"token_env": "NOT_SET_ANYWHERE"})
    _, raw = load_raw(str(recipe), ["teacher.remote.token=x", f"teacher.remote.token_file={tmp_path / 'nope'}"])
    errors = validate_raw(raw, recipe_dir=tmp_path)
    assert any("give one of teacher.remote.token, teacher.remote.token_file" in e for e in errors), errors
    assert any("teacher.remote.token_file: no such file" in e for e in errors), errors


def test_the_remote_engine_gets_the_token_the_recipe_no_longer_holds(tmp_path):
    from kdcore.recipe.loading import load_recipe
    from kdcore.engines import create_teacher_engine
    from kdcore.plugin_system.manager import load_registry

    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"teacher: {{path: {tmp_path / 'm'}, engine: remote, remote: {{address: '127.0.0.1:5999'}}}}\n"
                      f"data: {{train: {tmp_path / 'd.jsonl'}}}\ntrain: {{output_dir: {tmp_path / 'out'}}}\n")
    registry = load_registry()
    cfg = load_recipe(str(recipe), ["teacher.remote.token=engine-secret"], registry=registry)
    assert "engine-secret" not in str(cfg)
    engine = create_teacher_engine(cfg.teacher, registry=registry, max_rows=8)  # not started: no server needed
    assert engine.token == "engine-secret"


def test_a_resume_compares_masked_tokens_equal(tmp_path, cpu_process_group):
    from kdcore.recipe import secret

    d = tmp_path / "run"
    recipe = {"teacher": {"path": "m", "remote": {"token": "first", "address": "h:1"}}, "train": {"output_dir": str(d)}}
    rf.prepare_collective(d, recipe, resume=False, overwrite=False)
    assert rf.load_saved_recipe(d)["teacher"]["remote"]["token"] == secret.MASK
    rf.unlock(d)
    recipe["teacher"]["remote"]["token"] = "given-again"
    rf.prepare_collective(d, recipe, resume=True, overwrite=False)  # no "token changed" refusal
    recipe["teacher"]["remote"] = {"token_file": "/run/secrets/t", "address": "h:2"}  # where it comes from may change
    rf.prepare_collective(d, recipe, resume=True, overwrite=False)
