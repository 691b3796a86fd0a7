"""The run folder under concurrent, killed and careless use, with real `kdcore train` processes:
one run per folder (flock), SIGTERM like Ctrl-C, no token in any file, data checked on resume,
documented exit codes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers.assets import PYDOC, ROOT
from helpers.train import KDCORE, run_train, train_steps, write_recipe


def _start(recipe: Path, *args: str) -> subprocess.Popen:
    # a session of its own: the teacher process dies with the group when a test kills it
    return subprocess.Popen(KDCORE + ["train", str(recipe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, start_new_session=True)


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("kdcore:")]


def _wait_for(pred, proc: subprocess.Popen, what: str, limit: float = 240) -> None:
    deadline = time.time() + limit
    while not pred():
        assert proc.poll() is None, f"exited {proc.returncode} before {what}: {proc.stderr.read()[-3000:]}"
        assert time.time() < deadline, f"no {what} within {limit} s"
        time.sleep(0.2)


def _stop_group(proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        proc.wait(timeout=60)


def _race(recipe: Path, *args: str):
    """Two trainers started together into one folder (neither ends by itself: 10,000 steps). The
    one refused exits; the other is then stopped with SIGTERM. Returns (winner, loser) with
    their stderr and exit codes."""
    a, b = _start(recipe, *args), _start(recipe, *args)
    try:
        deadline = time.time() + 300
        while a.poll() is None and b.poll() is None:
            assert time.time() < deadline, "neither run was refused"
            time.sleep(0.2)
        loser, winner = (a, b) if a.poll() is not None else (b, a)
        loser_err = loser.communicate(timeout=60)[1]
        out = recipe.parent / "out"
        _wait_for(lambda: (out / "checkpoints" / "latest").exists(), winner, "a checkpoint of the winner")
        winner.send_signal(signal.SIGTERM)
        winner_err = winner.communicate(timeout=120)[1]
    finally:
        _stop_group(a)
        _stop_group(b)
    return (winner, winner_err), (loser, loser_err)


def _long_recipe(tmp_path: Path, tiny_teacher: Path) -> Path:
    return write_recipe(tmp_path, tiny_teacher, train={"max_steps": 10_000, "eval_batches": 1},
                        checkpoint={"every": 1, "keep": 2, "export_hf": False})


def _assert_refused_for(winner: subprocess.Popen, loser, loser_err: str) -> None:
    assert loser.returncode == 2, loser_err[-3000:]
    assert "Traceback" not in loser_err
    (line,) = [x for x in _lines(loser_err) if "error" in x]
    assert "is in use by another kdcore run" in line and f"pid {winner.pid} " in line, line


def _assert_sigterm_line(winner: subprocess.Popen, err: str) -> None:
    assert winner.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    last = _lines(err)[-1]
    assert last.startswith("kdcore: terminated (SIGTERM); the last good checkpoint is '") and "step_" in last, last


@pytest.mark.long  # ~11 s; tests/unit/test_run_folder.py holds the lock against a live holder process fast
def test_two_fresh_runs_into_one_folder_one_trains_the_other_is_refused(tmp_path, tiny_teacher):
    recipe = _long_recipe(tmp_path, tiny_teacher)
    (winner, werr), (loser, lerr) = _race(recipe)
    _assert_refused_for(winner, loser, lerr)
    _assert_sigterm_line(winner, werr)
    steps = [r["step"] for r in train_steps(tmp_path / "out")]
    assert steps == list(range(1, len(steps) + 1))  # one run's records only


@pytest.mark.long  # fast twin: tests/unit/test_run_folder.py
def test_two_resumes_of_one_run_one_continues_the_other_is_refused(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 2, "eval_batches": 1},
                          checkpoint={"every": 1, "keep": 2, "export_hf": False})
    assert run_train(recipe).returncode == 0
    (winner, werr), (loser, lerr) = _race(recipe, "train.max_steps=10000", "--resume")
    _assert_refused_for(winner, loser, lerr)
    _assert_sigterm_line(winner, werr)
    steps = [r["step"] for r in train_steps(tmp_path / "out")]
    assert steps[:2] == [1, 2] and len(steps) == len(set(steps))  # no step logged by two runs


@pytest.mark.long  # fast twin: tests/unit/test_run_folder.py
def test_the_lock_of_a_killed_run_does_not_block_the_next(tmp_path, tiny_teacher):
    recipe = _long_recipe(tmp_path, tiny_teacher)
    out = tmp_path / "out"
    proc = _start(recipe)
    try:
        _wait_for(lambda: (out / "checkpoints" / "latest").exists(), proc, "a checkpoint")
        assert json.loads((out / ".kdcore.lock").read_text())["pid"] == proc.pid
    finally:
        _stop_group(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    res = run_train(recipe, "train.max_steps=2", "checkpoint.every=0", resume=True)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.long  # ~11 s; tests/unit/test_run_folder.py checks the masking of every written recipe fast
def test_a_token_given_as_an_override_is_in_no_file_of_the_run(tmp_path, tiny_teacher):
    _train_with_token(tmp_path, tiny_teacher)


def _train_with_token(tmp_path, tiny_teacher):
    secret = "s3cret-token-7f1d2c9b"
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 1, "eval_batches": 1},
                          checkpoint={"every": 1, "keep": 3, "export_hf": False},
                          logging={"backends": ["tensorboard"], "progress": False})
    res = run_train(recipe, f"teacher.remote.token={secret}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "recipe.json" for p in files) and (out / "recipe.yaml") in files
    leaks = [str(p) for p in files if secret.encode() in p.read_bytes()]
    assert leaks == []
    return recipe, out, secret


@pytest.mark.long  # fast twin: the masked recipes compare equal in test_run_folder.py
def test_a_run_given_its_token_again_resumes_and_stores_it_nowhere(tmp_path, tiny_teacher):
    recipe, out, secret = _train_with_token(tmp_path, tiny_teacher)
    res = run_train(recipe, f"teacher.remote.token={secret}", "train.max_steps=2", resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [p for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()] == []


@pytest.mark.long  # fast twin: tests/unit/test_run_folder.py
def test_a_data_file_replaced_at_its_path_is_refused_on_resume(tmp_path, tiny_teacher):
    data = tmp_path / "train.jsonl"
    rows = PYDOC.read_text().splitlines()
    data.write_text("\n".join(rows) + "\n")
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 2}, data={"train": str(data)},
                          checkpoint={"every": 1, "keep": 3, "export_hf": False})
    assert run_train(recipe).returncode == 0
    data.write_text("\n".join(reversed(rows)) + "\n")  # same rows, other order: other batches
    res = run_train(recipe, "train.max_steps=3", resume=True)
    assert res.returncode == 2, res.stderr[-3000:]
    (line,) = [x for x in _lines(res.stderr) if "error" in x]
    assert "data.train changed since the run started" in line and "--allow-data-change" in line
    assert [r["step"] for r in train_steps(tmp_path / "out")] == [1, 2]  # nothing ran
    res = run_train(recipe, "train.max_steps=3", "--allow-data-change", resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "kdcore: warning: data.train changed since the run started" in res.stderr
    assert [r["step"] for r in train_steps(tmp_path / "out")] == [1, 2, 3]


def test_a_data_error_exits_2_as_documented(tmp_path, tiny_teacher):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 5, "completion": [1]}\n')
    recipe = write_recipe(tmp_path, tiny_teacher, data={"train": str(data), "bad_rows": "error", "limit": None})
    res = run_train(recipe)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert len([x for x in _lines(res.stderr) if x.startswith("kdcore: error:")]) == 1


@pytest.mark.long  # fast twin: tests/unit/test_run_folder.py
def test_home_paths_are_expanded_and_system_folders_refused(tmp_path, tiny_teacher):
    home = tmp_path / "home"
    home.mkdir()
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 1, "output_dir": "~/runs/x"},
                          checkpoint={"export_hf": False})
    env = dict(os.environ, HOME=str(home))
    res = subprocess.run(KDCORE + ["train", str(recipe)], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (home / "runs" / "x" / "metrics.jsonl").is_file() and not (tmp_path / "~").exists()
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    for out, says in (("/", "is a system folder"), ("~/", "is the home folder"), ("/etc", "is a system folder"),
                      (str(project), "holds files that are not a kdcore run (notes.txt)")):
        res = subprocess.run(KDCORE + ["validate", str(recipe), f"train.output_dir={out}"], capture_output=True,
                             text=True, cwd=tmp_path, env=env)
        assert res.returncode == 2 and says in res.stderr, (out, res.stderr)
        res = subprocess.run(KDCORE + ["train", str(recipe), f"train.output_dir={out}"], capture_output=True,
                             text=True, cwd=tmp_path, env=env)
        assert res.returncode == 2 and says in res.stderr, (out, res.stderr)
        assert len(_lines(res.stderr)) == 1, res.stderr
    assert sorted(p.name for p in project.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("command", ["validate", pytest.param("train", marks=pytest.mark.long)])
def test_a_10_mb_value_is_not_echoed_whole(tmp_path, tiny_teacher, command):
    recipe = write_recipe(tmp_path, tiny_teacher)
    huge = "x" * (10 << 20)
    recipe.write_text(recipe.read_text() + f"eval:\n  samples: {huge}\n")
    res = subprocess.run(KDCORE + [command, str(recipe)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert res.returncode == 2
    assert "eval.samples: expected int" in res.stderr
    assert len(res.stderr) < 5000, len(res.stderr)
