"""Peak memory and time of the chunked KD loss driver vs the dense torch computation (not a test).

    .venv/bin/python -m bench loss_memory                  # V=152064, H=1024, N in {1024, 4096}, fkl
    .venv/bin/python -m bench loss_memory --loss js --ce   # another loss, with the CE mix
    .venv/bin/python -m bench loss_memory --chunks 256,512,1024 --strategies fused,recompute

One step = student logits + teacher logits + loss, forward and backward (grads w.r.t. the
student hidden states and the student head), fp32 on CPU. "dense" is the plain torch code
(``h_s @ W_sᵀ``, ``h_t @ W_tᵀ`` under no_grad, the registered loss on the full ``[N, V]``
logits, ``.backward()``); "chunked" is ``kdcore.distill.loss.distill_loss``.

How memory is measured: every configuration runs in fresh subprocesses, which report their peak
resident set size (``VmHWM`` in /proc/self/status) during the first step minus their RSS just
before it (after the inputs exist and ``malloc_trim(0)`` has handed free heap pages back, so no
cached memory hides part of the peak). torch's CPU allocator is plain ``malloc``, so tracemalloc
(Python objects only) does not see tensor memory, and the profiler's per-op byte counts miss
allocator behaviour; peak RSS is what the OS must actually provide and what gets a process
killed. Two views, each in its own process:

- *live*: default glibc, which serves every tensor above 32 MiB with its own mmap and unmaps it
  on free, so RSS tracks the bytes of live tensors exactly (deterministic);
- *tuned heap*: ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``, the settings the timed
  runs use (below): every tensor comes from the brk heap and freed memory is kept for reuse, so
  RSS is the heap's high-water mark, fragmentation included (varies ±15% run to run).

Both sides are timed in both settings; the tuned one is what kdflow's processes run with: glibc
otherwise returns every large tensor to the OS on free, so each step page-faults its
vocab-sized buffers afresh (DESIGN.md §7). A run the OOM killer ends (dense at large N, whose
tuned heap can outgrow a shared 24 GiB machine) is reported as such; the other rows still run.
Timings are medians of the steps after the first, both wall-clock and process CPU time (user +
sys of the worker's threads): on a shared machine wall time is noisy, CPU time much less so.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time

MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "68719476736"}


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def _trim_heap() -> None:
    """Hand free heap pages back to the OS, so the baseline RSS holds no reusable memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing cached to hand back that we can reach
        pass


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    import kdcore
    from kdcore.distill.loss import distill_loss

    torch.manual_seed(0)
    fn = kdcore.load_registry().get("loss", args.loss).fn
    n, v, h = args.n, args.vocab, args.hidden
    # Scales give logits of std ~0.6, like a trained head's (uniform-ish softmax is no easier).
    # In-place scaling: a freed temporary would stay in the heap and hide part of the peak.
    h_s = torch.randn(n, h).requires_grad_(True)
    w_s = torch.randn(v, h).mul_(0.02).requires_grad_(True)
    h_t = torch.randn(n, h)
    w_t = torch.randn(v, h).mul_(0.02)
    labels = torch.randint(0, v, (n,)) if args.ce else None
    _trim_heap()
    kd_ratio = 0.5 if args.ce else 1.0
    kd_scale, ce_scale = kd_ratio / n, (1.0 - kd_ratio) / n

    def dense_step():
        ls = h_s @ w_s.T
        with torch.no_grad():
            lt = h_t @ w_t.T
        loss = fn(ls, lt, temperature=1.0).sum() * kd_scale
        if labels is not None:
            loss = loss + F.cross_entropy(ls, labels, reduction="sum") * ce_scale
        loss.backward()
        return float(loss.detach())

    def chunked_step():
        out = distill_loss(h_s, w_s, h_t, w_t, loss_fn=fn, labels=labels, kd_scale=kd_scale, ce_scale=ce_scale,
                           chunk_size=args.chunk, strategy=args.strategy)
        out.loss.backward()
        return float(out.loss.detach())

    step = dense_step if args.mode == "dense" else chunked_step
    times, cpu = [], []
    base = _status_kib("VmRSS")
    for i in range(args.steps):
        h_s.grad = w_s.grad = None  # as optimizer.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        value = step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        if i == 0:
            peak = _status_kib("VmHWM") - base
    print(json.dumps({"peak_mib": peak / 1024, "times": times, "cpu": cpu, "loss": value}))


