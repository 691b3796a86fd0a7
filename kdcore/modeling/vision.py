"""Vision-language models: the few places where a VL model differs from a causal LM.

Everything else in kdcore treats a VL model as a causal LM whose forward takes a few more
tensors (the processor's pixel inputs). A model is VL when its config has a
``vision_config``; then:

- it loads with ``AutoModelForImageTextToText`` (:func:`model_class`);
- its last hidden states come from the *whole* backbone ``model.model`` (vision tower,
  projector, language model), not from ``get_decoder()``, which is the language model alone and
  would read image tokens as text (:func:`backbone`);
- its decoder layers are the language model's (:func:`language_layers`), which FSDP2 wraps like
  a causal LM's; the vision tower's blocks (:func:`vision_blocks`) are wrapped too when trained;
- ``student.train_vision: false`` freezes the vision tower (:func:`freeze_vision`); the
  projector stays trained, since it is what maps the frozen features into the student.

The data side (images, the processor, image tokens out of the loss) is
:mod:`kdcore.data.images`.
"""

from __future__ import annotations

from typing import Any

_VISION_ATTRS = ("vision_tower", "visual", "vision_model")


def is_vision_config(cfg: Any) -> bool:
    return getattr(cfg, "vision_config", None) is not None


def model_class(cfg: Any):
    """The auto class that builds a model of this config."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_config(cfg) else AutoModelForCausalLM


def is_vision_model(model: Any) -> bool:
    return is_vision_config(getattr(model, "config", None))


def backbone(model: Any):
    """The module whose ``last_hidden_state`` is after the final norm: the decoder of a causal
    LM, the whole ``model.model`` of a VL model."""
    return model.model if is_vision_model(model) else model.get_decoder()


def language_layers(base: Any):
    """The decoder layer list of a VL model's ``model.model`` (None when it has none there)."""
    lm = getattr(base, "language_model", None)
    return getattr(lm, "layers", None)


def vision_tower(model: Any):
    base = getattr(model, "model", model)
    for name in _VISION_ATTRS:
        tower = getattr(base, name, None)
        if tower is not None:
            return tower
    return None


def vision_blocks(model: Any) -> list:
    """The vision tower's transformer blocks (its longest module list), [] for a text model."""
    import torch

    tower = vision_tower(model)
    if tower is None:
        return []
    lists = [m for m in tower.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def freeze_vision(model: Any) -> int:
    """Stop training the vision tower; returns how many parameters were frozen (0: no tower)."""
    tower = vision_tower(model)
    if tower is None:
        return 0
    n = 0
    for p in tower.parameters():
        p.requires_grad_(False)
        n += p.numel()
    return n


def model_inputs(vision: dict | None, device, dtype=None) -> dict:
    """A micro-batch's pixel inputs on ``device``; floating tensors in the compute ``dtype``."""
    if not vision:
        return {}
    return {k: v.to(device=device, dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in vision.items()}


def allow_processors() -> None:
    """Let transformers build processors when ``MistralCommonBackend`` cannot be imported.

    transformers 5.24 checks a processor's tokenizer against ``(PreTrainedTokenizerBase,
    MistralCommonBackend)`` and resolving the second name raises when mistral-common's optional
    dependencies (jsonschema) are missing, so *every* processor fails to build; the check only
    needs the classes that exist."""
    import transformers
    from transformers import processing_utils

    mapping = processing_utils.MODALITY_TO_BASE_CLASS_MAPPING
    names = mapping.get("tokenizer")
    if not isinstance(names, tuple) or "MistralCommonBackend" not in names:
        return
    try:
        transformers.MistralCommonBackend  # noqa: B018 - the import is the test
    except Exception:
        mapping["tokenizer"] = tuple(n for n in names if n != "MistralCommonBackend")


__all__ = ["allow_processors", "backbone", "freeze_vision", "is_vision_config", "is_vision_model",
           "language_layers", "model_class", "model_inputs", "vision_blocks", "vision_tower"]
