"""The one training loop: rollout → teacher → channel → student → loss → step → checkpoint.

Every algorithm plugs in through the registry (loss, aligner, rollout); nothing here knows a
particular one. Per optimizer step and rank:

1. the batch planner gives this rank's ``grad_accum`` micro-batches (sample indices);
2. the rollout policy picks the sequences to learn on (the data's own for off-policy);
3. the aligner pairs student loss positions with teacher positions, per sample;
4. the step's KD and CE token counts are summed over micro-batches and ranks first, so each
   micro-batch's loss is scaled by ``world_size / global_count`` — with FSDP averaging gradients
   over ranks, the step's gradient is exactly that of the token-mean over the global batch,
   whatever the split into micro-batches and ranks;
5. the teacher engine computes last hidden states at the requested positions into a channel
   slot (for the *next* micro-batch while the student trains on this one: the slots are double
   buffered and the teacher runs in its own process);
6. the student's last hidden states at its loss positions and its head, with the teacher's
   hidden states and head (loaded alone), go to the aligner, whose loss rebuilds logits chunk
   by chunk; backward; optimizer step.

Evaluation (before training, every ``train.eval_every`` steps, and at the end) reports on the
held-out split: ``eval_teacher_kl`` (forward KL teacher→student through the aligner),
``eval_kd`` (the recipe's own loss), ``eval_ppl`` (student perplexity on the references) and,
when both share a vocabulary, ``eval_top1_agreement``; plus the aligner's own scalars
(``metrics()``: ``align_ratio``, DSKD's ``projector_acc``) over the held-out forwards only, as
``eval_<name>``. Step records carry the same scalars over the training forwards since the
previous record. With several ranks each scalar is the mean of the ranks' values.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from kdcore.aligner import AlignedBatch, Aligner, Alignment, LossSpec
from kdcore.teacher import HiddenRequest


class TrainingError(RuntimeError):
    """Training stopped; the message says why, at which step, and what was kept."""


@dataclass
class PreparedMicroBatch:
    step: int
    index: int  # within the step
    last: bool  # last micro-batch of the step
    batch: Any  # kdcore.data.MicroBatch
    alignments: list[Alignment]
    teacher_positions: list[list[int]]
    student_index: torch.Tensor
    teacher_index: torch.Tensor
    extra: dict
    kd_rows: int  # student rows paired with a teacher row
    ce_rows: int  # student rows with a label
    ticket: Any = None


@dataclass
class PreparedStep:
    step: int
    micro_batches: list[PreparedMicroBatch]
    data_next: Any  # kdcore.data.DataPosition after this step
    kd_global: int = 0
    ce_global: int = 0


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    metrics_file: Path
    export_dir: Path | None
    evals: list[dict] = field(default_factory=list)


def _fkl_reference(student_logits, teacher_logits, *, temperature):
    """Forward KL for the held-out metric, independent of which losses are installed."""
    t = teacher_logits.float() / temperature
    s = student_logits.float() / temperature
    log_p = torch.log_softmax(t, -1)
    log_q = torch.log_softmax(s, -1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


class Trainer:
    def __init__(self, cfg, *, registry=None, resume: bool = False, overwrite: bool = False):
        from kdcore import distributed as kdist
        from kdcore.plugins import load_registry
        from kdcore.runtime import tune_allocator

        self.cfg = cfg
        self.registry = registry or load_registry()
        self.resume = resume
        self.overwrite = overwrite
        tune_allocator()
        self.env = kdist.init_distributed(cfg.train.device)
        self.kdist = kdist
        self.out_dir = Path(cfg.train.output_dir)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        self.engine = None
        self.colocation = None  # kdcore.teacher.colocation.Colocation when teacher.sglang.colocate
        self.sampler = None  # kdcore.sampling.RolloutSampler: sampling policies, self-distillation
        self.teacher_wait_s = 0.0
        self.last_position = None
        self.console = None
        if self.env.is_main:
            from rich.console import Console

            self.console = Console(stderr=True)

    # ------------------------------------------------------------------------------ logging
    def say(self, msg: str) -> None:
        if self.console is not None:
            self.console.print(msg)

    def log(self, record: dict) -> None:
        if not self.env.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    # -------------------------------------------------------------------------------- setup
    def setup(self) -> None:
        from kdcore.data import prepare_data
        from kdcore.models import load_lm_head
        from kdcore.tokenizers import load_tokenizer, pad_token_id

        cfg = self.cfg
        d = cfg.distill
        loss_entry = self.registry.get("loss", d.loss)
        aligner_entry = self.registry.get("aligner", d.aligner)
        rollout_entry = self.registry.get("rollout", d.rollout)
        self.loss_fn = loss_entry.fn
        self.loss_options = dict(d.loss_options or {})
        loss_entry.make_options(self.loss_options)  # same checks as validate, in case cfg was built by hand
        from kdcore import run_folder

        run_folder.prepare_collective(self.out_dir, cfg, resume=self.resume, overwrite=self.overwrite)

        student_tok_spec = cfg.student.tokenizer or cfg.student.path or cfg.teacher.tokenizer or cfg.teacher.path
        teacher_tok_spec = cfg.teacher.tokenizer or cfg.teacher.path
        self.student_tok = load_tokenizer(student_tok_spec)
        self.teacher_tok = self.student_tok if teacher_tok_spec == student_tok_spec else load_tokenizer(teacher_tok_spec)
        cache_dir = Path(os.environ.get("KDCORE_CACHE", Path.home() / ".cache" / "kdflow")) / "vocab_maps"
        self.aligner = aligner_entry.fn(student_tokenizer=self.student_tok, teacher_tokenizer=self.teacher_tok,
                                        options=aligner_entry.make_options(dict(d.aligner_options or {})),
                                        cache_dir=cache_dir)
        self.rollout = rollout_entry.fn(rollout_entry.make_options(dict(d.rollout_options or {})))
        self.cross = bool(getattr(self.aligner, "cross_tokenizer", True))
        self.pad_id = pad_token_id(self.student_tok)
        self.teacher_pad_id = pad_token_id(self.teacher_tok)

        data = prepare_data(cfg.data, self.student_tok, self.teacher_tok if self.cross else None, seed=cfg.train.seed)
        self.train_samples, self.eval_samples = data.train, data.eval
        self.data_report = data.report
        if self.console is not None:
            self.console.print(data.report.rich_table())

        from kdcore import student as kstudent

        model = kstudent.build_student(cfg)
        self._check_max_length(model.config, "student")
        teacher_dtype = getattr(torch, cfg.teacher.dtype)
        self.teacher_head = load_lm_head(cfg.teacher.path, dtype=teacher_dtype).to(self.env.device)
        # Aligners with parameters (DSKD projectors) create them now, before the optimizer exists.
        if hasattr(self.aligner, "setup"):
            # seeded like the student (train.seed), so projector init is reproducible and equal on every rank
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.train.seed)
                self.aligner.setup(student_hidden_size=int(model.config.hidden_size),
                                   teacher_hidden_size=int(self.teacher_head.shape[1]))
        self.student = kstudent.Student.from_recipe(cfg, extra_modules=[self.aligner] if any(
            p.requires_grad for p in self.aligner.parameters()) else [], model=model,
            extra_lr=cfg.train.lr * float(getattr(self.aligner, "lr_scale", 1.0)))
        self.kstudent = kstudent
        if hasattr(self.aligner, "check_heads"):
            w_s = self.student.model.get_output_embeddings().weight
            self.aligner.check_heads(int(w_s.shape[0]), int(self.teacher_head.shape[0]))
        self.start_engine()
        from kdcore.sampling import trainer_sampler

        self.sampler = trainer_sampler(self)

    def _check_max_length(self, config, who: str) -> None:
        limit = getattr(config, "max_position_embeddings", None)
        if limit and self.cfg.data.max_length > limit:
            raise TrainingError(f"data.max_length={self.cfg.data.max_length} exceeds the {who}'s "
                                f"max_position_embeddings={limit}")

    def start_engine(self) -> None:
        from kdcore.teacher import create_engine

        cfg = self.cfg
        longest = max(len(s.teacher.input_ids if s.teacher is not None else s.student.input_ids)
                      for s in self.train_samples + self.eval_samples)
        mb = max(cfg.train.micro_batch_size, 1)
        max_rows = cfg.train.max_tokens_per_micro_batch or mb * longest
        from kdcore.sampling import rollout_rows

        max_rows = max(max_rows, rollout_rows(self))  # generated responses can outgrow the data's
        teacher_threads, student_threads = self.thread_split()
        self.kdist.setup_threads(student_threads)
        colocate = self.colocated()
        # colocated: a whole step's micro-batches are computed in one teacher phase, then read while it sleeps
        extra = {"n_slots": max(2, cfg.train.grad_accum)} if colocate else {}
        self.engine = create_engine(cfg.teacher, max_rows=max_rows, threads=teacher_threads, **extra)
        self.engine.start()
        self.say(f"[dim]threads: student {student_threads}, teacher {teacher_threads}[/dim]")
        if colocate:
            from kdcore.teacher.colocation import Colocation

            self.colocation = Colocation(self.engine, self.student.optimizer,
                                         offload_optimizer=bool(cfg.teacher.sglang.offload_optimizer))
            self.colocation.start_asleep()

    def colocated(self) -> bool:
        """Teacher and student share the GPUs (``teacher.sglang.colocate``): the teacher is
        woken for its phases only, and works on a step while the student waits (no overlap)."""
        return self.cfg.teacher.engine == "sglang" and bool(self.cfg.teacher.sglang.colocate)

    def teacher_phase(self):
        """Context in which the teacher engine may be used: a colocated engine is awake only
        inside it; otherwise a no-op."""
        return self.colocation.teacher_phase() if self.colocation is not None else contextlib.nullcontext()

    def thread_split(self) -> tuple[int, int]:
        """(teacher, student) torch threads: by default both get all of this rank's cores.
        Teacher and student overlap (pipelined) and which side is larger depends on the pair
        and the data, so each may use every core while the other waits; workers wait
        passively (kdcore.runtime), so the overlap costs little. Measured on 2 cores, s/step,
        teacher + student threads: bench pair 4×128 (student side larger) 2+2 0.95–0.98,
        1+2 0.97–0.98, 1+1 1.28; quickstart (teacher side larger) 2+2 1.23, 1+2 1.46, 1+1 1.39."""
        cores = self.kdist.default_threads(self.env.local_world_size)
        t = self.cfg.teacher.threads or cores
        s = self.cfg.train.threads or cores
        return t, s

    # --------------------------------------------------------------------- step preparation
    def prepare_micro_batch(self, step: int, index: int, last: bool, samples: list) -> PreparedMicroBatch:
        from kdcore.data import collate

        mb = collate(samples, self.pad_id, self.teacher_pad_id)
        alignments = [self.aligner.align(s.student, s.teacher if s.teacher is not None else s.student)
                      for s in samples]
        s_idx, t_idx, s_off, t_off = [], [], [], []
        s_base = t_base = 0
        for s, a in zip(samples, alignments):
            s_off.append(s_base)
            t_off.append(t_base)
            s_idx.extend(s_base + i for i in a.student_index)
            t_idx.extend(t_base + i for i in a.teacher_index)
            s_base += len(s.student.loss_positions)
            t_base += len(a.teacher_positions)
        extra = self.aligner.collate([a.extra for a in alignments], s_off, t_off)
        student_index = torch.tensor(s_idx, dtype=torch.long)
        return PreparedMicroBatch(
            step=step, index=index, last=last, batch=mb, alignments=alignments,
            teacher_positions=[list(a.teacher_positions) for a in alignments],
            student_index=student_index, teacher_index=torch.tensor(t_idx, dtype=torch.long), extra=extra,
            kd_rows=int(torch.unique(student_index).numel()), ce_rows=int((mb.labels != -100).sum()),
        )

    def prepare_steps(self, start_step: int, position) -> Iterator[PreparedStep]:
        from kdcore.data import planner_for
        from kdcore.rollout import RolloutContext

        planner = planner_for(self.train_samples, self.cfg.train, world_size=self.env.world_size,
                              shuffle=self.cfg.data.shuffle)
        self.planner = planner
        rng = random.Random(self.cfg.train.seed * 7919 + self.env.rank)
        step = start_step
        for planned in planner.iterate(self.env.rank, position):
            if step >= self.cfg.train.max_steps:
                return
            if self.sampler is not None:
                self.sampler.before_step(step)  # weight sync when due: collective, so on every rank here
            ctx = RolloutContext(step=step, rng=rng, last_eval_loss=self.last_eval_loss, last_eval=self.last_eval,
                                 max_steps=self.cfg.train.max_steps,
                                 **(self.sampler.context_fields() if self.sampler is not None else {}))
            mbs = []
            n = len(planned.micro_batches)
            for i, idx in enumerate(planned.micro_batches):
                ctx.micro_batch = i
                samples = self.rollout.select([self.train_samples[j] for j in idx], ctx)
                mbs.append(self.prepare_micro_batch(step, i, i == n - 1, samples))
            counts = torch.tensor([sum(m.kd_rows for m in mbs), sum(m.ce_rows for m in mbs)], dtype=torch.float64)
            self.kdist.all_reduce_sum(counts)
            yield PreparedStep(step=step, micro_batches=mbs, data_next=planned.next,
                               kd_global=int(counts[0]), ce_global=int(counts[1]))
            step += 1

    # ---------------------------------------------------------------------------- the loss
    def submit(self, pmb: PreparedMicroBatch) -> None:
        b = pmb.batch
        ids = b.teacher_input_ids if self.cross else b.input_ids
        mask = b.teacher_attention_mask if self.cross else b.attention_mask
        pmb.ticket = self.engine.submit(HiddenRequest(ids, mask, pmb.teacher_positions))

    def teacher_hidden(self, pmb: PreparedMicroBatch) -> torch.Tensor:
        """The teacher rows of a submitted micro-batch: a view of its channel slot."""
        from kdcore.channel import ChannelError

        t0 = time.perf_counter()
        try:
            h_t = self.engine.result(pmb.ticket)
        except ChannelError as exc:
            raise TrainingError(f"teacher engine failed at step {pmb.step}: {exc}") from exc
        self.teacher_wait_s += time.perf_counter() - t0
        return h_t

    def micro_batch_loss(self, pmb: PreparedMicroBatch, specs: list[LossSpec]):
        """Student forward once, then one aligner loss per spec; returns (outputs, hidden)."""
        b = pmb.batch
        dev = self.env.device
        hidden = self.kstudent.student_hidden(self.student.model, b.input_ids.to(dev), b.attention_mask.to(dev))
        h_s = hidden.reshape(-1, hidden.shape[-1])[b.loss_index.to(dev)]
        w_s = self.kstudent.student_head_weight(self.student.model)
        h_t = self.teacher_hidden(pmb)
        batch = AlignedBatch(
            student_hidden=h_s, student_head=w_s, labels=b.labels.to(dev),
            teacher_hidden=h_t.to(dev), teacher_head=self.teacher_head,
            student_index=pmb.student_index.to(dev), teacher_index=pmb.teacher_index.to(dev), extra=pmb.extra,
        )
        return [self.aligner(batch, spec) for spec in specs], hidden

    def loss_spec(self, kd_global: int, ce_global: int, *, loss_fn=None, options=None, eval_mode=False) -> LossSpec:
        """Training: scales that turn this rank's sums into its share of the global token mean
        (see the module docstring). Evaluation: unit scales, only the sums are read."""
        d = self.cfg.distill
        r = d.kd_ratio
        if eval_mode:
            kd_scale = ce_scale = 1.0
        else:
            world = self.env.world_size
            kd_scale = r * world / kd_global if kd_global else 0.0
            ce_scale = (1 - r) * world / ce_global if ce_global else 0.0
        return LossSpec(
            fn=loss_fn or self.loss_fn, options=self.loss_options if options is None else options,
            temperature=d.temperature, kd_ratio=r, chunk_size=d.chunk_size, kd_scale=kd_scale, ce_scale=ce_scale,
        )

    # ------------------------------------------------------------------------------ eval
    @torch.no_grad()
    def evaluate(self, step: int) -> dict | None:
        if not self.eval_samples:
            return None
        was_training = self.student.model.training
        self.student.train(False)
        mbs = self.cfg.train.micro_batch_size
        idx = list(range(len(self.eval_samples)))
        # every rank evaluates its own slice of the fixed held-out batches; sums are all-reduced
        batches = [idx[i:i + mbs] for i in range(0, len(idx), mbs)][: self.cfg.train.eval_batches]
        mine = batches[self.env.rank::self.env.world_size]
        # pad every rank to the same number of forwards: FSDP collectives need all ranks
        rounds = math.ceil(len(batches) / self.env.world_size)
        sums = torch.zeros(7, dtype=torch.float64)
        # the aligner's counters (align_ratio, projector_acc) restart here, so eval reports held-out
        # forwards only; training forwards not yet read by a step record are dropped
        self._read_aligner_metrics()
        aligner_rec: dict = {}
        for r in range(rounds):
            use = r < len(mine)
            chosen = mine[r] if use else batches[0]
            pmb = self.prepare_micro_batch(step, r, True, [self.eval_samples[j] for j in chosen])
            self.submit(pmb)
            try:
                kl_spec = self.loss_spec(0, 0, loss_fn=_fkl_reference, options={}, eval_mode=True)
                (kl_out, own_out), hidden = self.micro_batch_loss(pmb, [kl_spec, self.loss_spec(0, 0, eval_mode=True)])
                agree = (0, 0) if self.cross else self.top1_agreement(pmb, hidden, self.engine.result(pmb.ticket))
            finally:
                self.engine.release(pmb.ticket)
            if use:
                sums += torch.tensor([float(kl_out.kd_sum), kl_out.kd_tokens, float(kl_out.ce_sum), kl_out.ce_tokens,
                                      float(own_out.kd_sum), agree[0], agree[1]], dtype=torch.float64)
                if r == len(mine) - 1:  # before the padding rounds, which repeat batch 0
                    aligner_rec = self._read_aligner_metrics()
        self._read_aligner_metrics()  # drop the padding rounds' counts
        aligner_rec = self._mean_over_ranks(aligner_rec)
        self.kdist.all_reduce_sum(sums)
        self.student.train(was_training)
        kl, kd_tok, ce, ce_tok, own_kd, agree_n, agree_tot = sums.tolist()
        rec = {"step": step, "eval_teacher_kl": kl / max(kd_tok, 1), "eval_kd": own_kd / max(kd_tok, 1),
               "eval_ppl": math.exp(min(ce / max(ce_tok, 1), 50.0)), "eval_tokens": int(ce_tok)}
        if not self.cross:
            rec["eval_top1_agreement"] = agree_n / max(agree_tot, 1)
        rec.update({f"eval_{k}": v for k, v in aligner_rec.items()})
        self.last_eval_loss = rec["eval_kd"]
        self.last_eval = rec
        self.log(rec)
        return rec

    def _read_aligner_metrics(self) -> dict[str, float]:
        """This rank's aligner scalars since the previous read (reading starts a new window)."""
        return dict(self.aligner.metrics()) if hasattr(self.aligner, "metrics") else {}

    def _mean_over_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Each key averaged over the ranks that report it (collective: call on every rank)."""
        # an aligner without metrics (same_vocab) has none on any rank: no collective to pay for
        if self.env.world_size == 1 or type(self.aligner).metrics is Aligner.metrics:
            return values
        import torch.distributed as dist

        every: list = [None] * self.env.world_size
        dist.all_gather_object(every, values)
        keys = sorted({k for d in every for k in d})
        return {k: sum(d[k] for d in every if k in d) / sum(1 for d in every if k in d) for k in keys}

    def top1_agreement(self, pmb: PreparedMicroBatch, hidden: torch.Tensor, h_t: torch.Tensor) -> tuple[int, int]:
        """How often the student's most likely next token is the teacher's (paired rows only)."""
        b = pmb.batch
        dev = self.env.device
        h_s = hidden.reshape(-1, hidden.shape[-1])[b.loss_index.to(dev)][pmb.student_index.to(dev)]
        h_tt = h_t.to(dev)[pmb.teacher_index.to(dev)]
        w_s = self.kstudent.student_head_weight(self.student.model)
        v = min(w_s.shape[0], self.teacher_head.shape[0], getattr(self.aligner, "vocab_size", 10**12))
        hits = 0
        chunk = self.cfg.distill.chunk_size
        for i in range(0, h_s.shape[0], chunk):
            s_top = (h_s[i:i + chunk] @ w_s[:v].T).argmax(-1)
            t_top = (h_tt[i:i + chunk].to(self.teacher_head.dtype) @ self.teacher_head[:v].T).argmax(-1)
            hits += int((s_top == t_top).sum())
        return hits, int(h_s.shape[0])

    # ------------------------------------------------------------------------------ loop
    def run(self) -> TrainResult:
        from kdcore import checkpoint as ckpt
        from kdcore.data import DataPosition

        cfg = self.cfg
        self.last_eval_loss = None
        self.last_eval = None
        self.setup()
        ckpt_dir = self.out_dir / "checkpoints"
        start_step, position = 0, DataPosition()
        last_good = None
        if self.resume:
            state = ckpt.load_latest(ckpt_dir, model=self.student.model, optimizer=self.student.optimizer,
                                     scheduler=self.student.scheduler, extra_modules=self.student.extra_modules)
            if state is None:
                raise TrainingError(f"--resume: no checkpoint in {ckpt_dir}")
            start_step = state.step
            position = DataPosition(**state.data_state)
            self.last_eval_loss = state.trainer_state.get("last_eval_loss")
            self.rollout.load_state_dict(state.trainer_state.get("rollout") or {})
            last_good = state.path
            self.kstudent.reschedule_for_recipe(self.student.scheduler, cfg.train, (state.recipe or {}).get("train"))
            if self.env.is_main:
                from kdcore.run_folder import trim_metrics

                trim_metrics(self.metrics_path, start_step)
            self.say(f"resumed from {state.path} at step {start_step}")
        evals = []
        if start_step == 0:
            with self.teacher_phase():
                ev = self.evaluate(0)
            if ev:
                evals.append(ev)
                self.say(self._eval_line(ev))
        progress = self._progress()
        steps = self.prepare_steps(start_step, position)
        lookahead = not getattr(self.rollout, "needs_sampling", False)
        queue: deque[PreparedMicroBatch] = deque()
        pending_steps: deque[PreparedStep] = deque()

        def fill(n_ahead: int) -> None:
            if self.colocation is not None:
                return fill_colocated()
            # submit queued micro-batches until n_ahead of them wait in the channel (the one the
            # student holds is the other slot of the double buffer)
            while sum(1 for m in queue if m.ticket is not None) < n_ahead:
                waiting = [m for m in queue if m.ticket is None]
                if waiting:
                    self.submit(waiting[0])
                    continue
                if not lookahead and pending_steps:
                    return  # on-policy: the next step's rollout must see this step's update
                nxt = next(steps, None)
                if nxt is None:
                    return
                pending_steps.append(nxt)
                queue.extend(nxt.micro_batches)

        prepared = start_step  # steps taken from `steps` so far

        def fill_colocated() -> None:
            # one teacher phase per step: prepare it (a rollout may sample from the teacher),
            # compute every micro-batch, read them all; the teacher sleeps while the student trains
            nonlocal prepared
            if queue or prepared >= cfg.train.max_steps:
                return  # (no phase just to learn that the steps are over)
            with self.teacher_phase():
                nxt = next(steps, None)
                if nxt is None:
                    return
                prepared += 1
                if len(nxt.micro_batches) > self.engine.n_slots:
                    raise TrainingError(f"step {nxt.step + 1} has {len(nxt.micro_batches)} micro-batches but the "
                                        f"colocated teacher holds {self.engine.n_slots}; lower train.grad_accum")
                pending_steps.append(nxt)
                queue.extend(nxt.micro_batches)
                for m in nxt.micro_batches:
                    self.submit(m)
                for m in nxt.micro_batches:
                    self.teacher_hidden(m)

        step = start_step
        t_step = time.perf_counter()
        tokens = 0
        kd_sum = ce_sum = 0.0
        self.teacher_wait_s = 0.0
        try:
            with progress:
                task = progress.add_task("distilling", total=cfg.train.max_steps, completed=start_step,
                                         loss=float("nan"), tps=0.0)
                while True:
                    fill(1)
                    if not queue:
                        break
                    pmb = queue.popleft()
                    if self.colocation is None:  # colocated: the teacher sleeps until the step is done
                        fill(1)  # the teacher computes the next micro-batch while the student trains on this one
                    cur = pending_steps[0]
                    spec = self.loss_spec(cur.kd_global, cur.ce_global)
                    self.student.begin_micro_batch(pmb.last)
                    (out,), _ = self.micro_batch_loss(pmb, [spec])
                    out.loss.backward()
                    self.engine.release(pmb.ticket)
                    kd_sum += float(out.kd_sum)
                    ce_sum += float(out.ce_sum)
                    tokens += pmb.batch.num_tokens
                    if not pmb.last:
                        continue
                    pending_steps.popleft()
                    stats = self.student.step()
                    sums = torch.tensor([kd_sum, ce_sum, tokens], dtype=torch.float64)
                    self.kdist.all_reduce_sum(sums)
                    kd_mean = float(sums[0]) / max(cur.kd_global, 1)
                    ce_mean = float(sums[1]) / max(cur.ce_global, 1)
                    loss = cfg.distill.kd_ratio * kd_mean + (1 - cfg.distill.kd_ratio) * ce_mean
                    dt = time.perf_counter() - t_step
                    tps = float(sums[2]) / dt if dt > 0 else 0.0
                    step = cur.step + 1
                    if not (math.isfinite(loss) and stats.stepped):
                        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                        raise TrainingError(f"non-finite loss or gradients at step {step} (loss {loss}, grad norm "
                                            f"{stats.grad_norm}); stopped without updating; {where}")
                    rollout_rec = self.rollout.metrics()
                    if step % cfg.logging.log_every == 0 or step == cfg.train.max_steps:
                        # the aligner's window covers the training forwards since the last record
                        rollout_rec.update(self._mean_over_ranks(self._read_aligner_metrics()))
                    if self.sampler is not None:
                        self.sampler.after_update()
                        if self.sampler.teacher_sync_due(step):
                            for m in queue:  # computed by the old teacher: drop, recomputed after the refresh
                                if m.ticket is not None:
                                    self.engine.release(m.ticket)
                                    m.ticket = None
                            with self.teacher_phase():
                                self.teacher_head = self.sampler.refresh_teacher(
                                    self.engine, dtype=self.teacher_head.dtype, device=self.env.device)
                        rollout_rec.update(self.sampler.pop_metrics())
                        # sampling ran inside this step's time; the rest is teacher wait + student
                        rollout_rec["train_s"] = dt - rollout_rec["sample_s"] - rollout_rec["sync_s"]
                    if step % cfg.logging.log_every == 0 or step == cfg.train.max_steps:
                        self.log({"step": step, "loss": loss, "kd_loss": kd_mean, "ce_loss": ce_mean, "lr": stats.lr,
                                  "grad_norm": stats.grad_norm, "tokens_per_s": tps, "step_time_s": dt,
                                  "tokens": int(sums[2]), "teacher_wait_s": self.teacher_wait_s, **rollout_rec})
                    progress.update(task, completed=step, loss=loss, tps=tps)
                    kd_sum = ce_sum = 0.0
                    tokens = 0
                    self.teacher_wait_s = 0.0
                    self.last_position = cur.data_next
                    if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.max_steps:
                        last_good = self.save(ckpt_dir, step, cur.data_next)
                    if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                        # drain the teacher queue first: eval uses the same channel slots
                        for m in queue:
                            if m.ticket is not None:
                                self.engine.result(m.ticket)
                                self.engine.release(m.ticket)
                                m.ticket = None
                        with self.teacher_phase():
                            ev = self.evaluate(step)
                        if ev:
                            evals.append(ev)
                            (progress.console.print if progress.console else self.say)(self._eval_line(ev))
                    t_step = time.perf_counter()
            if step > start_step or start_step == cfg.train.max_steps:
                with self.teacher_phase():
                    ev = self.evaluate(step)
                if ev:
                    evals.append(ev)
                    self.say(self._eval_line(ev))
            export_dir = None
            if step > start_step:
                self.save(ckpt_dir, step, self.last_position)
            if cfg.checkpoint.export_hf:
                export_dir = self.out_dir / "hf"
                ckpt.export_hf(self.student.model, self.student_tok, export_dir)
                self.say(f"exported {export_dir}")
            return TrainResult(self.out_dir, step, self.metrics_path, export_dir, evals)
        finally:
            self.close()

    def save(self, ckpt_dir: Path, step: int, position) -> Path:
        from dataclasses import asdict

        from kdcore import checkpoint as ckpt, run_folder

        path = ckpt.save_checkpoint(
            ckpt_dir, step, model=self.student.model, optimizer=self.student.optimizer,
            scheduler=self.student.scheduler, extra_modules=self.student.extra_modules,
            data_state=asdict(position) if position is not None else {},
            trainer_state={"last_eval_loss": self.last_eval_loss, "rollout": self.rollout.state_dict()},
            recipe=run_folder.recipe_dict(self.cfg),
            keep=self.cfg.checkpoint.keep)
        return path

    def _eval_line(self, ev: dict) -> str:
        parts = [f"{k.removeprefix('eval_')} {v:.4f}" for k, v in ev.items() if k.startswith("eval_") and k != "eval_tokens"]
        return f"[bold]eval @ step {ev['step']}[/bold]: " + ", ".join(parts)

    def _progress(self):
        if not (self.env.is_main and self.cfg.logging.progress):
            return _NullProgress()
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        return Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
        )

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        if self.engine is not None:
            try:
                self.engine.close()
            finally:
                self.engine = None


class _NullProgress:
    """Stands in for the rich progress bar on other ranks or with logging.progress false."""

    console = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return None

    def update(self, *a, **k):
        pass


def train(cfg, *, registry=None, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run a validated recipe (``kdcore.load_recipe``); returns where everything was written."""
    from kdcore.channel import ChannelError
    from kdcore.data import DataError
    from kdcore.paths import ModelNotFoundError
    from kdcore.registry import UnknownAlgorithmError
    from kdcore.sampling import RolloutError
    from kdcore.vocab import VocabMismatchError

    trainer = Trainer(cfg, registry=registry, resume=resume, overwrite=overwrite)
    try:
        return trainer.run()
    except (DataError, ModelNotFoundError, UnknownAlgorithmError, VocabMismatchError, ChannelError,
            RolloutError) as exc:
        raise TrainingError(str(exc)) from exc
