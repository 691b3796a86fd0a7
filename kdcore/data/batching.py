"""Batching: padding samples into a :class:`MicroBatch`, and the deterministic per-epoch
:class:`BatchPlanner` with the :class:`DataPosition` checkpoints resume from."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from kdcore.data.common import Sample, _cfg
from kdcore.data.images import collate_vision


@dataclass
class MicroBatch:
    """Padded tensors for one micro-batch (right padding).

    Student side: ``input_ids``/``attention_mask`` ``[B, L]`` (long); per sample
    ``loss_positions``; ``loss_index`` ``[N]`` flat indices ``b * L + p`` into ``[B * L]``
    (sample-major, positions ascending); ``labels`` ``[N]`` = ``input_ids[b, p + 1]``.
    Teacher side (cross-tokenizer only, else None — the teacher then receives ``input_ids``):
    ``teacher_input_ids``/``teacher_attention_mask`` ``[B, L_t]``, ``teacher_loss_positions``,
    ``teacher_loss_index`` (flat into ``[B * L_t]``).
    ``vision`` / ``teacher_vision``: a vision-language side's pixel inputs for the micro-batch
    (:func:`kdcore.data.images.collate_vision`), None for text.
    """

    input_ids: Any
    attention_mask: Any
    loss_positions: list[list[int]]
    loss_index: Any
    labels: Any
    samples: list[Sample]
    teacher_input_ids: Any = None
    teacher_attention_mask: Any = None
    teacher_loss_positions: list[list[int]] | None = None
    teacher_loss_index: Any = None
    vision: dict[str, Any] | None = None
    teacher_vision: dict[str, Any] | None = None

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) student tokens."""
        return int(self.attention_mask.sum())

    @property
    def padded_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_index.numel())


def flat_index(positions: Sequence[Sequence[int]], seq_len: int):
    """``[N]`` long tensor of ``b * seq_len + p`` for each sample ``b`` and position ``p``."""
    import torch

    idx = [b * seq_len + p for b, ps in enumerate(positions) for p in ps]
    return torch.tensor(idx, dtype=torch.long)


def _pad(seqs: Sequence[Sequence[int]], pad_id: int):
    import torch

    L = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), L), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), L), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


def collate(samples: Sequence[Sample], pad_id: int, teacher_pad_id: int | None = None) -> MicroBatch:
    """Pad samples into a :class:`MicroBatch` (see its docstring for shapes)."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    ids, mask = _pad([s.student.input_ids for s in samples], pad_id)
    positions = [list(s.student.loss_positions) for s in samples]
    index = flat_index(positions, ids.shape[1])
    labels = ids.reshape(-1)[index + 1]

    mb = MicroBatch(input_ids=ids, attention_mask=mask, loss_positions=positions, loss_index=index,
                    labels=labels, samples=list(samples), vision=collate_vision([s.student for s in samples]))
    have_t = [s.teacher is not None for s in samples]
    if any(have_t):
        if not all(have_t):
            raise ValueError("collate: some samples have a teacher tokenization and some do not")
        tpad = pad_id if teacher_pad_id is None else teacher_pad_id
        t_ids, t_mask = _pad([s.teacher.input_ids for s in samples], tpad)
        t_pos = [list(s.teacher.loss_positions) for s in samples]
        mb.teacher_input_ids, mb.teacher_attention_mask = t_ids, t_mask
        mb.teacher_loss_positions = t_pos
        mb.teacher_loss_index = flat_index(t_pos, t_ids.shape[1])
        mb.teacher_vision = collate_vision([s.teacher for s in samples])
    return mb


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream stands: ``step`` optimizer steps of ``epoch`` are done."""

    epoch: int = 0
    step: int = 0


@dataclass
class PlannedStep:
    """One optimizer step for one rank: ``micro_batches`` (``grad_accum`` lists of sample
    indices). ``next`` is the position after this step (store it in checkpoints).
    ``global_loss_tokens`` sums the loss tokens of every rank's micro-batches in this step
    (for an exact token mean without a collective), when the planner knows them."""

    epoch: int
    step: int
    micro_batches: list[list[int]]
    next: DataPosition
    global_loss_tokens: int | None = None


