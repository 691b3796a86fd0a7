"""One line for every failure: the CLI's top-level handler, validate's path and option checks,
and `kdcore train` refusing, moving aside, resuming and stopping on Ctrl-C as a user sees it."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

import kdcore
from kdcore.commands import errors
from kdcore.commands.cli import main

# ------------------------------------------------------------------------------ the handler


def test_known_errors_are_one_line_with_their_exit_code(capsys):
    from kdcore.recipe.loading import RecipeError
    from kdcore.storage.run_folder import RunFolderError

    assert errors.report(RecipeError("r.yaml", ["a: bad", "b: worse"])) == 2
    assert capsys.readouterr().err == "kdcore: error: r.yaml: a: bad; b: worse\n"
    assert errors.report(RunFolderError("'out' already holds a run")) == 2
    assert capsys.readouterr().err == "kdcore: error: 'out' already holds a run\n"
    assert errors.report(PermissionError(13, "Permission denied", "/ro/out")) == 2
    assert capsys.readouterr().err == "kdcore: error: Permission denied: '/ro/out'\n"
    assert errors.report(OSError(28, "No space left on device")) == 1


def test_an_unexpected_error_is_one_line_and_a_traceback_file(tmp_path, capsys):
    def deep():
        raise ZeroDivisionError("boom")

    try:
        deep()
    except ZeroDivisionError as exc:
        code = errors.report(exc, output_dir=tmp_path)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("kdcore: error: unexpected ZeroDivisionError: boom; full traceback in ")
    log = Path(err.strip().rsplit(" ", 1)[1])
    assert log.parent == tmp_path and "in deep" in log.read_text() and "Traceback" in log.read_text()


def test_a_multi_line_known_message_keeps_one_line_and_files_the_rest(tmp_path, capsys):
    from kdcore.infra.channel import TeacherDiedError

    code = errors.report(TeacherDiedError("teacher process died:\nTraceback...\nValueError: x"), output_dir=tmp_path)
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "teacher process died:" in err and "full message in" in err


def test_ctrl_c_names_the_last_good_checkpoint(tmp_path, capsys):
    assert errors.report(KeyboardInterrupt(), output_dir=tmp_path) == 130
    assert capsys.readouterr().err == "kdcore: interrupted; no checkpoint was written\n"
    step = tmp_path / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    (step / "meta.json").write_text("{}")
    (step / ".metadata").write_bytes(b"")
    assert errors.report(KeyboardInterrupt(), output_dir=tmp_path) == 130
    assert f"the last good checkpoint is '{step}'" in capsys.readouterr().err


def test_bad_input_wrapped_by_training_keeps_exit_2(capsys):
    """train() turns a DataError (and a missing model, an unknown algorithm) into a TrainingError;
    the exit code stays the documented one for bad input."""
    from kdcore.infra.channel import ChannelError
    from kdcore.data import DataError
    from kdcore.modeling.paths import ModelNotFoundError
    from kdcore.training import TrainingError

    for inner, code in ((DataError("data row 3: no text"), 2), (ModelNotFoundError("no model 'x'"), 2),
                        (ChannelError("teacher gone"), 1)):
        try:
            raise TrainingError(str(inner)) from inner
        except TrainingError as exc:
            assert errors.report(exc) == code, inner
        assert capsys.readouterr().err == f"kdcore: error: {inner}\n"
    assert errors.report(TrainingError("non-finite loss")) == 1


def test_a_huge_value_is_clipped_in_the_error_line(capsys, tmp_path):
    from kdcore.recipe.loading import RecipeError, load_raw, validate_raw
    from kdcore.infra.exceptions import clip

    huge = "v" * (10 << 20)
    assert len(clip(huge)) < 300 and clip(huge).startswith("vvv") and "characters left out" in clip(huge)
    assert clip("short") == "short"
    _, raw = load_raw("quickstart", [f"train.precision={huge[:100_000]}", f"data.train=/no/{huge[:100_000]}.jsonl"])
    problems = validate_raw(raw)
    assert errors.report(RecipeError("r.yaml", problems + [f"x: {huge}"])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 3000, len(err)
    assert "train.precision: 'vvv" in err and "is not one of fp32, bf16" in err
    assert errors.report(ValueError(huge), output_dir=tmp_path) == 1  # the whole text goes to the file
    assert len(capsys.readouterr().err) < 5000


def test_a_dead_childs_exit_is_named_as_received():
    from kdcore.infra.channel import describe_exit

    assert describe_exit(-signal.SIGKILL) == ("was killed by SIGKILL (signal 9); the kernel's OOM killer sends "
                                              "this when memory runs out, as does kill -9")
    assert describe_exit(-signal.SIGSEGV) == "was killed by SIGSEGV (signal 11)"  # no OOM guess for others
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(None) == "stopped responding"
    assert describe_exit(-200) == "was killed by signal 200"


# ----------------------------------------------------------------------------- validate


@dataclasses.dataclass
class PickyOptions:
    scale: float = 1.0  # test option

    def __post_init__(self):
        if self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")


def picky_loss(student_logits, teacher_logits, *, temperature, scale=1.0):
    """For tests."""
    return scale * (student_logits - teacher_logits).abs().sum(-1)


def test_validate_instantiates_each_algorithms_options(capsys):
    from types import SimpleNamespace

    def register_losses(register):
        register("picky", picky_loss, options=PickyOptions)

    kdcore.register_plugin(SimpleNamespace(register_losses=kdcore.hookimpl(register_losses)), "test-picky")
    try:
        assert main(["validate", "quickstart", "distill.loss=picky", "distill.loss_options.scale=-1"]) == 2
        assert "scale must be > 0, got -1" in capsys.readouterr().err
        assert main(["validate", "quickstart", "distill.loss=picky", "distill.loss_options.scale=2"]) == 0
    finally:
        kdcore.unregister_plugin("test-picky")


def test_validate_checks_what_the_recipe_points_at(tmp_path, capsys):
    text_file = tmp_path / "teacher.txt"
    text_file.write_text("not a model")
    no_config = tmp_path / "empty_model"
    no_config.mkdir()
    code = main(["validate", "quickstart", f"teacher.path={text_file}", f"student.path={no_config}",
                 "data.train=missing/train.jsonl", "data.eval=pkg://kdcore/no_such.jsonl",
                 f"student.tokenizer={tmp_path / 'tok.json'}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "teacher.path" in err and "is a file but not a .gguf" in err
    assert "student.path" in err and "no config.json" in err
    assert "data.train: no file or folder 'missing/train.jsonl'" in err
    assert "data.eval" in err and "no_such.jsonl" in err
    assert "student.tokenizer: no such file or folder" in err
    assert main(["validate", "quickstart", "data.train=some-org/hub-dataset"]) == 0  # hub names: the loader's job


def test_validate_warns_about_absurd_settings(capsys):
    assert main(["validate", "quickstart", "distill.temperature=1000", "train.lr=5"]) == 0
    err = capsys.readouterr().err
    assert "kdcore: warning: distill.temperature=1000" in err and "kdcore: warning: train.lr=5" in err
    assert main(["validate", "quickstart"]) == 0
    assert "warning" not in capsys.readouterr().err


# ------------------------------------------------------------------ kdcore train, end to end


from helpers.train import KDCORE, _children, records, run_train, train_steps, write_recipe  # noqa: E402
from helpers.assets import ROOT  # noqa: E402


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("kdcore: error:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def test_a_used_folder_is_refused_and_so_is_a_changed_student_on_resume(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 2}, checkpoint={"export_hf": False})
    out = tmp_path / "out"
    assert run_train(recipe).returncode == 0
    first = (out / "metrics.jsonl").read_text()
    assert (out / "recipe.yaml").is_file() and (out / "checkpoints" / "step_2" / "recipe.json").is_file()

    res = run_train(recipe)
    assert res.returncode == 2
    line = _one_error_line(res.stderr)
    assert "--resume" in line and "--overwrite" in line and "metrics.jsonl" in line
    assert (out / "metrics.jsonl").read_text() == first  # nothing touched

    # resume: a changed student is refused before anything loads
    res = run_train(recipe, "student.config_overrides.num_hidden_layers=2", resume=True)
    assert res.returncode == 2
    assert "student.config_overrides.num_hidden_layers: 1 → 2" in _one_error_line(res.stderr)
    assert (out / "metrics.jsonl").read_text() == first


@pytest.mark.long  # three more runs (~20 s); fast twins: tests/unit/test_run_folder.py (overwrite moves the old
# run aside, keeps the lock), tests/unit/test_resume.py (a longer run leaves the schedule's floor) and the refusals
# above, end to end
def test_overwrite_moves_a_run_aside_and_a_longer_resume_stretches_the_schedule(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 2}, checkpoint={"export_hf": False})
    out = tmp_path / "out"
    assert run_train(recipe).returncode == 0
    first = (out / "metrics.jsonl").read_text()
    res = run_train(recipe, "--overwrite")
    assert res.returncode == 0, res.stderr[-3000:]
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("out.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == first
    assert (aside[0] / "checkpoints" / "step_2").is_dir()

    # resume: a longer run is applied
    res = run_train(recipe, "train.max_steps=4", resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "changed settings: train.max_steps: 2 → 4" in res.stderr
    steps = train_steps(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]  # each step once
    floor = 1e-2 * 0.1
    assert steps[2]["lr"] > 2 * floor  # the schedule was stretched, not left at the old floor


@pytest.mark.long  # fast twin: test_checkpoint_safety's resume that logs the final eval once
def test_resume_after_a_crash_logs_each_step_once(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 4},
                          checkpoint={"every": 2, "keep": 3, "export_hf": False})
    assert run_train(recipe).returncode == 0
    out = tmp_path / "out"
    import shutil

    shutil.rmtree(out / "checkpoints" / "step_4")  # as if killed after step 4 was logged, before its save
    res = run_train(recipe, resume=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in train_steps(out)] == [1, 2, 3, 4]
    assert sum(1 for r in records(out) if r.get("step") == 4 and "eval_kd" in r) == 1


def test_a_read_only_output_folder_is_one_line(tmp_path, tiny_teacher):
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {proc.stderr.strip()}")
    try:
        recipe = write_recipe(tmp_path, tiny_teacher, train={"output_dir": str(ro / "out")})
        res = run_train(recipe)
        assert res.returncode == 2
        assert "Read-only file system" in _one_error_line(res.stderr)
    finally:
        subprocess.run(["umount", str(ro)], check=False)


# kill-pid is long: the terminal variant runs the same handler (the default suite's 15-min budget)
@pytest.mark.parametrize("to_group", [pytest.param(False, marks=pytest.mark.long), True],
                         ids=["kill-pid", "terminal-ctrl-c"])
def test_ctrl_c_stops_cleanly_with_exit_130_naming_the_checkpoint(tmp_path, tiny_teacher, to_group):
    """SIGINT to the trainer alone, and to its whole process group as a terminal's Ctrl-C does
    (the teacher process gets it too)."""
    # engine hf: the teacher's own process must be gone too (the default, inline, has none)
    recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 10_000, "eval_batches": 1},
                          checkpoint={"every": 1, "keep": 2, "export_hf": False}, teacher={"engine": "hf"})
    # SIGINT at its default in the trainer whatever this suite inherited: a suite started in the
    # background of a non-interactive shell (`bash .ci/run &`) runs with SIGINT ignored, its children
    # too, and kdcore rightly leaves an ignored SIGINT alone, so the Ctrl-C below would not arrive
    proc = subprocess.Popen(KDCORE + ["train", str(recipe)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, start_new_session=to_group,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = tmp_path / "out"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (out / "checkpoints" / "latest").exists():
            time.sleep(0.3)
            assert proc.poll() is None, proc.stderr.read()[-3000:]
        kids = _children(proc.pid)
        if to_group:
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    def gone(k):
        status = Path(f"/proc/{k}/status")
        try:
            return "zombie" in status.read_text().lower()
        except OSError:
            return True

    deadline = time.time() + 15  # multiprocessing's resource tracker exits once its pipe closes
    while time.time() < deadline and not all(gone(k) for k in kids):
        time.sleep(0.2)
    assert kids and all(gone(k) for k in kids)
    last = [line for line in err.splitlines() if line.startswith("kdcore:")][-1]
    assert last.startswith("kdcore: interrupted; the last good checkpoint is '") and "step_" in last
    named = Path(last.split("'")[1])
    from kdcore.storage.checkpoint import verify_checkpoint

    assert verify_checkpoint(named) is None
    assert json.loads((named / "meta.json").read_text())["step"] >= 1
