"""Batched greedy decoding with a KV cache: ``kdcore eval``'s answers, the student's and the teacher's.

:func:`greedy_answers` continues many prompts at once: prompts sorted by length (less padding),
cut into batches of ``rows``, each batch left-padded (every row's next token in the last column)
with position ids counted over the real tokens only, one prefill that keeps only the last
position's logits, then one cached decoding step per token. A row leaves the batch (its cache
rows dropped) as soon as it emits a stop id or reaches its limit, so the long answers do not
make the short ones pay for padding steps.

Why not transformers' ``generate``: ``kdcore eval`` ran it in batches of ``micro_batch_size``
rows, and for the quickstart's models a decoding step is mostly per-step overhead (the
4-layer student's step is its 49152-wide head); fewer, wider steps are what pays. The answers
are the ones ``generate`` gives for each prompt alone (tests/unit/test_greedy.py, token for
token on a tiny model with prompts of different lengths).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import torch

# rows x (longest prompt + new tokens) per batch: the KV cache of the quickstart's teacher
# (30 layers, 3 KV heads of 64, fp32) is 46 KB a token, so this is ~0.75 GB at most
GENERATION_TOKENS = 16384


def batch_rows(prompt_lengths: Sequence[int], max_new_tokens: int, *, at_least: int = 1,
               budget: int = GENERATION_TOKENS) -> int:
    """How many prompts to continue at once: as many as ``budget`` tokens of cache hold (at least
    ``at_least``, e.g. the micro-batch size that evaluation already holds in memory)."""
    longest = max(prompt_lengths, default=1) + max_new_tokens
    return max(at_least, budget // max(longest, 1), 1)


def greedy_answers(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_ids: Sequence[int] = (),
                   rows: int, pad_id: int = 0, device=None,
                   on_batch: Optional[Callable[[int, int], None]] = None) -> list[list[int]]:
    """The greedy continuation of every prompt (token ids), in the prompts' order, each up to
    and including its first stop id in ``eos_ids``, at most ``max_new_tokens`` long.

    ``model``: a causal LM in eval mode (``transformers``, taking ``attention_mask``,
    ``position_ids``, ``past_key_values``). ``on_batch(prompts_done, tokens)`` after each batch."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot continue an empty prompt")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    eos = {int(e) for e in eos_ids}
    keep_last, cache_kw = _forward_kwargs(model)
    for start in range(0, len(order), max(1, rows)):
        chunk = order[start:start + max(1, rows)]
        answers = _greedy_batch(model, [list(map(int, prompts[i])) for i in chunk], max_new_tokens, eos, pad_id,
                                device, keep_last, cache_kw)
        for i, a in zip(chunk, answers):
            out[i] = a
        if on_batch is not None:
            on_batch(len(chunk), sum(len(a) for a in answers))
    return out


def _forward_kwargs(model) -> tuple[bool, str]:
    """Whether the forward can keep only the last position's logits (the prefill needs one
    position, not [rows, width, vocab]: 3 GB for 64 x 256 x 49152), and the name of its cache
    argument (transformers 5 renames ``past_key_values`` to ``cache``; 4.x knows only the former)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False, "past_key_values"
    return "logits_to_keep" in params, "cache" if "cache" in params else "past_key_values"


def _cache_of(out):
    """The output's KV cache: ``cache`` in transformers 5 (``past_key_values`` there only warns),
    ``past_key_values`` before."""
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


@torch.inference_mode()
def _greedy_batch(model, prompts: list[list[int]], max_new: int, eos: set[int], pad_id: int, device,
                  keep_last: bool, cache_kw: str) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    # positions count real tokens only: a left-padded row starts at 0 like the same prompt alone
    positions = (mask.cumsum(-1) - 1).clamp_(min=0)
    extra = {"logits_to_keep": 1} if keep_last else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
    cache = _cache_of(out)
    logits = out.logits[:, -1]
    next_pos = positions[:, -1:] + 1
    alive = list(range(len(prompts)))  # the batch's rows, by index into prompts
    answers: list[list[int]] = [[] for _ in prompts]
    while True:
        tokens = logits.argmax(-1)
        keep = []
        for j, (row, t) in enumerate(zip(alive, tokens.tolist())):
            answers[row].append(t)
            if t not in eos and len(answers[row]) < max_new:
                keep.append(j)
        if not keep:
            return answers
        if len(keep) < len(alive):  # finished rows leave: no more steps spent on them
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, tokens, next_pos = mask[index], tokens[index], next_pos[index]
            alive = [alive[j] for j in keep]
        mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=next_pos, use_cache=True,
                    **{cache_kw: cache})
        cache, logits = _cache_of(out), out.logits[:, -1]
        next_pos = next_pos + 1


__all__ = ["GENERATION_TOKENS", "batch_rows", "greedy_answers"]
