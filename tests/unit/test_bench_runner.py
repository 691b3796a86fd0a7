"""bench/ has one runner (``python -m bench``) that knows every benchmark; kdflow's sides sit in
bench/sides/ beside the peers, and the GPU acceptance checks live outside bench/ (checks/gpu/)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench"
# modules with a __main__ block that are parts, not benchmarks: the child-process entry of run_isolated
NOT_BENCHMARKS = {"__main__", "common"}


def run_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)


def runner_names() -> dict[str, str]:
    sys.path.insert(0, str(ROOT))
    try:
        from bench.__main__ import BENCHMARKS
    finally:
        sys.path.remove(str(ROOT))
    return BENCHMARKS


def test_every_runnable_module_of_bench_is_listed_and_every_listed_one_exists():
    runnable = {p.stem for p in BENCH.glob("*.py")
                if re.search(r'^if __name__ == "__main__"', p.read_text(), re.M)} - NOT_BENCHMARKS
    listed = set(runner_names())
    assert runnable - listed == set(), f"benchmarks the runner does not list: {sorted(runnable - listed)}"
    assert listed - runnable == set(), f"listed, but no bench/<name>.py with a __main__: {sorted(listed - runnable)}"


def test_the_runner_lists_without_arguments_and_refuses_an_unknown_name_in_one_line():
    listed = run_bench()
    assert listed.returncode == 0, listed.stderr
    for name in runner_names():
        assert re.search(rf"^  {name} ", listed.stdout, re.M), f"{name} missing from the listing"
    unknown = run_bench("run_al")
    assert unknown.returncode == 2
    assert unknown.stderr.splitlines()[0] == "python -m bench: no benchmark 'run_al'"


def test_the_runner_runs_the_module_as_main_with_its_arguments():
    # --help is parsed by the benchmark's own argparse: proof it ran as __main__ with the arguments
    done = run_bench("alignment", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: alignment.py") and "--lengths" in done.stdout


def test_sides_beside_peers_and_checks_out_of_bench():
    assert (BENCH / "sides" / "kdflow.py").is_file() and (BENCH / "peers" / "trl_gkd.py").is_file()
    assert not list(BENCH.glob("kdflow_*.py")), "kdflow's sides belong in bench/sides/"
    assert not list(BENCH.glob("gpu_check*")) and not (BENCH / "fetch_gpu_wheels.sh").exists()
    assert (ROOT / "checks" / "gpu" / "gpu_check.sh").is_file()
