"""Channel: what moves between teacher and student per step, hidden states vs full logits.

A step with ``N`` loss positions moves either the teacher's last hidden states ``[N, H_t]``
(kdflow: the student side rebuilds logits with the teacher's ``lm_head``) or its full logits
``[N, V]`` (a logits-shipping design). Both are measured the same way: a producer process
copies a private tensor into a preallocated shared-memory buffer (what a teacher engine does
with its output), signals, and a consumer process copies it out into its own private buffer
(the one read the loss needs). Times are ``perf_counter`` stamps from both processes (the same
monotonic clock on Linux): ``write`` = producer copy, ``read`` = consumer copy, ``total`` =
write start to read end, signalling included. One warm-up round faults every page in first;
the median and range over ``repeats`` rounds are reported.

Run as a benchmark child (``measure``) through :func:`bench.common.run_isolated`.
"""

from __future__ import annotations

import statistics
import time

# (label, vocab, teacher hidden): the bench teacher, the real SmolLM2 teacher, a Qwen2.5-7B-class one.
CASES = (
    ("bench teacher 512", 49152, 512),
    ("SmolLM2-135M", 49152, 576),
    ("Qwen2.5-7B-class", 152064, 3584),
)
N_DEFAULT = 4 * 512  # loss positions of a 4 x 512 batch (4 x 511, rounded up: the order of magnitude is the point)


def _consumer(shm, ready, done, stamps, rounds: int) -> None:
    """Child: on each ``ready``, copy the shared buffer out, stamp and set ``done``."""
    import torch

    torch.set_num_threads(1)  # the copy is memory-bound; one thread keeps the producer's core free
    dst = torch.empty_like(shm)
    dst.copy_(shm)  # fault the private pages in once
    for i in range(rounds):
        ready.wait()
        ready.clear()
        t_seen = time.perf_counter()
        dst.copy_(shm)
        stamps[i, 0] = t_seen
        stamps[i, 1] = time.perf_counter()
        done.set()


def transfer(rows: int, cols: int, dtype: str, repeats: int = 5) -> dict:
    """Move a ``[rows, cols]`` tensor of ``dtype`` through shared memory ``repeats`` (+1 warm-up) times."""
    import torch
    import torch.multiprocessing as mp

    dt = getattr(torch, dtype)
    src = torch.randn(rows, cols).to(dt)
    shm = torch.empty(rows, cols, dtype=dt).share_memory_()
    shm.copy_(src)  # fault the shared pages in once
    rounds = repeats + 1
    stamps = torch.zeros(rounds, 2, dtype=torch.float64).share_memory_()
    ctx = mp.get_context("spawn")
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_consumer, args=(shm, ready, done, stamps, rounds), daemon=True)
    proc.start()
    write, read, total = [], [], []
    try:
        for i in range(rounds):
            t0 = time.perf_counter()
            shm.copy_(src)
            t1 = time.perf_counter()
            ready.set()
            if not done.wait(timeout=120):
                raise RuntimeError(f"channel consumer (pid {proc.pid}) did not answer in 120 s")
            done.clear()
            if i == 0:
                continue  # warm-up round
            write.append(t1 - t0)
            read.append(float(stamps[i, 1] - stamps[i, 0]))
            total.append(float(stamps[i, 1]) - t0)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    nbytes = src.numel() * src.element_size()
    return {"rows": rows, "cols": cols, "dtype": dtype, "bytes": nbytes, "write_s": write, "read_s": read,
            "total_s": total, "gbps": nbytes / statistics.median(total) / 1e9}


def measure(n: int = N_DEFAULT, repeats: int = 5, cases=CASES) -> dict:
    """Every case × {hidden, logits} × {float32, bfloat16} (a benchmark child entry point)."""
    out = []
    for label, vocab, hidden in cases:
        for what, cols in (("hidden", hidden), ("logits", vocab)):
            for dtype in ("float32", "bfloat16"):
                r = transfer(n, cols, dtype, repeats=repeats)
                r.update(case=label, vocab=vocab, teacher_hidden=hidden, payload=what)
                out.append(r)
    return {"n": n, "repeats": repeats, "rows": out}


if __name__ == "__main__":
    res = measure(repeats=3)
    for r in res["rows"]:
        print(f"{r['case']:>18} {r['payload']:>6} {r['dtype']:>8} {r['bytes'] / 1e6:9.1f} MB "
              f"total {statistics.median(r['total_s']) * 1e3:8.2f} ms")
