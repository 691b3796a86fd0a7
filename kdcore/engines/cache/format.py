"""The ``cache`` teacher engine's format, manifest, fingerprints and recipe checks (light: no
torch); its spec is :class:`kdcore.engines.cache.spec.CacheEngine`, the engine
:mod:`kdcore.engines.cache.teacher`, the builder :mod:`kdcore.commands.cache_teacher`.

Off-policy distillation asks the teacher the same questions every epoch, trial and student.
``kdcore cache-teacher RECIPE --out DIR`` (:mod:`kdcore.commands.cache_teacher`) asks them once
and stores, per sample, the last hidden states at the teacher positions the aligner requests
(bf16 by default: ``2 * H`` bytes per row); a recipe with ``teacher.engine: cache`` and
``teacher.cache: DIR`` then reads them back. The teacher head is still loaded alone from
``teacher.path``, so the loss rebuilds exact full-vocabulary logits as with a live teacher.

Folder layout: ``manifest.json`` (fingerprints, settings, the shard list with sizes and
sha256) and ``shard-NNNNN.safetensors`` files of about ``shard_mb`` each, holding ``hidden``
``[rows, H]``, ``keys`` ``[n, 16]`` uint8 (one per sample), ``offsets`` ``[n + 1]`` (the
sample's rows are ``hidden[offsets[i]:offsets[i + 1]]``) and ``sample_ids`` ``[n, 2]``
(split 0 = train / 1 = eval, index in the prepared split).

How a request finds its rows: a sample's key is a hash of the teacher token ids it sends (the
unpadded ids) and the positions it asks for (relative to its first real token). The trainer's
request for a sample therefore hits exactly the rows built for it, or misses: a miss is an
error naming the sample — the cache was built for other data, tokenizers, max length or
aligner. Shards are opened with ``safetensors.safe_open``: read-only views of a private file
mapping (pages come from the page cache, shared by every run reading the folder); each request
copies its rows once into its slot, converting to the head's dtype in the same copy (the live
``hf`` engine also copies its rows once, into the shared-memory channel).

Recipe checks (``kdcore validate``, cheap: no torch, no tokenizer loading): the folder and its
manifest exist; the rollout does not sample and self-distillation is off (both need a live
teacher); the teacher weights, the tokenizer and data files and the data/aligner settings the
manifest records equal the recipe's, each difference one line naming manifest and recipe value.
At start the engine checks every shard's presence and size (a truncated shard stops the run
before its first step); ``kdcore cache-teacher`` also checks their sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from kdcore.engines.protocol import TeacherError
from kdcore.modeling.paths import resolve
from kdcore.recipe.loading import DataConfig, DistillConfig, TrainConfig

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
KEY_BYTES = 16  # 128-bit sample keys: a collision among even 10^9 samples is ~1e-20 likely
SPLITS = ("train", "eval")
# Bytes hashed for a file fingerprint: size plus SAMPLE_BLOCKS evenly spaced blocks. Measured
# on a loaded 2-core machine: sha256 runs at ~420 MB/s, so the 94 MiB SmolLM2 GGUF costs 364 ms
# hashed whole and 47 ms sampled, and a 15 GB 7B checkpoint would cost ~36 s whole on every
# validate. 16 MiB of samples still catches a replaced or re-quantised file (all its blocks differ).
SAMPLE_BLOCKS = 16
BLOCK_BYTES = 1 << 20
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "tekken.json", "tokenizer.model.v3")


class CacheError(TeacherError):
    """The teacher cache cannot serve this run (missing, damaged, or built for another recipe)."""


# ------------------------------------------------------------------------------ fingerprints


def file_fingerprint(path: str | os.PathLike) -> str:
    """Content identity of one file: its size and SAMPLE_BLOCKS evenly spaced 1 MiB blocks
    (the whole file when it is smaller). No mtime: a copied teacher keeps its fingerprint."""
    p = Path(path)
    size = p.stat().st_size
    h = hashlib.sha256(f"{p.suffix}:{size}".encode())
    with open(p, "rb") as f:
        if size <= SAMPLE_BLOCKS * BLOCK_BYTES:
            h.update(f.read())
        else:
            step = (size - BLOCK_BYTES) // (SAMPLE_BLOCKS - 1)
            for i in range(SAMPLE_BLOCKS):
                f.seek(i * step)
                h.update(f.read(BLOCK_BYTES))
    return h.hexdigest()[:16]


def files_fingerprint(paths: Sequence[Path], root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(f"{p.relative_to(root).as_posix()}={file_fingerprint(p)};".encode())
    return h.hexdigest()[:16]


def _local(spec: str) -> Optional[Path]:
    try:
        p = Path(os.path.expanduser(resolve(str(spec))))
    except Exception:  # an uninstalled pkg:// package: the recipe check names it elsewhere
        return None
    return p if p.exists() else None


def weights_fingerprint(spec: str) -> str:
    """The teacher's weights: a GGUF file's fingerprint, or a folder's model files and config
    (a hub id that is not local: the id itself, since nothing else can be read offline)."""
    p = _local(spec)
    if p is None:
        return f"id:{spec}"
    if p.is_file():
        return file_fingerprint(p)
    files = [f for f in p.iterdir() if f.is_file() and (f.suffix in MODEL_FILE_SUFFIXES or f.name == "config.json")]
    return files_fingerprint(files, p)


def source_fingerprint(spec: Optional[str], names: Sequence[str] = ()) -> Optional[str]:
    """A data or tokenizer source: a file's fingerprint, a folder's ``names`` (all files when
    empty), or the spec itself when it is not local."""
    if spec is None:
        return None
    p = _local(spec)
    if p is None:
        return f"id:{spec}"
    if p.is_file():
        return file_fingerprint(p)
    files = [f for f in p.rglob("*") if f.is_file() and (not names or f.name in names)]
    return files_fingerprint(files, p)


def recipe_identity(raw: Mapping[str, Any]) -> dict[str, Any]:
    """What a cache depends on that a recipe states, from a raw (or typed) recipe mapping:
    compared key by key against the manifest at validation."""
    def get(section: str, key: str, default: Any = None) -> Any:
        s = raw.get(section) or {}
        return s.get(key, default) if isinstance(s, Mapping) else default

    teacher_path = get("teacher", "path")
    teacher_tok = get("teacher", "tokenizer") or teacher_path
    student_tok = get("student", "tokenizer") or get("student", "path") or teacher_tok
    d, dist = DataConfig, DistillConfig
    return {
        "teacher weights": weights_fingerprint(teacher_path) if teacher_path else None,
        "teacher tokenizer files": source_fingerprint(teacher_tok, TOKENIZER_FILES),
        "student tokenizer files": source_fingerprint(student_tok, TOKENIZER_FILES),
        "data.train file": source_fingerprint(get("data", "train")),
        "data.eval file": source_fingerprint(get("data", "eval")),
        **{f"data.{k}": get("data", k, getattr(d, k)) for k in
           ("max_length", "overlong", "format", "bad_rows", "limit", "eval_size")},
        "train.seed": get("train", "seed", TrainConfig.seed),  # picks the held-out split
        "distill.aligner": get("distill", "aligner", dist.aligner),
        "distill.aligner_options": dict(get("distill", "aligner_options") or {}),
    }


def identity_differences(built: Mapping[str, Any], recipe: Mapping[str, Any]) -> list[str]:
    """One line per key whose manifest value differs from the recipe's."""
    return [f"built for {k} {built.get(k)!r}, the recipe has {recipe.get(k)!r}"
            for k in recipe if built.get(k) != recipe.get(k)]


