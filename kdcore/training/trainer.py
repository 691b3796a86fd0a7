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
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from kdcore.training import teachers
from kdcore.training.checkpointing import Checkpointer
from kdcore.training.evaluation import Evaluator, mean_over_ranks
from kdcore.training.forward import DistillForward
from kdcore.infra.phases import phase
from kdcore.training.metrics import RunLog, StepMeter
from kdcore.training.run_parts import RunParts
from kdcore.training.types import LatestEval, PreparedMicroBatch, PreparedStep, TrainingError, TrainResult
from kdcore.data import DataError, DataPosition
from kdcore.engines.colocation import Colocation
from kdcore.engines.protocol import RolloutError
from kdcore.infra import distributed as kdist
from kdcore.infra.channel import ChannelError
from kdcore.infra.process_env import tune_allocator
from kdcore.modeling import student as kstudent
from kdcore.modeling.paths import ModelNotFoundError
from kdcore.modeling.vocab import VocabMismatchError
from kdcore.plugin_system.manager import load_registry
from kdcore.plugin_system.registry import UnknownAlgorithmError
from kdcore.storage import checkpoint as ckpt, run_folder
from kdcore.training.ema import EMATeacher, check_ema_architecture
from kdcore.training.sampler import build_sampler, rollout_rows, sampler_sides
from kdcore.training.steps import CEOnlyTargets


