"""Held-out evaluation during training (before the first step, every ``train.eval_every`` steps,
and at the end).

A record holds ``eval_teacher_kl`` (forward KL teacher→student through the aligner),
``eval_kd`` (the recipe's own loss), ``eval_ppl`` (student perplexity on the references) and,
when both share a vocabulary, ``eval_top1_agreement``; plus the aligner's own scalars
(``metrics()``: ``align_ratio``, DSKD's ``projector_acc``) over the held-out forwards only, as
``eval_<name>``. Every rank evaluates its own slice of the fixed held-out batches and the sums
are all-reduced; aligner scalars are the mean of the ranks' values.

The trainer builds an :class:`Evaluator` from its own parts; :func:`frozen_evaluator` builds
one around a model that is only scored (``kdcore eval``), with the same preparer, forward and
teacher schedule classes, so both report the same numbers for the same weights.
"""

from __future__ import annotations

import math

import torch

from kdcore.training.types import LatestEval, TeacherShare
from kdcore.distill.aligner import Aligner
from kdcore.infra.phases import phase
from kdcore.training.forward import DistillForward
from kdcore.training.steps import StepPreparer
from kdcore.training.teacher_schedule import TeacherSchedule


def fkl_reference(student_logits, teacher_logits, *, temperature):
    """Forward KL for the held-out metric, independent of which losses are installed.

    A metric, run without grad: it works in place, so two ``[n, V]`` buffers and a mask live
    beside the logits (the plain formula held six, and the final evaluation was the student
    process's peak)."""
    def scaled(logits):  # no copy at temperature 1
        return logits.float() if temperature == 1 else logits.float() / temperature

    log_p = torch.log_softmax(scaled(teacher_logits), -1)
    log_q = torch.log_softmax(scaled(student_logits), -1)
    p = log_p.exp()
    diff = log_p.sub_(log_q)
    del log_q
    # p = 0 where the teacher masks a token (log p = -inf): those terms are 0, not 0·inf = nan
    return diff.mul_(p).masked_fill_(p == 0, 0.0).sum(-1)


def mean_over_ranks(values: dict[str, float], env, aligner) -> dict[str, float]:
    """Each key averaged over the ranks that report it (collective: call on every rank)."""
    # an aligner without metrics (same_vocab) has none on any rank: no collective to pay for
    if env.world_size == 1 or type(aligner).metrics is Aligner.metrics:
        return values
    import torch.distributed as dist

    every: list = [None] * env.world_size
    dist.all_gather_object(every, values)
    keys = sorted({k for d in every for k in d})
    return {k: sum(d[k] for d in every if k in d) / sum(1 for d in every if k in d) for k in keys}


