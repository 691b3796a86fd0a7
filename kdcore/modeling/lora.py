"""LoRA students: the recipe's ``student.lora`` section applied with peft (imported only when on).

:func:`apply_lora` wraps the built student with ``peft.get_peft_model`` before FSDP2 sharding.
Only the adapter matrices require gradients, so the optimizer (which skips frozen parameters)
holds only them; FSDP2 shards each decoder layer with its frozen base weights and trainable
adapters in one unit (mixed ``requires_grad`` within a unit works: frozen parameters are
gathered for forward and get no gradient to reduce-scatter).

Checkpoints of a LoRA student hold the adapters and their optimizer state only: the frozen base
is rebuilt from the recipe on resume, and the resume comparison refuses any change of
``student.*``. The export writes the merged model (plain transformers) and the adapter folder
(``PeftModel.from_pretrained``), both built on rank 0 from a gathered, unsharded copy.

The decoder stack and head of the wrapped model are found through :func:`unwrap`, so the loss
driver's ``student_hidden``/``student_head_weight`` see the base model's modules. The head and
the embedding cannot be adapted: the loss driver multiplies by the head weight directly.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

from torch import nn

ADAPTER_NAME = "default"  # peft's name for a model's single adapter


def lora_enabled(lora_cfg) -> bool:
    return lora_cfg is not None and bool(getattr(lora_cfg, "enabled", False))


def is_lora_model(model: nn.Module) -> bool:
    """True for a peft-wrapped student (without importing peft: unloaded, it wraps nothing)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def unwrap(model: nn.Module) -> nn.Module:
    """The causal LM inside a peft wrapper (the model itself otherwise)."""
    return model.get_base_model() if is_lora_model(model) else model


def _import_peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError("student.lora.enabled needs the peft package: pip install 'kdflow[lora]'") from exc
    return peft


def check_lora_section(lora_cfg) -> None:
    """One-line ``ValueError`` for a value peft would reject late or silently misuse."""
    r, alpha, dropout = lora_cfg.r, lora_cfg.alpha, lora_cfg.dropout
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"student.lora.r must be an integer >= 1 when LoRA is enabled, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"student.lora.alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"student.lora.dropout must be within [0, 1), got {dropout!r}")
    targets = list(lora_cfg.target_modules or [])
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"student.lora.target_modules must be a non-empty list of module names, got {targets!r}")


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    fixed = {n for n, m in model.named_modules() if m is head or m is embed}
    linear_leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                            if isinstance(m, nn.Linear) and n not in fixed})
    for t in targets:
        hits = [n for n in names if n == t or n.endswith("." + t)]
        if not hits:
            raise ValueError(f"student.lora.target_modules: '{t}' matches no module of {type(model).__name__} "
                             f"(its adaptable linear layers: {', '.join(linear_leaves)})")
        if any(n in fixed for n in hits):
            raise ValueError(f"student.lora.target_modules: '{t}' is the embedding or lm_head, which cannot be "
                             "adapted (the loss driver multiplies by the head weight directly)")


def apply_lora(model: nn.Module, lora_cfg) -> nn.Module:
    """``model`` wrapped with fresh LoRA adapters from the ``student.lora`` section (validated
    first; every error one line naming the key). Adapters are initialised from torch's global
    RNG, which the caller seeds identically on every rank."""
    check_lora_section(lora_cfg)
    targets = list(lora_cfg.target_modules)
    _check_targets(model, targets)
    peft = _import_peft()
    config = peft.LoraConfig(r=int(lora_cfg.r), lora_alpha=float(lora_cfg.alpha),
                             lora_dropout=float(lora_cfg.dropout), target_modules=targets,
                             bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config, adapter_name=ADAPTER_NAME)


# --------------------------------------------------------------------------------------------
# merged weights (rollout engines and self-distillation take the student's weights by name)

_PEFT_PREFIX = "base_model.model."  # where a PeftModelForCausalLM keeps the wrapped model


def merge_lora_weights(model: nn.Module, weights: dict) -> dict:
    """``weights`` (the peft ``model``'s full state, peft names) with each adapter merged into
    its base weight, ``W + scaling * B @ A``, under the base model's own names: what a plain
    copy of the model (a rollout engine, a self-distilled teacher) loads."""
    out = dict(weights)
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if not isinstance(lora_a, nn.ModuleDict) or ADAPTER_NAME not in lora_a:
            continue
        if getattr(module, "fan_in_fan_out", False):
            raise NotImplementedError(f"LoRA merge: {name} stores its weight transposed (fan_in_fan_out)")
        base_key = f"{name}.base_layer.weight"
        a = out.pop(f"{name}.lora_A.{ADAPTER_NAME}.weight")
        b = out.pop(f"{name}.lora_B.{ADAPTER_NAME}.weight")
        w = out.pop(base_key)
        delta = (b.float() @ a.float()) * float(module.scaling[ADAPTER_NAME])
        out[f"{name}.weight"] = (w.float() + delta).to(w.dtype)
        if f"{name}.base_layer.bias" in out:
            out[f"{name}.bias"] = out.pop(f"{name}.base_layer.bias")
    return {k[len(_PEFT_PREFIX):] if k.startswith(_PEFT_PREFIX) else k: v for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# export (rank 0, from a full state dict)


def merge_for_export(model: nn.Module, full_sd: dict, adapter_dir: str | os.PathLike, *, write_folder) -> dict:
    """Rebuild an unsharded copy of the peft ``model`` from its gathered ``full_sd``, write its
    adapter folder to ``adapter_dir`` through ``write_folder(out, save)`` (the export's atomic
    folder writer), and return the merged base model's state dict (plain transformers names).
    Rank 0 only; ``model`` may be FSDP2-sharded."""
    import torch
    from transformers import AutoModelForCausalLM

    peft = _import_peft()
    base = unwrap(model)
    cfg = type(base.config).from_dict(base.config.to_dict())
    with torch.device("meta"):  # weights come from full_sd; no random init of a throwaway copy
        skeleton = AutoModelForCausalLM.from_config(cfg)
    lora_config = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    lora_config.inference_mode = False  # keep the adapters as parameters until merged
    twin = peft.get_peft_model(skeleton, lora_config, adapter_name=ADAPTER_NAME)
    _, unexpected = twin.load_state_dict(full_sd, strict=False, assign=True)
    twin.get_base_model().tie_weights()
    still_meta = [n for n, p in twin.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise RuntimeError(f"LoRA export: the gathered state does not fit a rebuilt {type(base).__name__}: "
                           f"missing {still_meta[:5]}, unexpected {unexpected[:5]}")
    # the adapter folder before merging: merge_and_unload folds the adapters into the base
    write_folder(Path(adapter_dir), lambda tmp: twin.save_pretrained(str(tmp), safe_serialization=True))
    merged = twin.merge_and_unload()
    return merged.state_dict()
