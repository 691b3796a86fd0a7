"""Built-in loggers: where a run's records go besides the console.

============  ================================================================================
tensorboard   ``<run>/tensorboard/`` event files: every number as a scalar at its ``step``, the
              recipe as text (``pip install 'kdflow[tensorboard]'``)
wandb         Weights & Biases, offline by default, under ``<run>/wandb/``: every record as history
              at its ``step``, the recipe as the run's config (``pip install 'kdflow[wandb]'``)
============  ================================================================================

Turn trackers on with ``logging.backends: [tensorboard, wandb]``. ``<run>/metrics.jsonl`` (one
JSON record per line, what ``kdcore plot`` reads) is not a plugin: the run writes it itself,
always and first, and its name ``jsonl`` is reserved. The trackers' packages are imported when a
run builds the logger, never at registration (that runs for every command).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kdcore import hookimpl


def _scalars(record: dict) -> dict:
    """The record's numbers except the step itself (bools are flags, not curves)."""
    return {k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoardLogger:
    def __init__(self, run_dir: Path, config: dict):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(f"needs the tensorboard package (pip install 'kdflow[tensorboard]'): {exc}") from exc
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        # four-space indent: TensorBoard renders text as Markdown, this keeps the JSON a code block
        text = "\n".join("    " + line for line in json.dumps(config, indent=2, default=str).splitlines())
        self.writer.add_text("config", text, global_step=0)

    def log(self, record: dict) -> None:
        for key, value in _scalars(record).items():
            self.writer.add_scalar(key, value, global_step=int(record["step"]))

    def close(self) -> None:
        self.writer.close()  # flushes: events are otherwise written every two minutes


def tensorboard(*, run_dir: Path, config: dict):
    """TensorBoard event files under <run>/tensorboard/: scalars per step, the recipe as text."""
    return TensorBoardLogger(run_dir, config)


class WandbLogger:
    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError(f"needs the wandb package (pip install 'kdflow[wandb]'): {exc}") from exc
        # offline unless WANDB_MODE says otherwise: a run never needs the network or an account;
        # `wandb sync <run>/wandb/offline-run-*` uploads it later
        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(dir=str(run_dir), config=config, mode=mode,
                              settings=wandb.Settings(console="off", silent=True))  # the console is ours

    def log(self, record: dict) -> None:
        # an evaluation record at a step already logged joins that step's history row
        self.run.log(_scalars(record) | {"step": record["step"]}, step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def wandb(*, run_dir: Path, config: dict):
    """Weights & Biases (offline unless WANDB_MODE is set) under <run>/wandb/: history per step, recipe as config."""
    return WandbLogger(run_dir, config)


@hookimpl
def register_loggers(register):
    register("tensorboard", tensorboard)
    register("wandb", wandb)
