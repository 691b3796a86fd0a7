"""Model loading shared by the teacher engines and the student side.

A model *spec* is one of: a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``), a local folder
in Hugging Face layout, a ``.gguf`` file, or ``pkg://<package>/<file>`` (see
:mod:`kdcore.modeling.paths`).

- :func:`load_causal_lm` loads a whole ``AutoModelForCausalLM`` (GGUFs through a cached HF
  folder, see :func:`gguf_to_hf_folder`).
- :func:`load_lm_head` loads only the output projection ``[V, H]`` — the student side needs the
  teacher's head to rebuild teacher logits from hidden states, and must never hold the whole
  teacher.

Hidden states: for Llama/Qwen-style models in transformers 5.x the decoder's
``last_hidden_state`` (``model.get_decoder()(...)``) is already after the final norm and
``logits == last_hidden_state @ lm_head.T`` (checked in tests/unit/test_models.py), so no separate
"final norm" helper is needed; engines call the decoder rather than asking for
``output_hidden_states``, which would keep every layer's activations alive.

Heavy libraries (torch, transformers, gguf, safetensors) are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdcore.modeling.paths import ModelNotFoundError, looks_local, resolve
from kdcore.infra.phases import phase
from kdcore.modeling.cast_load import load_cast
from kdcore.modeling.vision import model_class

if TYPE_CHECKING:  # pragma: no cover
    import torch

DTYPES = ("float32", "bfloat16", "float16")


# CPU features with native bf16 matrix multiplies: AMX tiles (Sapphire Rapids and later) and
# AVX512-BF16 (Cooper Lake, Zen 4). Without one, a bf16 matmul is emulated through fp32 and is no
# faster than fp32, so "auto" keeps the exact fp32 targets there.
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def _cpuinfo_field(name: str, path: str) -> str:
    """The first ``name : value`` line's value in ``/proc/cpuinfo`` ("" where it cannot be read:
    not Linux, or an architecture that does not report it)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(name):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read: not Linux)."""
    return set(_cpuinfo_field("flags", path).split())


def cpu_vendor(path: str = "/proc/cpuinfo") -> str:
    """The CPU's ``vendor_id`` from ``/proc/cpuinfo`` (``GenuineIntel``, ``AuthenticAMD``, ...; empty
    where it cannot be read: not Linux, or an architecture that does not report one)."""
    return _cpuinfo_field("vendor_id", path)


def auto_dtype(device: str, *, flags: "set[str] | None" = None, cuda: "bool | None" = None,
               cuda_bf16: "bool | None" = None) -> tuple[str, str]:
    """What ``teacher.dtype: auto`` means on ``device`` (``cpu``, ``cuda[:i]`` or ``auto``):
    ``(dtype, why)`` — ``bfloat16`` where the device multiplies bf16 natively (a CUDA GPU that
    supports it; a CPU with one of :data:`BF16_CPU_FLAGS`), ``float32`` elsewhere.

    ``flags`` / ``cuda`` / ``cuda_bf16`` stand in for the machine's (tests); by default the CPU
    flags are read from ``/proc/cpuinfo`` and torch is asked about CUDA only when the device may
    be a GPU."""
    on_cuda = device.startswith("cuda")
    if device == "auto":
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        on_cuda = cuda
    if on_cuda:
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return ("bfloat16", "the CUDA device supports bf16") if cuda_bf16 else \
            ("float32", "the CUDA device has no native bf16")
    flags = cpu_flags() if flags is None else set(flags)
    native = [f for f in BF16_CPU_FLAGS if f in flags]
    if native:
        return "bfloat16", f"the CPU has {native[0]}"
    return "float32", "the CPU has no native bf16 (" + " or ".join(BF16_CPU_FLAGS) + ")"


def torch_dtype(dtype: "str | torch.dtype") -> "torch.dtype":
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; anything else is a clear error."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype '{dtype}' is not one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


def default_cache_dir() -> Path:
    """Where converted GGUF folders live: ``$KDCORE_CACHE`` or ``~/.cache/kdflow``."""
    root = os.environ.get("KDCORE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "kdflow"
    )
    return Path(root)


def locate(spec: str) -> tuple[str, str]:
    """Classify a spec: ``("gguf", file)``, ``("folder", dir)`` or ``("hub", id)``.

    A spec that looks like a path (absolute, relative, ``~``, ``*.gguf``, ``pkg://``) but does
    not exist raises :class:`ModelNotFoundError` naming it, instead of a confusing hub lookup.
    """
    path = resolve(str(spec))  # pkg:// -> file path; raises ModelNotFoundError itself
    expanded = os.path.expanduser(path)
    if os.path.isfile(expanded):
        if expanded.endswith(".gguf"):
            return "gguf", expanded
        raise ModelNotFoundError(f"model '{spec}': '{expanded}' is a file but not a .gguf (give its folder instead)")
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelNotFoundError(f"model '{spec}': folder '{expanded}' has no config.json (not a Hugging Face model folder)")
        return "folder", expanded
    if looks_local(path, (".gguf",)) or path != spec:
        raise ModelNotFoundError(f"model '{spec}': no such file or folder '{expanded}'")
    return "hub", spec


# ----------------------------------------------------------------------------- whole models


def load_causal_lm(spec: str, *, dtype: "str | torch.dtype" = "float32", device: str = "cpu",
                   gguf_cache: bool = True, cache_dir: str | os.PathLike | None = None):
    """Load an ``AutoModelForCausalLM`` in eval mode on ``device``.

    GGUF files are converted once into a cached HF folder (:func:`gguf_to_hf_folder`) and loaded
    from there (``gguf_cache=False`` dequantizes the GGUF directly every time). A missing path
    raises :class:`ModelNotFoundError` naming it.
    """
    import torch
    from transformers import AutoModelForCausalLM

    kind, where = locate(spec)
    dt = torch_dtype(dtype)
    if kind == "gguf" and gguf_cache:
        kind, where = "folder", str(gguf_to_hf_folder(where, cache_dir))
    _quiet_transformers()
    if kind == "gguf":
        with _no_gguf_tqdm():
            model = AutoModelForCausalLM.from_pretrained(os.path.dirname(where), gguf_file=os.path.basename(where),
                                                         dtype=dt)
    else:
        try:
            model = load_cast(where, dt) if kind == "folder" else None
            if model is None:
                model = _auto_class(where).from_pretrained(where, dtype=dt)
        except OSError as exc:
            if kind == "hub":
                raise ModelNotFoundError(f"model '{spec}': not a local file or folder, and the hub could not provide it ({exc})") from exc
            raise
    model.eval()
    if device != "cpu":
        model.to(device)
    return model


def _auto_class(where: str):
    """``AutoModelForCausalLM``, or ``AutoModelForImageTextToText`` for a vision-language
    folder (:mod:`kdcore.modeling.vision`); a hub id is read as a causal LM unless its config says VL."""
    from transformers import AutoConfig

    try:
        return model_class(AutoConfig.from_pretrained(where))
    except OSError:  # unreachable hub id: let from_pretrained report it
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM


def _quiet_transformers() -> None:
    # Progress bars and per-load notices would spam the logs of every (child) process.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if "TRANSFORMERS_VERBOSITY" not in os.environ:
        hf_logging.set_verbosity_error()


@contextlib.contextmanager
def _no_gguf_tqdm():
    """transformers draws its GGUF "Converting and de-quantizing" bar with plain tqdm, which
    ``disable_progress_bar`` does not reach: a second bar under kdcore's own phase line (issue 28)."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # another transformers layout: its bar shows, nothing breaks
        yield
        return
    bar = getattr(gguf_utils, "tqdm", None)
    gguf_utils.tqdm = lambda iterable=None, *args, **kwargs: iterable
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def gguf_cache_key(gguf_path: str | os.PathLike) -> str:
    """A cheap identity for a GGUF file: size, mtime and the first and last MiB of content.

    Hashing the whole file would cost a full read on every start; size + mtime catch
    replacements by a reinstall, the sampled bytes catch an in-place rewrite that kept both.
    """
    p = Path(gguf_path)
    st = p.stat()
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        if st.st_size > (2 << 20):
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def gguf_to_hf_folder(gguf_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert a GGUF file once into an HF folder (fp32 safetensors + config + tokenizer).

    Returns ``<cache_dir>/gguf/<stem>-<key>`` (:func:`gguf_cache_key`); later calls return the
    existing folder at once. The weights are the GGUF's dequantized values in fp32 (exact; the
    caller picks the compute dtype when loading). The folder appears atomically (built in a
    temporary sibling, then renamed), so an interrupted conversion or two processes converting
    at once never leave a half-written folder behind.

    Why: transformers dequantizes every tensor of a GGUF on each load (~16-18 s for
    SmolLM2-135M here) while a safetensors folder loads in about a second. ``save_pretrained``
    refuses a GGUF-loaded model, so the weights are copied into a model built ``from_config``
    after dropping ``config.quantization_config``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    src = Path(resolve(str(gguf_path))).expanduser()
    if not src.is_file():
        raise ModelNotFoundError(f"GGUF file '{gguf_path}' does not exist")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / "gguf" / f"{src.stem}-{gguf_cache_key(src)}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _quiet_transformers()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))

    # tens of seconds once per GGUF (issue 28: it was a silent stretch before step 1); one line
    # per part, so a log shows which part took the time
    try:
        with phase(f"{src.name}: dequantizing once into the cache {final.parent} (later runs load it in about a second)"):
            with _no_gguf_tqdm():
                gguf_model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                                  dtype=torch.float32)
            config = gguf_model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
            if unexpected or [k for k in missing if not k.endswith("inv_freq")]:
                raise RuntimeError(f"GGUF '{src}': weights do not fit the converted model (missing {missing}, unexpected {unexpected})")
            del gguf_model
        with phase(f"{src.name}: writing the converted model and tokenizer"):
            model.save_pretrained(tmp)
            # the data preparation has usually parsed this GGUF's vocabulary already and cached the
            # tokenizer (kdcore.modeling.tokenizers.load_gguf_tokenizer, same key): copying its files saves
            # the seconds of parsing it again
            cached_tok = default_cache_dir() / "gguf" / f"{final.name}.tokenizer"
            if (cached_tok / "tokenizer.json").is_file():
                shutil.copytree(cached_tok, tmp, dirs_exist_ok=True)
            else:
                from transformers import AutoTokenizer

                AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(tmp)
        (tmp / "kdflow_source.json").write_text(json.dumps({"gguf": str(src), "key": final.name, "created": time.time()}))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # lost a race to nobody: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- lm_head alone


