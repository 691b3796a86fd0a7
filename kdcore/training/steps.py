"""From the data plan to prepared steps: rollout selection, alignment, global token counts.

Per optimizer step and rank: the batch planner gives ``grad_accum`` micro-batches (sample
indices); the rollout policy picks the sequences to learn on; the aligner pairs student loss
positions with teacher positions per sample, once per teacher, over the rows
``data.teacher_column`` routes to it (:mod:`kdcore.training.teachers`); the step's KD and CE row counts are summed over
micro-batches and ranks before any backward, so each micro-batch's loss can be scaled to its
share of the global token mean (see :mod:`kdcore.training.forward`).

What a training micro-batch learns from: with ``kd_ratio`` 0 (``kd=False``) no row is paired
with the teacher, so the teacher computes nothing for training (the held-out evaluation still
asks it). With ``kd_ratio`` < 1 (``ce_on_data``), rows the *student* sampled get no CE: the
expected gradient of the student's log-likelihood of its own samples is zero (E_q[∇ log q] = 0),
so CE there is noise that takes the place of the supervised term. Those micro-batches carry the
data samples of the same prompts as CE-only rows instead, keeping the CE half on the data's
references whatever the rollout (as GKD and DistiLLM keep their supervised term on the data).
Teacher samples (SeqKD) keep their CE: learning the teacher's answers is that method, unless
the policy lists "teacher" in ``ce_from_data`` (KD on the teacher's answers, CE on the data).
A sample whose end a policy's rule drew (``RolloutSample.drawn_end``) keeps the CE of its stop
token in any case, and that token gets no KD pair: the generator did not choose to stop there.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import torch

from kdcore.training.types import LatestEval, PreparedMicroBatch, PreparedStep, TeacherShare
from kdcore.data import collate, planner_for
from kdcore.distill.loss import IGNORE_INDEX
from kdcore.training.rollout_policy import RolloutContext


def _pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[B, L]`` ids and mask (as :func:`kdcore.data.collate` pads)."""
    longest = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), longest), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[b, : len(s)] = 1
    return ids, mask


@dataclass(frozen=True)
class CEOnlyTargets:
    """The training rows that keep their CE but get no KD pair, so that the data alone decides
    there: those whose target is one of ``labels`` (the stop tokens with ``distill.kd_at_stop``
    false: where answers end) and, with ``openings``, each answer's first token
    (``distill.kd_at_opening`` false: how answers open). A rollout sample's drawn end (its stop
    token put there by a policy's rule, :attr:`kdcore.data.rollout_samples.RolloutSample.drawn_end`)
    is one of them whatever the settings: no model chose to stop there. The held-out evaluation
    pairs every row."""

    labels: frozenset = frozenset()
    openings: bool = False

    def __bool__(self) -> bool:
        return bool(self.labels) or self.openings

    def drop(self, a, sample):
        """Alignment ``a`` of ``sample``'s student side without its pairs at these rows; an
        answer's first token is the target of the first loss position of each run of
        consecutive ones."""
        ids, pos = sample.student.input_ids, sample.student.loss_positions
        drawn = len(pos) - 1 if getattr(sample, "drawn_end", False) else None
        if not self and drawn is None:
            return a

        def ce_only(i: int) -> bool:
            opens = i == 0 or pos[i] != pos[i - 1] + 1
            return i == drawn or int(ids[pos[i] + 1]) in self.labels or (self.openings and opens)

        keep = [k for k, i in enumerate(a.student_index) if not ce_only(i)]
        if len(keep) == len(a.student_index):
            return a
        return replace(a, student_index=[a.student_index[k] for k in keep],
                       teacher_index=[a.teacher_index[k] for k in keep])