@dataclass
class PlanStats:
    micro_batches: int  # over all ranks
    steps: int
    samples: int  # samples scheduled this epoch (the rest could not fill a whole step)
    real_tokens: int
    padded_tokens: int

    @property
    def padding_waste(self) -> float:
        """Fraction of computed positions that are padding."""
        return 1.0 - self.real_tokens / self.padded_tokens if self.padded_tokens else 0.0


class BatchPlanner:
    """Deterministic per-epoch micro-batch plan shared by all ranks (no communication).

    Each epoch: the sample order is shuffled from ``(seed, epoch)``; micro-batches hold
    ``micro_batch_size`` samples, or — when ``max_tokens`` > 0 — are length-grouped so each
    one's padded size ``B × L_max`` stays within ``max_tokens`` (samples are sorted by length
    within windows of about 64 micro-batches, packed longest first, and the micro-batches
    shuffled). Steps take ``world_size × grad_accum`` micro-batches; within a step, micro-batches
    go to ranks by padded size, largest first to the least-loaded rank, so every rank gets
    exactly ``grad_accum`` of them and a similar token load. When the epoch's micro-batches do
    not divide into whole steps, the largest ones are split in two until they do; only when
    that is impossible (too few samples) are the leftovers skipped for that epoch.
    """

    def __init__(self, lengths: Sequence[int], *, micro_batch_size: int = 4, max_tokens: int = 0,
                 world_size: int = 1, grad_accum: int = 1, seed: int = 0, shuffle: bool = True,
                 loss_tokens: Sequence[int] | None = None):
        if not lengths:
            raise ValueError("BatchPlanner needs at least one sample")
        if micro_batch_size < 1 or world_size < 1 or grad_accum < 1 or max_tokens < 0:
            raise ValueError("micro_batch_size, world_size and grad_accum must be >= 1 and max_tokens >= 0")
        longest = max(lengths)
        if max_tokens and longest > max_tokens:
            raise ValueError(f"train.max_tokens_per_micro_batch={max_tokens} is smaller than the longest sample "
                             f"({longest} tokens); raise it to at least data.max_length")
        self.lengths = [int(n) for n in lengths]
        self.loss_tokens = None if loss_tokens is None else [int(n) for n in loss_tokens]
        self.micro_batch_size = micro_batch_size
        self.max_tokens = max_tokens
        self.world_size = world_size
        self.grad_accum = grad_accum
        self.seed = seed
        self.shuffle = shuffle
        self._cache: dict[int, list[list[list[list[int]]]]] = {}

    @property
    def per_step(self) -> int:
        return self.world_size * self.grad_accum

    def _rng(self, epoch: int) -> random.Random:
        return random.Random(self.seed * 1_000_003 + epoch)

    def _micro_batches(self, epoch: int) -> list[list[int]]:
        rng = self._rng(epoch)
        order = list(range(len(self.lengths)))
        if self.shuffle:
            rng.shuffle(order)
        if not self.max_tokens:
            return [order[i:i + self.micro_batch_size] for i in range(0, len(order), self.micro_batch_size)]
        mean = sum(self.lengths) / len(self.lengths)
        # Sorting within windows (not globally) keeps batches different from epoch to epoch.
        window = max(1, int(64 * self.max_tokens / max(mean, 1.0))) if self.shuffle else len(order)
        batches: list[list[int]] = []
        for w in range(0, len(order), window):
            chunk = sorted(order[w:w + window], key=lambda i: -self.lengths[i])  # stable: shuffled ties
            cur: list[int] = []
            cur_max = 0
            for i in chunk:
                n = self.lengths[i]
                if cur and (len(cur) + 1) * max(cur_max, n) > self.max_tokens:
                    batches.append(cur)
                    cur, cur_max = [], 0
                cur.append(i)
                cur_max = max(cur_max, n)
            if cur:
                batches.append(cur)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def epoch_plan(self, epoch: int) -> list[list[list[list[int]]]]:
        """``plan[step][rank]`` = that rank's ``grad_accum`` micro-batches (lists of indices)."""
        if epoch in self._cache:
            return self._cache[epoch]
        batches = self._micro_batches(epoch)
        k = self.per_step
        while len(batches) % k:
            big = max(range(len(batches)), key=lambda i: (len(batches[i]), -i))
            b = batches[big]
            if len(b) < 2:
                break
            batches[big:big + 1] = [b[: len(b) // 2], b[len(b) // 2:]]
        usable = len(batches) - len(batches) % k
        if usable == 0:
            raise ValueError(f"{len(self.lengths)} samples cannot fill one step of world_size × grad_accum = "
                             f"{k} micro-batches")
        plan = []
        for s in range(0, usable, k):
            step = batches[s:s + k]
            load = [0] * self.world_size
            ranks: list[list[tuple[int, list[int]]]] = [[] for _ in range(self.world_size)]
            cost = [len(b) * max(self.lengths[i] for i in b) for b in step]
            for j in sorted(range(k), key=lambda j: (-cost[j], j)):
                r = min((r for r in range(self.world_size) if len(ranks[r]) < self.grad_accum),
                        key=lambda r: (load[r], r))
                ranks[r].append((j, step[j]))
                load[r] += cost[j]
            plan.append([[b for _, b in sorted(rk)] for rk in ranks])
        if len(self._cache) > 4:  # an epoch plan is small, but runs may have many epochs
            self._cache.pop(min(self._cache))
        self._cache[epoch] = plan
        return plan

    def steps_per_epoch(self, epoch: int = 0) -> int:
        return len(self.epoch_plan(epoch))

    def stats(self, epoch: int = 0) -> PlanStats:
        plan = self.epoch_plan(epoch)
        mbs = [b for step in plan for rk in step for b in rk]
        real = sum(self.lengths[i] for b in mbs for i in b)
        padded = sum(len(b) * max(self.lengths[i] for i in b) for b in mbs)
        return PlanStats(micro_batches=len(mbs), steps=len(plan), samples=sum(len(b) for b in mbs),
                         real_tokens=real, padded_tokens=padded)

    def iterate(self, rank: int = 0, start: DataPosition = DataPosition()) -> Iterator[PlannedStep]:
        """This rank's steps from ``start`` on, endlessly (epoch after epoch)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world_size {self.world_size}")
        epoch, step = start.epoch, start.step
        while True:
            plan = self.epoch_plan(epoch)
            if step >= len(plan):
                epoch, step = epoch + 1, step - len(plan)
                continue
            nxt = DataPosition(epoch, step + 1) if step + 1 < len(plan) else DataPosition(epoch + 1, 0)
            glt = None
            if self.loss_tokens is not None:
                glt = sum(self.loss_tokens[i] for rk in plan[step] for b in rk for i in b)
            yield PlannedStep(epoch=epoch, step=step, micro_batches=plan[step][rank], next=nxt, global_loss_tokens=glt)
            epoch, step = nxt.epoch, nxt.step


def planner_for(samples: Sequence[Sample], train_cfg: Any, *, world_size: int = 1,
                shuffle: bool = True) -> BatchPlanner:
    """A :class:`BatchPlanner` for samples from the recipe's ``train`` section."""
    return BatchPlanner(
        [len(s.student.input_ids) for s in samples],
        micro_batch_size=_cfg(train_cfg, "micro_batch_size", 4),
        max_tokens=_cfg(train_cfg, "max_tokens_per_micro_batch", 0),
        world_size=world_size,
        grad_accum=_cfg(train_cfg, "grad_accum", 1),
        seed=_cfg(train_cfg, "seed", 0),
        shuffle=shuffle,
        loss_tokens=[len(s.student.loss_positions) for s in samples],
    )