def _median_after_first(xs: list[float]) -> float:
    return statistics.median(xs[1:] or xs)  # the first step pays for page faults and warm-up


def _available_mib() -> float:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def run_config(args, mode: str, n: int, chunk: int | None, strategy: str | None, *, tuned_malloc: bool = True) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--n", str(n), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--loss", args.loss, "--steps", str(args.steps)]
    if chunk:
        cmd += ["--chunk", str(chunk), "--strategy", strategy]
    if args.ce:
        cmd.append("--ce")
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    if tuned_malloc:
        env.update(MALLOC_ENV)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode in (-9, 137):  # the OOM killer: record it, the other rows still run
        return None
    if proc.returncode != 0:
        raise SystemExit(f"{mode} N={n} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from kdcore.distill.loss import DEFAULT_CHUNK_SIZE

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["dense", "chunked"], default="dense", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=1024, help=argparse.SUPPRESS)
    p.add_argument("--chunk", type=int, default=DEFAULT_CHUNK_SIZE, help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="fused", help=argparse.SUPPRESS)
    p.add_argument("--ns", default="1024,4096", help="token counts N (comma separated)")
    p.add_argument("--vocab", type=int, default=152064)  # Qwen2.5-7B's padded head
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--loss", default="fkl", help="registered loss name")
    p.add_argument("--ce", action="store_true", help="mix in CE (kd_ratio 0.5)")
    p.add_argument("--chunks", default=str(DEFAULT_CHUNK_SIZE), help="chunk sizes to compare (comma separated)")
    p.add_argument("--strategies", default="fused", help="fused and/or recompute (comma separated)")
    p.add_argument("--steps", type=int, default=3, help="timed-run steps per configuration; the first is not timed")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"V={args.vocab} H={args.hidden} loss={args.loss}{' +CE' if args.ce else ''} fp32 CPU, "
          f"torch threads=default, env {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}", flush=True)
    rows = []
    for n in [int(x) for x in args.ns.split(",")]:
        # Dense fp32 peaks at about six [N, V] buffers (measured); refuse rather than push a
        # shared machine into the OOM killer.
        need_mib = 1.05 * 6 * n * args.vocab * 4 / 2**20
        if need_mib > 0.95 * _available_mib():
            raise SystemExit(f"dense N={n} needs ~{need_mib:.0f} MiB, only {_available_mib():.0f} MiB available")
        configs = [("dense", None, None)] + [("chunked", c, st) for st in args.strategies.split(",")
                                              for c in (int(x) for x in args.chunks.split(","))]
        base = None
        for mode, chunk, strategy in configs:
            live = run_config(args, mode, n, chunk, strategy, tuned_malloc=False)
            tuned = run_config(args, mode, n, chunk, strategy)
            if live is None:
                raise SystemExit(f"{mode} N={n} chunk={chunk} was killed (out of memory) even with default malloc")
            row = dict(n=n, driver="dense" if mode == "dense" else f"chunked/{strategy}", chunk=chunk or "-",
                       live=live["peak_mib"], cpu_default=_median_after_first(live["cpu"]), loss=live["loss"],
                       heap=tuned and tuned["peak_mib"], cpu=tuned and _median_after_first(tuned["cpu"]),
                       wall=tuned and _median_after_first(tuned["times"]))
            base = base or row
            rows.append((row, base))
            print(f"  N={n} {row['driver']} chunk={row['chunk']}: {row}", flush=True)
    print()
    print("| N | driver | chunk | peak extra MiB (live) | vs dense | peak extra MiB (tuned heap) | vs dense "
          "| step CPU s (tuned) | vs dense | step CPU s (default malloc) | vs dense | step wall s (tuned) | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")

    def ratio(a, b, digits):
        return f"{a / b:.{digits}f}" if a is not None and b is not None else "-"

    def num(a, fmt):
        return format(a, fmt) if a is not None else "OOM-killed"

    for r, b in rows:
        print(f"| {r['n']} | {r['driver']} | {r['chunk']} | {r['live']:.0f} | {ratio(r['live'], b['live'], 3)} "
              f"| {num(r['heap'], '.0f')} | {ratio(r['heap'], b['heap'], 3)} | {num(r['cpu'], '.2f')} "
              f"| {ratio(r['cpu'], b['cpu'], 2)} | {r['cpu_default']:.2f} | {ratio(r['cpu_default'], b['cpu_default'], 2)} "
              f"| {num(r['wall'], '.2f')} | {r['loss']:.6f} |")

if __name__ == "__main__":
    main()
