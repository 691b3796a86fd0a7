"""Whole-model weights out of a (possibly FSDP2-sharded) student and into an engine: the rollout
engine's student copy (:class:`kdcore.training.sampler.RolloutSampler`), the teacher of
self-distillation (``teacher.self_distill_every``) and the EMA teacher (:mod:`kdcore.training.ema`).
"""

from __future__ import annotations

import torch

from kdcore.modeling import lora
from kdcore.engines.protocol import RolloutError


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full (unsharded) weights of a possibly FSDP2-sharded model, on **every** rank.

    Collective under FSDP2 (every rank calls it at the same point). Tensors are detached and
    may alias the model's own storage when nothing had to be gathered: copy them before the
    next optimizer step if they must outlive it. Tied weights are gathered once and appear
    under each of their names. Non-persistent buffers (rotary ``inv_freq``) are not included.
    """
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            key = id(t)
            if key not in gathered:
                gathered[key] = (t.full_tensor() if isinstance(t, DTensor) else t).detach()
            out[name] = gathered[key]
    # a LoRA student hands out merged weights under the base model's names (what engines load)
    return lora.merge_lora_weights(model, out) if lora.is_lora_model(model) else out


def head_name(model: torch.nn.Module) -> str:
    """The state-dict name of the model's output projection weight (lm_head, or the tied embedding)."""
    model = lora.unwrap(model)  # a LoRA student's names as in its merged weights (full_weights)
    head = model.get_output_embeddings().weight
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is head:
            return name
    raise RolloutError(f"{type(model).__name__}: cannot find the lm_head weight among its parameters")


def sync_teacher(engine, model: torch.nn.Module, *, dtype: torch.dtype, device) -> torch.Tensor:
    """Self-distillation: copy the student's full weights into the teacher engine (every rank
    into its own engine; collective under FSDP) and return the new teacher head ``[V, H]``
    (a copy in ``dtype`` on ``device``) for the student side of the loss."""
    return push_teacher_weights(engine, full_weights(model), head_name(model), dtype=dtype, device=device)


def push_teacher_weights(engine, weights: dict[str, torch.Tensor], head_key: str, *, dtype: torch.dtype,
                         device) -> torch.Tensor:
    """Load full ``weights`` into the teacher engine (self-distillation, an EMA teacher) and
    return the teacher head they hold in ``dtype`` on ``device``: the head the engine holds in
    this process (``inline``), which the update has just written, where it is in that dtype and
    on that device; otherwise a copy."""
    engine.update_weights(weights)
    held = engine.resident_head()
    if held is not None and held.dtype == dtype and held.device == torch.device(device):
        return held
    return weights[head_key].to(device=device, dtype=dtype, copy=True)


def check_self_distill(student_config, teacher_config, *, setting: str = "teacher.self_distill_every",
                       error: type[Exception] = RolloutError) -> None:
    """Self-distillation (``setting``: the recipe key that asks for it) copies the student into
    the teacher by name: same architecture required, else ``error``."""
    keys = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    diff = [f"{k} {getattr(student_config, k, None)} vs {getattr(teacher_config, k, None)}" for k in keys
            if getattr(student_config, k, None) != getattr(teacher_config, k, None)]
    if diff:
        raise error(f"{setting} needs the student to have the teacher's architecture "
                           f"(student.init: pretrained from the teacher); student vs teacher: {', '.join(diff)}")


__all__ = ["full_weights", "head_name", "sync_teacher", "push_teacher_weights", "check_self_distill"]
