"""The one training loop: rollout → teacher → channel → student → loss → step → checkpoint.

Every algorithm plugs in through the registry (loss, aligner, rollout, engine); nothing here
knows a particular one. The parts each own their decisions (docs/architecture.md):
:class:`~kdcore.training.steps.StepPreparer` turns the data plan into aligned micro-batches,
:class:`~kdcore.training.teacher_schedule.TeacherSchedule` decides when the teacher computes
them, :class:`~kdcore.training.forward.DistillForward` runs the student and the loss,
:class:`~kdcore.training.evaluation.Evaluator` and
:class:`~kdcore.training.checkpointing.Checkpointer` know their own intervals, and
:class:`~kdcore.training.metrics.RunLog` writes what a run reports.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kdcore.training.checkpointing import Checkpointer
from kdcore.training.evaluation import Evaluator, mean_over_ranks
from kdcore.training.forward import DistillForward
from kdcore.training.metrics import RunLog, StepMeter
from kdcore.training.steps import StepPreparer
from kdcore.training.teacher_schedule import TeacherSchedule
from kdcore.training.types import LatestEval, PreparedMicroBatch, PreparedStep, TrainingError, TrainResult


class Trainer:
    """Builds every part of a run from a validated recipe; :meth:`run` trains it."""

    def __init__(self, cfg, *, registry=None, resume: bool = False, overwrite: bool = False):
        from kdcore import distributed as kdist
        from kdcore.data import prepare_data
        from kdcore.plugins import load_registry
        from kdcore.runtime import tune_allocator
        from kdcore.sampling import build_sampler
        from kdcore.tokenizers import pad_token_id

        self.cfg = cfg
        self.registry = registry or load_registry()
        self.resume = resume
        self.overwrite = overwrite  # a fresh run may move an old run in output_dir aside
        tune_allocator()
        self.kdist = kdist
        self.env = kdist.init_distributed(cfg.train.device)
        self.out_dir = Path(cfg.train.output_dir)
        self.log = RunLog(self.out_dir / "metrics.jsonl", is_main=self.env.is_main, progress=cfg.logging.progress)
        self.latest_eval = LatestEval()
        self.meter = StepMeter()
        self.evals: list[dict] = []
        self.position = None  # data position after the last finished step
        self.step_started = time.perf_counter()
        self.engine = self.sampler = None  # closed by close(), also when building fails half-way
        try:
            self.loss_fn, self.loss_options, self.rollout = self._algorithms()
            self._prepare_output()
            self.log.open_loggers(self.registry, cfg.logging.backends, config=OmegaConf.to_container(cfg, resolve=True))
            self.student_tok, self.teacher_tok = self._tokenizers()
            self.aligner = self._aligner()
            self.cross = bool(self.aligner.cross_tokenizer)
            data = prepare_data(cfg.data, self.student_tok, self.teacher_tok if self.cross else None,
                                seed=cfg.train.seed)
            self.train_samples, self.eval_samples = data.train, data.eval
            self.log.say(data.report.rich_table())
            self.student, teacher_head = self._student()
            self.engine, colocation = self._start_teacher()
            self.sampler = build_sampler(cfg, self.rollout, student_model=self.student.model,
                                         student_tok=self.student_tok, teacher_tok=self.teacher_tok,
                                         cross=self.cross, teacher_engine=self.engine, env=self.env,
                                         train_samples=self.train_samples)
            self.preparer = StepPreparer(
                aligner=self.aligner, rollout=self.rollout, train_samples=self.train_samples, train_cfg=cfg.train,
                shuffle=cfg.data.shuffle, env=self.env, kdist=kdist, pad_id=pad_token_id(self.student_tok),
                teacher_pad_id=pad_token_id(self.teacher_tok), latest_eval=self.latest_eval, sampler=self.sampler)
            self.forward = DistillForward(student=self.student, aligner=self.aligner, distill_cfg=cfg.distill,
                                          loss_fn=self.loss_fn, loss_options=self.loss_options,
                                          teacher_head=teacher_head, device=self.env.device,
                                          world_size=self.env.world_size)
            self.schedule = TeacherSchedule(self.engine, cross=self.cross, looks_ahead=self.preparer.looks_ahead,
                                            max_steps=cfg.train.max_steps, colocation=colocation)
            self.evaluator = Evaluator(samples=self.eval_samples, preparer=self.preparer, forward=self.forward,
                                       schedule=self.schedule, train_cfg=cfg.train, chunk_size=cfg.distill.chunk_size,
                                       cross=self.cross, env=self.env, kdist=kdist, latest=self.latest_eval)
            self.checkpointer = Checkpointer(self.out_dir, cfg=cfg, student=self.student, rollout=self.rollout,
                                             latest_eval=self.latest_eval, log=self.log)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        from kdcore.data import DataPosition

        max_steps = self.cfg.train.max_steps
        try:
            start, self.position = self.checkpointer.restore() if self.resume else (0, DataPosition())
            if start == 0:
                self.evaluate(0)
            step = start
            with self.log.progress(total=max_steps, completed=start):
                self.step_started = time.perf_counter()
                steps = self.preparer.steps(start, self.position)
                for pmb, prepared in self.schedule.micro_batches(steps, start):
                    self.train_micro_batch(pmb, prepared)
                    if pmb.last:
                        step = self.finish_step(prepared)
            if step > start or start == max_steps:
                self.evaluate(step)
            if step > start:
                self.checkpointer.save(step, self.position)
            return TrainResult(self.out_dir, step, self.log.path, self.export(), self.evals)
        finally:
            self.close()

    def train_micro_batch(self, pmb: PreparedMicroBatch, prepared: PreparedStep) -> None:
        spec = self.forward.spec(prepared.kd_global, prepared.ce_global)
        self.student.begin_micro_batch(pmb.last)
        (out,), _ = self.forward.losses(pmb, lambda: self.schedule.hidden(pmb), [spec])
        out.loss.backward()
        self.schedule.release(pmb)
        self.meter.add(float(out.kd_sum), float(out.ce_sum), pmb.batch.num_tokens)

    def finish_step(self, prepared: PreparedStep) -> int:
        """Optimizer step, then what follows it: record, teacher refresh, checkpoint, evaluation."""
        cfg = self.cfg
        stats = self.student.step()
        done = self.meter.take()
        sums = torch.tensor([done.kd_sum, done.ce_sum, done.tokens], dtype=torch.float64)
        self.kdist.all_reduce_sum(sums)
        kd_mean = float(sums[0]) / max(prepared.kd_global, 1)
        ce_mean = float(sums[1]) / max(prepared.ce_global, 1)
        loss = cfg.distill.kd_ratio * kd_mean + (1 - cfg.distill.kd_ratio) * ce_mean
        dt = time.perf_counter() - self.step_started
        tps = float(sums[2]) / dt if dt > 0 else 0.0
        step = prepared.step + 1
        if not (math.isfinite(loss) and stats.stepped):
            raise TrainingError(f"non-finite loss or gradients at step {step} (loss {loss}, grad norm "
                                f"{stats.grad_norm}); stopped without updating; {self.checkpointer.where()}")
        rec = {"step": step, "loss": loss, "kd_loss": kd_mean, "ce_loss": ce_mean, "lr": stats.lr,
               "grad_norm": stats.grad_norm, "tokens_per_s": tps, "step_time_s": dt, "tokens": int(sums[2]),
               "teacher_wait_s": self.schedule.wait_s, **self.rollout.metrics()}
        self.schedule.wait_s = 0.0
        logged = step % cfg.logging.log_every == 0 or step == cfg.train.max_steps
        if logged:  # the aligner's window covers the training forwards since the last record
            rec.update(mean_over_ranks(dict(self.aligner.metrics()), self.env, self.aligner))
        if self.sampler is not None:
            rec.update(self._after_update(step, dt))
        if logged:
            self.log.record(rec)
        self.log.advance(step, loss=loss, tps=tps)
        self.position = prepared.data_next
        if self.checkpointer.due(step):
            self.checkpointer.save(step, prepared.data_next)
        if self.evaluator.due(step):
            self.evaluate(step)
        self.step_started = time.perf_counter()
        return step

    def _after_update(self, step: int, step_s: float) -> dict:
        """Sampler bookkeeping after an optimizer step; self-distillation refreshes the teacher."""
        self.sampler.after_update()
        if self.sampler.teacher_sync_due(step):
            self.schedule.drop_in_flight()  # computed by the old teacher: recomputed after the refresh
            with self.schedule.phase():
                self.forward.teacher_head = self.sampler.refresh_teacher(
                    self.engine, dtype=self.forward.teacher_head.dtype, device=self.env.device)
        rec = self.sampler.pop_metrics()
        # sampling ran inside this step's time; the rest is teacher wait + student
        rec["train_s"] = step_s - rec["sample_s"] - rec["sync_s"]
        return rec

    def evaluate(self, step: int) -> None:
        self.schedule.drop_in_flight()  # evaluation uses the same channel slots
        with self.schedule.phase():
            rec = self.evaluator.evaluate(step)
        if rec:
            self.evals.append(rec)
            self.log.eval_record(rec)

    def export(self) -> Path | None:
        if not self.cfg.checkpoint.export_hf:
            return None
        from kdcore import checkpoint as ckpt

        export_dir = self.out_dir / "hf"
        ckpt.export_hf(self.student.model, self.student_tok, export_dir)
        self.log.say(f"exported {export_dir}")
        return export_dir

    def close(self) -> None:
        self.log.close()
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        if self.engine is not None:
            try:
                self.engine.close()
            finally:
                self.engine = None

    # ------------------------------------------------------------------------------ building
    def _algorithms(self):
        d = self.cfg.distill
        loss_entry = self.registry.get("loss", d.loss)
        loss_options = dict(d.loss_options or {})
        loss_entry.make_options(loss_options)  # same checks as validate, in case cfg was built by hand
        rollout_entry = self.registry.get("rollout", d.rollout)
        rollout = rollout_entry.fn(rollout_entry.make_options(dict(d.rollout_options or {})))
        return loss_entry.fn, loss_options, rollout

    def _prepare_output(self) -> None:
        """Refuse to overwrite another run, compare recipes on resume, save this one's recipe."""
        from kdcore import run_folder

        run_folder.prepare_collective(self.out_dir, self.cfg, resume=self.resume, overwrite=self.overwrite)

    def _tokenizers(self):
        return recipe_tokenizers(self.cfg)

    def _aligner(self):
        return recipe_aligner(self.cfg, self.registry, self.student_tok, self.teacher_tok)

    def _student(self):
        """The sharded student with its optimizer, and the teacher's head (loaded alone)."""
        from kdcore import student as kstudent
        from kdcore.models import load_lm_head

        cfg = self.cfg
        model = kstudent.build_student(cfg)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and cfg.data.max_length > limit:
            raise TrainingError(f"data.max_length={cfg.data.max_length} exceeds the student's "
                                f"max_position_embeddings={limit}")
        teacher_head = load_lm_head(cfg.teacher.path, dtype=getattr(torch, cfg.teacher.dtype)).to(self.env.device)
        # aligners with parameters (DSKD projectors) create them before the optimizer exists,
        # seeded like the student (train.seed) so their init is reproducible and equal on every rank
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            self.aligner.setup(student_hidden_size=int(model.config.hidden_size),
                               teacher_hidden_size=int(teacher_head.shape[1]))
        trained = [self.aligner] if any(p.requires_grad for p in self.aligner.parameters()) else []
        student = kstudent.Student.from_recipe(cfg, extra_modules=trained, model=model,
                                               extra_lr=cfg.train.lr * float(self.aligner.lr_scale))
        w_s = student.model.get_output_embeddings().weight
        self.aligner.check_heads(int(w_s.shape[0]), int(teacher_head.shape[0]))
        return student, teacher_head

    def _start_teacher(self):
        """The started teacher engine, and its colocation when it shares the accelerators.

        Threads: by default the teacher and the student both get all of this rank's cores.
        They overlap (pipelined) and which side is larger depends on the pair and the data, so
        each may use every core while the other waits; workers wait passively
        (kdcore.runtime), so the overlap costs little. Measured on 2 cores, s/step, teacher +
        student threads: bench pair 4×128 (student side larger) 2+2 0.95–0.98, 1+2 0.97–0.98,
        1+1 1.28; quickstart (teacher side larger) 2+2 1.23, 1+2 1.46, 1+1 1.39."""
        from kdcore.engines import create_teacher_engine
        from kdcore.sampling import rollout_rows

        cfg = self.cfg
        longest = max(len(s.teacher.input_ids if s.teacher is not None else s.student.input_ids)
                      for s in self.train_samples + self.eval_samples)
        max_rows = cfg.train.max_tokens_per_micro_batch or max(cfg.train.micro_batch_size, 1) * longest
        # generated responses can outgrow the data's
        max_rows = max(max_rows, rollout_rows(cfg, self.rollout, self.train_samples, cross=self.cross))
        cores = self.kdist.default_threads(self.env.local_world_size)
        teacher_threads, student_threads = cfg.teacher.threads or cores, cfg.train.threads or cores
        self.kdist.setup_threads(student_threads)
        engine = self.engine = create_teacher_engine(cfg.teacher, registry=self.registry, max_rows=max_rows,
                                                     threads=teacher_threads,
                                                     micro_batches_per_step=cfg.train.grad_accum)
        engine.start()
        self.log.say(f"[dim]threads: student {student_threads}, teacher {teacher_threads}[/dim]")
        if not engine.colocated:
            return engine, None
        from kdcore.engines.colocation import Colocation

        colocation = Colocation(engine, self.student.optimizer, offload_optimizer=engine.offloads_optimizer)
        colocation.start_asleep()
        return engine, colocation


