"""kdflow's SGLang contracts, judged by sglang 0.5.23's own code on CPU.

sglang is installed ``--no-deps`` (requirements-sglang-contracts.txt, by scripts/setup.sh, so CI
runs these); it never enters this pytest process (importing it patches transformers and torch):
``sglang_contracts/probe.py`` runs every check once in a subprocess and each test below reports
one contract. A change of the pinned sglang version makes the test of the contract that moved
fail with sglang's own words. What stands in for what (no GPU here): see probe.py's docstring.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdcore.engines.sglang.config import SGLANG_VERSION, installed_version

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

if installed_version() != SGLANG_VERSION or importlib.util.find_spec("sglang") is None:
    pytest.skip(f"sglang=={SGLANG_VERSION} is not installed here (found {installed_version()}): "
                f"pip install --no-deps -r requirements-sglang-contracts.txt (scripts/setup.sh does)",
                allow_module_level=True)


def run_probe(out: Path, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, str(HERE / "sglang_contracts" / "probe.py"), str(out)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})))
    assert out.is_file(), f"the contract probe died (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_probe(tmp_path_factory.mktemp("sglang_contracts") / "results.json")


def contract(results, name):
    r = results[name]
    assert r["ok"], f"contract '{name}' broken against sglang {SGLANG_VERSION}: {r['detail']}"
    return r["detail"]


def test_every_launch_command_parses_through_sglangs_server_args(results):
    """teacher / colocated-fp8-tp2 / recipe server_args (a negatable flag set False) / rollout:
    each value kdflow sends is the value sglang's ``prepare_server_args`` parses; kdflow's
    negatable-flag table equals sglang's parser."""
    contract(results, "launch_commands_parse")


def test_argument_names_and_quantizations_exist_in_sglang(results):
    contract(results, "fixed_server_args_exist")


def test_every_generate_body_passes_sglangs_request_checks(results):
    """hook, lists, SeqKD generate and rollout bodies: the /generate JSON contract gate,
    GenerateReqInput's pydantic validation and normalisation, SamplingParams normalize/verify."""
    contract(results, "generate_bodies_pass_sglang_checks")


def test_weight_and_memory_bodies_pass_sglangs_request_structs(results):
    contract(results, "admin_bodies_pass_sglang_structs")


def test_ipc_payload_passes_sglangs_safe_unpickler(results):
    """Weight and destination payloads through sglang's SafeUnpickler and its UUID-patched rebuild."""
    contract(results, "ipc_payload_passes_safe_unpickler")


def test_hook_registers_through_sglangs_loader_and_writes_rows(results):
    """load_plugins() finds the entry point, HookRegistry wraps the 0.5.23 method, and the wrapped
    method (called with 0.5.23's CaptureHiddenMode and LogitsProcessorOutput) writes kdflow's rows
    and leaves other requests to sglang's original."""
    contract(results, "hook_registers_and_writes_rows")


def test_hook_entry_point_loads_without_kdcore_omegaconf_or_pluggy(results):
    contract(results, "hook_module_imports_no_kdcore")


def test_weight_update_call_order_matches_sglangs_session_manager(results):
    """Teacher push and rollout sync against sglang's SchedulerWeightUpdaterManager behind an
    HTTP server shaped like 0.5.23's: begin, updates, end (also when a push fails), flush."""
    contract(results, "weight_update_order_matches_sglang")


def test_flush_reply_is_parsed(results):
    contract(results, "flush_reply_parsed")


def test_reply_fields_kdflow_reads_exist(results):
    contract(results, "hidden_state_reply_fields")
