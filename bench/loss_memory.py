"""Peak memory and time of the chunked KD loss driver vs the dense torch computation (not a test).

    .venv/bin/python bench/loss_memory.py                  # V=152064, H=1024, N in {1024, 4096}, fkl
    .venv/bin/python bench/loss_memory.py --loss js --ce   # another loss, with the CE mix
    .venv/bin/python bench/loss_memory.py --chunks 256,512,1024 --strategies fused,recompute

One step = student logits + teacher logits + loss, forward and backward (grads w.r.t. the
student hidden states and the student head), fp32 on CPU. "dense" is the plain torch code
(``h_s @ W_sᵀ``, ``h_t @ W_tᵀ`` under no_grad, the registered loss on the full ``[N, V]``
logits, ``.backward()``); "chunked" is ``kdcore.kdloss.distill_loss``.

How memory is measured: every configuration runs in a fresh subprocess, which reports its
peak resident set size (``VmHWM`` in /proc/self/status) during the first step minus its RSS just
before it (after the inputs exist). torch's CPU allocator is plain ``malloc``, so tracemalloc
(Python objects only) does not see tensor memory, and the profiler's tensor-byte counts miss
allocator overhead and fragmentation; peak RSS is what the OS must actually provide and what
gets a process killed. A fresh process per configuration keeps one configuration's cached heap
from hiding another's peak.

Both sides run with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``: glibc otherwise
serves every large tensor with mmap and returns it on free, so each step page-faults its
vocab-sized buffers afresh (DESIGN.md §7); with these settings freed memory stays in the heap
and is reused, which is also why the first step's RSS high-water mark is the step's peak.
Timings are medians of the steps after the first, both wall-clock and process CPU time (user +
sys of the worker's threads): on a shared machine wall time is noisy, CPU time much less so.
"""

from __future__ import annotations

import argparse
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


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    import kdcore
    from kdcore.kdloss import distill_loss

    torch.manual_seed(0)
    fn = kdcore.load_registry().get("loss", args.loss).fn
    n, v, h = args.n, args.vocab, args.hidden
    # Scales give logits of std ~0.6, like a trained head's (uniform-ish softmax is no easier).
    h_s = torch.randn(n, h).requires_grad_(True)
    w_s = (torch.randn(v, h) * 0.02).requires_grad_(True)
    h_t = torch.randn(n, h)
    w_t = torch.randn(v, h) * 0.02
    labels = torch.randint(0, v, (n,)) if args.ce else None
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
        return float(loss)

    def chunked_step():
        out = distill_loss(h_s, w_s, h_t, w_t, loss_fn=fn, labels=labels, kd_scale=kd_scale, ce_scale=ce_scale,
                           chunk_size=args.chunk, strategy=args.strategy)
        out.loss.backward()
        return float(out.loss)

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


def run_config(args, mode: str, n: int, chunk: int | None, strategy: str | None) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--n", str(n), "--vocab", str(args.vocab),
           "--hidden", str(args.hidden), "--loss", args.loss, "--steps", str(args.steps)]
    if chunk:
        cmd += ["--chunk", str(chunk), "--strategy", strategy]
    if args.ce:
        cmd.append("--ce")
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} N={n} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    from kdcore.kdloss import DEFAULT_CHUNK_SIZE

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
    p.add_argument("--steps", type=int, default=3, help="steps per configuration; the first is the memory step")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    print(f"V={args.vocab} H={args.hidden} loss={args.loss}{' +CE' if args.ce else ''} fp32 CPU, "
          f"torch threads=default, env {' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}", flush=True)
    rows = []
    for n in [int(x) for x in args.ns.split(",")]:
        # Dense fp32 needs about six [N, V] buffers; refuse rather than push a shared box into OOM.
        need_mib = 6.5 * n * args.vocab * 4 / 2**20
        if need_mib > 0.9 * _available_mib():
            raise SystemExit(f"dense N={n} needs ~{need_mib:.0f} MiB, only {_available_mib():.0f} MiB available")
        dense = run_config(args, "dense", n, None, None)
        d_time, d_cpu = _median_after_first(dense["times"]), _median_after_first(dense["cpu"])
        rows.append((n, "dense", "-", dense["peak_mib"], d_time, d_cpu, 1.0, 1.0, 1.0, dense["loss"]))
        print(f"  N={n} dense: {dense['peak_mib']:.0f} MiB, {d_time:.2f} s, {d_cpu:.2f} cpu-s", flush=True)
        for strategy in args.strategies.split(","):
            for chunk in [int(x) for x in args.chunks.split(",")]:
                out = run_config(args, "chunked", n, chunk, strategy)
                t, c = _median_after_first(out["times"]), _median_after_first(out["cpu"])
                rows.append((n, f"chunked/{strategy}", str(chunk), out["peak_mib"], t, c,
                             out["peak_mib"] / dense["peak_mib"], t / d_time, c / d_cpu, out["loss"]))
                print(f"  N={n} {strategy} chunk={chunk}: {out['peak_mib']:.0f} MiB, {t:.2f} s, {c:.2f} cpu-s",
                      flush=True)
    print()
    print("| N | driver | chunk | peak extra MiB | step wall s | step CPU s | memory vs dense | wall vs dense "
          "| CPU vs dense | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n, name, chunk, mib, t, c, mr, tr, cr, loss in rows:
        print(f"| {n} | {name} | {chunk} | {mib:.0f} | {t:.2f} | {c:.2f} | {mr:.3f} | {tr:.2f} | {cr:.2f} | {loss:.6f} |")


if __name__ == "__main__":
    main()
