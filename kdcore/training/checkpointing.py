"""The run's checkpoints: where training resumes from, when to save, what a save holds.

The files themselves (atomic DCP folders, ``latest``, pruning, export) are
:mod:`kdcore.checkpoint`'s; this part owns the run's decisions: the save interval, the final
save, which trainer state goes with a checkpoint (the rollout policy's state, the latest eval
loss, and an EMA teacher's average as ``ema_teacher.safetensors``: :mod:`kdcore.training.ema`),
and naming the last good one when a run stops.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdcore.training.types import LatestEval, TrainingError


class Checkpointer:
    def __init__(self, out_dir: Path, *, cfg, student, rollout, latest_eval: LatestEval, log, ema=None):
        self.dir = out_dir / "checkpoints"
        self.recipe = cfg  # saved with every checkpoint, compared on --resume (kdcore/resume.py)
        self.cfg = cfg.checkpoint
        self.max_steps = cfg.train.max_steps
        self.student = student
        self.rollout = rollout  # its state (e.g. an adaptive probability) is saved with the weights
        self.latest_eval = latest_eval
        self.log = log  # kdcore.training.metrics.RunLog
        self.ema = ema  # kdcore.training.ema.EMATeacher, or None
        self.last_good: Path | None = None

    def restore(self) -> tuple[int, Any]:
        """``(step, data position)`` of the latest checkpoint, restored into the student; the
        schedule follows the recipe's (possibly changed) ``train`` settings, and metrics.jsonl
        loses the records of steps after the checkpoint (they are about to be re-run)."""
        from kdcore import checkpoint as ckpt
        from kdcore import student as kstudent
        from kdcore.run_folder import trim_metrics

        s = self.student
        state = ckpt.load_latest(self.dir, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler,
                                 extra_modules=s.extra_modules)
        if state is None:
            raise TrainingError(f"--resume: no checkpoint in {self.dir}")
        from kdcore.data import DataPosition

        self.latest_eval.loss = state.trainer_state.get("last_eval_loss")
        self.rollout.load_state_dict(state.trainer_state.get("rollout") or {})
        if self.ema is not None:
            self.ema.load(state.path)
        self.last_good = state.path
        kstudent.reschedule_for_recipe(s.scheduler, self.recipe.train, (state.recipe or {}).get("train"))
        if self.log.is_main:
            trim_metrics(self.log.path, state.step)
        self.log.say(f"resumed from {state.path} at step {state.step}")
        return state.step, DataPosition(**state.data_state)

    def due(self, step: int) -> bool:
        every = self.cfg.every
        return bool(every) and step % every == 0 and step < self.max_steps

    def save(self, step: int, position: Any) -> Path:
        from kdcore import checkpoint as ckpt
        from kdcore.run_folder import recipe_dict

        s = self.student
        self.last_good = ckpt.save_checkpoint(
            self.dir, step, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler,
            extra_modules=s.extra_modules, data_state=asdict(position) if position is not None else {},
            trainer_state={"last_eval_loss": self.latest_eval.loss, "rollout": self.rollout.state_dict()},
            recipe=recipe_dict(self.recipe), keep=self.cfg.keep)
        if self.ema is not None:
            from kdcore import distributed as kdist

            if kdist.get_rank() == 0:  # the average is the same on every rank
                self.ema.save(self.last_good)
            kdist.barrier()
        return self.last_good

    def where(self) -> str:
        """Which checkpoint a stopped run leaves, for its error message."""
        return f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written yet"
