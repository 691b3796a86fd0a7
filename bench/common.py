"""Measuring helpers shared by every benchmark table.

Every configuration runs in a **fresh child process** (:func:`run_isolated`) so that

- peak memory is per run (a parent that already loaded torch and a model would hide it);
- the CPU budget is fixed: the child and everything it starts are pinned to ``threads`` CPUs
  (``sched_setaffinity``) and get ``OMP_NUM_THREADS=threads``, so "2 threads" means 2 cores in
  total for TRL's single process and for kdflow's student + teacher processes alike;
- the allocator setting is the child's environment (:data:`ALLOCATORS`): ``default`` removes
  every ``MALLOC_*`` tuning variable (and a preloaded jemalloc/tcmalloc), ``tuned`` sets
  ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736`` (freed vocab-sized buffers stay in
  the heap instead of being unmapped and page-faulted afresh every step).

Memory is reported two ways: ``peak_mem`` — the largest sum, over the processes of the child's
tree alive at one sample (every ``sample_interval`` seconds), of each one's peak resident set
(the kernel's ``VmHWM``; :class:`TreeMemory` says why not PSS, and how this errs: pages shared
by two processes count in both) — and ``maxrss`` — the kernel's high-water RSS of the largest single
process in the tree (``wait4`` rusage), exact but blind to a second process.

A child entry point is any ``module:function`` that takes keyword arguments (JSON values) and
returns a JSON-serialisable dict; it runs as ``python -m bench.common --child ...``.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent

# glibc knobs that keep freed large blocks in the heap; the same values kdcore.infra.process_env applies.
TUNED_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}
ALLOCATORS: dict[str, dict[str, str]] = {"default": {}, "tuned": dict(TUNED_MALLOC)}
_ALLOCATOR_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_",
                   "MALLOC_ARENA_MAX", "MALLOC_CONF", "TCMALLOC_RELEASE_RATE")
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

GB = 1e9


def available_cpus() -> list[int]:
    """CPUs this process may run on (respects an outer taskset/cgroup), sorted."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def child_env(threads: int, allocator: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a benchmark child runs with: thread caps, allocator, repo on the path."""
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator '{allocator}' is not one of {', '.join(ALLOCATORS)}")
    env = dict(os.environ)
    for k in _ALLOCATOR_VARS:
        env.pop(k, None)
    preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p and "malloc" not in p]
    if preload:
        env["LD_PRELOAD"] = ":".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    env.update(ALLOCATORS[allocator])
    for k in _THREAD_VARS:
        env[k] = str(threads)
    env["BENCH_THREADS"] = str(threads)
    env["BENCH_ALLOCATOR"] = allocator
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")  # the Rust pool would add threads beyond the budget
    env.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # trl.experimental import warning: known, by design
    if extra:
        env.update(extra)
    return env


@dataclass
class RunResult:
    """One child run: what it returned, how much memory its process tree used, how it ended."""

    target: str
    kwargs: dict
    threads: int
    allocator: str
    ok: bool = False
    result: dict = field(default_factory=dict)
    error: str = ""
    returncode: int | None = None
    wall_s: float = 0.0
    peak_mem: int = 0  # bytes, TreeMemory.peak: sum of the alive processes' peak RSS
    peak_parts: dict = field(default_factory=dict)  # role -> bytes of peak_mem (TreeMemory.peak_parts)
    maxrss: int = 0  # bytes, kernel high-water RSS of the largest single process
    max_procs: int = 1  # most processes seen alive at once in the tree
    cpu_s: float = 0.0  # user + system CPU seconds of the tree (waited-for descendants included)
    load_before: float = 0.0  # 1-minute load average when the run started
    load_after: float = 0.0
    log_tail: str = ""

    @property
    def cpu_share(self) -> float:
        """CPU seconds per (wall second × pinned thread): well below 1 means the run waited
        (other work on the machine, or a serial phase such as model loading)."""
        return self.cpu_s / (self.wall_s * self.threads) if self.wall_s else 0.0


def process_role(proc) -> str:
    """What a process of a benchmark tree is, from its command line: ``student`` (``kdcore
    train``), ``teacher`` (a spawned child of it), ``launcher`` (the benchmark child), else its
    program name (a TRL run is one ``launcher`` process that trains)."""
    cmd = " ".join(proc.cmdline())
    if "kdcore train" in cmd or "-m kdcore" in cmd:
        return "student"
    if "spawn_main" in cmd or "multiprocessing" in cmd:
        return "teacher"
    if "bench.common" in cmd:
        return "launcher"
    return proc.name()


