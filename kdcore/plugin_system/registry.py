"""Typed registries of losses, aligners, rollouts, engines, evaluators and loggers, filled through the plugin hooks."""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

KINDS = ("loss", "aligner", "rollout", "engine", "evaluator", "logger")
HOOK_OF_KIND = {"loss": "register_losses", "aligner": "register_aligners", "rollout": "register_rollouts",
                "engine": "register_engines", "evaluator": "register_evaluators", "logger": "register_loggers"}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
# metrics.jsonl is the run's own record (kdcore plot and every test read it), written by the run
# itself before any plugin logger, on whatever the recipe says, and unlike the trackers a failure
# in it stops the run. Its name is reserved: `logging.backends` may list it (a no-op), a plugin
# may not register it (build_loggers would skip that logger without a word).
ALWAYS_ON_LOGGER = "jsonl"
ENGINE_ROLES = ("teacher", "rollout")  # the recipe sections that name an engine: teacher.engine, rollout.engine
# What people type for a registered name, when spelling alone would suggest another: "kl" is
# closest to "skl" by edit distance, but someone typing "kl" means the plain forward KL. Used for
# the did-you-mean only (a name is never silently replaced), and only when the target is installed.
NAME_ALIASES = {
    "loss": {"kl": "fkl", "forward_kl": "fkl", "kld": "fkl", "reverse_kl": "rkl", "jsd": "js",
             "jensen_shannon": "js", "tv": "tvd"},
}


class PluginError(Exception):
    """A plugin is broken: bad registration, duplicate name, unknown hook."""