def loadable_path(spec: str, cache_dir: str | os.PathLike | None = None) -> tuple[str, bool]:
    """Where transformers or SGLang can load ``spec`` from, and whether it was converted: a
    GGUF file becomes its cached HF folder (:func:`gguf_to_hf_folder`, converted once); a
    folder or hub id is returned as :func:`locate` found it."""
    kind, where = locate(spec)
    if kind == "gguf":
        return str(gguf_to_hf_folder(where, cache_dir)), True
    return where, False


def load_lm_head(spec: str, *, dtype: "str | torch.dtype" = "float32") -> "torch.Tensor":
    """The output projection ``W [V, H]`` of a causal LM (logits = hidden @ W.T), loaded alone.

    Tied models give their input embedding. Only that one tensor is read: with ``safe_open``
    from a single or sharded safetensors checkpoint (``model.safetensors.index.json``), or
    from a GGUF (``output.weight``, else the tied ``token_embd.weight``; only that tensor is
    dequantized). Hub ids download config, index and the one shard that holds the tensor.
    """
    kind, where = locate(spec)
    if kind == "gguf":
        weight = _gguf_head(where)
    else:
        weight = _safetensors_head(spec, kind, where)
    return weight.to(torch_dtype(dtype)).contiguous()


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_index(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], int, int]]]:
    """Read a GGUF's metadata and tensor table without touching tensor data.

    Returns ``(kv, tensors)``: ``kv`` maps keys to scalar/string values (arrays to their length
    only); ``tensors`` maps names to ``(torch-order shape, ggml type, absolute byte offset)``.
    ``gguf.GGUFReader`` builds Python objects for every vocabulary entry and merge (about 2 s
    for a 49k-token vocabulary); skipping over arrays takes milliseconds.
    """
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if mm[:4] != b"GGUF":
            raise ValueError(f"'{path}' is not a GGUF file (bad magic)")
        version, n_tensors, n_kv = struct.unpack_from("<IQQ", mm, 4)
        if version < 2:
            raise ValueError(f"'{path}': GGUF version {version} is not supported (>= 2 needed)")
        pos = 24

        def string() -> str:
            nonlocal pos
            (n,) = struct.unpack_from("<Q", mm, pos)
            pos += 8 + n
            return mm[pos - n:pos].decode("utf-8", errors="replace")

        def value(vtype: int):
            nonlocal pos
            if vtype in _GGUF_SCALARS:
                fmt = _GGUF_SCALARS[vtype]
                (v,) = struct.unpack_from(fmt, mm, pos)
                pos += struct.calcsize(fmt)
                return v
            if vtype == _GGUF_STRING:
                return string()
            if vtype == _GGUF_ARRAY:
                etype, count = struct.unpack_from("<IQ", mm, pos)
                pos += 12
                if etype in _GGUF_SCALARS:
                    pos += count * struct.calcsize(_GGUF_SCALARS[etype])
                else:
                    for _ in range(count):
                        value(etype)
                return count
            raise ValueError(f"'{path}': unknown GGUF value type {vtype} at byte {pos}")

        kv: dict[str, Any] = {}
        for _ in range(n_kv):
            key = string()
            (vtype,) = struct.unpack_from("<I", mm, pos)
            pos += 4
            kv[key] = value(vtype)
        infos = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", mm, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", mm, pos + 4)
            ttype, offset = struct.unpack_from("<IQ", mm, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            infos.append((name, tuple(reversed(dims)), ttype, offset))  # GGUF lists dims fastest-first
        align = int(kv.get("general.alignment", 32))
        start = (pos + align - 1) // align * align
    return kv, {name: (shape, ttype, start + off) for name, shape, ttype, off in infos}


def _gguf_head(path: str) -> "torch.Tensor":
    import gguf
    import numpy as np
    import torch

    _, tensors = gguf_index(path)
    name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
    if name not in tensors:
        raise ValueError(f"GGUF '{path}': neither output.weight nor token_embd.weight present")
    (rows, cols), ttype, offset = tensors[name]
    qtype = gguf.GGMLQuantizationType(ttype)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    row_bytes = cols // block * type_size
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(rows, row_bytes))
    values = gguf.quants.dequantize(np.asarray(raw), qtype)
    return torch.from_numpy(np.ascontiguousarray(values.reshape(rows, cols), dtype=np.float32))