def sample_keys(input_ids, attention_mask, positions: Sequence[Sequence[int]]) -> list[bytes]:
    """Per sample of a request: the hash of its unpadded ids and of the positions it asks for,
    counted from its first real token (left or right padding give the same key)."""
    import numpy as np

    ids = input_ids.cpu().numpy()
    mask = attention_mask.cpu().numpy().astype(bool)
    keys = []
    for b, pos in enumerate(positions):
        real = np.flatnonzero(mask[b])
        first = int(real[0]) if real.size else 0
        h = hashlib.blake2b(digest_size=KEY_BYTES)
        h.update(ids[b][real].astype(np.int64).tobytes())
        h.update(b"|")
        h.update((np.asarray(pos, dtype=np.int64).reshape(-1) - first).tobytes())
        keys.append(h.digest())
    return keys


def read_manifest(folder: str | os.PathLike) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CacheError(f"teacher.cache: no {MANIFEST} in '{folder}' (build it with `kdcore cache-teacher`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CacheError(f"teacher.cache: cannot read {path}: {exc}") from exc
    if manifest.get("format") != FORMAT_VERSION:
        raise CacheError(f"teacher.cache: {path} has format {manifest.get('format')!r}, this kdflow reads {FORMAT_VERSION}")
    return manifest


def check_shard_files(folder: Path, manifest: Mapping[str, Any], *, checksums: bool = False) -> None:
    """Every listed shard exists with its recorded size (and sha256 when ``checksums``)."""
    for s in manifest["shards"]:
        path = folder / s["file"]
        if not path.is_file():
            raise CacheError(f"teacher.cache: shard {path} is missing")
        size = path.stat().st_size
        if size != s["bytes"]:
            raise CacheError(f"teacher.cache: shard {path} has {size} bytes, the manifest records {s['bytes']} "
                             f"(truncated or overwritten)")
        if checksums and sha256_file(path) != s["sha256"]:
            raise CacheError(f"teacher.cache: shard {path} does not match its sha256 in the manifest (damaged)")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            h.update(block)
    return h.hexdigest()


def needs_live_teacher(raw: Mapping[str, Any], registry) -> list[str]:
    """The recipe parts a stored teacher cannot serve: sampling rollouts and self-distillation."""
    problems = []
    distill = raw.get("distill") or {}
    name = distill.get("rollout", "off_policy") if isinstance(distill, Mapping) else "off_policy"
    try:
        entry = registry.get("rollout", name)
        policy = entry.fn(entry.make_options(dict(distill.get("rollout_options") or {})))
    except Exception:  # unknown names and bad options are reported by the algorithm checks
        policy = None
    if getattr(policy, "needs_sampling", False):
        problems.append(f"teacher.engine: 'cache' serves stored teacher states, but distill.rollout '{name}' "
                        f"samples new sequences, which need a live teacher (use teacher.engine hf or sglang)")
    teacher = raw.get("teacher") or {}
    every = teacher.get("self_distill_every", 0) if isinstance(teacher, Mapping) else 0
    if isinstance(every, int) and every > 0:
        problems.append(f"teacher.engine: 'cache' serves a fixed stored teacher, but teacher.self_distill_every="
                        f"{every} refreshes the teacher's weights (use teacher.engine hf or sglang)")
    return problems


__all__ = ["CacheError", "needs_live_teacher", "sample_keys", "read_manifest", "recipe_identity",
           "weights_fingerprint", "file_fingerprint", "check_shard_files", "MANIFEST"]
