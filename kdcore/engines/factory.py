"""Engines by name: the base of what ``register_engines`` registers, and the two factories.

The trainer, the sampler and recipe validation never test an engine's name: they look it up
in the registry (kind ``engine``) and ask the registered :class:`EngineSpec` to build or check.
Light on purpose (no torch, no sglang): a spec imports its engine module only when it builds one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

from kdcore.engines.protocol import RolloutError, TeacherError
from kdcore.plugin_system.registry import ENGINE_ROLES as ROLES  # light; the registry checks specs against them

if TYPE_CHECKING:  # pragma: no cover
    from kdcore.engines.protocol import RolloutEngine, TeacherEngine
    from kdcore.plugin_system.registry import Entry, Registry

# The teacher engine a recipe gets when it names none. ``inline`` (the teacher in the trainer's
# process) over ``hf`` (a second process, overlapping the teacher's forward with the student's
# step): on 2 CPU cores the overlap was worth -4% to 9% of step time (bench/teacher_engines.py,
# four tables) and the second interpreter cost ~0.35 GB, which put kdflow above TRL's leanest
# trainer in memory on the on-policy and ULD tables (bench/results.md). ``hf`` stays one line
# away for when the overlap pays (a teacher on its own GPU).
DEFAULT_TEACHER_ENGINE = "inline"


class EngineSpec:
    """One engine kind, as a plugin registers it: ``register("name", MySpec())``.

    Subclass it and set ``roles`` to the recipe sections the engine can serve (``"teacher"``:
    hidden states for the loss; ``"rollout"``: sampling from the student's weights), then
    implement the matching factory. Factories import the engine's heavy modules inside the
    method, never at module level: registering runs for every ``kdcore`` command.

    Settings: ``register("name", MySpec(), options=MyOptions)`` with a dataclass (every field
    with a default) makes ``<teacher|rollout>.engine_options`` the engine's section: recipe
    validation checks it against the dataclass (unknown keys with the nearest valid one, types,
    choices, ``__post_init__``), as it checks ``distill.loss_options``, and the factory gets
    the instance as ``options=``. An engine without an options dataclass gets no ``options``
    argument, and a recipe giving it ``engine_options`` is refused.
    """

    roles: tuple[str, ...] = ()

    def create_teacher(self, teacher_cfg: Any, *, max_rows: int, threads: Optional[int] = None,
                       micro_batches_per_step: int = 1, **kwargs: Any) -> "TeacherEngine":
        """Build (not start) a :class:`kdcore.engines.protocol.TeacherEngine` for the recipe's
        ``teacher`` section: ``max_rows`` rows per channel slot, ``threads`` CPU threads (None:
        the engine's default), ``micro_batches_per_step`` = ``train.grad_accum`` (a colocated
        engine needs that many slots, since a whole step is computed before the student trains)."""
        raise TeacherError(f"{type(self).__name__} cannot serve as a teacher engine")

    def create_rollout(self, *, config: Any, device: Any, dtype: Any = None, threads: Optional[int] = None,
                       settings: Any = None, **kwargs: Any) -> "RolloutEngine":
        """Build a :class:`kdcore.engines.protocol.RolloutEngine`: a sampling copy of the student
        built from its transformers ``config`` on ``device`` in ``dtype`` (None: the engine's
        default); ``settings`` is the recipe's ``rollout`` section (its engine sub-section, e.g.
        ``settings.sglang``, is the engine's to read)."""
        raise RolloutError(f"{type(self).__name__} cannot serve as a rollout engine")

    def check_recipe(self, section: Mapping[str, Any], prefix: str) -> list[str]:
        """Problems with a raw recipe section that names this engine (one line each, each
        starting with a dotted key under ``prefix``). ``prefix`` is the section, ``teacher`` or
        ``rollout``: the role the engine plays there. Runs at recipe validation: keep it light."""
        return []


def engine_spec(name: str, role: str, registry: "Optional[Registry]" = None) -> EngineSpec:
    """The registered spec of engine ``name`` for ``role``; a one-line error otherwise."""
    return engine_entry(name, role, registry).fn


def engine_entry(name: str, role: str, registry: "Optional[Registry]" = None) -> "Entry":
    """The registry entry of engine ``name`` for ``role`` (its spec and options dataclass)."""
    error = TeacherError if role == "teacher" else RolloutError
    if registry is None:
        from kdcore.plugin_system.manager import load_registry

        registry = load_registry()
    try:
        entry = registry.get("engine", name)
    except KeyError as exc:  # UnknownAlgorithmError: its message names the installed engines
        raise error(f"{role}.engine: {exc}") from None
    if role not in entry.fn.roles:
        raise error(f"{role}.engine: engine '{name}' cannot serve as a {role} engine "
                    f"(it serves: {', '.join(entry.fn.roles)})")
    return entry


def engine_options(entry: "Entry", section: Any, role: str) -> dict[str, Any]:
    """``{"options": <the engine's options dataclass>}`` from ``section.engine_options`` when the
    engine registered one, else ``{}`` (the factory's keyword arguments)."""
    raw = getattr(section, "engine_options", None) or {}
    if not isinstance(raw, Mapping):  # an OmegaConf node from a loaded recipe
        from omegaconf import OmegaConf

        raw = OmegaConf.to_container(raw, resolve=True)
    if entry.options is None:
        if raw:
            error = TeacherError if role == "teacher" else RolloutError
            raise error(f"{role}.engine_options: engine '{entry.name}' takes no options, got {', '.join(map(str, raw))}")
        return {}
    return {"options": entry.make_options(dict(raw))}


def create_teacher_engine(teacher_cfg: Any, *, registry: "Optional[Registry]" = None, max_rows: int,
                          threads: Optional[int] = None, micro_batches_per_step: int = 1,
                          **kwargs: Any) -> "TeacherEngine":
    """Build (not start) the teacher engine a recipe's ``teacher`` section names (``engine``,
    default :data:`DEFAULT_TEACHER_ENGINE`). ``registry``: the run's registry (None: load the installed one)."""
    name = getattr(teacher_cfg, "engine", None) or DEFAULT_TEACHER_ENGINE
    entry = engine_entry(name, "teacher", registry)
    return entry.fn.create_teacher(teacher_cfg, max_rows=max_rows, threads=threads,
                                   micro_batches_per_step=max(1, int(micro_batches_per_step)),
                                   **engine_options(entry, teacher_cfg, "teacher"), **kwargs)


def create_rollout_engine(kind: str, *, registry: "Optional[Registry]" = None, config: Any = None,
                          device: Any = "cpu", dtype: Any = None, threads: Optional[int] = None,
                          settings: Any = None, **kwargs: Any) -> "RolloutEngine":
    """The student rollout engine a recipe's ``rollout.engine`` names (``settings``: that section)."""
    entry = engine_entry(kind, "rollout", registry)
    return entry.fn.create_rollout(config=config, device=device, dtype=dtype, threads=threads, settings=settings,
                                   **engine_options(entry, settings, "rollout"), **kwargs)


__all__ = ["ROLES", "EngineSpec", "engine_spec", "engine_entry", "engine_options", "create_teacher_engine",
           "create_rollout_engine"]
