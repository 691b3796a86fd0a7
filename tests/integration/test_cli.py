"""The kdcore command line, run as a user runs it (a subprocess of the installed script)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

KDCORE = shutil.which("kdcore") or f"{sys.executable} -m kdcore"


def run(*args, check=False):
    cmd = KDCORE.split() + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, check=check)


def test_help_shows_examples():
    out = run("--help").stdout
    assert "examples:" in out and "kdcore train quickstart" in out


def test_list_algorithms_json_shape():
    res = run("list-algorithms", "--json")
    assert res.returncode == 0, res.stderr
    items = json.loads(res.stdout)
    assert items and all(set(i) == {"name", "kind", "plugin", "version", "summary", "options"} for i in items)
    by_name = {(i["kind"], i["name"]): i for i in items}
    assert by_name[("loss", "ab_div")]["plugin"] == "kdflow-plugin-example"
    assert by_name[("loss", "ab_div")]["options"] == {"alpha": 0.5, "beta": 0.5}
    assert ("rollout", "off_policy") in by_name


def test_list_algorithms_kind_filter_and_table():
    res = run("list-algorithms", "--kind", "loss", "--json")
    assert {i["kind"] for i in json.loads(res.stdout)} == {"loss"}
    table = run("list-algorithms", "--kind", "rollout").stdout
    assert "off_policy" in table and "kdflow" in table


def test_plugins_lists_versions_and_hooks():
    rows = json.loads(run("plugins", "--json").stdout)
    example = next(r for r in rows if r["distribution"] == "kdflow-plugin-example")
    assert example["hooks"] == ["register_losses"] and example["version"] == "0.1.0"
    assert any(r["builtin"] for r in rows)


def test_validate_ok_and_errors(tmp_path):
    ok = run("validate", "quickstart")
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: {path: m}\ndata: {train: x}\ntrain: {lrr: 1, precision: fp8}\ndistill: {loss: nope}\n")
    res = run("validate", str(bad), "train.max_steps=ten")
    assert res.returncode == 2
    err = res.stderr
    assert "train.lrr: unknown key; did you mean 'train.lr'" in err
    assert "train.precision: 'fp8' is not one of" in err
    assert "train.max_steps: expected int" in err
    assert "distill.loss: unknown loss 'nope'" in err


@pytest.mark.parametrize("args", [("validate", "no-such-recipe"), ("validate", "quickstart", "train.lr")])
def test_validate_bad_invocation_is_one_clear_error(args):
    res = run(*args)
    assert res.returncode == 2 and res.stderr.strip()


def test_ci_runs_exactly_the_readme_test_command():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    readme = (root / "README.md").read_text()
    section = readme.split("## Tests", 1)[1]
    command = section.split("```bash", 1)[1].split("```", 1)[0].strip()
    ci_lines = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    # CI runs it through scripts/test.sh without arguments (the script behind `make test`)
    if "VENV=.venv-ci bash scripts/test.sh" in ci_lines:
        ci_lines += [line.strip() for line in (root / "scripts" / "test.sh").read_text().splitlines()]
    assert command in ci_lines


@pytest.mark.parametrize("preset", [None, "ACTIVE"])
def test_cli_makes_openmp_workers_wait_passively_before_torch_loads(preset):
    # the student and the teacher process share the cores; spinning workers steal their slices
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import os, sys, kdcore.commands.cli as c; c.main(['list-algorithms', '--kind', 'loss', '--json']); "
            "print('POLICY=' + os.environ['OMP_WAIT_POLICY'], file=sys.stderr)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    assert f"POLICY={preset or 'PASSIVE'}" in res.stderr  # a user's own setting wins
