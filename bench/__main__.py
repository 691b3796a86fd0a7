"""The one way to run a benchmark: ``python -m bench`` lists them, ``python -m bench NAME ARGS...``
runs one (``python -m bench NAME --help`` for its options).

Each benchmark is a module of this folder, run as its own ``__main__`` exactly as
``python bench/NAME.py ARGS...`` would run it, so a figure does not depend on how it was
started. Listing imports nothing: no torch, no models built.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

# name -> what it measures (and where its report goes). The modules beside them are parts, not
# benchmarks: common.py (measuring in a child process), limit.py's helpers, models.py's cache,
# quality_sections.py, quality_report.py and quality_store.py (quality's sections, report and
# store of runs), sides/ (kdflow's side of a table) and peers/ (what users would pick instead).
BENCHMARKS = {
    "run_all": "kdflow against TRL, every table in one run -> bench/results.md (--quick --no-write: smoke run)",
    "memory_breakdown": "what each of kdflow's two processes holds, phase by phase, in one real run (exact: RSS, not timed)",
    "teacher_engines": "the teacher in its own process (hf) or in the trainer's (inline), beside TRL DistillationTrainer: time and peak memory",
    "fsdp_one_rank": "what FSDP2 costs a student on one rank: resident memory with and without fully_shard (exact: not timed)",
    "loss_memory": "peak memory and time of the chunked KD loss vs the dense computation",
    "uld_sort": "ULD's teacher part vs student part of the loss step, and the partial sort's speed and error",
    "channel_bytes": "bytes and shared-memory time per step: hidden states at loss positions vs full logits",
    "remote_teacher": "one step's hidden states over ZeroMQ loopback vs shared memory -> bench/remote_teacher.md",
    "remote_pool": "two jobs served by 1, 2 and 3 teacher replicas: tokens/s and the spread -> bench/remote_teacher.md",
    "teacher_cache": "the exact teacher cache: bytes per token, exactness, speed -> bench/teacher_cache.md",
    "teachers": "one teacher vs two: tokens/s and peak memory -> bench/teachers.md",
    "lora": "LoRA vs full fine-tuning: trainable parameters, peak memory, tokens/s -> bench/lora.md",
    "quality": "distillation quality at equal work, held-out, over seeds -> bench/quality.md",
    "first_token": "how the quickstart's teacher and given students open their answers (first answer token)",
    "bits_per_char": "how well each teacher knows the held-out answers, in bits per character",
    "alignment": "time of the character-offset alignment of two real tokenizations, by text length",
    "limit": "this machine's fp32/bf16 matmul GFLOP/s (the denominator of '% of peak')",
    "models": "build the bench models and data into the cache once (the tables do it when missing)",
}


def listing() -> str:
    width = max(map(len, BENCHMARKS))
    lines = ["usage: python -m bench NAME [ARGS...]   (python -m bench NAME --help: its options)", ""]
    lines += [f"  {name:<{width}}  {what}" for name, what in BENCHMARKS.items()]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "list"):
        print(listing())
        return 0
    name, args = argv[0], argv[1:]
    if name not in BENCHMARKS:
        print(f"python -m bench: no benchmark '{name}'\n\n{listing()}", file=sys.stderr)
        return 2
    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:  # `bench.<module>` imports resolve from the repository, wherever we are started
        sys.path.insert(0, root)
    sys.argv = [name, *args]  # runpy puts the module's file in argv[0], as `python bench/<name>.py` would
    runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