def model_dims(spec: str) -> dict[str, int]:
    """``hidden_size``, ``vocab_size`` and ``num_layers`` from config / GGUF metadata only."""
    kind, where = locate(spec)
    if kind == "gguf":
        kv, tensors = gguf_index(where)
        arch = kv.get("general.architecture", "llama")
        vocab = kv.get(f"{arch}.vocab_size") or kv.get("tokenizer.ggml.tokens") or tensors["token_embd.weight"][0][0]
        return {"hidden_size": int(kv[f"{arch}.embedding_length"]), "vocab_size": int(vocab),
                "num_layers": int(kv[f"{arch}.block_count"])}
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(where)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    return {"hidden_size": int(cfg.hidden_size), "vocab_size": int(cfg.vocab_size),
            "num_layers": int(cfg.num_hidden_layers)}


def _head_names(config) -> list[str]:
    """Checkpoint names to try for the head, best first (built on the meta device: no memory)."""
    import torch

    with torch.device("meta"):
        model = model_class(config).from_config(config)
    out = model.get_output_embeddings()
    inp = model.get_input_embeddings()
    if out is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (not a causal LM head)")
    tied = out.weight is inp.weight
    params = list(model.named_parameters(remove_duplicate=False))
    out_names = [n for n, p in params if p is out.weight]
    inp_names = [n for n, p in params if p is inp.weight]
    # Tied: transformers takes the input embedding as the source of the tie, so read that;
    # untied: only the head itself is correct (a missing head would be randomly initialised).
    return inp_names + [n for n in out_names if n not in inp_names] if tied else out_names


