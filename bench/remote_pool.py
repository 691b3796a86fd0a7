"""A pool of teacher servers: two student jobs served by 1, 2 and 3 ``kdcore serve-teacher`` replicas.

Each set-up starts ``n`` servers of the bench teacher on 127.0.0.1 (models loaded before the
jobs start), then two ``kdcore train`` jobs of the bench pair together, both with
``teacher.engine=remote`` and ``teacher.remote.address`` listing every replica (the pool spreads
each job's requests by least outstanding work). Per job: median tokens/s after ``warmup``
steps; for the set: their sum and the wall time until both ended, and how many requests each
replica answered (from the servers' logs' totals).

On one machine every replica and both students share the same cores: the figures say what the
pool costs and how it spreads, not what separate teacher machines would give. The machine load
at start is written with the table (the machine is shared).

    nice -n 10 python -m bench remote_pool     # (re)writes its section of bench/remote_teacher.md
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import load_average, md_table
from bench.remote_teacher import OUT, _metrics_tokens_per_s, _replace_section

HEADING = "## A pool of teacher servers: two student jobs, 1, 2 and 3 replicas"


def _start_server(recipe: Path, log: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "kdcore", "serve-teacher", str(recipe), "--listen", "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=open(log, "wb"), text=True)
    endpoint = proc.stdout.readline().strip()
    if not endpoint.startswith("tcp://"):
        raise RuntimeError(f"serve-teacher did not start: {log.read_text(errors='replace')[-2000:]}")
    return proc, endpoint.removeprefix("tcp://")


def pool_jobs(replicas: int, steps: int = 10, warmup: int = 2, batch: int = 2, seq_len: int = 128) -> dict:
    import yaml

    from bench.kdflow_side import recipe_dict
    from bench.models import ensure_data, ensure_model, tokenizer_folder

    student, teacher = str(ensure_model("student")), str(ensure_model("teacher"))
    data = str(ensure_data(tokenizer_folder(49152), seq_len, batch * steps))
    with tempfile.TemporaryDirectory(prefix="kdflow-pool-bench-") as tmp:
        paths = []
        for job in "ab":
            recipe = recipe_dict(student, teacher, data, seq_len, batch, steps, str(Path(tmp) / job))
            recipe["teacher"]["threads"] = 1  # one core per replica: the machine has few
            paths.append(Path(tmp) / f"{job}.yaml")
            paths[-1].write_text(yaml.safe_dump(recipe))
        servers, logs = [], [Path(tmp) / f"server{i}.log" for i in range(replicas)]
        try:
            for log in logs:
                servers.append(_start_server(paths[0], log))
            address = ",".join(ep for _, ep in servers)
            t0, jobs = time.perf_counter(), []
            for path in paths:
                with open(path.with_suffix(".log"), "wb") as fh:
                    jobs.append(subprocess.Popen([sys.executable, "-m", "kdcore", "train", str(path),
                                                  "teacher.engine=remote", f"teacher.remote.address={address}"],
                                                 stdout=fh, stderr=subprocess.STDOUT))
            for job, proc, path in zip("ab", jobs, paths):
                if proc.wait():
                    raise RuntimeError(f"job {job}: {path.with_suffix('.log').read_text(errors='replace')[-2000:]}")
            wall = time.perf_counter() - t0
            tps = [_metrics_tokens_per_s(Path(tmp) / j, warmup) for j in "ab"]
        finally:
            for proc, _ in servers:
                proc.terminate()
                proc.wait(30)
        served = []
        for log in logs:  # each job's goodbye line there: "client ...: N requests, ... (total), ... (client closed)"
            totals = re.findall(r": (\d+) requests, [^\n]*\(total\)[^\n]*\(client closed\)", log.read_text(errors="replace"))
            served.append(sum(int(t) for t in totals))
    return {"tokens_per_s": tps, "wall_s": wall, "served": served}


def main() -> None:
    load = load_average()
    rows = []
    for n in (1, 2, 3):
        r = pool_jobs(n)
        a, b = r["tokens_per_s"]
        rows.append([n, f"{a:.0f}", f"{b:.0f}", f"{a + b:.0f}", f"{r['wall_s']:.0f}", " / ".join(map(str, r["served"]))])
        print(rows[-1], flush=True)
    section = [HEADING, "",
               f"Machine: {os.cpu_count()} CPUs, shared, load average {load[0]:.1f} at start. `python -m bench remote_pool`. "
               "Bench pair, 2 x 128 tokens, 10 steps per job, both jobs started together against every replica "
               "(`teacher.remote.address` lists them; each server `teacher.threads: 1`, loaded before the jobs). "
               "tokens/s: each job's median after 2 steps; wall: jobs' start to both ended; requests: answered "
               "by each replica.", "",
               md_table(["replicas", "job A tokens/s", "job B tokens/s", "total tokens/s", "wall s",
                         "requests per replica"], rows), "",
               "What this means: the pool spreads the work evenly (requests per replica) and the losses do not "
               "depend on it (tests/integration/test_remote_pool.py). The rise in tokens/s is real but not a clean "
               "scaling figure: on few cores shared with other work, more replica processes win a larger share of "
               "the machine, and two jobs' teacher forwards run side by side instead of queuing in one server. With "
               "each replica on its own machine or accelerator the teacher side scales with the replicas until the "
               "students are the bottleneck; that has not been measured here.", ""]
    OUT.write_text(_replace_section(OUT.read_text() if OUT.exists() else "", HEADING, section))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
