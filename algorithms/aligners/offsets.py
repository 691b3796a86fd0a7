"""Position alignment from character offsets, shared by every cross-tokenizer aligner.

The question an aligner asks is: which student hidden state and which teacher hidden state
have read the same text? A hidden state at position ``p`` has consumed tokens ``0..p``, so what
it has read is the content up to the *end* of those tokens. Two positions are comparable when
they have consumed exactly the same content, i.e. when their token spans end at the same
content character. Offsets are in the coordinates of the sample's canonical content text
(docs/architecture.md, ``kdcore.distill.aligner.Tokenized``); template-only tokens (BOS, chat markers) carry an
empty span ``(e, e)`` at the content position where they sit.

Definitions, per tokenization with offsets ``(s_i, e_i)``:

- ``consumed[p] = max(e_0..e_p)``: content characters read after position ``p`` (a running
  maximum, so an empty-span token never moves it back).
- position ``p`` is *complete* when no later token starts before ``consumed[p]``. This is what
  makes the alignment robust to pieces that share a character: byte-level BPE splits 中 or 🙂
  into several byte tokens and SentencePiece's byte fallback spells ǅ as ``<0xC7><0x85>``; fast
  tokenizers give every such piece the span of the whole character, so the first piece looks
  like it ends where the character ends although it holds only part of its bytes. Its successor
  starts inside the character, so the first piece is not complete and never pairs.
- among the loss positions of one side with the same ``consumed`` value only the *last* one is
  kept: it is the one whose next token moves past the boundary, i.e. that predicts the content
  after it. Earlier ones predict template tokens (the position before a chat marker), or are a
  BOS that one tokenizer adds and the other not.

A pair is a (student loss position, teacher loss position) with equal ``consumed`` values, both
complete and both last of their group. One boundary per pair, so each student row pairs with at
most one teacher row and vice versa; positions inside a many-to-one span (student ``Hello``
against teacher ``Hel`` + ``lo``) are grouped by construction: only the group's last position,
where both sides have read the same text, is paired. A BOS on one side only never shifts the
pairs: it has consumed nothing, and the other side has no position that consumed nothing.

Offsets must cover the content (untrimmed: the space in ``Ġworld`` belongs to its span, as
fast tokenizers give it with ``trim_offsets=False``); :func:`offset_gaps` finds characters no
token covers, which is how trimmed offsets show up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from kdcore.distill.aligner import Alignment, Tokenized

_NO_NEXT = np.iinfo(np.int64).max


@dataclass(frozen=True)
class PositionPairs:
    """Pairs of loss positions that have consumed the same content.

    ``student_index[k]``/``teacher_index[k]`` index into the student's/teacher's loss positions
    as given; ``boundary[k]`` is the content character both have read up to (exclusive).
    All three are int64 arrays of the same length, sorted by boundary.
    """

    student_index: np.ndarray
    teacher_index: np.ndarray
    boundary: np.ndarray

    def __len__(self) -> int:
        return int(self.student_index.shape[0])


def _as_offsets(offsets: Sequence[tuple[int, int]] | np.ndarray, side: str) -> np.ndarray:
    arr = np.asarray(offsets, dtype=np.int64)
    if arr.size == 0:
        return arr.reshape(0, 2)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{side} offsets must be a list of (start, end) pairs, got shape {arr.shape}")
    bad = np.nonzero((arr[:, 0] > arr[:, 1]) | (arr[:, 0] < 0))[0]
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{side} offsets: token {i} has invalid span {tuple(arr[i].tolist())} (need 0 <= start <= end)")
    return arr


def consumed_ends(offsets: Sequence[tuple[int, int]] | np.ndarray, side: str = "tokens") -> tuple[np.ndarray, np.ndarray]:
    """Per position: content characters consumed through it, and whether that read is complete.

    Returns ``(consumed [n] int64, complete [n] bool)`` as defined in the module docstring.
    """
    arr = _as_offsets(offsets, side)
    n = arr.shape[0]
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, bool)
    consumed = np.maximum.accumulate(arr[:, 1])
    # min start over positions p+1..n-1 (suffix minimum shifted by one); the last position has
    # no successor, so it has read everything it ever will.
    suffix_min = np.minimum.accumulate(arr[::-1, 0])[::-1]
    next_start = np.empty(n, np.int64)
    next_start[:-1] = suffix_min[1:]
    next_start[-1] = _NO_NEXT
    return consumed, next_start >= consumed


def _boundaries(offsets, positions, side: str) -> tuple[np.ndarray, np.ndarray]:
    """(boundary, index into positions) of the kept loss positions, one per boundary, sorted."""
    consumed, complete = consumed_ends(offsets, side)
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    if pos.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    n = consumed.shape[0]
    if pos.min() < 0 or pos.max() >= n:
        bad = int(pos[(pos < 0) | (pos >= n)][0])
        raise ValueError(f"{side} loss position {bad} is outside its {n} tokens")
    if np.any(np.diff(pos) <= 0):
        raise ValueError(f"{side} loss positions must be strictly increasing")
    idx = np.nonzero(complete[pos])[0]
    c = consumed[pos[idx]]
    # consumed is non-decreasing along positions, so groups are runs; keep each run's last.
    last = np.ones(idx.shape[0], bool)
    last[:-1] = c[1:] != c[:-1]
    return c[last], idx[last]


def align_offsets(
    student_offsets: Sequence[tuple[int, int]] | np.ndarray,
    student_positions: Sequence[int] | np.ndarray,
    teacher_offsets: Sequence[tuple[int, int]] | np.ndarray,
    teacher_positions: Sequence[int] | np.ndarray,
) -> PositionPairs:
    """Pair student and teacher loss positions whose consumed content ends at the same character.

    ``*_offsets``: ``[n, 2]`` character spans of every token of that side (canonical content
    coordinates); ``*_positions``: strictly increasing loss positions of that side. Returns
    :class:`PositionPairs` indexing into the position lists.
    """
    cs, ks = _boundaries(student_offsets, student_positions, "student")
    ct, kt = _boundaries(teacher_offsets, teacher_positions, "teacher")
    common, i_s, i_t = np.intersect1d(cs, ct, assume_unique=True, return_indices=True)
    return PositionPairs(ks[i_s].astype(np.int64), kt[i_t].astype(np.int64), common.astype(np.int64))


def offsets_alignment(student: Tokenized, teacher: Tokenized, *, fetch_all_teacher: bool = False) -> Alignment:
    """The :class:`~kdcore.distill.aligner.Alignment` of one sample from its two tokenizations.

    By default only paired teacher positions cross the channel. ``fetch_all_teacher`` requests
    every teacher loss position (DSKD's cross-model attention looks at all of them); pairs then
    index into that longer list. ``extra["boundary"]`` holds each pair's character boundary.
    """
    pairs = align_offsets(student.offsets, student.loss_positions, teacher.offsets, teacher.loss_positions)
    t_loss = np.asarray(teacher.loss_positions, dtype=np.int64).reshape(-1)
    if fetch_all_teacher:
        teacher_positions = t_loss
        teacher_index = pairs.teacher_index
    else:
        teacher_positions = t_loss[pairs.teacher_index]
        teacher_index = np.arange(len(pairs), dtype=np.int64)
    return Alignment(
        teacher_positions=teacher_positions.tolist(),
        student_index=pairs.student_index.tolist(),
        teacher_index=teacher_index.tolist(),
        extra={"boundary": pairs.boundary.tolist()},
    )


def offset_gaps(offsets: Sequence[tuple[int, int]] | np.ndarray, n_chars: int) -> list[tuple[int, int]]:
    """Character ranges of ``[0, n_chars)`` that no token span covers (empty when fully covered).

    Trimmed offsets (a tokenizer that leaves spaces outside its spans) show up here; such
    offsets make boundaries ambiguous and should be fixed where the tokens are made.
    """
    arr = _as_offsets(offsets, "tokens")
    covered = np.zeros(n_chars + 1, np.int64)
    if arr.shape[0]:
        s = np.clip(arr[:, 0], 0, n_chars)
        e = np.clip(arr[:, 1], 0, n_chars)
        np.add.at(covered, s, 1)
        np.add.at(covered, e, -1)
    depth = np.cumsum(covered)[:n_chars]
    holes = depth == 0
    if not holes.any():
        return []
    edges = np.diff(np.concatenate([[0], holes.astype(np.int8), [0]]))
    return list(zip(np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist()))
