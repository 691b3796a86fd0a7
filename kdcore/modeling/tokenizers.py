"""Tokenizer loading from any spec kdflow accepts, as a fast (Rust-backed) tokenizer.

``load_tokenizer(spec)`` accepts:

- a hub id (``HuggingFaceTB/SmolLM2-135M-Instruct``) — needs network, never used in tests;
- a local folder with ``tokenizer.json`` / ``tokenizer_config.json`` (anything
  ``AutoTokenizer`` reads), or a folder holding only a ``.gguf``, ``tokenizer.model`` or
  ``.tiktoken`` file;
- a ``.gguf`` model file (the tokenizer is read from its metadata);
- a SentencePiece ``.model`` file (Llama/Mistral style, byte fallback);
- a tiktoken ``.tiktoken`` file (Qwen's pre-tokenizer pattern and special tokens are applied
  when the file is Qwen's);
- any of the above as ``pkg://<package>/<file>`` (see :mod:`kdcore.modeling.paths`).

The result is always a fast tokenizer because data preparation needs character offsets
(``return_offsets_mapping``). Tokenizers built from a bare vocabulary file get a chat template
of their family (Mistral v1 ``[INST]`` format for SentencePiece ``.model`` files from Mistral,
ChatML for Qwen) when they carry none; other bare files get none, and chat-format data then
fails with a clear error.

transformers is imported lazily (importing this module is cheap).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from kdcore.modeling.paths import ModelNotFoundError, is_local, resolve
from kdcore.modeling.models import default_cache_dir, gguf_cache_key


class TokenizerLoadError(ValueError):
    """A tokenizer spec that cannot be turned into a fast tokenizer; the message names it."""


# Qwen (1 / 2 / 2.5 vocabularies, 151643 BPE ranks): single digits, unlike the converter's
# default \p{N}{1,3} (GPT-4 style); a different pattern changes how numbers tokenize.
QWEN_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen 3.5 / 3.6 (248044 ranks): letters may carry combining marks (\p{M}).
QWEN35_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Special tokens follow the BPE ranks in this order (ids 151643, 151644, ...).
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
QWEN35_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
    "<|audio_start|>", "<|audio_end|>", "<tts_pad>", "<tts_text_bos>", "<tts_text_eod>",
    "<tts_text_bos_single>", "<|audio_pad|>",
]
# Generic tiktoken files (cl100k-style): the GPT-4 pattern, transformers' converter default.
GPT4_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Mistral-7B-Instruct v0.1 format: a system message is prepended to the first user turn.
MISTRAL_V1_TEMPLATE = (
    "{{ bos_token }}"
    "{% set sys = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set sys.text = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + sys.text + message['content'] + ' [/INST]' }}"
    "{% set sys.text = '' %}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


def load_tokenizer(spec: str):
    """Load a fast tokenizer from a spec (see the module docstring).

    Returns a ``transformers.PreTrainedTokenizerFast`` (or subclass); raises
    :class:`~kdcore.modeling.paths.ModelNotFoundError` for a local path that does not exist and
    :class:`TokenizerLoadError` when the spec cannot be loaded as a fast tokenizer.
    """
    if not isinstance(spec, str) or not spec:
        raise TokenizerLoadError(f"tokenizer spec must be a non-empty string, got {spec!r}")
    path = resolve(spec)
    p = Path(os.path.expanduser(path))
    if is_local(spec) or p.exists():
        if not p.exists():
            raise ModelNotFoundError(f"tokenizer path not found: '{spec}'")
        tok = _load_local(p, spec)
    else:
        tok = _load_auto(path, spec)
    if not getattr(tok, "is_fast", False):
        raise TokenizerLoadError(
            f"tokenizer '{spec}' loaded as a slow tokenizer ({type(tok).__name__}); kdflow needs a fast "
            "tokenizer for character offsets (provide tokenizer.json)"
        )
    return tok


def _load_auto(path: str, spec: str, **kwargs: Any):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as exc:  # transformers raises many types (OSError, ValueError, HTTP errors)
        raise TokenizerLoadError(f"cannot load tokenizer '{spec}': {type(exc).__name__}: {exc}") from exc


def _load_local(p: Path, spec: str):
    if p.is_file():
        suffix = p.suffix.lower()
        if suffix == ".gguf":
            return load_gguf_tokenizer(p)
        if suffix == ".tiktoken":
            return load_tiktoken(p)
        if suffix == ".model" or p.name.startswith("tokenizer.model"):
            return load_sentencepiece(p)
        if suffix == ".json":
            return _from_tokenizer_json(p, spec)
        raise TokenizerLoadError(
            f"cannot tell the tokenizer type of file '{spec}': expected .gguf, .tiktoken, "
            "a SentencePiece .model or a tokenizer.json"
        )
    names = {f.name for f in p.iterdir()}
    if names & {"tokenizer.json", "tokenizer_config.json", "vocab.json"}:
        return _load_auto(str(p), spec)
    for pattern in ("*.gguf", "*.tiktoken", "tokenizer.model*", "*.model"):
        found = sorted(p.glob(pattern))
        if len(found) == 1:
            return _load_local(found[0], spec)
        if len(found) > 1:
            raise TokenizerLoadError(
                f"folder '{spec}' holds several {pattern} files ({', '.join(f.name for f in found)}); name one"
            )
    raise TokenizerLoadError(f"folder '{spec}' holds no tokenizer (tokenizer.json, .gguf, .model or .tiktoken)")


def load_gguf_tokenizer(path: str | os.PathLike):
    """The tokenizer stored in a GGUF file's metadata.

    Reading it means parsing the GGUF vocabulary (seconds for a 49k vocabulary, more for
    bigger ones), so the result is saved once as an HF tokenizer folder beside the converted
    model folders (``kdcore.modeling.models.default_cache_dir()/gguf``, keyed like them by
    ``kdcore.modeling.models.gguf_cache_key``) and later loads read that folder. A model folder
    converted by ``kdcore.modeling.models.gguf_to_hf_folder`` is used directly when present.
    """
    from transformers import AutoTokenizer

    src = Path(path).expanduser().resolve()
    key = f"{src.stem}-{gguf_cache_key(src)}"
    root = default_cache_dir() / "gguf"
    for folder in (root / key, root / f"{key}.tokenizer"):
        if (folder / "tokenizer.json").is_file():
            try:
                tok = AutoTokenizer.from_pretrained(str(folder))
                tok.name_or_path = str(src)
                return tok
            except Exception:  # a damaged cache entry: rebuild from the GGUF below
                pass
    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    except Exception as exc:
        raise TokenizerLoadError(f"cannot read the tokenizer of GGUF '{src}': {type(exc).__name__}: {exc}") from exc
    try:
        _save_atomically(tok, root / f"{key}.tokenizer")
    except OSError:  # read-only cache: still usable, only slower next time
        pass
    tok.name_or_path = str(src)
    return tok


def _save_atomically(tok, final: Path) -> None:
    import shutil

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "tokenizer.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_tokenizer_json(p: Path, spec: str):
    from transformers import PreTrainedTokenizerFast

    try:
        return PreTrainedTokenizerFast(tokenizer_file=str(p))
    except Exception as exc:
        raise TokenizerLoadError(f"cannot load tokenizer '{spec}': {type(exc).__name__}: {exc}") from exc


def load_sentencepiece(path: str | os.PathLike):
    """A SentencePiece ``.model`` file as a fast Llama-style tokenizer (BOS added, byte fallback).

    transformers converts a SentencePiece proto only when it finds it as ``tokenizer.model``
    in a folder, so the file is linked into a temporary folder for the conversion.
    """
    from transformers import LlamaTokenizer

    path = Path(path).resolve()
    with tempfile.TemporaryDirectory(prefix="kdflow-spm-") as d:
        link = Path(d) / "tokenizer.model"
        try:
            link.symlink_to(path)
        except OSError:  # filesystems without symlinks
            link.write_bytes(path.read_bytes())
        try:
            # Llama/Mistral SentencePiece models are trained with a BOS at the start of each text.
            tok = LlamaTokenizer.from_pretrained(d, add_bos_token=True)
        except Exception as exc:
            raise TokenizerLoadError(
                f"cannot convert SentencePiece model '{path}': {type(exc).__name__}: {exc}") from exc
    if tok.chat_template is None and _is_mistral_spm(path):
        tok.chat_template = MISTRAL_V1_TEMPLATE
    tok.name_or_path = str(path)
    return tok


def _is_mistral_spm(path: Path) -> bool:
    return "mistral" in str(path).lower() or path.name.endswith(".v1")


def load_tiktoken(path: str | os.PathLike):
    """A tiktoken BPE file as a fast tokenizer (converted with transformers' TikTokenConverter).

    Qwen's files (recognised by name and size) get Qwen's pre-tokenizer pattern (single digits),
    NFC normalisation (Qwen's own encoder normalises to NFC), its special tokens in id order
    after the BPE ranks, ``<|im_end|>`` as EOS and a ChatML template. Other files get the
    GPT-4 pattern and no special tokens.
    """
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = Path(path)
    n_ranks = _count_lines(path)
    qwen = "qwen" in path.name.lower()
    if qwen and n_ranks == 248044:
        pattern, specials = QWEN35_PATTERN, QWEN35_SPECIALS
    elif qwen:
        pattern, specials = QWEN_PATTERN, QWEN_SPECIALS
    else:
        pattern, specials = GPT4_PATTERN, []
    try:
        conv = TikTokenConverter(vocab_file=str(path), pattern=pattern, extra_special_tokens=specials or None)
        backend = conv.converted()
    except Exception as exc:
        raise TokenizerLoadError(f"cannot convert tiktoken file '{path}': {type(exc).__name__}: {exc}") from exc
    if qwen:
        backend.normalizer = normalizers.NFC()
        # Instruct convention (Qwen2.5-Instruct): turns end with <|im_end|>; pad with <|endoftext|>.
        tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
        tok.chat_template = CHATML_TEMPLATE
    else:
        tok = PreTrainedTokenizerFast(tokenizer_object=backend)
    tok.name_or_path = str(path)
    return tok


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def tokenizer_fingerprint(tok) -> str:
    """A content hash of a tokenizer: vocabulary, merges, normalizers, special tokens and chat
    template. Equal fingerprints mean equal token ids and equal rendering of every input; use
    it to key on-disk caches (e.g. aligner vocabulary maps)."""
    cached = getattr(tok, "_kdflow_fingerprint", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    h.update(tok.backend_tokenizer.to_str().encode())
    h.update(b"\0" + str(tok.chat_template or "").encode())
    h.update(b"\0" + repr(special_affixes(tok)).encode())
    fp = h.hexdigest()[:16]
    try:
        tok._kdflow_fingerprint = fp
    except AttributeError:  # pragma: no cover - objects that refuse attributes
        pass
    return fp


def same_tokenizer(a, b) -> bool:
    """True when ``a`` and ``b`` produce the same ids for every sample (then the teacher can
    receive the student's ids)."""
    if a is b:
        return True
    if a is None or b is None or len(a) != len(b):
        return False
    return tokenizer_fingerprint(a) == tokenizer_fingerprint(b)


def special_affixes(tok) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds around a plain text with ``add_special_tokens=True``:
    ``(prefix, suffix)`` — e.g. ``([bos], [])`` for Llama/Mistral, ``([], [])`` for GPT-2-style."""
    cached = getattr(tok, "_kdflow_affixes", None)
    if cached is not None:
        return cached
    probe = "kdflow probe text"
    with_sp = tok(probe, add_special_tokens=True)["input_ids"]
    without = tok(probe, add_special_tokens=False)["input_ids"]
    n = len(without)
    for start in range(len(with_sp) - n + 1):
        if with_sp[start:start + n] == without:
            result = (list(with_sp[:start]), list(with_sp[start + n:]))
            break
    else:  # the post-processor rewrites the text's own ids: treat as adding nothing
        result = ([], [])
    try:
        tok._kdflow_affixes = result
    except AttributeError:  # pragma: no cover
        pass
    return result


def special_ids(tok) -> set[int]:
    """Ids of special tokens (BOS/EOS/PAD and added special tokens such as ``<|im_end|>``)."""
    ids = set(tok.all_special_ids)
    for i, t in getattr(tok, "added_tokens_decoder", {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids


def pad_token_id(tok) -> int:
    """The id used to pad: the pad token, else EOS, else 0 (padded positions are masked out, so
    the choice only has to be a valid id)."""
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if isinstance(v, int):
            return v
    return 0
