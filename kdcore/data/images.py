"""Rows with images: loading them, rendering a vision-language side with its processor, and
batching the pixel inputs.

A side (student or teacher) is *vision-language* when its tokenizer's folder holds a processor
(``processor_config.json`` / ``preprocessor_config.json``, see :func:`processor_for`). Such a
side renders ``messages`` rows with the **processor's** chat template, which places one image
token per image part, and the processor then expands each image token into the image's
feature tokens and computes the pixel tensors. A text-only side reads the same rows as text
(each message's text parts joined): the images are not loaded for it.

Offsets and loss positions (see :mod:`kdcore.data`): the row is first tokenized as rendered,
exactly as a text row; the processor's ids are then that sequence with tokens inserted where
the images go. Inserted tokens (and the image token itself) are markup: an empty span at the
content before them, never trained, and no position whose input is one of them is a loss
position. So image tokens never enter the loss, and offset aligners pair a VL side with any
other tokenizer on the text alone.

Bad images (a missing file, bytes PIL cannot read, a mode that is no colour image) make the row
a :class:`~kdcore.data.common.BadRow` whose reason names the image; the data report counts it
like any bad row.

Batching (:func:`collate_vision`): every tensor the processor returns besides the token-level
ones is per image along dim 0 (``pixel_values`` ``[images, C, H, W]`` for LLaVA-style models,
``[patches, D]`` with ``image_grid_thw`` ``[images, 3]`` for Qwen2-VL), so a micro-batch's are
the samples' concatenated in sample order, which is the order of the image tokens in the
right-padded batch.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from kdcore.distill.aligner import Tokenized
from kdcore.data.common import BadRow
from kdcore.data.rendering import tokenize_rows, _render, _render_chat, _tokenize_rendered
from kdcore.modeling.tokenizers import special_ids
from kdcore.modeling.vision import allow_processors

# modes that are a colour or grey image; anything else (CMYK, 16-bit, float) is refused rather
# than converted to something the model never saw
_MODES = ("RGB", "RGBA", "L", "LA", "P")
_TOKEN_LEVEL = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


@dataclass
class VisionInputs:
    """One sample's pixel inputs on one side: ``tensors`` (processor outputs, per image along
    dim 0) and ``end``, the position after the last image token (truncation may not cut it)."""

    tensors: dict[str, Any]
    end: int
    images: int


_PROCESSORS: dict[str, Any] = {}


def processor_for(tok):
    """The processor saved beside ``tok`` (its ``name_or_path`` folder), or None for a text
    tokenizer. Cached per folder."""
    where = str(getattr(tok, "name_or_path", "") or "")
    if not where or not os.path.isdir(where):
        return None
    if where not in _PROCESSORS:
        have = any(os.path.isfile(os.path.join(where, f)) for f in ("processor_config.json", "preprocessor_config.json"))
        _PROCESSORS[where] = load_processor(where) if have else None
    return _PROCESSORS[where]


def load_processor(where: str):
    """``AutoProcessor`` from a folder, with its tokenizer replaced by nothing else."""
    from transformers import AutoProcessor

    allow_processors()
    return AutoProcessor.from_pretrained(where)


def resolve_image_paths(norm: dict[str, Any], base: str | os.PathLike | None) -> dict[str, Any]:
    """Relative image paths of a normalised row are relative to the data file's folder."""
    if base is None or not norm.get("images"):
        return norm
    norm["images"] = [str(Path(base) / r) if isinstance(r, str) and not os.path.isabs(os.path.expanduser(r)) else r
                      for r in norm["images"]]
    return norm


def load_image(ref: Any, k: int):
    """Image ``k`` of a row as an RGB PIL image; :class:`BadRow` naming it when it cannot be."""
    from PIL import Image

    what = f"image {k}"
    try:
        if isinstance(ref, Image.Image):
            img = ref
        elif isinstance(ref, dict) and (ref.get("bytes") or ref.get("path")):  # a datasets Image value
            if ref.get("bytes"):
                img = Image.open(io.BytesIO(ref["bytes"]))
            else:
                what = f"image {k} ('{ref['path']}')"
                img = Image.open(os.path.expanduser(ref["path"]))
        elif isinstance(ref, (bytes, bytearray)):
            img = Image.open(io.BytesIO(bytes(ref)))
        elif isinstance(ref, str):
            what = f"image {k} ('{ref}')"
            if not os.path.isfile(os.path.expanduser(ref)):
                raise BadRow(f"{what}: no such file")
            img = Image.open(os.path.expanduser(ref))
        else:
            raise BadRow(f"{what}: expected a path, bytes or an Image value, got {type(ref).__name__}")
        img.load()
    except BadRow:
        raise
    except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise BadRow(f"{what}: cannot be read as an image ({type(exc).__name__}: {exc})") from exc
    if img.mode not in _MODES:
        raise BadRow(f"{what}: mode '{img.mode}' is not one of {', '.join(_MODES)}")
    return img.convert("RGB")