def _tree(root) -> list:
    import psutil

    try:
        return [root] + root.children(recursive=True)
    except psutil.Error:
        return []


def _status_kb(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    """``/proc/PID/status`` counters in KiB: read from the kernel's per-process counters, with no
    walk of the page tables (so the measured process is not slowed)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in fields:
                out[key] = int(rest.split()[0])
    return out


def _rollup_kb(pid: int) -> dict[str, int]:
    """``/proc/PID/smaps_rollup`` in KiB (RSS, PSS). The kernel walks every mapping for it,
    holding the process's mmap lock: see :class:`TreeMemory` for what that costs a measured run."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss"):
                out[key] = int(rest.split()[0])
    return out


class TreeMemory:
    """Peak memory of a process tree from the kernel's own high-water marks, without slowing it.

    Sampling PSS (``smaps_rollup``, a walk of every page table under the process's mmap lock)
    every 0.1 s slowed the runs it measured, each side differently (real SmolLM2 teacher, 4×128,
    default allocator, read every 0.1 s vs every 10 s: kdflow 1.98 vs 1.60 s/step, TRL
    GKDTrainer 3.60 vs 2.75 s/step), which made the speed ratio partly the meter's. ``/proc/PID/status`` is
    read from counters the kernel keeps anyway: ``VmHWM``, each process's peak resident set.

    ``peak`` = the largest sum, over the processes alive at one sample, of their ``VmHWM``.
    Each process's own peak is exact (the kernel tracks it at every page fault); the sum is an
    upper bound of the tree's true peak, because pages two processes share (the libraries both
    map, the shared-memory channel) count once in each, and two processes' peaks need not
    coincide: it errs against the side with more processes (kdflow's student and teacher).
    """

    def __init__(self, root):
        self.root = root
        self.peak = self.max_procs = 0
        self.peak_parts: dict[str, int] = {}  # role -> bytes at the peak sample (:func:`process_role`)
        self._roles: dict[int, str] = {}  # pid -> role, read once: a process keeps its command line

    def sample(self) -> int:
        """One sample; returns the current resident sum (bytes), for memory caps."""
        import psutil

        hwm = rss = n = 0
        parts: dict[str, int] = {}
        for p in _tree(self.root):
            try:
                st = _status_kb(p.pid, ("VmHWM", "VmRSS"))
                role = self._roles.get(p.pid) or self._roles.setdefault(p.pid, process_role(p))
            except (OSError, ValueError, psutil.Error):  # gone meanwhile, or not ours to read
                continue
            hwm += st.get("VmHWM", 0) * 1024
            rss += st.get("VmRSS", 0) * 1024
            parts[role] = parts.get(role, 0) + st.get("VmHWM", 0) * 1024
            n += 1
        if hwm > self.peak:
            self.peak, self.peak_parts = hwm, parts
        self.max_procs = max(self.max_procs, n)
        return rss


def _tree_memory(root) -> tuple[int, int, int]:
    """(sum PSS, sum RSS, process count) of ``root`` and its descendants from one full
    ``smaps_rollup`` read each (exact, but slows the processes read: see :class:`TreeMemory`)."""
    pss = rss = n = 0
    for p in _tree(root):
        try:
            r = _rollup_kb(p.pid)
            pss += r.get("Pss", r.get("Rss", 0)) * 1024
            rss += r.get("Rss", 0) * 1024
            n += 1
        except (OSError, ValueError):
            continue
    return pss, rss, n


def run_isolated(target: str, kwargs: dict | None = None, *, threads: int, allocator: str = "default",
                 timeout: float = 900.0, sample_interval: float = 0.2, mem_cap: int | None = None,
                 env_extra: dict[str, str] | None = None, memory: str = "hwm") -> RunResult:
    """Run ``target`` (``"module:function"``) with ``kwargs`` in a fresh child process.

    The child (and every process it starts) is pinned to ``threads`` CPUs and runs under the
    ``allocator`` setting. ``mem_cap`` (bytes): the tree is killed when its resident sum exceeds it, so
    one configuration that would not fit cannot push the machine into swap or the OOM killer;
    ``memory``: ``"hwm"`` (:class:`TreeMemory`, leaves the run's speed alone) or ``"pss"`` (the
    exact tree PSS from :func:`_tree_memory` at every sample, which slows the run);
    the result then says so. Returns a :class:`RunResult` (never raises for a failing child).
    """
    import psutil

    cpus = available_cpus()
    if not 1 <= threads <= len(cpus):
        raise ValueError(f"threads={threads}: this process may use {len(cpus)} CPU(s) ({cpus})")
    pinned = set(cpus[:threads])
    kwargs = dict(kwargs or {})
    res = RunResult(target=target, kwargs=kwargs, threads=threads, allocator=allocator)
    with tempfile.TemporaryDirectory(prefix="kdbench-") as tmp:
        args_file, out_file, log_file = (Path(tmp) / n for n in ("args.json", "out.json", "log.txt"))
        args_file.write_text(json.dumps(kwargs))
        res.load_before = os.getloadavg()[0]
        cmd = [sys.executable, "-m", "bench.common", "--child", target, str(args_file), str(out_file)]
        t0 = time.perf_counter()
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=child_env(threads, allocator, env_extra),
                                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=lambda: os.sched_setaffinity(0, pinned))
            if memory not in ("hwm", "pss"):
                raise ValueError(f"memory={memory!r}: choose 'hwm' or 'pss'")
            meter = TreeMemory(psutil.Process(proc.pid)) if memory == "hwm" else None
            killed = ""
            while True:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if meter is not None:
                    resident = meter.sample()  # the tree's current RSS sum
                    res.peak_mem, res.max_procs, res.peak_parts = meter.peak, meter.max_procs, meter.peak_parts
                else:
                    resident, _, n = _tree_memory(psutil.Process(proc.pid))  # the tree's current PSS
                    res.peak_mem, res.max_procs = max(res.peak_mem, resident), max(res.max_procs, n)
                if not killed and mem_cap and resident > mem_cap:
                    killed = (f"killed: process tree memory {resident / GB:.1f} GB exceeded the cap "
                              f"{mem_cap / GB:.1f} GB")
                elif not killed and time.perf_counter() - t0 > timeout:
                    killed = f"killed: still running after {timeout:.0f} s"
                if killed:
                    _kill_group(proc.pid)
                time.sleep(sample_interval)
            proc.returncode = os.waitstatus_to_exitcode(status)
        res.wall_s = time.perf_counter() - t0
        res.returncode = proc.returncode
        res.maxrss = usage.ru_maxrss * 1024  # Linux reports KiB
        res.cpu_s = usage.ru_utime + usage.ru_stime
        res.load_after = os.getloadavg()[0]
        log_text = log_file.read_text(errors="replace")
        res.log_tail = log_text[-4000:]
        if out_file.exists():
            payload = json.loads(out_file.read_text())
            res.result = payload.get("result") or {}
            res.error = payload.get("error", "")
            res.ok = proc.returncode == 0 and not res.error and not killed
        if killed:
            res.error = killed
        elif not res.ok and not res.error:
            res.error = f"child exited with {proc.returncode}: {_last_line(log_text)}"
    return res