class Evaluator:
    """Scores the student against the teacher on the held-out samples."""

    def __init__(self, *, samples, preparer, forward, schedule, train_cfg, chunk_size: int, env, kdist,
                 latest: LatestEval):
        self.samples = samples
        self.preparer = preparer  # kdcore.training.steps.StepPreparer: collate + align
        self.forward = forward  # kdcore.training.forward.DistillForward
        self.schedule = schedule  # kdcore.training.teacher_schedule.TeacherSchedule
        self.train_cfg = train_cfg
        self.chunk_size = chunk_size
        self.env = env
        self.kdist = kdist
        self.latest = latest
        # a progress line for the held-out batches (kdcore.infra.phases); the trainer turns it off
        # while its own bar is live, since two live displays on one terminal garble each other
        self.show_progress = True
        self.progress_label = ""  # "" = "held-out evaluation (step N), batches"
        self._advance = lambda n=1, tokens=0: None

    def due(self, step: int) -> bool:
        every = self.train_cfg.eval_every
        return bool(every) and step % every == 0 and step < self.train_cfg.max_steps

    @torch.no_grad()
    def evaluate(self, step: int) -> dict | None:
        """One record (also kept as ``latest``), or None without held-out samples.

        One teacher: ``eval_teacher_kl``, ``eval_kd``, ... as they are. Several teachers:
        ``eval_teacher_kl/<name>``, ``eval_kd/<name>`` (and
        ``eval_top1_agreement/<name>``, ``eval_<aligner metric>/<name>``) per teacher, plus the
        totals ``eval_teacher_kl`` and ``eval_kd`` weighted as the loss is."""
        if not self.samples:
            return None
        student = self.forward.student
        was_training = student.model.training
        student.train(False)

        rounds = math.ceil(len(self.held_out_batches()) / self.env.world_size)
        with phase(self.progress_label or f"held-out evaluation (step {step}), batches", total=rounds,
                   enabled=self.show_progress and self.env.is_main) as self._advance:
            sums, aligner_recs = self._held_out_sums(step)
        flat = torch.cat(list(sums.values()))
        self.kdist.all_reduce_sum(flat)
        student.train(was_training)
        parts = self.forward.parts
        several = len(parts) > 1
        rec = {"step": step}
        totals = {"eval_teacher_kl": 0.0, "eval_kd": 0.0}
        for k, name in enumerate(parts):
            kl, kd_tok, ce, ce_tok, own_kd, agree_n, agree_tot = flat[7 * k: 7 * k + 7].tolist()
            mine = {"eval_teacher_kl": kl / max(kd_tok, 1), "eval_kd": own_kd / max(kd_tok, 1)}
            if k == 0:
                ppl = {"eval_ppl": math.exp(min(ce / max(ce_tok, 1), 50.0)), "eval_tokens": int(ce_tok)}
            if not parts[name].cross:
                mine["eval_top1_agreement"] = agree_n / max(agree_tot, 1)
            mine.update({f"eval_{m}": v for m, v in aligner_recs[name].items()})
            if not several:
                rec.update({**{key: mine[key] for key in totals}, **ppl,
                            **{key: v for key, v in mine.items() if key not in totals}})
                break
            for key in totals:
                totals[key] += parts[name].weight * mine[key]
            rec.update({f"{key}/{name}": v for key, v in mine.items()})
        if several:
            rec.update({**totals, **ppl})
        self.latest.record, self.latest.loss = rec, rec["eval_kd"]
        return rec

    def held_out_batches(self) -> list[list[int]]:
        """The sample indices of the micro-batches every evaluation scores (bounded by
        ``train.eval_batches``), before the split over ranks."""
        mbs = self.train_cfg.micro_batch_size
        idx = list(range(len(self.samples)))
        return [idx[i:i + mbs] for i in range(0, len(idx), mbs)][: self.train_cfg.eval_batches]

    def _held_out_sums(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
        batches = self.held_out_batches()
        mine = batches[self.env.rank::self.env.world_size]
        # pad every rank to the same number of forwards: FSDP collectives need all ranks
        rounds = math.ceil(len(batches) / self.env.world_size)
        parts = self.forward.parts
        sums = {name: torch.zeros(7, dtype=torch.float64) for name in parts}
        # the aligners' counters (align_ratio, projector_acc) restart here, so eval reports held-out
        # forwards only; training forwards not yet read by a step record are dropped
        for part in parts.values():
            part.aligner.metrics()
        aligner_recs: dict = {name: {} for name in parts}
        specs = {name: [self.forward.spec(0, 0, loss_fn=fkl_reference, options={}, eval_mode=True, teacher=name),
                        self.forward.spec(0, 0, eval_mode=True, teacher=name)] for name in parts}
        for r in range(rounds):
            use = r < len(mine)
            chosen = mine[r] if use else batches[0]
            pmb = self.preparer.micro_batch(step, r, True, [self.samples[j] for j in chosen])
            self.schedule.submit(pmb)
            try:
                shares = pmb.teachers
                outs, hidden = self.forward.losses_by_teacher(
                    pmb, lambda n: self.schedule.hidden(pmb, n, timed=False), {n: specs[n] for n in shares})
                agree = {n: (0, 0) if parts[n].cross else
                         self.top1_agreement(shares[n], hidden, self.schedule.hidden(pmb, n, timed=False), n)
                         for n in shares}
            finally:
                self.schedule.release(pmb)
            if use:
                ce_out = next(iter(outs.values()))[0]  # CE is the same in every teacher's output
                for n, (kl_out, own_out) in outs.items():
                    sums[n] += torch.tensor([float(kl_out.kd_sum), kl_out.kd_tokens, float(ce_out.ce_sum),
                                             ce_out.ce_tokens, float(own_out.kd_sum), agree[n][0], agree[n][1]],
                                            dtype=torch.float64)
                if r == len(mine) - 1:  # before the padding rounds, which repeat batch 0
                    aligner_recs = {n: dict(p.aligner.metrics()) for n, p in parts.items()}
            self._advance(1)
        for part in parts.values():
            part.aligner.metrics()  # drop the padding rounds' counts
        return sums, {n: mean_over_ranks(aligner_recs[n], self.env, p.aligner) for n, p in parts.items()}

    def top1_agreement(self, share: TeacherShare, hidden: torch.Tensor, h_t: torch.Tensor,
                       teacher: str) -> tuple[int, int]:
        """How often the student's most likely next token is the teacher's (paired rows only)."""
        if h_t is None:  # the teacher was asked for no position
            return 0, 0
        b = share.batch
        dev = self.env.device
        part = self.forward.parts[teacher]
        h_s = hidden.reshape(-1, hidden.shape[-1])[b.loss_index.to(dev)][share.student_index.to(dev)]
        h_tt = h_t.to(dev)[share.teacher_index.to(dev)]
        w_s = self.forward.student_head()
        w_t = part.head
        v = min(w_s.shape[0], w_t.shape[0], part.aligner.vocab_size or w_s.shape[0])
        hits = 0
        for i in range(0, h_s.shape[0], self.chunk_size):
            s_top = (h_s[i:i + self.chunk_size] @ w_s[:v].T).argmax(-1)
            t_top = (h_tt[i:i + self.chunk_size].to(w_t.dtype) @ w_t[:v].T).argmax(-1)
            hits += int((s_top == t_top).sum())
        return hits, int(h_s.shape[0])


class FrozenStudent:
    """What :class:`~kdcore.training.forward.DistillForward` and :class:`Evaluator` need from a
    student (``.model``, ``.train(mode)``) for a plain, unsharded model that is only scored."""

    def __init__(self, model: torch.nn.Module):
        self.model = model.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)


