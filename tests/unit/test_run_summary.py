"""The ending of `kdcore eval RUN` and the progress lines of silent phases (issue 28)."""

from __future__ import annotations

import io
import json

import pytest

from kdcore.infra.phases import phase
from kdcore.commands.run_summary import budget_line, print_summary, run_folder_of, summary


def _run(folder, first_kl, last_kl, last_step=60):
    folder.mkdir()
    recs = [{"step": 0, "eval_teacher_kl": first_kl, "eval_ppl": 1.6e7, "eval_top1_agreement": 0.01}]
    recs += [{"step": s, "loss": 3.0, "tokens": 1000} for s in range(1, last_step + 1)]
    recs += [{"step": last_step, "eval_teacher_kl": last_kl, "eval_ppl": 215.0, "eval_top1_agreement": 0.4}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"step": 61, "lo')
    (folder / "hf").mkdir()
    return folder


def test_before_and_after_from_metrics(tmp_path):
    run = _run(tmp_path / "kd", 14.19, 3.07)
    assert run_folder_of(run / "hf") == run and run_folder_of(tmp_path) is None
    s = summary(run)
    rows = {r["metric"]: r for r in s["rows"]}
    assert (s["first_step"], s["last_step"], s["steps"], s["tokens"]) == (0, 60, 60, 60000)
    assert rows["eval_teacher_kl"]["before"] == 14.19 and rows["eval_teacher_kl"]["after"] == 3.07
    assert all(r["improved"] for r in s["rows"])
    assert "60 steps, 60,000 tokens in the loss" in budget_line(s)


def test_against_the_ce_twin(tmp_path, capsys):
    kd, ce = _run(tmp_path / "kd", 14.19, 3.07), _run(tmp_path / "ce", 14.19, 4.17)
    s = summary(kd, ce)
    kl = next(r for r in s["rows"] if r["metric"] == "eval_teacher_kl")
    assert kl["against"] == 4.17 and kl["beats_against"]
    from rich.console import Console

    buf = io.StringIO()
    print_summary(s, Console(file=buf, width=200))
    text = buf.getvalue()
    assert "14.19" in text and "3.07" in text and "4.17 (this run better)" in text and "At this budget" in text


def test_a_run_without_evaluations_has_no_summary(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    assert summary(run) is None


def test_phase_prints_one_line_when_done_without_a_terminal():
    buf = io.StringIO()
    with phase("answers", total=4, stream=buf) as advance:
        advance(2, tokens=10)
        advance(2, tokens=10)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("answers: done (4/4, ") and "tok/s" in lines[0]


def test_phase_failure_prints_no_done_line():
    buf = io.StringIO()
    for live in (False, True):
        with pytest.raises(RuntimeError):
            with phase("converting", stream=buf, live=live):
                raise RuntimeError("boom")
    assert "converting" not in buf.getvalue()  # the error stays the failure's one line


def test_live_phase_runs_and_ends_with_a_line():
    buf = io.StringIO()
    with phase("batches", total=2, stream=buf, live=True) as advance:
        advance()
        advance()
    assert "batches: done (2/2" in buf.getvalue()


def test_disabled_phase_is_silent():
    buf = io.StringIO()
    with phase("x", stream=buf, enabled=False) as advance:
        advance()
    assert buf.getvalue() == ""