def _safetensors_head(spec: str, kind: str, where: str) -> "torch.Tensor":
    from safetensors import safe_open
    from transformers import AutoConfig

    fetch = _hub_fetcher(where) if kind == "hub" else (lambda name: os.path.join(where, name))
    config = AutoConfig.from_pretrained(os.path.dirname(fetch("config.json")))
    wanted = _head_names(config)
    index_file = fetch("model.safetensors.index.json")
    if index_file and os.path.isfile(index_file):
        with open(index_file) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
    else:
        single = fetch("model.safetensors")
        if not single or not os.path.isfile(single):
            raise ModelNotFoundError(f"model '{spec}': no model.safetensors or model.safetensors.index.json")
        with safe_open(single, framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    name = _match_key(wanted, weight_map)
    if name is None:
        raise KeyError(f"model '{spec}': checkpoint holds none of {wanted} (the lm_head"
                       f"{' / tied embedding' if len(wanted) > 1 else ''})")
    with safe_open(fetch(weight_map[name]), framework="pt") as f:
        return f.get_tensor(name)


def _match_key(wanted: list[str], keys) -> str | None:
    keys = list(keys)
    for name in wanted:
        if name in keys:
            return name
    # Some checkpoints differ from module names by a prefix (e.g. "model." or a VLM's
    # "language_model."): match on the last two components, but only when unambiguous.
    for name in wanted:
        tail = ".".join(name.split(".")[-2:])
        hits = [k for k in keys if k == tail or k.endswith("." + tail)]
        if len(hits) == 1:
            return hits[0]
    return None


def _hub_fetcher(repo_id: str):
    """Download single files of a hub repo on demand (None when the file does not exist)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    def fetch(name: str) -> str | None:
        try:
            return hf_hub_download(repo_id, name)
        except EntryNotFoundError:
            return None
        except Exception as exc:  # offline, unknown repo, auth
            if name == "config.json":
                raise ModelNotFoundError(f"model '{repo_id}': not a local file or folder, and the hub could not provide it ({exc})") from exc
            return None

    return fetch


__all__: list[Any] = [
    "DTYPES", "torch_dtype", "default_cache_dir", "locate", "load_causal_lm",
    "gguf_cache_key", "gguf_to_hf_folder", "gguf_index", "load_lm_head", "model_dims",
]