class StepPreparer:
    """Builds :class:`PreparedStep` s for one rank, in step order."""

    def __init__(self, *, parts, rollout, train_samples: Sequence, train_cfg, shuffle: bool, env, kdist,
                 pad_id: int, teacher_pad_id: int, latest_eval: LatestEval, sampler=None,
                 kd: bool = True, ce_on_data: bool = False, ce_only: CEOnlyTargets = CEOnlyTargets()):
        self.parts = parts  # kdcore.training.teachers.TeacherPart per teacher (one teacher: a list of one)
        self.rollout = rollout
        self.train_samples = train_samples
        self.train_cfg = train_cfg
        self.shuffle = shuffle
        self.env = env
        self.kdist = kdist
        self.pad_id = pad_id
        self.teacher_pad_id = teacher_pad_id
        self.sampler = sampler  # kdcore.training.sampler.RolloutSampler for sampling policies, else None
        self.latest_eval = latest_eval  # what the evaluator saw last, for policies that adapt to it
        self.kd = kd  # training rows are paired with the teacher (kd_ratio > 0)
        self.ce_on_data = ce_on_data  # CE on the data's references, not on student samples (kd_ratio < 1)
        # training rows with CE and no KD pair; the held-out evaluation (micro_batch without them)
        # still scores every row
        self.ce_only = ce_only

    @property
    def looks_ahead(self) -> bool:
        """Whether the next step may be prepared before this one's update (not for policies that
        sample from the student: their samples must see the latest weights)."""
        return not getattr(self.rollout, "needs_sampling", False)

    def training_micro_batch(self, step: int, index: int, last: bool, data: list, selected: list) -> PreparedMicroBatch:
        """The micro-batch a step trains on: the rollout's ``selected`` samples for ``data``
        (see the module docstring for which rows get KD and which CE)."""
        sources = getattr(self.rollout, "ce_from_data", ("student",))
        replaced = [b for b, s in enumerate(selected) if getattr(s, "origin", "data") in sources]
        extra: list = []
        if replaced and self.ce_on_data:
            kept = {id(s) for s in selected}
            extra = [d for d in data if id(d) not in kept]  # a prompt's fallback is already in
        samples = list(selected) + extra
        kd_rows = list(range(len(selected))) if self.kd else []
        return self.micro_batch(step, index, last, samples, kd_rows=kd_rows,
                                no_ce=replaced if self.ce_on_data else [], ce_only=self.ce_only)

    def micro_batch(self, step: int, index: int, last: bool, samples: list, *, kd_rows: list[int] | None = None,
                    no_ce: Sequence[int] = (), ce_only: CEOnlyTargets = CEOnlyTargets()) -> PreparedMicroBatch:
        """``samples`` collated and aligned: rows ``kd_rows`` (default all) paired with the
        teachers that teach them, rows ``no_ce`` without CE labels, no pair at the rows
        ``ce_only`` names."""
        mb = collate(samples, self.pad_id, self.teacher_pad_id)
        if no_ce:
            starts = [0]
            for s in samples:
                starts.append(starts[-1] + len(s.student.loss_positions))
            for b in no_ce:  # a drawn end keeps its CE: nothing else teaches a stop no model chose
                mb.labels[starts[b]:starts[b + 1] - int(getattr(samples[b], "drawn_end", False))] = IGNORE_INDEX
        ce_rows = int((mb.labels != IGNORE_INDEX).sum())
        paired = list(range(len(samples))) if kd_rows is None else list(kd_rows)
        shares = {}
        for part in self.parts:
            rows = [b for b in paired if part.teaches(samples[b])]
            if rows:
                shares[part.name] = self._share(part, mb, samples, rows, ce_only)
        if not shares:  # no row paired (kd_ratio 0): the first teacher's empty share still counts CE
            shares[self.parts[0].name] = self._share(self.parts[0], mb, samples, [])
        return PreparedMicroBatch(step=step, index=index, last=last, batch=mb, ce_rows=ce_rows, teachers=shares)

    def _share(self, part, mb, samples: list, rows: list[int],
               ce_only: CEOnlyTargets = CEOnlyTargets()) -> TeacherShare:
        """One teacher's share: its pairs over the micro-batch's student rows (sample ``b``'s
        loss rows start after those of samples ``< b``) and the teacher rows it reads.

        A teacher that reads the collated ids (the student's, or ``Sample.teacher``) and
        teaches every paired row reads ``mb`` itself, rows outside ``rows`` asking for no
        position (the schedule does not send them); one that reads its own tokenization
        (``own_tokens``) or only some rows (``data.teacher_column``) gets ``rows`` padded
        alone."""
        student_starts, base = [], 0
        for s in samples:
            student_starts.append(base)
            base += len(s.student.loss_positions)
        alignments = [part.aligner.align(samples[b].student, part.view(samples[b])) for b in rows]
        alignments = [ce_only.drop(a, samples[b]) for b, a in zip(rows, alignments)]
        s_idx, t_idx, s_off, t_off = [], [], [], []
        t_base = 0
        for b, a in zip(rows, alignments):
            s_base = student_starts[b]
            s_off.append(s_base)
            t_off.append(t_base)
            s_idx.extend(s_base + i for i in a.student_index)
            t_idx.extend(t_base + i for i in a.teacher_index)
            t_base += len(a.teacher_positions)
        extra = part.aligner.collate([a.extra for a in alignments], s_off, t_off)
        student_index = torch.tensor(s_idx, dtype=torch.long)
        positions = [list(a.teacher_positions) for a in alignments]
        batch, batch_rows = mb, rows
        if rows and (part.own_tokens or any(not part.teaches(s) for s in samples)):
            # the rows this teacher reads: its own tokens, or the student's ids
            batch = replace(mb, **dict(zip(("teacher_input_ids", "teacher_attention_mask"),
                                           _pad([part.view(samples[b]).input_ids for b in rows], part.pad_id))))
        else:
            batch_rows = list(range(len(samples)))
            by_row = dict(zip(rows, positions))
            positions = [by_row.get(b, []) for b in batch_rows]
        return TeacherShare(batch=batch, rows=batch_rows, alignments=alignments, teacher_positions=positions,
                            student_index=student_index, teacher_index=torch.tensor(t_idx, dtype=torch.long),
                            extra=extra, kd_rows=int(torch.unique(student_index).numel()))

    def steps(self, start_step: int, position: Any) -> Iterator[PreparedStep]:
        """Prepared steps from ``start_step`` (at data ``position``) to ``train.max_steps``."""
        planner = planner_for(self.train_samples, self.train_cfg, world_size=self.env.world_size,
                              shuffle=self.shuffle)
        rng = random.Random(self.train_cfg.seed * 7919 + self.env.rank)
        step = start_step
        for planned in planner.iterate(self.env.rank, position):
            if step >= self.train_cfg.max_steps:
                return
            if self.sampler is not None:
                self.sampler.before_step(step)  # weight sync when due: collective, so on every rank here
            ctx = RolloutContext(step=step, rng=rng, last_eval_loss=self.latest_eval.loss,
                                 last_eval=self.latest_eval.record, max_steps=self.train_cfg.max_steps,
                                 **(self.sampler.context_fields() if self.sampler is not None else {}))
            mbs = []
            n = len(planned.micro_batches)
            for i, idx in enumerate(planned.micro_batches):
                ctx.micro_batch = i
                data = [self.train_samples[j] for j in idx]
                mbs.append(self.training_micro_batch(step, i, i == n - 1, data, self.rollout.select(data, ctx)))
            names = [p.name for p in self.parts]
            counts = torch.tensor([sum(m.ce_rows for m in mbs)]
                                  + [sum(m.teachers[n].kd_rows for m in mbs if n in m.teachers) for n in names],
                                  dtype=torch.float64)
            self.kdist.all_reduce_sum(counts)
            yield PreparedStep(step=step, micro_batches=mbs, data_next=planned.next, ce_global=int(counts[0]),
                               kd_by_teacher={n: int(c) for n, c in zip(names, counts[1:].tolist())})
            step += 1
