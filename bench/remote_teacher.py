"""Remote teacher: what one step's hidden states cost over ZeroMQ loopback vs shared memory,
and one student job's tokens/s with a local vs a remote (loopback) teacher.

Transfer: a step with ``N`` loss positions moves ``[N, H]`` hidden states. *Shared memory* is
:func:`bench.channel_bytes.transfer` (producer copy in, consumer copy out: the ``hf`` engine's
path). *Loopback* is the remote path end to end without a model: a server process answers a
small request with :func:`kdcore.engines.remote.wire.pack_hidden` of a ready tensor (the copy
the real server makes before releasing its slot) over a ROUTER socket, and the client copies
the reply into its slot with ``unpack_hidden_into`` — request to copied reply.

Tokens/s: the bench pair (teacher 512 x 8, student 256 x 4, vocab 49152), trained with
``kdcore train`` once with the local ``hf`` engine and once against ``kdcore serve-teacher``
on 127.0.0.1 (same machine: the teacher's compute is the same, the transport is what differs).

Two jobs: two ``kdcore train`` processes of the bench pair started together, once each with its
own local ``hf`` teacher and once both with ``teacher.engine=remote`` against one
``kdcore serve-teacher`` on 127.0.0.1 (started, and its model loaded, before the jobs). Per job:
median tokens/s; for the set: the sum of the two, the wall time from start until both finished,
and the peak PSS of every process involved (jobs, their teacher processes, the server), sampled
as :mod:`bench.common` does. On one machine both jobs contend for the same cores either way;
what sharing saves is one teacher's memory and one model load.

    nice -n 10 python -m bench remote_teacher [--skip-train]   # writes bench/remote_teacher.md
    nice -n 10 python -m bench remote_teacher --two-jobs-only   # (re)writes only that section
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import md_table

CASES = (("bench teacher", 512), ("7B-class", 4096))
N_ROWS = 4 * 512  # loss positions of a 4 x 512 micro-batch
OUT = Path(__file__).with_suffix(".md")


def _echo_server(endpoint_q, rows: int, cols: int, dtype: str) -> None:
    import torch
    import zmq

    from kdcore.engines.remote import wire

    torch.set_num_threads(1)
    hidden = torch.randn(rows, cols).to(getattr(torch, dtype))
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.bind("tcp://127.0.0.1:*")
    endpoint_q.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    while True:
        ident, head = sock.recv_multipart()
        if wire.decode_header(head).get("type") == "bye":
            break
        fields, payload = wire.pack_hidden(hidden)
        sock.send_multipart([ident, wire.encode_header(fields), payload], copy=False)
    sock.close(linger=0)
    ctx.term()


def loopback_transfer(rows: int, cols: int, dtype: str, repeats: int = 5) -> dict:
    """Request -> ``[rows, cols]`` reply copied into a slot, ``repeats`` (+1 warm-up) times."""
    import torch
    import torch.multiprocessing as mp
    import zmq

    from kdcore.engines.remote import wire

    ctx_mp = mp.get_context("spawn")
    q = ctx_mp.Queue()
    proc = ctx_mp.Process(target=_echo_server, args=(q, rows, cols, dtype), daemon=True)
    proc.start()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(q.get(timeout=120))
    slot = torch.empty(rows, cols, dtype=getattr(torch, dtype))
    times = []
    try:
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            sock.send_multipart([wire.encode_header({"type": "hidden"})])
            head, payload = sock.recv_multipart(copy=False)
            wire.unpack_hidden_into(wire.decode_header(head.buffer), payload.buffer, slot)
            if i:
                times.append(time.perf_counter() - t0)
        sock.send_multipart([wire.encode_header({"type": "bye"})])
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
        sock.close()
        ctx.term()
    return {"bytes": slot.numel() * slot.element_size(), "total_s": times}


def transfer_rows(repeats: int) -> list[list[str]]:
    from bench.channel_bytes import transfer

    rows = []
    for label, hidden in CASES:
        for dtype in ("float32", "bfloat16"):
            shm = transfer(N_ROWS, hidden, dtype, repeats=repeats)
            net = loopback_transfer(N_ROWS, hidden, dtype, repeats=repeats)
            t_shm, t_net = statistics.median(shm["total_s"]), statistics.median(net["total_s"])
            rows.append([label, str(hidden), dtype, f"{net['bytes'] / 1e6:.1f}", f"{t_shm * 1e3:.2f}",
                         f"{t_net * 1e3:.2f}", f"{net['bytes'] / t_net / 1e9:.2f}"])
    return rows


def _metrics_tokens_per_s(out: Path, warmup: int) -> float:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tps = [r["tokens_per_s"] for r in recs if "tokens_per_s" in r][warmup:]
    return statistics.median(tps)


def tokens_per_s(steps: int = 8, warmup: int = 2, batch: int = 2, seq_len: int = 128) -> dict:
    """Median tokens/s of the bench pair, local hf engine vs a serve-teacher on loopback."""
    import yaml

    from bench.sides.kdflow import recipe_dict
    from bench.models import ensure_data, ensure_model, tokenizer_folder

    student, teacher = str(ensure_model("student")), str(ensure_model("teacher"))
    data = str(ensure_data(tokenizer_folder(49152), seq_len, batch * steps))
    result = {}
    with tempfile.TemporaryDirectory(prefix="kdflow-remote-bench-") as tmp:
        for mode in ("local", "remote"):
            recipe = recipe_dict(student, teacher, data, seq_len, batch, steps, str(Path(tmp) / mode))
            path = Path(tmp) / f"{mode}.yaml"
            path.write_text(yaml.safe_dump(recipe))
            server, overrides = None, []
            if mode == "remote":
                server = subprocess.Popen([sys.executable, "-m", "kdcore", "serve-teacher", str(path), "--listen",
                                           "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                endpoint = server.stdout.readline().strip()
                overrides = ["teacher.engine=remote", f"teacher.remote.address={endpoint.removeprefix('tcp://')}"]
            try:
                res = subprocess.run([sys.executable, "-m", "kdcore", "train", str(path), *overrides],
                                     capture_output=True, text=True)
                if res.returncode:
                    raise RuntimeError(f"{mode} run failed: {res.stderr[-2000:]}")
                result[mode] = _metrics_tokens_per_s(Path(tmp) / mode, warmup)
            finally:
                if server is not None:
                    server.terminate()
                    server.wait(30)
    return result


def _peak_tree_pss(jobs: list, others: list, sample_interval: float = 0.1) -> tuple[int, float]:
    """Wait for every Popen in ``jobs`` to end (``others``, e.g. a server, keep running); returns
    (peak PSS summed over the process trees of all of them, seconds until the jobs ended)."""
    import psutil

    from bench.common import _tree_memory

    roots = [psutil.Process(p.pid) for p in [*jobs, *others]]
    peak, t0 = 0, time.perf_counter()
    while any(j.poll() is None for j in jobs):
        peak = max(peak, sum(_tree_memory(r)[0] for r in roots))
        time.sleep(sample_interval)
    return peak, time.perf_counter() - t0


def two_jobs(steps: int = 8, warmup: int = 2, batch: int = 2, seq_len: int = 128) -> dict:
    """Two jobs started together: each with its own hf teacher vs both on one serve-teacher."""
    import yaml

    from bench.sides.kdflow import recipe_dict
    from bench.models import ensure_data, ensure_model, tokenizer_folder

    student, teacher = str(ensure_model("student")), str(ensure_model("teacher"))
    data = str(ensure_data(tokenizer_folder(49152), seq_len, batch * steps))
    result = {}
    with tempfile.TemporaryDirectory(prefix="kdflow-remote-2jobs-") as tmp:
        for mode in ("own", "shared"):
            paths = []
            for job in ("a", "b"):
                recipe = recipe_dict(student, teacher, data, seq_len, batch, steps, str(Path(tmp) / mode / job))
                paths.append(Path(tmp) / f"{mode}-{job}.yaml")
                paths[-1].write_text(yaml.safe_dump(recipe))
            server, overrides, server_load_s = None, [], 0.0
            if mode == "shared":
                t0 = time.perf_counter()
                server = subprocess.Popen([sys.executable, "-m", "kdcore", "serve-teacher", str(paths[0]), "--listen",
                                           "127.0.0.1:0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                endpoint = server.stdout.readline().strip()
                server_load_s = time.perf_counter() - t0
                overrides = ["teacher.engine=remote", f"teacher.remote.address={endpoint.removeprefix('tcp://')}"]
            logs = [p.with_suffix(".log") for p in paths]  # a file, not a pipe: a full pipe would stall a job
            jobs = []
            for path, log in zip(paths, logs):
                with open(log, "wb") as fh:
                    jobs.append(subprocess.Popen([sys.executable, "-m", "kdcore", "train", str(path), *overrides],
                                                 stdout=fh, stderr=subprocess.STDOUT))
            try:
                peak, wall = _peak_tree_pss(jobs, [server] if server else [])
                for job, proc, log in zip("ab", jobs, logs):
                    if proc.wait():
                        raise RuntimeError(f"{mode} job {job} failed: {log.read_text(errors='replace')[-2000:]}")
                result[mode] = {"tokens_per_s": [_metrics_tokens_per_s(Path(tmp) / mode / j, warmup) for j in "ab"],
                                "wall_s": wall, "peak_pss": peak, "server_load_s": server_load_s}
            finally:
                for proc in jobs:
                    if proc.poll() is None:
                        proc.kill()
                if server is not None:
                    server.terminate()
                    server.wait(30)
    return result


TWO_JOBS_HEADING = "## Two student jobs at once: one shared teacher server vs a teacher each"


def two_jobs_lines(steps: int = 8) -> list[str]:
    res = two_jobs(steps=steps)
    rows = []
    for mode, label in (("own", "own local hf teacher each"), ("shared", "one serve-teacher, 127.0.0.1")):
        r = res[mode]
        a, b = r["tokens_per_s"]
        wall = f"{r['wall_s']:.0f}" + (f" (+{r['server_load_s']:.0f} server start)" if r["server_load_s"] else "")
        rows.append([label, f"{a:.0f}", f"{b:.0f}", f"{a + b:.0f}", wall, f"{r['peak_pss'] / 1e9:.2f}"])
    return [TWO_JOBS_HEADING, "",
            f"Bench pair, 2 x 128 tokens, {steps} steps per job, both jobs started together; tokens/s is each "
            "job's median after 2 steps. Wall: start until both jobs ended (model loads included; the shared "
            "server was started and loaded before). Peak PSS: the whole process tree (both jobs, their teacher "
            "processes, the server), shared pages counted once.", "",
            md_table(["teacher", "job A tokens/s", "job B tokens/s", "total tokens/s", "wall s", "peak PSS GB"],
                     rows), "",
            f"What this means: the machine has {os.cpu_count()} cores, so in both set-ups the two students and "
            "the teacher work contend for the same cores (and with other work on a shared machine); the shared "
            "server does not add compute, it serialises both jobs' teacher forwards through one process. What it "
            "saves is one teacher's memory and one teacher model load (the bench teacher is small, so both savings "
            "are small here; they grow with the teacher). On separate machines (the teacher on its own "
            "accelerator) the throughput picture would differ.", ""]


def _replace_section(text: str, heading: str, section: list[str]) -> str:
    """``text`` without any previous ``heading`` section (up to the next ``## ``), plus ``section``."""
    lines, out, skipping = text.rstrip("\n").splitlines(), [], False
    for line in lines:
        if line.startswith("## "):
            skipping = line == heading
        if not skipping:
            out.append(line)
    return "\n".join(out).rstrip("\n") + "\n\n" + "\n".join(section)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-train", action="store_true", help="transfer table only")
    parser.add_argument("--two-jobs-only", action="store_true",
                        help="run only the two-jobs measurement and replace that section of the existing report")
    args = parser.parse_args()
    from bench.common import machine_info

    if args.two_jobs_only:
        load = os.getloadavg()[0]
        section = two_jobs_lines()
        section[2:2] = [f"(Measured separately, load {load:.1f} at start.)", ""]
        OUT.write_text(_replace_section(OUT.read_text() if OUT.exists() else "", TWO_JOBS_HEADING, section))
        print("\n".join(section))
        return

    info = machine_info()
    lines = ["# Remote teacher: loopback vs shared memory", "",
             f"Machine: {info.get('cpu', '?')}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f} at start "
             f"(shared machine: figures are indicative). `python -m bench remote_teacher`.", "",
             f"## One step's hidden states, N = {N_ROWS} rows (median of {args.repeats})", "",
             md_table(["case", "H", "dtype", "MB/step", "shared memory ms", "zmq loopback ms", "loopback GB/s"],
                      transfer_rows(args.repeats)), ""]
    if not args.skip_train:
        tps = tokens_per_s()
        lines += ["## Tokens/s of one student job (bench pair, 2 x 128 tokens, 8 steps, median after 2)", "",
                  md_table(["teacher", "tokens/s"], [["local hf engine", f"{tps['local']:.0f}"],
                                                     ["remote, 127.0.0.1", f"{tps['remote']:.0f}"]]), ""]
        lines += two_jobs_lines()
    OUT.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
