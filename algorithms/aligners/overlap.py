"""``overlap``: KD over the vocabulary both tokenizers share, at positions that read the same text.

The exact-match baseline of cross-tokenizer distillation: the tokens whose strings are equal
after normalising the space/newline markers and the byte alphabets (``Ġworld`` = ``▁world`` =
" world"; see :mod:`.vocab_maps`) form a shared vocabulary; at each aligned pair of positions
(:mod:`.offsets`) both next-token distributions are restricted to it (softmax over the shared
ids only) and compared with the recipe's registered loss. This is the "exact match" vocabulary
mapping that ULD (Boizard et al. 2024) and MinED (Wan et al. 2024, FuseLLM) are measured
against, and the token-overlap setting studied by Zhang et al. 2024 (DSKD) for models whose
vocabularies differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kdcore.distill.aligner import AlignedBatch, LossSpec
from kdcore.distill.loss import LossOutput
from kdflow_algorithms.aligners.common import PairedAligner, check_hidden, pair_rows, paired_loss
from kdflow_algorithms.aligners.vocab_maps import exact_map, token_surfaces
from kdflow_algorithms.checks import check_range


@dataclass
class OverlapOptions:
    # Special tokens matched by exact string (<|im_end|> = <|im_end|>) and EOS with EOS: the
    # end-of-turn prediction is part of what the student must learn from the teacher.
    include_specials: bool = True
    # Below this many shared ids the restricted distributions say little; fail early instead.
    min_shared: int = 1000

    def __post_init__(self):
        check_range("min_shared", self.min_shared, low=0)


class OverlapAligner(PairedAligner):
    """Exact-match shared vocabulary; see the module docstring.

    Buffers ``shared_student``/``shared_teacher`` ``[S]`` (non-persistent: rebuilt from the
    tokenizers, not checkpointed) hold the shared ids, pair ``k`` spelling the same string.
    """

    def __init__(self, shared_student: torch.Tensor, shared_teacher: torch.Tensor, build_seconds: float = 0.0):
        super().__init__()
        self.register_buffer("shared_student", shared_student.long(), persistent=False)
        self.register_buffer("shared_teacher", shared_teacher.long(), persistent=False)
        self.build_seconds = build_seconds
        self._head_cache: tuple[Any, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"shared={self.shared_student.numel()}"

    def _teacher_head(self, w_t: torch.Tensor) -> torch.Tensor:
        # The teacher head is frozen and usually the same tensor every step: slice it once.
        key = (w_t.data_ptr(), tuple(w_t.shape), w_t.dtype, w_t.device, w_t._version)
        if self._head_cache is None or self._head_cache[0] != key:
            with torch.no_grad():
                self._head_cache = (key, w_t.index_select(0, self.shared_teacher.to(w_t.device)))
        return self._head_cache[1]

    def forward(self, batch: AlignedBatch, loss: LossSpec) -> LossOutput:
        """KD over the shared vocabulary on aligned pairs, CE on every labelled student row.

        ``student_hidden [N_s, H_s]``, ``teacher_hidden [N_t, H_t]``, pairs ``[P]``.
        """
        check_hidden(batch, "overlap")
        s_idx, t_idx = pair_rows(batch, "overlap")
        self.check_heads(batch.student_head.shape[0], batch.teacher_head.shape[0])
        shared_s = self.shared_student.to(batch.student_hidden.device)
        self._count(s_idx.numel(), batch.student_hidden.shape[0])
        return paired_loss(batch, loss, (s_idx, t_idx), teacher_head=self._teacher_head(batch.teacher_head),
                           student_view=lambda ls: ls.index_select(1, shared_s))

    def check_heads(self, student_rows: int, teacher_rows: int) -> None:
        """Both heads must cover the shared ids (``forward`` checks it on every micro-batch too)."""
        if self.shared_student.numel() and int(self.shared_student.max()) >= student_rows:
            raise ValueError(f"overlap: student head has {student_rows} rows but the shared vocabulary uses id "
                             f"{int(self.shared_student.max())}: is it the student tokenizer's model?")
        if self.shared_teacher.numel() and int(self.shared_teacher.max()) >= teacher_rows:
            raise ValueError(f"overlap: teacher head has {teacher_rows} rows but the shared vocabulary uses id "
                             f"{int(self.shared_teacher.max())}: is it the teacher tokenizer's model?")


def overlap(*, student_tokenizer: Any, teacher_tokenizer: Any, options: OverlapOptions | None = None,
            cache_dir: Any = None) -> OverlapAligner:
    """Exact-match shared vocabulary: KD with both distributions restricted to the shared tokens.

    The shared vocabulary is computed once per tokenizer pair and cached in ``cache_dir``.
    Raises ``ValueError`` when fewer than ``options.min_shared`` tokens are shared.
    """
    options = options or OverlapOptions()
    m = exact_map(student_tokenizer, teacher_tokenizer, cache_dir)
    s_ids, t_ids = m.student_ids, m.teacher_ids
    if not options.include_specials:
        surf = token_surfaces(student_tokenizer).surfaces
        keep = [k for k, i in enumerate(s_ids.tolist()) if surf[i] is not None]
        s_ids, t_ids = s_ids[keep], t_ids[keep]
    if len(s_ids) < options.min_shared:
        raise ValueError(f"overlap: the tokenizers share only {len(s_ids)} tokens (< min_shared = {options.min_shared}); "
                         "use a vocabulary-agnostic aligner (uld, dskd or mined)")
    return OverlapAligner(torch.from_numpy(s_ids), torch.from_numpy(t_ids), m.build_seconds)
