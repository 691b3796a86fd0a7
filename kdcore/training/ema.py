"""The EMA teacher (``teacher.ema``): self-distillation from an average of the student.

The teacher's weights are an exponential moving average of the student's: they start as the
student's initial weights (pushed into the teacher engine before the first step, so
``teacher.path`` gives the engine and the architecture) and every ``teacher.ema_every``
optimizer steps become ``decay · teacher + (1 − decay) · student``, pushed into the engine with
``update_weights`` as ``teacher.self_distill_every`` does (:func:`kdcore.training.weight_sync.push_teacher_weights`).
The average is kept in float32 on the student's side (every rank holds the same full copy) and
saved with each checkpoint as ``ema_teacher.safetensors`` beside the DCP shards (tensors only,
never pickle), so a resumed run continues the same average.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kdcore.training.types import TrainingError
from kdcore.modeling.student import load_config
from kdcore.training.weight_sync import check_self_distill, full_weights, head_name, push_teacher_weights

EMA_FILE = "ema_teacher.safetensors"


class EMATeacher:
    def __init__(self, *, decay: float, every: int, model: torch.nn.Module):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"teacher.ema must be within (0, 1), got {decay}")
        self.decay = float(decay)
        self.every = int(every)
        self.model = model
        self.state: dict[str, torch.Tensor] = {}

    def due(self, step: int) -> bool:
        """Update the average after optimizer step ``step`` (1-based)?"""
        return step % self.every == 0

    def reset(self) -> None:
        """The average starts as the student's current weights (collective under FSDP)."""
        # one float32 copy per name (tied weights too): safetensors stores no shared storage
        self.state = {k: v.detach().to(torch.float32, copy=True).cpu() for k, v in full_weights(self.model).items()}

    @torch.no_grad()
    def update(self) -> None:
        """``teacher ← decay · teacher + (1 − decay) · student`` (collective under FSDP)."""
        for k, v in full_weights(self.model).items():
            self.state[k].mul_(self.decay).add_(v.detach().to(device="cpu", dtype=torch.float32),
                                                 alpha=1.0 - self.decay)

    def push(self, engine, *, dtype: torch.dtype, device) -> torch.Tensor:
        """Load the average into the teacher engine; returns the new teacher head."""
        return push_teacher_weights(engine, self.state, head_name(self.model), dtype=dtype, device=device)

    def save(self, step_dir: Path) -> None:
        """Write the average into a checkpoint folder (main rank; the state is equal on every rank)."""
        from safetensors.torch import save_file

        tmp = Path(step_dir) / (EMA_FILE + ".tmp")
        save_file({k: v.contiguous() for k, v in self.state.items()}, str(tmp))
        os.replace(tmp, Path(step_dir) / EMA_FILE)

    def load(self, step_dir: Path) -> None:
        from safetensors.torch import load_file

        path = Path(step_dir) / EMA_FILE
        if not path.is_file():
            raise TrainingError(f"--resume: {step_dir} holds no {EMA_FILE}, but teacher.ema is set; "
                                "resume with the recipe the checkpoint was written with")
        self.state = load_file(str(path))


def check_ema_architecture(student_model, teacher_path: str) -> None:
    """The average is pushed into the teacher by name: the student needs the teacher's architecture."""
    check_self_distill(student_model.config, load_config(teacher_path), setting="teacher.ema", error=TrainingError)
