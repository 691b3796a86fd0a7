"""``kdcore plot``: the metrics it reads, the picture it writes, the one-line errors it gives."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdcore.commands.plot import DPI, FIGURE_INCHES, METRICS, PlotError, Series, extract_series, load_runs, plot_runs


def _write_run(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def _kd_records() -> list[dict]:
    recs = [{"step": 0, "eval_teacher_kl": 14.0, "eval_kd": 14.0, "eval_ppl": 1.6e7, "eval_top1_agreement": 0.0}]
    for step in range(1, 7):
        recs.append({"step": step, "loss": 10.0 / step, "kd_loss": 9.0 / step, "ce_loss": 11.0 / step,
                     "lr": 3e-4, "tokens_per_s": 350.0})
        if step % 3 == 0:
            recs.append({"step": step, "eval_teacher_kl": 14.0 / step, "eval_kd": 1.0, "eval_ppl": 1e6 / step**3,
                         "eval_top1_agreement": 0.1 * step})
    return recs


@pytest.fixture
def two_runs(tmp_path):
    kd = _write_run(tmp_path / "kd", _kd_records())
    # the CE-only twin: no evaluation at all, and steps 3-4 logged twice (resumed from step 2)
    ce = [{"step": s, "loss": 20.0 - s, "kd_loss": 0.0, "ce_loss": 20.0 - s} for s in (1, 2, 3, 4)]
    ce += [{"step": 3, "loss": 7.5, "kd_loss": 0.0, "ce_loss": 7.5}, {"step": 4, "loss": 6.5, "kd_loss": 0.0,
                                                                        "ce_loss": 6.5}]
    return kd, _write_run(tmp_path / "ce", ce)


def test_extract_series_steps_and_values_per_metric():
    got = extract_series(_kd_records())
    assert got["loss"] == Series([1, 2, 3, 4, 5, 6], [10.0 / s for s in range(1, 7)])
    assert got["eval_teacher_kl"] == Series([0, 3, 6], [14.0, 14.0 / 3, 14.0 / 6])
    assert got["eval_ppl"] == Series([0, 3, 6], [1.6e7, 1e6 / 27, 1e6 / 216])


def test_later_record_of_a_step_wins_and_missing_metrics_are_absent(two_runs):
    runs = load_runs([str(p) for p in two_runs])
    assert list(runs) == ["kd", "ce"]  # default labels: the folder names, in the order given
    assert runs["ce"] == {"loss": Series([1, 2, 3, 4], [19.0, 18.0, 7.5, 6.5])}


def test_png_written_with_the_metrics_as_its_lines(two_runs, tmp_path, monkeypatch):
    import matplotlib.image
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (figures.append(fig), real_close(fig)))
    runs = load_runs([str(p) for p in two_runs], labels=["KD", "CE"])
    out = plot_runs(runs, tmp_path / "cmp.png")

    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(out).shape[:2]
    assert (width, height) == (round(FIGURE_INCHES[0] * DPI), round(FIGURE_INCHES[1] * DPI))

    (fig,) = figures
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == [title for _, title, _ in METRICS]
    assert [ax.get_yscale() for ax in axes] == [scale for _, _, scale in METRICS]
    for ax, (key, _, _) in zip(axes, METRICS):
        drawn = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}
        expected = {label: (s[key].steps, s[key].values) for label, s in runs.items() if key in s}
        assert drawn == expected
    assert set(runs["CE"]) == {"loss"}  # so CE is in the loss panel only


def test_cli_writes_the_picture(two_runs, tmp_path):
    out = tmp_path / "cli.png"
    res = _cli(*map(str, two_runs), "--out", str(out), "--labels", "KD,CE")
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "kdcore", "plot", *args], capture_output=True, text=True)


@pytest.mark.parametrize("case, expected", [
    ("no_folder", "not a run folder"),
    ("no_metrics", "no metrics.jsonl"),
    ("empty", "metrics.jsonl: empty"),
    ("malformed", "metrics.jsonl:2: not a JSON record"),
    ("no_step", "metrics.jsonl:1: a record needs an integer 'step'"),
    ("text_value", "metrics.jsonl:1: 'loss' is 'high', not a number"),
    ("missing_out_folder", "cannot write the picture: folder"),
    ("out_is_folder", "cannot write the picture"),
    ("labels_count", "--labels: 1 label(s) for 2 run folder(s)"),
])
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, two_runs, case, expected):
    kd, ce = map(str, two_runs)
    bad = tmp_path / "bad"
    out = str(tmp_path / "x.png")
    if case != "no_folder":
        bad.mkdir()
    contents = {"empty": "\n", "malformed": '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": \n',
                "no_step": '{"loss": 2.0}\n', "text_value": '{"step": 1, "loss": "high"}\n'}
    if case in contents:
        (bad / "metrics.jsonl").write_text(contents[case])
    args = [kd, str(bad)]
    if case == "missing_out_folder":
        args, out = [kd, ce], str(tmp_path / "nowhere" / "x.png")
    elif case == "out_is_folder":
        args, out = [kd, ce], str(bad)
    elif case == "labels_count":
        args = [kd, ce, "--labels", "only"]
    res = _cli(*args, "--out", out)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], res.stderr
    culprit = {"missing_out_folder": "nowhere", "out_is_folder": str(bad), "labels_count": "--labels"}.get(case, "bad")
    assert culprit in lines[0]
    assert not Path(out).is_file()


def test_plot_error_is_a_value_error():
    with pytest.raises(PlotError, match="2 label"):
        load_runs(["a"], labels=["x", "y"])
