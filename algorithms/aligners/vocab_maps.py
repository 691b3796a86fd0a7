"""Vocabulary maps between two tokenizers, built once per pair and cached on disk.

Token strings are compared by what they *spell*, not by how a tokenizer writes them: every
token is turned into its surface bytes first (:func:`token_surfaces`):

- byte-level BPE (GPT-2, SmolLM2, Qwen): each character of the token string stands for one
  byte (``Ġ`` = space, ``Ċ`` = newline, ``Ã©`` = the two bytes of é); the GPT-2 byte table is
  inverted to get the real bytes back;
- SentencePiece (Llama, Mistral v1): ``▁`` is a space and ``<0xNN>`` byte-fallback pieces are
  the byte ``NN``;
- special tokens (added tokens marked special: ``<|im_end|>``, ``</s>``) spell no content; they
  are matched by their exact string, and the two end-of-sequence tokens are matched with each
  other when their strings differ (``<|im_end|>`` and ``</s>`` both end a turn).

Maps:

- :func:`exact_map` — the shared vocabulary: pairs of ids whose surfaces are equal (one id per
  side per surface; when a side spells one surface twice, e.g. SentencePiece's ``A`` and
  ``<0x41>``, the regular piece wins over the byte-fallback one, then the lower id).
- :func:`mined_map` — MinED (Wan et al. 2024, "Knowledge Fusion of Large Language Models",
  FuseLLM): every teacher token is mapped to the student token with the minimum Levenshtein
  distance between their surfaces (exact matches first, distance 0; ties to the lower student
  id, which in BPE vocabularies is the earlier, more frequent merge). Surfaces are compared as
  text, a valid UTF-8 character counting as one symbol and each stray byte of a partial
  character as one symbol of its own. Searched by length windows: a student token whose length
  differs by ``d`` is at distance at least ``d``, so a teacher token whose best distance within
  a window of ±w lengths is ≤ w is settled; the rest retry with a doubled window. The distances
  themselves come from ``rapidfuzz.process.cdist`` (bit-parallel, multi-threaded).

Cache files live in ``cache_dir`` and are keyed by both tokenizers' content hashes
(:func:`tokenizer_digest`), so a changed vocabulary never reuses a stale map. They are written
to a temporary file and renamed, so concurrent ranks building the same map never see half a file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

_FORMAT_VERSION = 1  # bump when the meaning of a cached map changes
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character stand-ins for bytes, inverted: character -> byte value."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars)}


def _backend_component(tokenizer: Any, name: str) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    comp = getattr(backend, name, None) if backend is not None else None
    if comp is None:
        return {}
    try:
        return json.loads(comp.__getstate__())
    except Exception:  # a component without a JSON state tells us nothing
        return {}


def tokenizer_kind(tokenizer: Any) -> str:
    """``"byte_level"``, ``"sentencepiece"`` or ``"plain"``: how token strings encode bytes."""
    decoder = json.dumps(_backend_component(tokenizer, "decoder"))
    pre = json.dumps(_backend_component(tokenizer, "pre_tokenizer"))
    if "ByteLevel" in decoder:
        return "byte_level"
    if "\\u2581" in decoder or "\u2581" in decoder or "Metaspace" in pre or "ByteFallback" in decoder:
        return "sentencepiece"
    if hasattr(tokenizer, "sp_model"):  # slow SentencePiece tokenizers
        return "sentencepiece"
    return "plain"


@dataclass(frozen=True)
class Surfaces:
    """Per token id: the bytes it spells (``None`` for special tokens and unused ids)."""

    surfaces: list[bytes | None]
    byte_fallback: np.ndarray  # [V] bool: SentencePiece <0xNN> pieces (lower priority on ties)
    specials: dict[int, str]  # id -> content of special tokens
    eos_id: int | None
    kind: str

    def __len__(self) -> int:
        return len(self.surfaces)


def _vocab_size(tokenizer: Any, vocab: dict[str, int]) -> int:
    return max(max(vocab.values(), default=-1) + 1, len(tokenizer))


def _special_tokens(tokenizer: Any) -> dict[int, str]:
    specials: dict[int, str] = {}
    for i, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            specials[int(i)] = str(getattr(tok, "content", tok))
    for i in getattr(tokenizer, "all_special_ids", []) or []:
        if i is not None and int(i) not in specials:
            specials[int(i)] = tokenizer.convert_ids_to_tokens(int(i))
    return specials


def _memo(tokenizer: Any, attr: str, compute):
    """Per-tokenizer memo, invalidated when the vocabulary grows (``add_tokens``)."""
    key = len(tokenizer)
    hit = getattr(tokenizer, attr, None)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute(tokenizer)
    try:
        setattr(tokenizer, attr, (key, value))
    except AttributeError:  # objects that refuse attributes just recompute
        pass
    return value


def token_surfaces(tokenizer: Any) -> Surfaces:
    """The surface bytes of every token of a (HF) tokenizer; see the module docstring."""
    return _memo(tokenizer, "_kdflow_surfaces", _token_surfaces)


def _token_surfaces(tokenizer: Any) -> Surfaces:
    vocab: dict[str, int] = tokenizer.get_vocab()
    kind = tokenizer_kind(tokenizer)
    specials = _special_tokens(tokenizer)
    added = {int(i): str(getattr(t, "content", t)) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    n = _vocab_size(tokenizer, vocab)
    surfaces: list[bytes | None] = [None] * n
    fallback = np.zeros(n, bool)
    table = _byte_decoder()
    for token, i in vocab.items():
        if i in specials:
            continue
        if i in added:  # added tokens are literal text, not written in the model's byte alphabet
            surfaces[i] = added[i].encode("utf-8")
        elif kind == "byte_level":
            try:
                surfaces[i] = bytes(table[c] for c in token)
            except KeyError:  # not in the byte alphabet: literal text
                surfaces[i] = token.encode("utf-8")
        elif kind == "sentencepiece":
            m = _BYTE_PIECE.match(token)
            if m:
                surfaces[i] = bytes([int(m.group(1), 16)])
                fallback[i] = True
            else:
                surfaces[i] = token.replace("\u2581", " ").encode("utf-8")
        else:
            surfaces[i] = token.encode("utf-8")
    eos = getattr(tokenizer, "eos_token_id", None)
    return Surfaces(surfaces, fallback, specials, int(eos) if eos is not None else None, kind)


def tokenizer_digest(tokenizer: Any) -> str:
    """Content hash of a tokenizer's vocabulary (token -> id), special tokens and byte scheme.

    Two tokenizers with the same digest spell every id the same way, whatever their folder or
    file format (a GGUF and a tokenizer.json of one model hash alike). Unlike
    ``kdcore.modeling.tokenizers.tokenizer_fingerprint`` it ignores chat templates and merges, which do
    not change what a token spells.
    """
    return _memo(tokenizer, "_kdflow_vocab_digest", _tokenizer_digest)


def _tokenizer_digest(tokenizer: Any) -> str:
    vocab = tokenizer.get_vocab()
    payload = {
        "kind": tokenizer_kind(tokenizer),
        "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
        "specials": sorted(_special_tokens(tokenizer).items()),
        "eos": getattr(tokenizer, "eos_token_id", None),
        "size": _vocab_size(tokenizer, vocab),
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class VocabMap:
    """Pairs ``(student_ids[k], teacher_ids[k])`` of a vocabulary map (int64 arrays).

    ``exact``: a one-to-one map of the shared vocabulary, sorted by student id.
    ``mined``: one pair per mappable teacher id, sorted by teacher id (several teacher ids may
    map to one student id); ``distance[k]`` is the edit distance of pair ``k``.
    ``build_seconds`` is the time the map took to build (also when loaded from the cache).
    """

    kind: str
    student_ids: np.ndarray
    teacher_ids: np.ndarray
    distance: np.ndarray
    student_vocab: int
    teacher_vocab: int
    build_seconds: float
    cached: bool = False
    path: Path | None = None

    def __len__(self) -> int:
        return int(self.student_ids.shape[0])

    def teacher_to_student(self, n_teacher_rows: int | None = None) -> np.ndarray:
        """Dense ``[n_teacher_rows]`` array: the student id of each teacher id, -1 when unmapped.

        ``n_teacher_rows`` may exceed the tokenizer's size (padded ``lm_head`` rows stay -1).
        """
        n = self.teacher_vocab if n_teacher_rows is None else int(n_teacher_rows)
        if n < self.teacher_vocab and len(self) and int(self.teacher_ids.max()) >= n:
            raise ValueError(f"teacher head has {n} rows but the map uses teacher id {int(self.teacher_ids.max())}")
        out = np.full(n, -1, np.int64)
        keep = self.teacher_ids < n
        out[self.teacher_ids[keep]] = self.student_ids[keep]
        return out


def _index_of_surface(s: Surfaces) -> dict[bytes, int]:
    """Surface -> preferred id (regular pieces before byte-fallback pieces, then lower id)."""
    index: dict[bytes, int] = {}
    for i, b in enumerate(s.surfaces):
        if b is None:
            continue
        j = index.get(b)
        if j is None or (s.byte_fallback[j] and not s.byte_fallback[i]):
            index[b] = i
    return index


def _special_pairs(student: Surfaces, teacher: Surfaces) -> list[tuple[int, int]]:
    """Special tokens matched by exact string, then end-of-sequence with end-of-sequence."""
    by_string = {content: i for i, content in sorted(student.specials.items())}
    pairs = []
    used_s: set[int] = set()
    for t_id, content in sorted(teacher.specials.items()):
        s_id = by_string.get(content)
        if s_id is not None and s_id not in used_s:
            pairs.append((s_id, t_id))
            used_s.add(s_id)
    used_t = {t for _, t in pairs}
    if (student.eos_id is not None and teacher.eos_id is not None
            and student.eos_id not in used_s and teacher.eos_id not in used_t):
        pairs.append((student.eos_id, teacher.eos_id))
    return pairs


def _build_exact(student: Surfaces, teacher: Surfaces) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    s_index = _index_of_surface(student)
    t_index = _index_of_surface(teacher)
    pairs = [(s_index[b], t) for b, t in t_index.items() if b in s_index]
    pairs += _special_pairs(student, teacher)
    pairs.sort()
    arr = np.asarray(pairs, np.int64).reshape(-1, 2)
    return arr[:, 0].copy(), arr[:, 1].copy(), np.zeros(arr.shape[0], np.int64)


def _as_text(b: bytes) -> str:
    # Valid UTF-8 characters become one symbol each; stray bytes of a partial character become
    # lone surrogates, one symbol per byte, distinct from every real character.
    return b.decode("utf-8", "surrogateescape")


def _build_mined(student: Surfaces, teacher: Surfaces, *, workers: int, max_cells: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    s_index = _index_of_surface(student)
    # Candidate student tokens: one id per surface, ordered by id so argmin breaks ties low.
    cand_ids = np.asarray(sorted(s_index.values()), np.int64)
    cand_text = [_as_text(student.surfaces[i]) for i in cand_ids]  # type: ignore[arg-type]
    cand_len = np.asarray([len(t) for t in cand_text], np.int64)

    mapped_t: list[int] = []
    mapped_s: list[int] = []
    dist: list[int] = []
    pending: list[int] = []
    for t_id, b in enumerate(teacher.surfaces):
        if b is None:
            continue
        s_id = s_index.get(b)
        if s_id is not None:
            mapped_t.append(t_id)
            mapped_s.append(s_id)
            dist.append(0)
        else:
            pending.append(t_id)
    for s_id, t_id in _special_pairs(student, teacher):
        mapped_t.append(t_id)
        mapped_s.append(s_id)
        dist.append(0)

    if pending and cand_ids.size:
        t_text = {t: _as_text(teacher.surfaces[t]) for t in pending}  # type: ignore[arg-type]
        max_len = int(max(cand_len.max(), max(len(x) for x in t_text.values())))
        window = 1
        while pending:
            unresolved: list[int] = []
            by_len: dict[int, list[int]] = {}
            for t in pending:
                by_len.setdefault(len(t_text[t]), []).append(t)
            final = window >= max_len  # the window covers every length: all settle now
            for length, ids in sorted(by_len.items()):
                cols = np.nonzero(np.abs(cand_len - length) <= window)[0]
                if cols.size == 0:
                    unresolved.extend(ids)
                    continue
                col_text = [cand_text[c] for c in cols]
                rows_per_block = max(1, max_cells // cols.size)
                for start in range(0, len(ids), rows_per_block):
                    block = ids[start:start + rows_per_block]
                    d = process.cdist([t_text[t] for t in block], col_text, scorer=Levenshtein.distance,
                                      score_cutoff=None if final else window, dtype=np.int32, workers=workers)
                    best = d.argmin(axis=1)
                    best_d = d[np.arange(len(block)), best]
                    for t, c, bd in zip(block, best.tolist(), best_d.tolist()):
                        # Outside the window every distance is > window: a best <= window is final.
                        if final or bd <= window:
                            mapped_t.append(t)
                            mapped_s.append(int(cand_ids[cols[c]]))
                            dist.append(int(bd))
                        else:
                            unresolved.append(t)
            pending = unresolved
            window *= 2
    order = np.argsort(np.asarray(mapped_t, np.int64), kind="stable")
    return (np.asarray(mapped_s, np.int64)[order], np.asarray(mapped_t, np.int64)[order],
            np.asarray(dist, np.int64)[order])


def _cache_path(cache_dir: str | os.PathLike | None, kind: str, s_digest: str, t_digest: str) -> Path | None:
    if cache_dir is None:
        return None
    return Path(cache_dir) / f"vocabmap-{kind}-v{_FORMAT_VERSION}-{s_digest[:16]}-{t_digest[:16]}.npz"


def _load(path: Path, kind: str, s_digest: str, t_digest: str) -> VocabMap | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["student_digest"]) != s_digest or str(z["teacher_digest"]) != t_digest:
                return None  # a 64-bit prefix collision: rebuild rather than trust it
            return VocabMap(kind, z["student_ids"].astype(np.int64), z["teacher_ids"].astype(np.int64),
                            z["distance"].astype(np.int64), int(z["student_vocab"]), int(z["teacher_vocab"]),
                            float(z["build_seconds"]), cached=True, path=path)
    except (OSError, KeyError, ValueError):  # unreadable or from another format: rebuild
        return None


def _save(path: Path, m: VocabMap, s_digest: str, t_digest: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, student_ids=m.student_ids, teacher_ids=m.teacher_ids, distance=m.distance,
                     student_vocab=m.student_vocab, teacher_vocab=m.teacher_vocab,
                     build_seconds=m.build_seconds, student_digest=s_digest, teacher_digest=t_digest)
        os.replace(tmp, path)  # atomic: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _get_map(kind: str, student_tokenizer: Any, teacher_tokenizer: Any, cache_dir, build) -> VocabMap:
    s_digest = tokenizer_digest(student_tokenizer)
    t_digest = tokenizer_digest(teacher_tokenizer)
    path = _cache_path(cache_dir, kind, s_digest, t_digest)
    if path is not None and path.exists():
        hit = _load(path, kind, s_digest, t_digest)
        if hit is not None:
            return hit
    t0 = time.perf_counter()
    student, teacher = token_surfaces(student_tokenizer), token_surfaces(teacher_tokenizer)
    s_ids, t_ids, dist = build(student, teacher)
    m = VocabMap(kind, s_ids, t_ids, dist, len(student), len(teacher), time.perf_counter() - t0, cached=False, path=path)
    if path is not None:
        _save(path, m, s_digest, t_digest)
    return m


def exact_map(student_tokenizer: Any, teacher_tokenizer: Any, cache_dir: str | os.PathLike | None = None) -> VocabMap:
    """The shared vocabulary (equal surfaces, plus matched special tokens); cached in ``cache_dir``."""
    return _get_map("exact", student_tokenizer, teacher_tokenizer, cache_dir, _build_exact)


def mined_map(student_tokenizer: Any, teacher_tokenizer: Any, cache_dir: str | os.PathLike | None = None, *,
              workers: int = -1, max_cells: int = 1 << 25) -> VocabMap:
    """MinED map: each teacher token to its minimum-edit-distance student token; cached.

    ``workers``: rapidfuzz threads (-1: all cores). ``max_cells``: distance-matrix cells per
    block (int32, so the default 2**25 is 128 MiB), bounding memory for 150k x 50k vocabularies.
    """
    def build(student: Surfaces, teacher: Surfaces):
        return _build_mined(student, teacher, workers=workers, max_cells=max_cells)
    return _get_map("mined", student_tokenizer, teacher_tokenizer, cache_dir, build)