def _kill_group(pid: int) -> None:
    """Stop the child's own session (it was started with start_new_session): only our processes."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def _child_main(target: str, args_file: str, out_file: str) -> int:
    """Child side of :func:`run_isolated`: set torch threads, call the target, write its result."""
    import importlib
    import traceback

    threads = int(os.environ.get("BENCH_THREADS", "0") or 0)
    payload: dict[str, Any] = {}
    try:
        if threads and os.environ.get("BENCH_CHILD_TORCH", "1") == "1":
            # a target that only launches other processes (kdflow's side) sets BENCH_CHILD_TORCH=0:
            # an idle torch in the launcher would count against its memory
            import torch

            torch.set_num_threads(threads)
        mod_name, _, fn_name = target.partition(":")
        fn: Callable[..., dict] = getattr(importlib.import_module(mod_name), fn_name)
        payload["result"] = fn(**json.loads(Path(args_file).read_text()))
    except BaseException as exc:  # report anything, including KeyboardInterrupt, to the parent
        traceback.print_exc()
        payload["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    Path(out_file).write_text(json.dumps(payload, default=_json_default))
    return 1 if "error" in payload else 0


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------- statistics


def summarize(values: Iterable[float]) -> tuple[float, float, float]:
    """(median, min, max) of the values; a clear error for an empty list."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize: no values")
    return statistics.median(vals), min(vals), max(vals)


