"""The ``hf`` engines: transformers, CPU or CUDA.

``spec``: the registered :class:`kdcore.engines.hf.spec.HFEngine` (no recipe section of its
own: it reads the teacher section's ``path``/``dtype``/``device``/``threads``); ``teacher``:
the teacher engine's parent side (the student process); ``child``: the spawned process that
loads the model and answers; ``model``: the loaded teacher both sides of the ``hf`` engine and
the ``inline`` engine compute with; ``inline``: the ``inline`` engine (the teacher in the
trainer's process, registered by :class:`kdcore.engines.hf.spec.InlineEngine`). Its rollout engine, a student copy in the trainer, is
:mod:`kdcore.engines.hf_rollout` (shared with the teacher-driven rollouts of every engine).
This package itself stays light: ``HFTeacher`` is imported (with torch) on first use.
"""

from typing import Any


def __getattr__(name: str) -> Any:  # `from kdcore.engines.hf import HFTeacher`, without torch at registration
    if name == "HFTeacher":
        from kdcore.engines.hf.teacher import HFTeacher

        return HFTeacher
    if name == "InlineTeacher":
        from kdcore.engines.hf.inline import InlineTeacher

        return InlineTeacher
    raise AttributeError(f"module 'kdcore.engines.hf' has no attribute '{name}'")
