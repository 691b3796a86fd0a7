"""The ``hf`` teacher's model and what is done with it, wherever it runs.

:class:`TeacherModel` loads a transformers teacher and answers the three kinds of work a teacher
engine is asked for: last hidden states, generation and weight updates. The ``hf`` engine's
child process (:mod:`kdcore.engines.hf.child`) wraps it in a queue loop and writes the states
into shared-memory slots; the ``inline`` engine (:mod:`kdcore.engines.hf.inline`) calls it in the
trainer's own process. One class, so that both engines compute the same numbers.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch

from kdcore.engines.protocol import HiddenRequest, TeacherError
from kdcore.modeling import models
from kdcore.modeling.vision import backbone, is_vision_model, model_inputs


def decoder_layers(decoder: torch.nn.Module) -> list[torch.nn.Module]:
    layers = getattr(decoder, "layers", None)
    if isinstance(layers, torch.nn.ModuleList):
        return list(layers)
    lists = [m for m in decoder.modules() if isinstance(m, torch.nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def resolve_device(device: str) -> str:
    """``cpu`` or ``cuda:<index>``. A bare ``cuda`` (or ``auto``) gets this process's current
    device index (LOCAL_RANK's, which :func:`kdcore.infra.distributed.init_distributed` sets): the
    channel is allocated here and the spawned child, whose own current device is 0, must put
    the model on the same GPU (the inline engine: the trainer's own GPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TeacherError(f"teacher device '{device}' asked for, but CUDA is not available here")
    if device == "cuda":
        device = f"cuda:{torch.cuda.current_device()}"
    return device


class TeacherModel:
    """A loaded teacher: ``model``, its ``decoder`` (the backbone without ``lm_head``), ``vision``
    (a vision-language model), ``hidden_size``, ``vocab_size`` and ``folder`` (the converted
    folder of a GGUF teacher, else None)."""

    def __init__(self, spec: str, *, dtype: Any, device: str = "cpu", cache_dir: Optional[str] = None,
                 attn_implementation: Optional[str] = None):
        path, converted = models.loadable_path(spec, cache_dir)
        self.folder = path if converted else None
        self.model = models.load_causal_lm(self.folder or spec, dtype=dtype, device=device)
        if attn_implementation:
            self.model.set_attn_implementation(attn_implementation)
        self.dtype = dtype
        self.device = device
        self.vision = is_vision_model(self.model)
        self.decoder = backbone(self.model)  # a VL model's whole backbone: vision tower, projector, language model
        self.hidden_size = int(self.model.config.get_text_config().hidden_size)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])

    def last_hidden(self, ids: torch.Tensor, mask: torch.Tensor,
                    vision: Optional[Mapping[str, torch.Tensor]] = None) -> torch.Tensor:
        """``[B, L, H]`` last hidden states (after the final norm) of a padded batch on the
        model's device. Text: position ids from the mask, so left padding gives the states of no
        padding. Vision: right-padded; the model makes its own multimodal positions. The caller
        picks the grad mode."""
        if self.vision:
            extra = model_inputs(dict(vision or {}), self.device, self.dtype)
        else:
            extra = {"position_ids": (mask.cumsum(-1) - 1).clamp_(min=0)}
        return self.decoder(input_ids=ids, attention_mask=mask, use_cache=False, **extra).last_hidden_state

    def generate(self, ids: torch.Tensor, mask: torch.Tensor, kw: dict) -> list[list[int]]:
        """New token ids per sample (up to and including the first EOS); ``kw`` as
        :meth:`kdcore.engines.hf.teacher.HFTeacher.generate` takes them."""
        on_device = self.device if self.device != "cpu" else None
        return generate(self.model, ids, mask, kw, on_device, greedy_loop=not self.vision)

    def update(self, named: Iterable[tuple[str, torch.Tensor]]) -> tuple[Optional[str], int]:
        """Copy each ``(name, values)`` into the parameter or buffer of that name: ``(None, count)``,
        or ``(error, 0)`` naming unknown names or wrong shapes, with nothing changed."""
        named = list(named)
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(dict(self.model.named_buffers(remove_duplicate=False)))
        unknown = [n for n, _ in named if n not in targets]
        if unknown:
            return (f"update_weights: the teacher has no parameter or buffer named {', '.join(unknown[:5])}"
                    + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else "")), 0
        bad = [f"{n} {tuple(v.shape)} vs {tuple(targets[n].shape)}" for n, v in named
               if tuple(targets[n].shape) != tuple(v.shape)]
        if bad:
            return f"update_weights: shape mismatch for {', '.join(bad[:5])}", 0
        with torch.no_grad():
            for name, values in named:
                targets[name].copy_(values)
        return None, len(named)


def image_inputs(request: HiddenRequest, mask: torch.Tensor, *, vision_teacher: bool,
                 spec: str) -> Optional[dict[str, torch.Tensor]]:
    """A request's pixel inputs, checked against the teacher (both engines refuse alike): None
    for a text request; a text teacher or a left-padded batch with images is refused."""
    if not request.vision:
        return None
    if not vision_teacher:
        raise TeacherError(f"teacher '{spec}' is a text model but the request carries image inputs")
    if bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise TeacherError("a request with image inputs must be right-padded (the model computes "
                           "its own multimodal positions)")
    return dict(request.vision)


def generate(model, ids: torch.Tensor, mask: torch.Tensor, kw: dict, device: Optional[str], *,
             greedy_loop: bool = True) -> list[list[int]]:
    # Batched generation needs left padding: re-pad each prompt's real tokens to the right edge.
    gen_cfg = model.generation_config
    eos = kw.get("eos_token_id")
    if eos is None:
        eos = gen_cfg.eos_token_id
    eos_set = set(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    pad = gen_cfg.pad_token_id if gen_cfg.pad_token_id is not None else (min(eos_set) if eos_set else 0)
    rows = [ids[b][mask[b].bool()] for b in range(ids.shape[0])]
    if greedy_loop and not kw["do_sample"]:
        # kdcore eval's teacher answers: the same tokens as generate, rows leaving as they stop
        # (kdcore.engines.greedy); a VL model makes its own multimodal positions, so it keeps generate
        from kdcore.engines.greedy import greedy_answers

        return greedy_answers(model, [r.tolist() for r in rows], max_new_tokens=kw["max_new_tokens"],
                              eos_ids=sorted(eos_set), rows=len(rows), pad_id=pad, device=device or "cpu")
    L = max(len(r) for r in rows)
    left = torch.full((len(rows), L), pad, dtype=torch.int64)
    lmask = torch.zeros((len(rows), L), dtype=torch.int64)
    for b, r in enumerate(rows):
        left[b, L - len(r):] = r
        lmask[b, L - len(r):] = 1
    if device:
        left, lmask = left.to(device), lmask.to(device)
    if kw.get("seed") is not None:
        torch.manual_seed(int(kw["seed"]))
    sample = kw["do_sample"]
    extra = {"temperature": kw["temperature"], "top_p": kw["top_p"], "top_k": kw["top_k"]} if sample else {}
    with torch.inference_mode():
        out = model.generate(input_ids=left, attention_mask=lmask, max_new_tokens=kw["max_new_tokens"],
                             do_sample=sample, pad_token_id=pad, eos_token_id=list(eos_set) or None, **extra)
    result = []
    for seq in out[:, L:].tolist():
        cut = next((i + 1 for i, t in enumerate(seq) if t in eos_set), len(seq))
        result.append(seq[:cut])
    return result


__all__ = ["TeacherModel", "decoder_layers", "generate", "image_inputs", "resolve_device"]
