"""Output a new user reads without a terminal (issue 28): plain progress lines every
``logging.print_every`` steps when the bar cannot redraw, and ``kdcore plot`` writing into the
run folder rather than the working directory."""

from __future__ import annotations

import json
import os

import pytest

from kdcore.training.metrics import RunLog


def test_plain_lines_every_n_steps_without_a_terminal(tmp_path, capsys):
    log = RunLog(tmp_path / "metrics.jsonl", is_main=True, progress=True, print_every=2)
    assert not log.show_progress  # pytest captures stderr: no terminal, so no live bar
    with log.progress(total=5, completed=0):
        for step in range(1, 6):
            log.advance(step, loss=1.0 / step, tps=100.0 * step)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["2/5", "4/5", "5/5"]  # every 2nd step, and the last
    assert "loss 0.5000" in lines[0] and "200 tok/s" in lines[0] and "eta" in lines[0]


def test_plain_lines_count_from_a_resumed_step(tmp_path, capsys):
    log = RunLog(tmp_path / "metrics.jsonl", is_main=True, progress=False, print_every=10)
    with log.progress(total=30, completed=20):
        for step in range(21, 31):
            log.advance(step, loss=1.0, tps=1.0)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("step ")]
    assert [x.split()[1] for x in lines] == ["30/30"]


def test_other_ranks_print_nothing(tmp_path, capsys):
    log = RunLog(tmp_path / "metrics.jsonl", is_main=False, progress=True, print_every=1)
    with log.progress(total=2, completed=0):
        log.advance(1, loss=1.0, tps=1.0)
    assert "step" not in capsys.readouterr().err


def test_print_every_is_a_checked_recipe_key():
    from kdcore.recipe.loading import validate_raw

    raw = {"teacher": {"path": "m"}, "data": {"train": "x"}, "logging": {"print_every": 0}}
    assert any(e.startswith("logging.print_every: must be >= 1") for e in validate_raw(raw))


def test_plot_writes_into_the_first_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from kdcore.commands.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3)))
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["plot", str(run)]) == 0
    assert (run / "metrics.png").is_file() and not os.listdir(elsewhere)
    assert main(["plot", str(run), "-o", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").is_file()
