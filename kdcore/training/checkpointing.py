"""The run's checkpoints: where training resumes from, when to save, what a save holds.

The files themselves (atomic DCP folders, ``latest``, pruning, export) are
:mod:`kdcore.storage.checkpoint`'s; this part owns the run's decisions: the save interval, the final
save, which trainer state goes with a checkpoint (the rollout policy's state, the latest eval
loss and the step it was logged at, and an EMA teacher's average as ``ema_teacher.safetensors``,
written into the folder before it is sealed: :mod:`kdcore.training.ema`),
and naming the last good one when a run stops.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from kdcore.training.types import LatestEval, TrainingError
from kdcore.data import DataPosition
from kdcore.modeling import student as kstudent
from kdcore.storage import checkpoint as ckpt
from kdcore.storage.checkpoint_files import MAX_STEP
from kdcore.storage.run_folder import trim_metrics, recipe_dict


class Checkpointer:
    def __init__(self, out_dir: Path, *, cfg, student, rollout, latest_eval: LatestEval, log, ema=None):
        self.dir = out_dir / "checkpoints"
        self.recipe = cfg  # saved with every checkpoint, compared on --resume (kdcore/storage/resume.py)
        self.cfg = cfg.checkpoint
        self.max_steps = cfg.train.max_steps
        self.student = student
        self.rollout = rollout  # its state (e.g. an adaptive probability) is saved with the weights
        self.latest_eval = latest_eval
        self.log = log  # kdcore.training.metrics.RunLog
        self.ema = ema  # kdcore.training.ema.EMATeacher, or None
        self.last_good: Path | None = None
        # the step whose evaluation was logged before the restored checkpoint was saved: the
        # final one (a kill during the export) is not evaluated and logged a second time
        self.evaluated_step: int | None = None

    def restore(self) -> tuple[int, Any]:
        """``(step, data position)`` of the latest checkpoint, restored into the student; the
        schedule follows the recipe's (possibly changed) ``train`` settings, and metrics.jsonl
        loses the records of steps after the checkpoint (they are about to be re-run)."""
        s = self.student
        state = ckpt.load_latest(self.dir, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler,
                                 extra_modules=s.extra_modules, validate=_check_trainer_state)
        if state is None:
            raise TrainingError(f"--resume: no checkpoint in {self.dir}")
        if state.step > self.max_steps:  # the loop would train nothing and export the old weights
            raise TrainingError(f"--resume: '{state.path}' is at step {state.step}, beyond train.max_steps "
                                f"{self.max_steps}: raise train.max_steps to continue it")

        self.latest_eval.loss = state.trainer_state.get("last_eval_loss")
        evaluated = state.trainer_state.get("evaluated_step")
        self.evaluated_step = evaluated if type(evaluated) is int else None
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
        s = self.student
        # rank 0 writes the average (the same on every rank) into the folder before it is sealed
        self.last_good = ckpt.save_checkpoint(
            self.dir, step, model=s.model, optimizer=s.optimizer, scheduler=s.scheduler,
            extra_modules=s.extra_modules, data_state=asdict(position) if position is not None else {},
            trainer_state={"last_eval_loss": self.latest_eval.loss, "rollout": self.rollout.state_dict(),
                           "evaluated_step": (self.latest_eval.record or {}).get("step")},
            recipe=recipe_dict(self.recipe), keep=self.cfg.keep,
            write_extra=self.ema.save if self.ema is not None else None)
        return self.last_good

    def where(self) -> str:
        """Which checkpoint a stopped run leaves, for its error message."""
        return f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written yet"


def _check_trainer_state(saved: dict) -> None:
    """The trainer's own values in a checkpoint's trainer_state.json (the checkpoint is skipped
    when one is impossible): a data position of non-negative counts, an eval loss that is a number."""
    pos = saved.get("data_state") or {}
    for key, value in pos.items():
        if key not in ("epoch", "step") or type(value) is not int or not 0 <= value <= MAX_STEP:
            raise ValueError(f"data position {key!r} is {str(value)[:40]!r}, not a count of epochs or steps")
    loss = (saved.get("trainer_state") or {}).get("last_eval_loss")
    if loss is not None and type(loss) not in (int, float):
        raise ValueError(f"last_eval_loss is {str(loss)[:40]!r}, not a number")
