"""Teacher and rollout engines: one protocol module, the built-in engines, and the factories.

Engines are chosen by name through the registry (kind ``engine``, filled by the
``register_engines`` hook, see :mod:`kdcore.plugin_system.hookspecs`); the built-in ``hf``, ``sglang``,
``remote`` and ``cache``, one package each (spec, recipe section, checks, engine), register from
:mod:`kdcore.engines.builtin` through the ``kdcore`` entry-point group like any third-party
plugin. Importing this package loads neither torch nor sglang.

    kdcore.engines.create_teacher_engine(recipe.teacher, registry=..., max_rows=...)
    kdcore.engines.create_rollout_engine(recipe.rollout.engine, registry=..., config=..., device=...)
"""

from kdcore.engines.factory import EngineSpec, create_rollout_engine, create_teacher_engine
from kdcore.engines.protocol import (Generation, HiddenRequest, HiddenStates, RolloutEngine, RolloutError,
                                     TeacherEngine, TeacherError, Ticket)

__all__ = [
    "EngineSpec", "create_teacher_engine", "create_rollout_engine", "TeacherEngine", "HiddenRequest", "Ticket",
    "HiddenStates", "TeacherError", "RolloutEngine", "Generation", "RolloutError",
]
