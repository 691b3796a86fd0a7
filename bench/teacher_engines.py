"""The teacher in its own process (engine ``hf``) or in the trainer's (``inline``), beside TRL's
DistillationTrainer, in the off-policy tables' own meter.

``python -m bench teacher_engines [--table offpolicy|onpolicy|xtok] [--pair bench|real] [--seq-len 128] [--repeats 3]``

Each repeat runs three fresh processes (``bench.common.run_isolated``, as ``run_all`` runs a
table's row; the order rotates between repeats so that drift touches every side): kdflow's side
of a ``results.md`` table with ``teacher.engine=hf``, the same with ``teacher.engine=inline``, and
that table's leanest peer: ``offpolicy`` (the off-policy and real-teacher tables' recipe,
``--pair``, default allocator) against TRL ``DistillationTrainer``; ``onpolicy`` (the on-policy
table: 4 prompts of 64 tokens + 64 sampled, tuned allocator) against TRL ``DistillationTrainer``
on-policy; ``xtok`` (the cross-tokenizer table's ULD, tuned allocator) against TRL
``GOLDTrainer``. Printed: per run the step time and the tree's peak memory (the sum of each
process's ``VmHWM``, as in ``results.md``), then medians, ranges and the ratios to the peer.
Times need a quiet machine; memory does not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

GB = 1e9
PAIRS = {"bench": ("student", "teacher"), "real": ("smollm2-student-576x4", "smollm2-135m")}
# table -> (kdflow's side, the peer's name and side, the table's allocator)
TABLES = {"offpolicy": ("bench.sides.kdflow:run", "TRL DistillationTrainer", "bench.peers.trl_distill:run", "default"),
          "onpolicy": ("bench.sides.kdflow:run_onpolicy", "TRL DistillationTrainer",
                       "bench.peers.trl_onpolicy:run_distillation", "tuned"),
          "xtok": ("bench.sides.kdflow_xtok:run_uld", "TRL GOLDTrainer", "bench.peers.trl_gold:run", "tuned")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--table", choices=sorted(TABLES), default="offpolicy")
    p.add_argument("--pair", choices=sorted(PAIRS), default="bench", help="offpolicy only: the models")
    p.add_argument("--seq-len", type=int, default=128, help="offpolicy and xtok: tokens per row")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="measured steps per run (after one warm-up step)")
    p.add_argument("--repeats", type=int, default=3, help="fresh-process runs per side")
    p.add_argument("--allocator", default=None, help="bench.common.ALLOCATORS (default: the table's own)")
    p.add_argument("--threads", type=int, default=None, help="CPUs per run (default: all available)")
    args = p.parse_args(argv)

    import psutil

    from bench import common, models
    from bench.run_all import LAUNCHER_ENV

    threads = args.threads or len(common.available_cpus())
    kdflow, peer_name, peer, allocator = TABLES[args.table]
    allocator = args.allocator or allocator
    base = dict(batch=args.batch, steps=args.steps, warmup=1)
    if args.table == "onpolicy":
        student, teacher = str(models.ensure_model("student")), str(models.ensure_model("teacher"))
        prompt, new = 64, 64
        data = models.ensure_data(models.tokenizer_folder(), prompt + new, max(32, args.batch * (args.steps + 1)))
        base.update(prompt_len=prompt, max_new_tokens=new)
    else:
        pair = PAIRS[args.pair] if args.table == "offpolicy" else ("student-v32000", "teacher")
        student, teacher = (str(models.ensure_model(m)) for m in pair)
        vocab = 49152 if args.table == "offpolicy" else 32000
        data = models.ensure_data(models.tokenizer_folder(vocab), args.seq_len, max(32, args.batch * (args.steps + 1)))
        base.update(seq_len=args.seq_len)
    base.update(student=student, teacher=teacher, data=str(data))
    sides = {"kdflow hf": (kdflow, {"overrides": ["teacher.engine=hf"]}),
             "kdflow inline": (kdflow, {"overrides": ["teacher.engine=inline"]}),
             peer_name: (peer, {})}
    names = list(sides)
    runs: dict[str, list] = {n: [] for n in names}
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            target, extra = sides[name]
            r = common.run_isolated(target, {**base, **extra}, threads=threads, allocator=allocator, timeout=1200,
                                    mem_cap=int(psutil.virtual_memory().available * 0.9),
                                    env_extra=LAUNCHER_ENV if name.startswith("kdflow") else None)
            if not r.ok:
                print(f"{name} #{rep + 1}: FAILED {r.error}\n{r.log_tail[-1500:]}", flush=True)
                continue
            step = statistics.median(r.result["step_times"])
            runs[name].append((step, r.peak_mem / GB, r.result.get("final_loss")))
            print(f"{name} #{rep + 1}: {step:.2f} s/step, peak {r.peak_mem / GB:.2f} GB, "
                  f"loss {r.result.get('final_loss')}, load {r.load_before:.1f}->{r.load_after:.1f}", flush=True)

    what = {"offpolicy": f"off-policy, {args.pair} pair, {args.batch}×{args.seq_len}",
            "onpolicy": f"on-policy, bench pair, {args.batch}×(64+64)", "xtok": f"ULD, {args.batch}×{args.seq_len}"}
    print(f"\n{what[args.table]}, {allocator} allocator, {threads} threads, "
          f"{args.repeats} runs per side × {args.steps} steps")
    print(f"| side | s/step, median (range) | peak GB, median (range) | vs {peer_name}: time, memory |")
    print("|:---|---:|---:|---:|")
    peer = runs[peer_name]
    for name in names:
        got = runs[name]
        if not got:
            print(f"| {name} | failed | failed | |")
            continue
        t = [x[0] for x in got]
        m = [x[1] for x in got]
        ratio = ""
        if peer and name != peer_name:
            ratio = (f"{statistics.median(x[0] for x in peer) / statistics.median(t):.2f}× the speed, "
                     f"{statistics.median(m) / statistics.median(x[1] for x in peer):.2f}× the memory")
        print(f"| {name} | {statistics.median(t):.2f} ({min(t):.2f}–{max(t):.2f}) | "
              f"{statistics.median(m):.2f} ({min(m):.2f}–{max(m):.2f}) | {ratio} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