def student_tokenizer_spec(cfg) -> str:
    """Which tokenizer the recipe's student speaks: its own, else its model's, else the teacher's."""
    return cfg.student.tokenizer or cfg.student.path or cfg.teacher.tokenizer or cfg.teacher.path


def recipe_tokenizers(cfg):
    """The recipe's (student, teacher) tokenizers; one object when both name the same."""
    from kdcore.tokenizers import load_tokenizer

    student_spec = student_tokenizer_spec(cfg)
    teacher_spec = cfg.teacher.tokenizer or cfg.teacher.path
    student_tok = load_tokenizer(student_spec)
    return student_tok, student_tok if teacher_spec == student_spec else load_tokenizer(teacher_spec)


def recipe_aligner(cfg, registry, student_tok, teacher_tok):
    """The recipe's aligner for this tokenizer pair (not yet ``setup``)."""
    d = cfg.distill
    entry = registry.get("aligner", d.aligner)
    cache_dir = Path(os.environ.get("KDCORE_CACHE", Path.home() / ".cache" / "kdflow")) / "vocab_maps"
    return entry.fn(student_tokenizer=student_tok, teacher_tokenizer=teacher_tok,
                    options=entry.make_options(dict(d.aligner_options or {})), cache_dir=cache_dir)


def train(cfg, *, registry=None, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Run a validated recipe (``kdcore.load_recipe``); returns where everything was written."""
    from kdcore.channel import ChannelError
    from kdcore.data import DataError
    from kdcore.paths import ModelNotFoundError
    from kdcore.registry import UnknownAlgorithmError
    from kdcore.sampling import RolloutError
    from kdcore.vocab import VocabMismatchError

    try:
        return Trainer(cfg, registry=registry, resume=resume, overwrite=overwrite).run()
    except (DataError, ModelNotFoundError, UnknownAlgorithmError, VocabMismatchError, ChannelError,
            RolloutError) as exc:
        raise TrainingError(str(exc)) from exc
