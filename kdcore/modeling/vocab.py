"""Vocabulary handling for same-tokenizer distillation: padded heads and genuine mismatches.

Models of one family share a tokenizer but pad their ``lm_head`` differently for matmul
efficiency (Qwen2.5: 151936 rows up to 3B, 152064 from 7B, for ~151.7k real tokens). The rows
past the tokenizer's last id are never targets and carry untrained logits, so both heads are
sliced to the real vocabulary before any softmax: ``W[:V]``. Whether two tokenizers *are* the
same is decided by their vocabularies (token → id dicts, added tokens included), never by their
names: a renamed copy is the same vocabulary, and two "Llama" tokenizers with different ids are
not. A genuine difference raises :class:`VocabMismatchError` pointing at the cross-tokenizer
aligners.

Tokenizers are transformers tokenizers (anything with ``get_vocab()``) or plain token → id dicts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["VocabMismatchError", "tokenizer_vocab", "real_vocab_size", "same_vocab_size", "check_head_rows",
           "shared_vocab_size"]

CROSS_TOKENIZER_HINT = "use a cross-tokenizer aligner instead (distill.aligner = overlap, dskd, uld or mined)"


class VocabMismatchError(ValueError):
    """Student and teacher vocabularies differ (or a head is smaller than its vocabulary)."""


def tokenizer_vocab(tokenizer: Any) -> dict[str, int]:
    """The token → id dict of a tokenizer (added tokens included)."""
    if isinstance(tokenizer, Mapping):
        return dict(tokenizer)
    get_vocab = getattr(tokenizer, "get_vocab", None)
    if callable(get_vocab):
        return dict(get_vocab())
    raise TypeError(
        f"cannot read a vocabulary from {type(tokenizer).__name__}: expected a transformers tokenizer "
        f"(with get_vocab()) or a token -> id dict"
    )


def real_vocab_size(tokenizer: Any) -> int:
    """Rows of a head that the tokenizer can address: its largest id + 1 (0 for an empty vocab)."""
    vocab = tokenizer_vocab(tokenizer)
    return max(vocab.values(), default=-1) + 1


def _first_difference(student: dict[str, int], teacher: dict[str, int]) -> str:
    # Lowest differing id first, so the example is deterministic (dict order is not).
    for token, i in sorted(student.items(), key=lambda item: item[1]):
        j = teacher.get(token)
        if j != i:
            where = f"id {j} in the teacher" if j is not None else "absent from the teacher"
            return f"e.g. {token!r} is id {i} in the student but {where}"
    token, j = min(((t, j) for t, j in teacher.items() if t not in student), key=lambda item: item[1])
    return f"e.g. {token!r} (teacher id {j}) is absent from the student"


def same_vocab_size(student_tokenizer: Any, teacher_tokenizer: Any) -> int:
    """The real vocabulary size shared by two tokenizers with identical token → id dicts.

    Raises :class:`VocabMismatchError` (one line, both vocab sizes, the first differing token
    and the cross-tokenizer aligners to use) when the dicts differ.
    """
    student = tokenizer_vocab(student_tokenizer)
    teacher = tokenizer_vocab(teacher_tokenizer)
    if student != teacher:
        raise VocabMismatchError(
            f"student vocab ({len(student)} tokens) and teacher vocab ({len(teacher)} tokens) differ "
            f"({_first_difference(student, teacher)}); same_vocab needs one tokenizer, {CROSS_TOKENIZER_HINT}"
        )
    return max(student.values(), default=-1) + 1


def check_head_rows(vocab_size: int, student_rows: int, teacher_rows: int) -> int:
    """Check that both heads cover the vocabulary; returns ``vocab_size`` (rows to keep).

    Rows beyond ``vocab_size`` are padding and are sliced off; a head with *fewer* rows than the
    vocabulary belongs to another tokenizer (or is the wrong tensor) and raises
    :class:`VocabMismatchError`.
    """
    for side, rows in (("student", student_rows), ("teacher", teacher_rows)):
        if rows < vocab_size:
            raise VocabMismatchError(
                f"{side} head has {rows} rows but the shared tokenizer has {vocab_size} ids "
                f"(student head {student_rows}, teacher head {teacher_rows}): the {side} model does not "
                f"match this tokenizer; {CROSS_TOKENIZER_HINT} if its tokenizer differs"
            )
    return vocab_size


def shared_vocab_size(student_tokenizer: Any, teacher_tokenizer: Any, student_rows: int, teacher_rows: int) -> int:
    """Rows to keep of both heads: the tokenizers' real vocabulary size.

    ``student_rows``/``teacher_rows`` are the heads' first dimensions (e.g. 151936 and 152064
    for Qwen2.5-0.5B and -7B, which share a 151665-token vocabulary: the result is 151665 and
    both heads are used as ``W[:151665]``). Raises :class:`VocabMismatchError` when the
    tokenizers' vocabularies differ or a head is smaller than the vocabulary.
    """
    return check_head_rows(same_vocab_size(student_tokenizer, teacher_tokenizer), student_rows, teacher_rows)