def fmt_range(values: Sequence[float] | None, fmt: str = "{:.2f}") -> str:
    """``"median (min–max)"``, or just the value when all values are one; ``"—"`` for none."""
    if not values:
        return "—"
    med, lo, hi = summarize(values)
    if fmt.format(lo) == fmt.format(hi):
        return fmt.format(med)
    return f"{fmt.format(med)} ({fmt.format(lo)}–{fmt.format(hi)})"


def ratio(a: float | None, b: float | None, fmt: str = "{:.2f}×") -> str:
    """``a / b`` formatted, or ``"—"`` when either side is missing."""
    if not a or not b:
        return "—"
    return fmt.format(a / b)


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
    """A GitHub markdown table. ``align``: one char per column, ``l`` / ``r`` / ``c`` (default: l then r)."""
    if align is None:
        align = "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers):
        raise ValueError(f"md_table: {len(headers)} headers but align '{align}'")
    for i, r in enumerate(rows):
        if len(r) != len(headers):
            raise ValueError(f"md_table: row {i} has {len(r)} cells, expected {len(headers)}: {r}")
    marks = {"l": ":---", "r": "---:", "c": ":---:"}

    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
             "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU as /proc/cpuinfo names it, with its family and model numbers (a virtual machine often
    reports only "Intel(R) Xeon(R) Processor") and its bf16 matmul support, which decides what
    ``teacher.dtype: auto`` picks: e.g. ``Intel(R) Xeon(R) Processor (family 6 model 143; avx512_bf16 amx_bf16)``."""
    try:
        text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    except OSError:
        return "?"
    first: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if first:  # the first processor's block is enough
                break
            continue
        first.setdefault(key.strip(), value.strip())
    name = first.get("model name", "?")
    bits = [f"family {first['cpu family']} model {first['model']}"] if "cpu family" in first and "model" in first else []
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in first.get("flags", "").split()]
    bits.append(" ".join(bf16) if bf16 else "no bf16 matmul instructions")
    return f"{name} ({'; '.join(bits)})"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, memory, library versions."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    info["cpu"] = cpu_model()
    info["cpus_available"] = len(available_cpus())
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    info["glibc"] = "-".join(platform.libc_ver())
    for mod in ("torch", "transformers", "trl", "accelerate"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            info[mod] = "not installed"
    return info


def load_average() -> tuple[float, float, float]:
    """1/5/15-minute load: other work on the machine makes every figure noisy; the report says so."""
    return os.getloadavg()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        sys.exit(_child_main(*sys.argv[2:]))
    print("usage: python -m bench.common --child module:function args.json out.json", file=sys.stderr)
    sys.exit(2)


def train_steps(recipe: str, overrides: list[str], steps: int, batch: int, seq_len: int,
                base: Sequence[str] = ()) -> dict:
    """``kdcore train RECIPE`` for ``steps`` steps of ``batch`` rows, as a user runs it; the
    trainer's per-step ``tokens_per_s`` and ``loss`` (run it in a child: :func:`run_isolated`)."""
    with tempfile.TemporaryDirectory(prefix="kdflow-bench-") as tmp:
        args = [*base, f"train.max_steps={steps}", f"train.micro_batch_size={batch}", f"data.max_length={seq_len}",
                f"data.limit={batch * steps}", f"train.output_dir={tmp}/out", *overrides]
        proc = subprocess.run([sys.executable, "-m", "kdcore", "train", recipe, *args],
                              capture_output=True, text=True, cwd=str(REPO_ROOT))
        if proc.returncode != 0:
            raise RuntimeError(f"kdcore train exited {proc.returncode}: {(proc.stderr or proc.stdout)[-2000:]}")
        with open(Path(tmp) / "out" / "metrics.jsonl") as f:
            records = [json.loads(line) for line in f if line.strip()]
    steps_rec = [r for r in records if "step" in r and "tokens_per_s" in r]
    return {"tokens_per_s": [float(r["tokens_per_s"]) for r in steps_rec], "loss": [float(r["loss"]) for r in steps_rec]}
