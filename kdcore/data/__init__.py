"""Data: loading, row formats, student/teacher tokenization with offsets, loss masks, batching.

Modules: :mod:`~kdcore.data.reading` (files and hub names to rows), :mod:`~kdcore.data.formats`
(row formats), :mod:`~kdcore.data.rendering` (templates, offsets, tokenization),
:mod:`~kdcore.data.preparation` (``prepare_data``), :mod:`~kdcore.data.report` (the data
report), :mod:`~kdcore.data.teacher_views` (each teacher's own tokenization: several teachers,
context distillation), :mod:`~kdcore.data.batching` (collate, batch planner, data positions); the shared
types are in :mod:`~kdcore.data.common`. Every name is importable from ``kdcore.data``.

Pipeline (``prepare_data``): read rows (``datasets``) → check each row and normalise it to one
of three formats → split a held-out set off (or read ``data.eval``) → render and tokenize each
row for the student and, when its tokenizer differs, the teacher → apply the max-length
policy → :class:`Sample` objects plus a :class:`DataReport` of what was kept, cut and dropped.

Row formats (``data.format``, ``auto`` picks by columns in this order):

- ``messages``: ``{"messages": [{"role": ..., "content": ...}, ...]}``, rendered with each
  tokenizer's own chat template. **Every assistant turn is trained** (its content, plus the
  end-of-turn special token the template puts right after it, e.g. ``<|im_end|>`` or
  ``</s>``); system/user turns and template markup are context only.
- ``prompt_completion``: ``{"prompt": str, "completion": str}`` → the text
  ``prompt + completion`` (plain concatenation, no template; the tokenizer's own BOS, if it
  adds one, and EOS appended); the completion and the EOS are trained. When ``prompt`` and
  ``completion`` are both message lists, the row is a conversation whose completion turns
  are trained.
- ``text``: ``{"text": str}`` → every token is trained (BOS if the tokenizer adds one; EOS
  appended).

**Canonical text and offsets.** Every sample has a canonical ``text``: its content only — the
message contents (or prompt + completion, or the text) concatenated in order, with nothing in
between. Each side's :class:`~kdcore.distill.aligner.Tokenized` ``offsets`` are in the coordinates of
that canonical text, not of the side's rendered template string, so aligners can pair tokens
across tokenizers whose templates differ:

- a token's span is the content characters its bytes belong to; a character whose bytes are
  split over several tokens (SentencePiece byte-fallback pieces, byte-level BPE tokens that
  end inside an emoji or CJK character) is in the span of each of them, so adjacent spans
  overlap by that character — as fast tokenizers report it. A position ``p`` has read whole
  characters only when no later token starts before ``offsets[p][1]``;
- template markup inside a token is left out of its span (SentencePiece's ``▁Hello`` after
  ``[INST]`` spans ``Hello``);
- a token of markup only gets the empty span ``(c, c)`` where ``c`` is the end of the content
  before it;
- starts and ends are non-decreasing; every content character the template renders is in some
  token's span (characters a tokenizer leaves out of all spans, such as trimmed spaces, go to
  the following token).

``loss_positions`` are the positions ``p`` whose target ``input_ids[p + 1]`` is trained.
"""

from __future__ import annotations

# Re-exports: the rest of kdflow (and plugins) import these from ``kdcore.data``. Rollout samples
# (kdcore.data.rollout_samples) render with this package's own helpers, imported there directly.
from kdcore.data.batching import (
    BatchPlanner,
    DataPosition,
    MicroBatch,
    PlannedStep,
    PlanStats,
    collate,
    flat_index,
    planner_for,
)
from kdcore.data.common import BadRow, DataError, OverlongRow, Sample
from kdcore.data.formats import FORMATS, ROLES, canonical_text, detect_format, normalize_row
from kdcore.data.preparation import PreparedData, prepare_data, split_eval
from kdcore.data.reading import RowSource, read_rows, resolve_data_path
from kdcore.data.rendering import build_sample, tokenize_rows
from kdcore.data.report import MAX_BAD_EXAMPLES, DataReport, SplitReport
from kdcore.data.teacher_views import TeacherView, shift_past_context, with_context

__all__ = [
    "FORMATS", "MAX_BAD_EXAMPLES", "ROLES",
    "BadRow", "BatchPlanner", "DataError", "DataPosition", "DataReport", "MicroBatch", "OverlongRow",
    "PlannedStep", "PlanStats", "PreparedData", "RowSource", "Sample", "SplitReport",
    "build_sample", "canonical_text", "collate", "detect_format", "flat_index", "normalize_row",
    "planner_for", "prepare_data", "read_rows", "resolve_data_path", "split_eval", "tokenize_rows",
    "TeacherView", "shift_past_context", "with_context",
]