class UnknownAlgorithmError(KeyError):
    """A name that no installed plugin registered. The message lists the valid names."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class DuplicateAlgorithmError(PluginError, UnknownAlgorithmError):
    """A name that several plugins registered: refused where it is used, listed everywhere."""


@dataclass(frozen=True)
class PluginInfo:
    """Where algorithms come from: a loaded plugin, or one that failed to load."""

    name: str  # entry-point name, or the in-process name given to the plugin manager
    distribution: str  # providing distribution ("kdflow" for the built-in zoo)
    version: str
    hooks: tuple[str, ...] = ()
    builtin: bool = False
    error: str | None = None  # set when the plugin failed to import; the others still load


@dataclass(frozen=True)
class Entry:
    """One registered algorithm (or engine: ``fn`` is then its :class:`kdcore.engines.EngineSpec`,
    ``options`` the dataclass of its recipe's ``engine_options``)."""

    name: str
    kind: str
    fn: Any  # the callable a hook registered; for kind "engine", the engine spec object
    plugin: str  # distribution name of the provider
    version: str
    summary: str
    options: type | None = None

    def option_fields(self) -> dict[str, Any]:
        """Option names and defaults (empty when the algorithm has no options)."""
        if self.options is None:
            return {}
        out = {}
        for f in dataclasses.fields(self.options):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
            else:
                out[f.name] = None
        return out

    def make_options(self, values: dict[str, Any] | None = None):
        """Instantiate the options dataclass from recipe values (already validated)."""
        values = dict(values or {})
        if self.options is None:
            if values:
                raise ValueError(f"{self.kind} '{self.name}' takes no options, got {sorted(values)}")
            return None
        return self.options(**values)


def summary_of(fn: Callable[..., Any], given: str | None) -> str:
    if given:
        return given.strip().splitlines()[0]
    doc = (getattr(fn, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else "Undocumented"


@dataclass
class Registry:
    """All algorithms of all loaded plugins. Built by :func:`kdcore.load_registry`."""

    entries: dict[tuple[str, str], Entry] = field(default_factory=dict)
    plugins: list[PluginInfo] = field(default_factory=list)
    # (kind, name) -> every plugin that registered it, when more than one did; the registry
    # still loads (so `kdcore plugins` can show the clash), and only using the name refuses
    duplicates: dict[tuple[str, str], list[str]] = field(default_factory=dict)

    def add(self, entry: Entry) -> None:
        key = (entry.kind, entry.name)
        if key in self.entries:
            owners = self.duplicates.setdefault(key, [self.entries[key].plugin])
            owners.append(entry.plugin)
            return
        self.entries[key] = entry

    def duplicate_text(self, kind: str, name: str) -> str:
        owners = self.duplicates[(kind, name)]
        return (f"{kind} '{name}' is registered by more than one plugin: "
                f"{' and '.join(repr(o) for o in owners)}; uninstall or rename one of them")

    def get(self, kind: str, name: str) -> Entry:
        if kind not in KINDS:
            raise ValueError(f"unknown kind '{kind}'; kinds are {', '.join(KINDS)}")
        if (kind, name) in self.duplicates:
            raise DuplicateAlgorithmError(self.duplicate_text(kind, name))
        try:
            return self.entries[(kind, name)]
        except KeyError:
            valid = self.names(kind)
            alias = NAME_ALIASES.get(kind, {}).get(name.lower()) if isinstance(name, str) else None
            near = [alias] if alias in valid else difflib.get_close_matches(name, valid, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise UnknownAlgorithmError(
                f"unknown {kind} '{name}'{hint}; installed: {', '.join(valid) or 'none'}"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(n for k, n in self.entries if k == kind)

    def list(self, kind: str | None = None) -> list[Entry]:
        return sorted(
            (e for e in self.entries.values() if kind is None or e.kind == kind),
            key=lambda e: (KINDS.index(e.kind), e.name),
        )

    def failed_plugins(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]


def engine_spec_problem(spec: Any) -> str | None:
    """Why ``spec`` is not a usable engine spec (:class:`kdcore.engines.EngineSpec`'s shape),
    None when it is: checked when a plugin registers it."""
    roles = getattr(spec, "roles", None)
    if not isinstance(roles, tuple) or not roles or any(r not in ENGINE_ROLES for r in roles):
        return f"needs `roles`, a non-empty tuple of {', '.join(map(repr, ENGINE_ROLES))}; got {roles!r}"
    for role in roles:
        if not callable(getattr(spec, f"create_{role}", None)):
            return f"serves '{role}' but has no create_{role}() method"
    check = getattr(spec, "check_recipe", None)
    if check is not None and not callable(check):
        return "check_recipe is not callable"
    return None


def make_register(registry: Registry, kind: str, plugin: PluginInfo) -> Callable[..., None]:
    """The ``register`` callback handed to one plugin's hook: validates each item on arrival."""

    def register(name: str, fn: Callable[..., Any], options: type | None = None, summary: str | None = None) -> None:
        where = f"plugin '{plugin.distribution}' ({plugin.name})"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise PluginError(f"{where}: {kind} name {name!r} must match [a-z][a-z0-9_]*")
        if kind == "engine":
            problem = engine_spec_problem(fn)
            if problem:
                raise PluginError(f"{where}: engine '{name}' {problem}")
        elif not callable(fn):
            raise PluginError(f"{where}: {kind} '{name}' is not callable: {fn!r}")
        if kind == "logger" and name == ALWAYS_ON_LOGGER:
            raise PluginError(f"{where}: logger name '{name}' is reserved for the run's own metrics.jsonl "
                              f"(always written); register the logger under another name")
        if kind == "logger" and options is not None:
            raise PluginError(f"{where}: logger '{name}' takes no options dataclass (a logger reads the run's "
                              f"config it is given)")
        if options is not None:
            if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
                raise PluginError(f"{where}: options of {kind} '{name}' must be a dataclass type")
            missing = [f.name for f in dataclasses.fields(options)
                       if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]  # type: ignore[misc]
            if missing:
                raise PluginError(f"{where}: options of {kind} '{name}' need defaults for {missing}")
        registry.add(Entry(name=name, kind=kind, fn=fn, plugin=plugin.distribution, version=plugin.version,
                           summary=summary_of(fn, summary), options=options))

    return register
