"""The limit: this machine's matmul throughput, and the useful FLOPs of one distillation step.

``measure_matmul`` times large square matmuls with torch at the threads it was given (run it
through :func:`bench.common.run_isolated` with all CPUs): ``2·n³`` FLOPs per product, median over
repeats. ``step_flops`` counts the work a KD step *must* do, whatever the implementation:

- student forward + backward over every token: ``6 · N_body · tokens`` (weight matmuls, the
  usual 6N rule with N = non-embedding, non-head parameters) plus causal attention
  ``3 · 2 · n_heads·head_dim · seq_len²`` per layer and sequence (scores and values, half the
  square each, forward ×1 + backward ×2);
- student head at loss positions, forward + backward: ``6 · V · H_s`` per loss token;
- teacher forward over every token: ``2 · N_body · tokens`` plus its attention
  ``2 · n_heads·head_dim · seq_len²`` per layer and sequence; no teacher head;
- teacher-logit rebuild at loss positions: ``2 · V · H_t`` per loss token (kdflow rebuilds
  teacher logits from hidden states; a logits-shipping design does the same product on the
  teacher side).

Softmax, divergence and optimizer work are O(V) or O(N) per token and left out (a few %).
A run's achieved rate is ``step_flops / step time`` and is compared with the fp32 matmul rate
(:func:`percent_of_peak`). Embedding lookups cost no FLOPs; tied heads count once as heads.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path


def measure_matmul(dtype: str = "float32", n: int = 4096, repeats: int = 5, min_seconds: float = 0.3) -> dict:
    """GFLOP/s of ``[n,n] @ [n,n]`` in ``dtype`` at torch's current thread count.

    Each repeat times enough back-to-back products to last ``min_seconds`` (timer noise stays
    well under 1%). Returns ``{"dtype", "n", "threads", "gflops": [per repeat], "median"}``.
    """
    import torch

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dt)
    b = torch.randn(n, n, generator=gen).to(dt)
    out = torch.empty(n, n, dtype=dt)
    torch.mm(a, b, out=out)  # warm-up: first call sets up kernels and faults the output pages
    t0 = time.perf_counter()
    torch.mm(a, b, out=out)
    per = max(time.perf_counter() - t0, 1e-6)
    k = max(1, int(min_seconds / per + 0.999))
    gflops = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(k):
            torch.mm(a, b, out=out)
        gflops.append(2.0 * n**3 * k / (time.perf_counter() - t0) / 1e9)
    return {"dtype": dtype, "n": n, "threads": torch.get_num_threads(), "gflops": gflops,
            "median": statistics.median(gflops)}


def measure_all(dtypes: tuple[str, ...] = ("float32", "bfloat16"), n: int = 4096, repeats: int = 5) -> dict:
    """``measure_matmul`` for each dtype (a benchmark child entry point)."""
    return {dt: measure_matmul(dt, n=n, repeats=repeats) for dt in dtypes}


@dataclass(frozen=True)
class Dims:
    """What the FLOP count needs from a decoder-only config."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Dims":
        """From a ``config.json`` mapping (Llama / Qwen / Mistral style keys)."""
        h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
        return cls(hidden=h, layers=cfg["num_hidden_layers"], intermediate=cfg["intermediate_size"], heads=heads,
                   kv_heads=cfg.get("num_key_value_heads") or heads,
                   head_dim=cfg.get("head_dim") or h // heads, vocab=cfg["vocab_size"])

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "Dims":
        return cls.from_config(json.loads((Path(folder) / "config.json").read_text()))

    @property
    def body_params(self) -> int:
        """Weight-matrix parameters of the decoder layers (no embedding, head or norms)."""
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        mlp = 3 * self.hidden * self.intermediate  # gate, up, down (SwiGLU)
        return self.layers * (q + kv + o + mlp)

    def attention_fwd(self, seq_len: int) -> float:
        """Causal attention FLOPs of one forward over one sequence (scores + weighted values)."""
        return self.layers * 2.0 * self.heads * self.head_dim * seq_len * seq_len


def step_flops(student: Dims, teacher: Dims, batch: int, seq_len: int, loss_tokens: int | None = None) -> dict:
    """Useful FLOPs of one off-policy KD step (see the module docstring), by component and total."""
    if student.vocab != teacher.vocab:
        raise ValueError(f"step_flops counts a same-vocabulary step; student V={student.vocab}, teacher V={teacher.vocab}")
    tokens = batch * seq_len
    loss_tokens = batch * (seq_len - 1) if loss_tokens is None else loss_tokens
    parts = {
        "student_body": 6.0 * student.body_params * tokens + 3.0 * batch * student.attention_fwd(seq_len),
        "student_head": 6.0 * student.vocab * student.hidden * loss_tokens,
        "teacher_body": 2.0 * teacher.body_params * tokens + batch * teacher.attention_fwd(seq_len),
        "teacher_logits": 2.0 * teacher.vocab * teacher.hidden * loss_tokens,
    }
    parts["total"] = sum(parts.values())
    return parts


def achieved_gflops(flops_per_step: float, seconds_per_step: float) -> float:
    return flops_per_step / seconds_per_step / 1e9


def percent_of_peak(flops_per_step: float, seconds_per_step: float, peak_gflops: float) -> float:
    """Achieved FLOP rate of a step as a percentage of the machine's matmul rate."""
    return 100.0 * achieved_gflops(flops_per_step, seconds_per_step) / peak_gflops


if __name__ == "__main__":
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    for dt, r in measure_all().items():
        print(f"{dt}: {r['median']:.1f} GFLOP/s at {r['threads']} threads (n={r['n']}, "
              f"{min(r['gflops']):.1f}–{max(r['gflops']):.1f})")
