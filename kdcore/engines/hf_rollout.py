"""The ``hf`` rollout engines: a student copy generating with transformers, and the teacher engine.

:class:`HFRolloutEngine` is an unsharded copy of the student, built from the student's config in
the trainer process, generating on the student's device; under FSDP2 every rank keeps its own
copy and samples its own prompts (the sampler gathers full weights on every rank).
:class:`TeacherRolloutEngine` samples through a teacher engine's own ``generate`` (SeqKD's
teacher samples; the sampler builds it around the running teacher).
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Mapping, Optional

import torch

from kdcore.engines.protocol import (RolloutEngine, RolloutError, check_generate, check_sampling, finish_generations,
                                     token_limits)


class HFRolloutEngine(RolloutEngine):
    """An unsharded copy of the student (same config), generating with transformers.

    Args:
        config: the student's ``transformers`` config (copied; the KV cache is switched on).
        device: where the copy lives and generates (the student's device).
        dtype: weights' dtype; float32 keeps samples exactly those of the fp32 master weights.
        threads: torch intra-op threads while generating (None = leave as is). The trainer
            passes all of the rank's cores: while the student samples, the teacher is idle.
    """

    def __init__(self, config, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 threads: Optional[int] = None):
        from transformers import AutoModelForCausalLM

        from kdcore.student import _transformers_dtype_kw  # the one torch_dtype=/dtype= version shim

        cfg = type(config).from_dict(config.to_dict())
        if hasattr(cfg, "quantization_config"):  # GGUF-loaded configs carry it; the copy is plain
            del cfg.quantization_config
        cfg.use_cache = True  # generation without a KV cache is quadratic
        self.device = torch.device(device)
        self.dtype = dtype
        self.threads = threads
        # the seed only makes the (immediately overwritten) random init reproducible
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.model = AutoModelForCausalLM.from_config(cfg, **_transformers_dtype_kw(dtype))
        self.model.to(self.device).eval().requires_grad_(False)
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
        with _threads(self.threads), torch.random.fork_rng(devices=_rng_devices(self.device)), torch.inference_mode():
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


__all__ = ["HFRolloutEngine", "TeacherRolloutEngine"]
