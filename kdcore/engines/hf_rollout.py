"""The ``hf`` rollout engines: a student copy generating with transformers, and the teacher engine.

:class:`HFRolloutEngine` is an unsharded copy of the student, built from the student's config in
the trainer process, generating on the student's device; under FSDP2 every rank keeps its own
copy and samples its own prompts (the sampler gathers full weights on every rank).
:class:`TeacherRolloutEngine` samples through a teacher engine's own ``generate`` (SeqKD's
teacher samples; the sampler builds it around the running teacher).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Mapping, Optional

import torch
from torch import nn

from kdcore.engines.protocol import (RolloutEngine, RolloutError, check_generate, check_sampling, finish_generations,
                                     token_limits)
from kdcore.modeling.models import cpu_vendor
from kdcore.modeling.student import _transformers_dtype_kw


@dataclass(frozen=True)
class CpuDecodePlan:
    """How a CPU copy of the student decodes: the layout of its linear layers and its threads."""

    matvec: bool  # every nn.Linear as DecodeLinear (W · xᵀ) instead of torch's x · Wᵀ
    threads: Optional[int]  # intra-op threads while generating; None: the process's own


def cpu_decode_plan(vendor: Optional[str] = None) -> CpuDecodePlan:
    """The fastest measured decoding layout for this CPU's vendor (``vendor``: a ``vendor_id``,
    default this machine's). Fixed per machine, never timed at start-up: the layout changes the
    products' rounding, so a timing race would make a seed's samples depend on the machine's load.

    torch's CPU wheels multiply fp32 through Intel MKL, which picks its kernels by CPU vendor. A few
    rows times a weight (every decoding step) measured, in the bench's on-policy row:
    - AMD EPYC (2026-12-01): ``x · Wᵀ`` up to 5x slower than ``W · xᵀ``, and one thread beat two
      (the sampling share of a step: 0.98 -> 0.36 s with W · xᵀ on one thread); again on an AMD EPYC
      (family 25 model 17, 2026-12-07, current code; 2 runs x 3 steps each, quiet): W · xᵀ on one
      thread 1.41 s/step (sampling 0.61 s), on two 1.45 (0.70), x · Wᵀ on two 2.16 (1.35);
    - Intel Xeon with AMX (2026-12-06): ``x · Wᵀ`` on the trainer's threads fastest, 1.62 s/step
      against 1.88 for W · xᵀ on one thread (x · Wᵀ on one thread 1.89, W · xᵀ on two 1.84).
    The Intel rule was measured on that Xeon only; other vendors were not measured and keep the
    AMD plan."""
    vendor = cpu_vendor() if vendor is None else vendor
    if vendor == "GenuineIntel":
        return CpuDecodePlan(matvec=False, threads=None)
    return CpuDecodePlan(matvec=True, threads=1)


class HFRolloutEngine(RolloutEngine):
    """An unsharded copy of the student (same config), generating with transformers.

    Args:
        config: the student's ``transformers`` config (copied; the KV cache is switched on).
        device: where the copy lives and generates (the student's device).
        dtype: weights' dtype; float32 keeps samples exactly those of the fp32 master weights.
        threads: torch intra-op threads while generating (None: the CPU plan's, or as is on an
            accelerator).
        plan: on CPU, the layout and threads (default :func:`cpu_decode_plan` for this machine).

    On CPU ``generate`` draws tokens with :func:`sample_one` (the same distribution, 30x cheaper
    than ``torch.multinomial``), and the copy's linear layers become :class:`DecodeLinear` where
    the plan says so: the same products, laid out for the few rows a decoding step has.
    """

    def __init__(self, config, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 threads: Optional[int] = None, plan: Optional[CpuDecodePlan] = None):
        from transformers import AutoModelForCausalLM

        cfg = type(config).from_dict(config.to_dict())
        if hasattr(cfg, "quantization_config"):  # GGUF-loaded configs carry it; the copy is plain
            del cfg.quantization_config
        cfg.use_cache = True  # generation without a KV cache is quadratic
        self.device = torch.device(device)
        self.dtype = dtype
        self.plan = (plan or cpu_decode_plan()) if self.device.type == "cpu" else None
        self.threads = threads if threads is not None or self.plan is None else self.plan.threads
        # the seed only makes the (immediately overwritten) random init reproducible
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = AutoModelForCausalLM.from_config(cfg, **_transformers_dtype_kw(dtype))
        self.model.to(self.device).eval().requires_grad_(False)
        if self.plan is not None and self.plan.matvec:
            decode_linears(self.model)
        self._targets = self._named_tensors()
        self.version: Optional[int] = None  # optimizer step of the weights held (set by the sampler)

    def _named_tensors(self) -> dict[str, torch.Tensor]:
        named = dict(self.model.named_parameters(remove_duplicate=False))
        persistent = self.model.state_dict(keep_vars=True)  # non-persistent buffers (rotary) excluded
        named.update({k: v for k, v in persistent.items() if k not in named})
        return named

    def update_weights(self, state_dict: Mapping[str, torch.Tensor]) -> int:
        unknown = [k for k in state_dict if k not in self._targets]
        if unknown:
            raise RolloutError(f"rollout engine: the student copy has no tensor named {', '.join(unknown[:5])}"
                               + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
        missing = [k for k in self._targets if k not in state_dict]
        if missing:
            raise RolloutError(f"rollout engine: the weights lack {', '.join(missing[:5])}"
                               + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
                               + " (a partial sync would sample from a mix of two models)")
        bad = [f"{k} {tuple(v.shape)} vs {tuple(self._targets[k].shape)}" for k, v in state_dict.items()
               if tuple(v.shape) != tuple(self._targets[k].shape)]
        if bad:
            raise RolloutError(f"rollout engine: shape mismatch for {', '.join(bad[:5])}")
        with torch.no_grad():
            done: set[int] = set()
            for k, v in state_dict.items():
                t = self._targets[k]
                if id(t) in done:  # tied weights: one tensor under two names
                    continue
                t.copy_(v.detach().to(device=t.device, dtype=t.dtype))
                done.add(id(t))
        return len(state_dict)

    def generate(self, prompt_ids, *, max_new_tokens, temperature=1.0, top_p=1.0, n=1, eos_ids=(), seed=None):
        from transformers import GenerationConfig

        limits = check_generate(prompt_ids, max_new_tokens, temperature, top_p, n)
        if not limits:
            return []
        rows = [list(map(int, p)) for p in prompt_ids for _ in range(n)]
        eos = {int(e) for e in eos_ids}
        pad = min(eos) if eos else 0  # any id: padded positions are masked out
        width = max(len(r) for r in rows)
        # batched generation needs left padding (every row's next token at the same column)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[b, width - len(r):] = 1
        greedy = temperature == 0
        gen = GenerationConfig(
            max_new_tokens=max(limits), do_sample=not greedy, num_beams=1, use_cache=True,
            eos_token_id=sorted(eos) or None, pad_token_id=pad,
            **({} if greedy else {"temperature": float(temperature), "top_p": float(top_p), "top_k": 0}),
        )
        with _threads(self.threads), torch.random.fork_rng(devices=_rng_devices(self.device)), torch.inference_mode(), \
                _inverse_cdf_sampling(self.device):
            if seed is not None:
                torch.manual_seed(int(seed))
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=gen)
        return finish_generations(out[:, width:].tolist(), limits, eos)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]
        self._targets = {}


class TeacherRolloutEngine(RolloutEngine):
    """The teacher engine as a rollout engine: generation runs in the teacher's own process
    (SeqKD's teacher samples); ``update_weights`` is the engine's (self-distillation)."""

    def __init__(self, engine):
        self.engine = engine

    def update_weights(self, state_dict):
        return self.engine.update_weights(state_dict)

    def generate(self, prompt_ids, *, max_new_tokens, temperature=1.0, top_p=1.0, n=1, eos_ids=(), seed=None):
        check_sampling(temperature, top_p, n)
        if not prompt_ids:
            return []
        limits = [m for m in token_limits(max_new_tokens, len(prompt_ids)) for _ in range(n)]
        rows = [list(map(int, p)) for p in prompt_ids for _ in range(n)]
        width = max(len(r) for r in rows)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = 1
        eos = sorted({int(e) for e in eos_ids})
        greedy = temperature == 0
        out = self.engine.generate(ids, mask, max_new_tokens=max(limits), do_sample=not greedy,
                                   temperature=float(temperature) if not greedy else 1.0, top_p=float(top_p),
                                   top_k=0, seed=seed, eos_token_id=eos or None)
        return finish_generations(out, limits, set(eos))


class DecodeLinear(nn.Linear):
    """``nn.Linear`` that computes a few rows as ``W · xᵀ``: the same product, laid out for the
    matrix-vector kernel. Decoding multiplies every weight by a handful of rows per token, and
    on an AMD EPYC torch's ``x · Wᵀ`` for them was up to 5× slower (measured, 2 threads, fp32: a
    49152 × 256 head times 4 rows, 5.0 vs 1.1 ms; never slower for 1-128 rows at the shapes of
    the bench models). More rows take the usual path."""

    max_rows = 128  # the largest row count measured faster this way

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, x.shape[-1])
        if rows > self.max_rows or x.dtype != self.weight.dtype or torch.is_grad_enabled():
            return super().forward(x)
        flat = x.reshape(rows, x.shape[-1])
        out = (self.weight @ flat.T).T
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], self.weight.shape[0])


def decode_linears(model: nn.Module) -> int:
    """Turn every plain ``nn.Linear`` of ``model`` into a :class:`DecodeLinear` (same parameters,
    same names); returns how many. Only for an inference copy: gradients take the usual path."""
    n = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = DecodeLinear
            n += 1
    return n


def sample_one(probs: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One index per row of ``probs [B, V]`` (non-negative, rows need not sum to 1), drawn with
    probability proportional to its entry: the first index whose running sum (float64) exceeds
    ``u × total``, ``u`` uniform in [0, 1). Returns ``[B, 1]`` int64, like ``torch.multinomial(probs,
    1)``; an exact categorical sampler that draws one uniform per row instead of ``V``
    exponentials (``torch.multinomial`` on CPU: 2.95 ms for 4 × 49152; this: 0.09 ms)."""
    cum = probs.to(torch.float64).cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, generator=generator, device=probs.device)
    idx = torch.searchsorted(cum, u * cum[:, -1:], right=True)
    return idx.clamp_(max=probs.shape[-1] - 1)  # u·total can round up to the total itself


@contextlib.contextmanager
def _inverse_cdf_sampling(device: torch.device) -> Iterator[None]:
    """While transformers' ``generate`` samples (it calls ``torch.multinomial(probs, 1)`` once per
    token), draw with :func:`sample_one` instead; every other call is passed through. CPU
    only, and only inside the engine's own ``generate`` (the trainer samples from one thread)."""
    if device.type != "cpu":
        yield
        return
    original = torch.multinomial

    def multinomial(probs, num_samples, replacement=False, *, generator=None, out=None):
        if num_samples != 1 or probs.dim() != 2 or out is not None:
            return original(probs, num_samples, replacement, generator=generator, out=out)
        return sample_one(probs, generator)

    torch.multinomial = multinomial
    try:
        yield
    finally:
        torch.multinomial = original


@contextlib.contextmanager
def _threads(n: Optional[int]) -> Iterator[None]:
    if not n or n == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


__all__ = ["CpuDecodePlan", "DecodeLinear", "HFRolloutEngine", "TeacherRolloutEngine", "cpu_decode_plan",
           "decode_linears", "sample_one"]