class Trainer:
    """Builds every part of a run from a validated recipe; :meth:`run` trains it."""

    def __init__(self, cfg, *, registry=None, resume: bool = False, overwrite: bool = False,
                 allow_data_change: bool = False):
        self.cfg = cfg
        self.registry = registry or load_registry()
        self.resume = resume
        self.overwrite = overwrite  # a fresh run may move an old run in output_dir aside
        self.allow_data_change = allow_data_change  # --resume onto a changed data file (run_folder.check_data)
        tune_allocator()
        self.kdist = kdist
        self.env = kdist.init_distributed(cfg.train.device)
        self.out_dir = Path(cfg.train.output_dir)
        self.log = RunLog(self.out_dir / "metrics.jsonl", is_main=self.env.is_main, progress=cfg.logging.progress,
                          print_every=cfg.logging.print_every)
        self.latest_eval = LatestEval()
        self.meter = StepMeter()
        self.evals: list[dict] = []
        self.position = None  # data position after the last finished step
        self.step_started = time.perf_counter()
        self.parts: list = []
        self.sampler = self.ema = None  # closed by close(), also when building fails half-way
        try:
            self.loss_fn, self.loss_options, self.rollout = self._algorithms()
            self._prepare_output()
            self.log.open_loggers(self.registry, cfg.logging.backends, config=OmegaConf.to_container(cfg, resolve=True))
            self.run_parts = RunParts.from_recipe(cfg, self.registry)
            self.student_tok, self.parts = self.run_parts.student_tok, self.run_parts.teachers
            self.train_samples, self.eval_samples = self._data()
            with phase(f"student: {cfg.student.init} from {cfg.student.path or cfg.teacher.path}",
                       enabled=self.env.is_main):  # tens of seconds before step 1 (issue 28)
                self.student = self._student()
            colocation = self._start_teachers()
            self.sampler = build_sampler(cfg, self.rollout, student_model=self.student.model,
                                         student_tok=self.student_tok, parts=self.parts,
                                         views=self.run_parts.views, env=self.env,
                                         train_samples=self.train_samples)
            self.ema = self._ema()
            self.preparer = self.run_parts.preparer(
                rollout=self.rollout, train_samples=self.train_samples, shuffle=cfg.data.shuffle, env=self.env,
                kdist=kdist, latest_eval=self.latest_eval, sampler=self.sampler, kd=cfg.distill.kd_ratio > 0,
                ce_on_data=cfg.distill.kd_ratio < 1, ce_only=self._ce_only_targets())
            self.forward = DistillForward(student=self.student, parts=self.parts, distill_cfg=cfg.distill,
                                          loss_fn=self.loss_fn, loss_options=self.loss_options,
                                          device=self.env.device, world_size=self.env.world_size)
            self.schedule = self.run_parts.schedule({p.name: p.engine for p in self.parts},
                                                    looks_ahead=self.preparer.looks_ahead,
                                                    max_steps=cfg.train.max_steps, colocation=colocation)
            self.evaluator = Evaluator(samples=self.eval_samples, preparer=self.preparer, forward=self.forward,
                                       schedule=self.schedule, train_cfg=cfg.train, chunk_size=cfg.distill.chunk_size,
                                       env=self.env, kdist=kdist, latest=self.latest_eval)
            self.checkpointer = Checkpointer(self.out_dir, cfg=cfg, student=self.student, rollout=self.rollout,
                                             latest_eval=self.latest_eval, log=self.log,
                                             ema=self.ema)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------ the loop
    def run(self) -> TrainResult:
        max_steps = self.cfg.train.max_steps
        try:
            start, self.position = self._begin()
            if start == 0 and self.cfg.train.eval_at_start:
                self.evaluate(0)
            step = start
            with self.log.progress(total=max_steps, completed=start):
                self.step_started = time.perf_counter()
                steps = self.preparer.steps(start, self.position)
                for pmb, prepared in self.schedule.micro_batches(steps, start):
                    self.train_micro_batch(pmb, prepared)
                    if pmb.last:
                        step = self.finish_step(prepared)
            if step > start or (start == max_steps and self.checkpointer.evaluated_step != start):
                self.evaluate(step)  # a resumed finished run logged its final evaluation already
            if step > start:
                with phase(f"checkpoint at step {step}", enabled=self.env.is_main):
                    self.checkpointer.save(step, self.position)
            return TrainResult(self.out_dir, step, self.log.path, self.export(), self.evals)
        finally:
            self.close()

    def _begin(self):
        """``(first step, data position)``: restored with --resume; the EMA teacher gets its average."""
        start, position = self.checkpointer.restore() if self.resume else (0, DataPosition())
        if self.ema is not None:
            if not self.resume:
                self.ema.reset()
            self._push_ema()
        return start, position

    def train_micro_batch(self, pmb: PreparedMicroBatch, prepared: PreparedStep) -> None:
        specs = self.forward.training_specs(pmb, prepared)
        self.student.begin_micro_batch(pmb.last)
        outs, _ = self.forward.losses_by_teacher(pmb, lambda name: self.schedule.hidden(pmb, name), specs)
        firsts = [o[0] for o in outs.values()]
        loss = firsts[0].loss
        for out in firsts[1:]:
            loss = loss + out.loss
        loss.backward()
        self.schedule.release(pmb)
        self.meter.add(float(firsts[0].ce_sum), pmb.batch.num_tokens, {n: float(o[0].kd_sum) for n, o in outs.items()})

    def finish_step(self, prepared: PreparedStep) -> int:
        """Optimizer step, then what follows it: record, teacher refresh, checkpoint, evaluation."""
        cfg = self.cfg
        stats = self.student.step()
        done = self.meter.take()
        names = list(prepared.kd_by_teacher)
        sums = torch.tensor([done.ce_sum, done.tokens] + [done.kd_by_teacher.get(n, 0.0) for n in names],
                            dtype=torch.float64)
        self.kdist.all_reduce_sum(sums)
        per_teacher = {n: float(v) / max(prepared.kd_by_teacher[n], 1) for n, v in zip(names, sums[2:].tolist())}
        kd_mean = sum(self.forward.parts[n].weight * v for n, v in per_teacher.items())  # what the loss optimises
        ce_mean = float(sums[0]) / max(prepared.ce_global, 1)
        loss = cfg.distill.kd_ratio * kd_mean + (1 - cfg.distill.kd_ratio) * ce_mean
        dt = time.perf_counter() - self.step_started
        tps = float(sums[1]) / dt if dt > 0 else 0.0
        step = prepared.step + 1
        if not (math.isfinite(loss) and stats.stepped):
            raise TrainingError(f"non-finite loss or gradients at step {step} (loss {loss}, grad norm "
                                f"{stats.grad_norm}); stopped without updating; {self.checkpointer.where()}")
        rec = {"step": step, "loss": loss, "kd_loss": kd_mean, "ce_loss": ce_mean, "lr": stats.lr,
               "grad_norm": stats.grad_norm, "tokens_per_s": tps, "step_time_s": dt, "tokens": int(sums[1]),
               "teacher_wait_s": self.schedule.wait_s, **self.rollout.metrics(),
               **({f"kd_loss/{n}": v for n, v in per_teacher.items()} if len(self.parts) > 1 else {})}
        self.schedule.wait_s = 0.0
        logged = step % cfg.logging.log_every == 0 or step == cfg.train.max_steps
        if logged:  # the aligners' windows cover the training forwards since the last record
            rec.update(self._aligner_metrics())
        if self.sampler is not None:
            rec.update(self._after_update(step, dt))
        if self.ema is not None and self.ema.due(step):
            self.ema.update()
            self._push_ema()
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

    def _aligner_metrics(self) -> dict:
        if len(self.parts) == 1:
            aligner = self.parts[0].aligner
            return mean_over_ranks(dict(aligner.metrics()), self.env, aligner)
        return {f"{k}/{p.name}": v for p in self.parts
                for k, v in mean_over_ranks(dict(p.aligner.metrics()), self.env, p.aligner).items()}

    def _push_ema(self) -> None:
        """The teacher takes the EMA weights (no request may be outstanding: stale rows are dropped)."""
        self.schedule.drop_in_flight()
        (part,) = self.parts  # self-distillation teaches with one teacher (recipe checks)
        with self.schedule.phase():
            part.head = self.ema.push(part.engine, dtype=part.head.dtype, device=self.env.device)

    def _after_update(self, step: int, step_s: float) -> dict:
        """Sampler bookkeeping after an optimizer step; self-distillation refreshes the teacher."""
        self.sampler.after_update()
        if self.sampler.teacher_sync_due(step):
            self.schedule.drop_in_flight()  # computed by the old teacher: recomputed after the refresh
            (part,) = self.parts  # self-distillation teaches with one teacher (recipe checks)
            with self.schedule.phase():
                part.head = self.sampler.refresh_teacher(part.engine, dtype=part.head.dtype, device=self.env.device)
        rec = self.sampler.pop_metrics()
        # sampling ran inside this step's time; the rest is teacher wait + student
        rec["train_s"] = step_s - rec["sample_s"] - rec["sync_s"]
        return rec

    def evaluate(self, step: int) -> None:
        self.schedule.drop_in_flight()  # evaluation uses the same channel slots
        self.evaluator.show_progress = not self.log.bar_live  # its own line only where no bar runs
        with self.schedule.phase():
            rec = self.evaluator.evaluate(step)
        if rec:
            self.evals.append(rec)
            self.log.eval_record(rec)

    def export(self) -> Path | None:
        if not self.cfg.checkpoint.export_hf:
            return None

        export_dir = self.out_dir / "hf"
        trained = {p.name: p.aligner for p in self.parts if teachers.trains_aligner(p)}
        ckpt.export_hf(self.student.model, self.student_tok, export_dir, aligners=trained)
        self.log.say(f"exported {export_dir}")
        return export_dir

    def close(self) -> None:
        self.log.close()
        if self.sampler is not None:
            self.sampler.close()
            self.sampler = None
        teachers.close_engines(self.parts)  # self.parts: the run's teachers, also when building failed half-way
        run_folder.unlock(self.out_dir)  # last: the run folder is ours until everything is closed

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
        run_folder.prepare_collective(self.out_dir, self.cfg, resume=self.resume, overwrite=self.overwrite,
                                      allow_data_change=self.allow_data_change)

    def _data(self):
        """Train and eval samples, each with every teacher's tokenization (teachers.prepare_run_data)."""
        cfg = self.cfg
        views = self.run_parts.views
        data = self.run_parts.prepare_data()
        self.log.say(data.report.rich_table())
        with_images = any(t is not None and t.vision is not None for s in data.train for t in (s.student, s.teacher))
        if with_images and (views or getattr(self.rollout, "needs_sampling", False)):
            # prompts would be re-rendered as text and views built without the images (docs/vision.md)
            raise TrainingError(f"rows with images are not supported with distill.rollout '{cfg.distill.rollout}' "
                                "(it samples) or several teachers yet; use off_policy with one teacher")
        return data.train, data.eval

    def _student(self):
        """The sharded student with its optimizer; every teacher's head (loaded alone) and aligner."""
        cfg = self.cfg
        model = kstudent.build_student(cfg)
        limit = getattr(model.config, "max_position_embeddings", None)
        if limit and cfg.data.max_length > limit:
            raise TrainingError(f"data.max_length={cfg.data.max_length} exceeds the student's "
                                f"max_position_embeddings={limit}")
        self.run_parts.setup_heads(model, self.env.device)
        trained, lr_scale = teachers.trained_aligners(self.parts)
        student = kstudent.Student.from_recipe(cfg, extra_modules=trained, model=model,
                                               extra_lr=cfg.train.lr * float(lr_scale))
        w_s = student.model.get_output_embeddings().weight
        for part in self.parts:
            part.aligner.check_heads(int(w_s.shape[0]), int(part.head.shape[0]))
        return student

    def _start_teachers(self):
        """Start every teacher engine; the colocation when the (one) teacher shares the accelerators.

        Threads: by default the teacher and the student both get all of this rank's cores.
        They overlap (pipelined) and which side is larger depends on the pair and the data, so
        each may use every core while the other waits; workers wait passively
        (kdcore.infra.process_env), so the overlap costs little. Measured on 2 cores, s/step, teacher +
        student threads: bench pair 4×128 (student side larger) 2+2 0.95–0.98, 1+2 0.97–0.98,
        1+1 1.28; quickstart (teacher side larger) 2+2 1.23, 1+2 1.46, 1+1 1.39."""
        cfg = self.cfg
        samples = self.train_samples + self.eval_samples
        # generated responses can outgrow the data's
        rollout = rollout_rows(cfg, self.rollout, self.train_samples,
                               cross=sampler_sides(self.parts, self.run_parts.views)[2])

        def max_rows_for(part) -> int:
            longest = self.run_parts.longest_input(part, samples)
            return max(cfg.train.max_tokens_per_micro_batch or max(cfg.train.micro_batch_size, 1) * longest, rollout)

        cores = self.kdist.default_threads(self.env.local_world_size)
        student_threads = cfg.train.threads or cores
        self.kdist.setup_threads(student_threads)
        self.run_parts.start_engines(max_rows_for=max_rows_for, threads_default=cores,
                                     micro_batches_per_step=cfg.train.grad_accum)
        self.log.say(f"[dim]threads: student {student_threads}, teacher {cfg.teacher.threads or cores}[/dim]")
        engine = self.parts[0].engine
        if not engine.colocated:
            return None

        colocation = Colocation(engine, self.student.optimizer, offload_optimizer=engine.offloads_optimizer)
        colocation.start_asleep()
        return colocation

    def _ce_only_targets(self) -> CEOnlyTargets:
        """Where CE alone teaches: the stop tokens (EOS, end of turn) when ``distill.kd_at_stop``
        is false (where the references end, a teacher that answers at greater length puts little
        mass on stopping, and KD there teaches the student not to stop), answers' first tokens when
        ``distill.kd_at_opening`` is false (a teacher that opens unlike the references teaches an
        opening the student cannot yet continue; bench/quality.md)."""
        from kdcore.data.rollout_samples import stop_ids

        d = self.cfg.distill
        stops = frozenset() if d.kd_at_stop else frozenset(int(i) for i in stop_ids(self.student_tok))
        return CEOnlyTargets(labels=stops, openings=not d.kd_at_opening)

    def _ema(self):
        t = self.cfg.teacher
        if not t.ema:
            return None

        check_ema_architecture(self.student.model, t.path)
        return EMATeacher(decay=t.ema, every=t.ema_every, model=self.student.model)


def train(cfg, *, registry=None, resume: bool = False, overwrite: bool = False,
          allow_data_change: bool = False) -> TrainResult:
    """Run a validated recipe (``kdcore.load_recipe``); returns where everything was written."""
    try:
        return Trainer(cfg, registry=registry, resume=resume, overwrite=overwrite,
                       allow_data_change=allow_data_change).run()
    except (DataError, ModelNotFoundError, UnknownAlgorithmError, VocabMismatchError, ChannelError,
            RolloutError) as exc:
        raise TrainingError(str(exc)) from exc
