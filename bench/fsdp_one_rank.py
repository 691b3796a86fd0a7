"""What FSDP2 costs a student trained on one rank: resident memory with and without ``fully_shard``.

``python -m bench fsdp_one_rank [--pair real|bench] [--batch 4] [--seq-len 128] [--steps 3]``

kdflow wrapped the student with FSDP2 at every world size until 2026-12-07 (one code path for
sharded parameters, mixed precision and DCP checkpoints); it now wraps it only where FSDP2 has work
(``kdcore.modeling.student.uses_fsdp``: several ranks, or bf16 compute), because on one rank FSDP2
has nothing to gather, yet it still copies each unit's sharded parameters into an unsharded buffer
before use, and the root unit (embedding and head) stays gathered from forward to backward. This
measures that copy on the students of the off-policy tables' 4×128 rows, where kdflow misses on
memory: each configuration in its own fresh process (``bench.common.run_isolated``, so neither
warms the other), the student of the pair loaded as ``kdcore`` loads a model, every weight page
read, then ``--steps`` steps of
forward (``student_hidden``), the head product at every position and a log-sum-exp loss, backward
and AdamW; the kernel's high-water resident set (``VmHWM``) after the steps and the resident set
before them. Memory only: no time is reported.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.memory_breakdown import MB, _reset_peak, _status  # noqa: E402  (the same /proc readers)


def measure(student: str, sharded: bool, batch: int, seq_len: int, steps: int) -> dict:
    """One configuration, in the calling process: resident MB before the steps and the peak of the steps."""
    import torch

    from kdcore.infra import distributed as kdist
    from kdcore.modeling import student as st
    from kdcore.modeling.models import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm(student, dtype=torch.float32)
    with torch.no_grad():  # read every mapped checkpoint page, so both sides start fully resident
        for p in model.parameters():
            p.add_(0)
    if sharded:
        kdist.init_distributed()
        st.shard_student(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len))

    def step() -> None:
        hidden = st.student_hidden(model, ids)
        head = st.student_head_weight(model)
        rows = hidden.reshape(-1, hidden.shape[-1])
        loss = torch.cat([(rows[i:i + 256] @ head.T).logsumexp(-1) for i in range(0, rows.shape[0], 256)]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on, on both sides
    before = _status()["VmRSS"]
    _reset_peak()  # VmHWM from here on: the peak below is the steps' own
    for _ in range(steps):
        step()
    return {"rss_before_mb": before / MB, "peak_mb": _status()["VmHWM"] / MB}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pair", choices=("real", "bench"), default="real")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from bench import models
    from bench.common import run_isolated

    student = str(models.ensure_model({"real": "smollm2-student-576x4", "bench": "student"}[args.pair]))
    rows = []
    for sharded in (False, True):
        res = run_isolated("bench.fsdp_one_rank:measure", {"student": student, "sharded": sharded, "batch": args.batch,
                                                          "seq_len": args.seq_len, "steps": args.steps},
                           threads=args.threads)
        if not res.ok:
            print(f"fsdp_one_rank: the {'sharded' if sharded else 'plain'} run failed: {res.error}", file=sys.stderr)
            return 1
        rows.append((sharded, res.result))
    (_, plain), (_, fsdp) = rows
    print(f"student {Path(student).name}, {args.batch}×{args.seq_len}, {args.steps} steps after one (AdamW state live)")
    print("| student | resident before the steps MB | peak in the steps MB |")
    print("|:---|---:|---:|")
    for sharded, r in rows:
        print(f"| {'FSDP2, one rank' if sharded else 'plain module'} | {r['rss_before_mb']:.0f} | {r['peak_mb']:.0f} |")
    print(f"FSDP2 on one rank: +{fsdp['rss_before_mb'] - plain['rss_before_mb']:.0f} MB resident, "
          f"+{fsdp['peak_mb'] - plain['peak_mb']:.0f} MB at the peak")
    return 0


if __name__ == "__main__":
    sys.exit(main())