def frozen_evaluator(cfg, *, model, samples, parts, loss_fn, loss_options: dict, pad_id: int, env,
                     kdist) -> Evaluator:
    """An :class:`Evaluator` scoring ``model`` (no optimizer, one process) against the teacher
    ``parts`` (:class:`kdcore.training.teachers.TeacherPart` each with its started ``engine`` and
    its ``head``) on ``samples``, with the recipe's loss and batching."""
    latest = LatestEval()
    # the preparer only aligns and collates here (micro_batch); no rollout, no training data
    preparer = StepPreparer(parts=parts, rollout=None, train_samples=[], train_cfg=cfg.train, shuffle=False,
                            env=env, kdist=kdist, pad_id=pad_id, teacher_pad_id=parts[0].pad_id, latest_eval=latest)
    forward = DistillForward(student=FrozenStudent(model), parts=parts, distill_cfg=cfg.distill, loss_fn=loss_fn,
                             loss_options=loss_options, device=env.device, world_size=env.world_size)
    schedule = TeacherSchedule({p.name: p.engine for p in parts}, looks_ahead=True, max_steps=0)
    return Evaluator(samples=samples, preparer=preparer, forward=forward, schedule=schedule, train_cfg=cfg.train,
                     chunk_size=cfg.distill.chunk_size, env=env, kdist=kdist, latest=latest)