def tokenize_side(norms: Sequence[dict[str, Any]], tok) -> list[Tokenized | BadRow]:
    """:func:`~kdcore.data.rendering.tokenize_rows`, or the vision-language rendering when
    ``tok`` has a processor (rows with and without images alike, so one template renders all)."""
    processor = processor_for(tok)
    if processor is None:
        return tokenize_rows(norms, tok)
    specials = special_ids(tok)
    out: list[Tokenized | BadRow] = []
    for norm in norms:
        try:
            out.append(tokenize_vl(norm, tok, processor, specials))
        except BadRow as exc:
            out.append(exc)
    return out


def tokenize_vl(norm: dict[str, Any], tok, processor, specials: set[int]) -> Tokenized:
    """One row on a vision-language side (see the module docstring)."""
    r = _render_chat(norm, tok, processor) if "messages" in norm else _render(norm, tok)
    enc = tok(r.string, add_special_tokens=False, return_offsets_mapping=True)
    plain = _tokenize_rendered(r, enc["input_ids"], enc["offset_mapping"], specials)
    refs = norm.get("images") or []
    if not refs:
        return plain
    images = [load_image(ref, k) for k, ref in enumerate(refs)]
    try:
        out = processor(text=[r.string], images=images, return_tensors="pt", add_special_tokens=False)
    except Exception as exc:  # the processor's own checks (image token count, sizes)
        raise BadRow(f"processor of '{getattr(tok, 'name_or_path', '')}' rejects the row's "
                     f"{len(images)} image(s): {type(exc).__name__}: {exc}") from exc
    ids = out["input_ids"][0].tolist()
    return _expand(plain, ids, _image_token_ids(processor, tok), VisionInputs(
        {k: v for k, v in out.items() if k not in _TOKEN_LEVEL}, 0, len(images)))


def _image_token_ids(processor, tok) -> set[int]:
    ids = {getattr(processor, "image_token_id", None)}
    token = getattr(processor, "image_token", None)
    if isinstance(token, str):
        ids.add(tok.convert_tokens_to_ids(token))
    return {i for i in ids if i is not None}


def _expand(plain: Tokenized, ids: list[int], image_ids: set[int], vision: VisionInputs) -> Tokenized:
    """The processor's ``ids`` as ``plain`` with tokens inserted: inserted tokens and image
    tokens are markup, and no loss position reads one."""
    src = plain.input_ids
    matched: list[int | None] = []  # per processor token: its index in plain, None when inserted
    j = 0
    for t in ids:
        if j < len(src) and t == src[j]:
            matched.append(j)
            j += 1
        else:
            matched.append(None)
    if j != len(src):
        raise BadRow("the processor changed the text's tokens, not only the image tokens "
                     f"({j} of {len(src)} matched)")
    trained = {p + 1 for p in plain.loss_positions}
    offsets, loss, last = [], [], 0
    image_at = [m is None or ids[i] in image_ids for i, m in enumerate(matched)]
    for i, m in enumerate(matched):
        if m is None:
            offsets.append((last, last))
            continue
        offsets.append(tuple(plain.offsets[m]))
        last = max(last, plain.offsets[m][1])
        if m in trained and i > 0 and not image_at[i - 1] and not image_at[i]:
            loss.append(i - 1)
    vision.end = max((i + 1 for i, a in enumerate(image_at) if a), default=0)
    return Tokenized(input_ids=ids, offsets=offsets, loss_positions=loss, vision=vision)


def collate_vision(sides: Sequence[Tokenized]) -> dict[str, Any] | None:
    """A micro-batch's pixel inputs: each key's tensors concatenated over the samples that
    have images, in sample order; None when no sample has any."""
    import torch

    have = [t.vision for t in sides if t.vision is not None]
    if not have:
        return None
    return {k: torch.cat([v.tensors[k] for v in have]) for k in have[0].tensors}


__all__ = ["VisionInputs", "collate_vision", "load_image", "load_processor", "processor_for",
           "resolve_image_paths", "tokenize_side", "tokenize_vl"]
