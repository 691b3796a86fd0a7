"""``mined``: the teacher distribution carried into the student vocabulary by a MinED token map.

FuseLLM (Wan et al. 2024, "Knowledge Fusion of Large Language Models", ICLR) aligns the
distributions of models with different vocabularies by mapping each teacher token to the
student token with the minimum edit distance (MinED) between their strings, then moving the
teacher's probability mass along that map. Here: at each aligned pair of positions
(:mod:`.offsets`) the teacher's next-token distribution at temperature T, ``p = softmax(z_t/T)``,
becomes ``p'[j] = Σ_{i: map(i) = j} p[i]`` over the student vocabulary (teacher ids without a
target, such as unmatched special tokens or padded head rows, drop out and ``p'`` is
renormalised), and the recipe's registered loss compares it with the student's distribution.

The loss takes logits, so it receives ``T·log p'`` as the teacher's logits (its ``softmax(·/T)``
gives back ``p'``) with ``-inf`` where ``p'`` is 0. Under the loss contract a ``-inf`` teacher
entry removes that student token from the comparison for both sides, so KD shapes the student's
distribution over the tokens the teacher can express, and the CE term covers the rest.

The map is built once per tokenizer pair by :func:`.vocab_maps.mined_map` (exact matches first,
then rapidfuzz Levenshtein by length windows; measured on 2 shared cores: 10-20 s for SmolLM2's
49k teacher tokens into Qwen's 152k, 4-11 s into Mistral's 32k, 1-1.5 min for Qwen's 152k into
SmolLM2's 49k) and cached in ``cache_dir`` (later loads take well under a second).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kdcore.distill.aligner import AlignedBatch, LossSpec
from kdcore.distill.loss import LossOutput
from kdflow_algorithms.aligners.common import PairedAligner, check_hidden, pair_rows, paired_loss
from kdflow_algorithms.aligners.vocab_maps import mined_map
from kdflow_algorithms.checks import check_range


@dataclass
class MinEDOptions:
    # Teacher tokens farther than this from their best student token are dropped (their mass is
    # not moved anywhere); -1 keeps every mapping, as FuseLLM does.
    max_distance: int = -1
    # rapidfuzz threads for the one-off map build; -1 = all cores.
    workers: int = -1

    def __post_init__(self):
        check_range("max_distance", self.max_distance, low=-1)
        if self.workers != -1:
            check_range("workers (-1 = all cores)", self.workers, low=1)


class MinEDAligner(PairedAligner):
    """Teacher distribution mapped into the student vocabulary; see the module docstring.

    Buffer ``teacher_to_student [V_t]`` (non-persistent: rebuilt from the tokenizers) holds the
    student id of each teacher id, -1 when it has none.
    """

    def __init__(self, teacher_to_student: torch.Tensor, build_seconds: float = 0.0):
        super().__init__()
        self.register_buffer("teacher_to_student", teacher_to_student.long(), persistent=False)
        self.build_seconds = build_seconds
        self._map_cache: tuple[Any, torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return f"teacher_vocab={self.teacher_to_student.numel()}, mapped={int((self.teacher_to_student >= 0).sum())}"

    def _map_for(self, teacher_rows: int, student_rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher ids that have a target, their student ids) for heads of these sizes."""
        key = (teacher_rows, student_rows, str(device))
        if self._map_cache is None or self._map_cache[0] != key:
            m = self.teacher_to_student
            if m.numel() > teacher_rows and bool((m[teacher_rows:] >= 0).any()):
                raise ValueError(f"mined: teacher head has {teacher_rows} rows but the map covers {m.numel()} teacher "
                                 "ids: is it the teacher tokenizer's model?")
            if m.numel() < teacher_rows:  # padded head rows: no target
                m = torch.cat([m, m.new_full((teacher_rows - m.numel(),), -1)])
            m = m[:teacher_rows]
            if m.numel() and int(m.max()) >= student_rows:
                raise ValueError(f"mined: student head has {student_rows} rows but the map targets student id "
                                 f"{int(m.max())}: is it the student tokenizer's model?")
            src = (m >= 0).nonzero().squeeze(1)
            self._map_cache = (key, src.to(device), m[src].to(device))
        return self._map_cache[1], self._map_cache[2]

    def check_heads(self, student_rows: int, teacher_rows: int) -> None:
        """The map must fit both heads (``forward`` checks it on every micro-batch too)."""
        self._map_for(teacher_rows, student_rows, self.teacher_to_student.device)

    def mapped_teacher_logits(self, lt: torch.Tensor, student_vocab: int, temperature: float) -> torch.Tensor:
        """``T·log p'`` over the student vocabulary (``-inf`` where ``p'`` is 0) from teacher
        logits ``lt [k, V_t]``; ``[k, V_s]``, float32 at least."""
        src, dst = self._map_for(lt.shape[1], student_vocab, lt.device)
        p = torch.softmax(lt.to(torch.promote_types(lt.dtype, torch.float32)) / temperature, dim=-1)
        mapped = p.new_zeros(lt.shape[0], student_vocab)
        mapped.index_add_(1, dst, p.index_select(1, src))
        mapped = mapped / mapped.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(mapped.dtype).tiny)
        out = mapped.log()  # log 0 = -inf: the loss contract's "masked entry"
        return out * temperature if temperature != 1.0 else out

    def forward(self, batch: AlignedBatch, loss: LossSpec) -> LossOutput:
        """KD between the student and the MinED-mapped teacher distribution on aligned pairs,
        CE on every labelled student row. Shapes as in :class:`kdcore.distill.aligner.AlignedBatch`."""
        check_hidden(batch, "mined")
        s_idx, t_idx = pair_rows(batch, "mined")
        w_t = batch.teacher_head
        v_s = batch.student_head.shape[0]
        self._map_for(w_t.shape[0], v_s, w_t.device)  # validate sizes before any work
        self._count(s_idx.numel(), batch.student_hidden.shape[0])
        return paired_loss(batch, loss, (s_idx, t_idx),
                           teacher_view=lambda lt: self.mapped_teacher_logits(lt, v_s, loss.temperature))


def mined(*, student_tokenizer: Any, teacher_tokenizer: Any, options: MinEDOptions | None = None,
          cache_dir: Any = None) -> MinEDAligner:
    """MinED (FuseLLM, Wan et al. 2024): teacher tokens mapped to their minimum-edit-distance student tokens.

    The map is computed once per tokenizer pair and cached in ``cache_dir``.
    """
    options = options or MinEDOptions()
    m = mined_map(student_tokenizer, teacher_tokenizer, cache_dir, workers=options.workers)
    dense = m.teacher_to_student()
    if options.max_distance >= 0:
        far = m.teacher_ids[m.distance > options.max_distance]
        dense[far] = -1
    if not (dense >= 0).any():
        raise ValueError("mined: no teacher token has a student target (check the tokenizers and max_distance)")
    return MinEDAligner(torch.from_numpy(dense), m.build_seconds)
