"""Loading a checkpoint into another float dtype than it is stored in, one tensor at a time.

transformers memory-maps a safetensors checkpoint and, when it casts (an fp32 folder loaded as
bf16: every GGUF teacher's cached folder under ``teacher.dtype: bfloat16``), keeps the stored
copy's pages resident beside the cast weights until the load ends. :func:`load_cast` reads each
tensor with plain reads instead, casts it, and hands transformers the state dict; where that
could differ from transformers' own load (quantized checkpoints, modules kept in fp32, several
classes per config) it declines and the caller loads as transformers does.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING

from kdcore.modeling.vision import model_class

if TYPE_CHECKING:
    import torch

__all__ = ["checkpoint_files", "cast_loadable_class", "load_cast"]

# safetensors' names of the float dtypes a checkpoint is cast from or to
_SAFETENSORS_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def checkpoint_files(folder: str) -> list[str] | None:
    """The folder's safetensors files (those its index names, each a plain file name inside the
    folder, or one ``model.safetensors``), or None when it holds neither or the index is not a
    well-formed one: the standard loader then reads the folder and reports what is wrong."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except (OSError, ValueError, AttributeError):  # unreadable, not JSON, not a mapping
            return None
        if not isinstance(weight_map, dict) or not weight_map:
            return None
        names = set(weight_map.values())
        if any(not isinstance(n, str) or os.path.basename(n) != n or n in ("", ".", "..") for n in names):
            return None
        files = [os.path.join(folder, n) for n in sorted(names)]
    else:
        files = [os.path.join(folder, "model.safetensors")]
    return files if all(os.path.isfile(f) and not os.path.islink(f) for f in files) else None


def cast_loadable_class(folder: str, dt: "torch.dtype"):
    """(config, the concrete model class) when :func:`load_cast` may build this folder's model,
    else None: a quantized checkpoint, or a class that keeps some modules in fp32 under ``dt``
    (transformers' dtype plan; cast here they would lose precision first), is left to transformers."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        return None
    concrete = getattr(model_class(config), "_model_mapping", {}).get(type(config), None)
    if not isinstance(concrete, type) or getattr(concrete, "config_class", None) is not type(config):
        return None  # several classes per config, or a text sub-config: the Auto class decides
    if getattr(concrete, "_keep_in_fp32_modules_strict", None) or (
            dt == torch.float16 and getattr(concrete, "_keep_in_fp32_modules", None)):
        return None
    return config, concrete


def load_cast(folder: str, dt: "torch.dtype"):
    """A model whose checkpoint is stored in another float dtype than ``dt``, built from tensors
    read one at a time with plain reads and cast on the way; None when this reader does not apply
    (a tensor already stored in ``dt``, a quantized or keep-in-fp32 model, a safetensors without
    its pread backend): the caller then loads the folder as transformers does.

    Why: transformers memory-maps the checkpoint and, when it casts, keeps the stored copy's pages
    resident beside the cast weights until the load ends: a SmolLM2-135M teacher in bf16 from its
    fp32 folder peaked at 1122 MB in its process that way, 610 MB this way (bench/README.md, memory
    breakdown). The generation config and the model's name are the folder's, as transformers sets them."""
    import torch
    from safetensors import safe_open
    from transformers import GenerationConfig

    files = checkpoint_files(folder)
    if files is None:
        return None
    try:
        opened = [safe_open(path, framework="pt", backend="pread") for path in files]
    except TypeError:  # safetensors before its pread backend
        return None
    # headers first: a checkpoint stored as computed (every fp32 load) costs no config read
    stored = {f.get_slice(k).get_dtype() for f in opened for k in f.keys()}
    if any(_SAFETENSORS_DTYPES.get(name) == str(dt).removeprefix("torch.") for name in stored):
        return None  # (partly) stored as computed: mapping those tensors costs nothing
    found = cast_loadable_class(folder, dt)
    if found is None:
        return None
    config, concrete = found
    state: dict[str, torch.Tensor] = {}
    for f in opened:
        for key in f.keys():
            tensor = f.get_tensor(key)
            state[key] = tensor.to(dt) if tensor.is_floating_point() else tensor
    del opened
    generation = (GenerationConfig.from_pretrained(folder)
                  if os.path.isfile(os.path.join(folder, "generation_config.json")) else None)
    model = concrete.from_pretrained(None, config=config, state_dict=state, dtype=dt, generation_config=generation)
    model.config._name_or_path = model.name_or_path = folder  # from_pretrained(None) names it "None"
    return model
