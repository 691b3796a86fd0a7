"""Plugin manager factory and registry loading.

Nothing happens at import time: every call to :func:`load_registry` builds a fresh plugin
manager, loads the ``kdcore`` entry-point group (the built-in zoo comes through it too, from the
``kdflow`` distribution), adds the in-process plugins registered with :func:`register_plugin`,
and asks each plugin's hooks to fill a new :class:`~kdcore.plugin_system.registry.Registry`.
"""

from __future__ import annotations

import importlib.metadata as md
import os
from typing import Any

import pluggy

from kdcore.plugin_system import hookspecs
from kdcore.plugin_system.registry import HOOK_OF_KIND, PluginError, PluginInfo, Registry, make_register

GROUP = "kdcore"
BUILTIN_DISTRIBUTION = "kdflow"
ENV_ALLOW = "KDCORE_LOAD_PLUGINS"

hookimpl = pluggy.HookimplMarker("kdcore")

# Plugins added from Python (tests, notebooks). Kept apart from any manager so that the
# factory stays pure; add and remove them with register_plugin / unregister_plugin.
_in_process: dict[str, Any] = {}


def register_plugin(plugin: Any, name: str) -> None:
    """Add an in-process plugin (a module or object with hookimpls) to every later registry."""
    if name in _in_process:
        raise PluginError(f"an in-process plugin named '{name}' is already registered")
    _in_process[name] = plugin


def unregister_plugin(name: str) -> None:
    _in_process.pop(name, None)


def _norm(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def _allowed() -> set[str] | None:
    raw = os.environ.get(ENV_ALLOW)
    if raw is None:
        return None
    return {_norm(n) for n in raw.split(",") if n.strip()}


def _entry_point_plugins(allow: set[str] | None) -> list[tuple[PluginInfo, Any]]:
    out: list[tuple[PluginInfo, Any]] = []
    seen: set[tuple[str, str]] = set()
    for ep in md.entry_points(group=GROUP):
        dist = ep.dist.name if ep.dist is not None else "unknown"
        version = ep.dist.version if ep.dist is not None else "unknown"
        key = (_norm(dist), ep.name)
        if key in seen:  # the same distribution seen twice on sys.path
            continue
        seen.add(key)
        builtin = _norm(dist) == BUILTIN_DISTRIBUTION
        if not builtin and allow is not None and not ({_norm(dist), _norm(ep.name)} & allow):
            continue
        # built-in plugins go by their entry-point name, third-party ones by distribution:name
        name = ep.name if builtin else f"{dist}:{ep.name}"
        info = PluginInfo(name=name, distribution=dist, version=version, builtin=builtin)
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            out.append((PluginInfo(info.name, dist, version, builtin=builtin,
                                   error=f"{type(exc).__name__}: {exc}"), None))
            continue
        out.append((info, module))
    return out


def make_plugin_manager(*, entry_points: bool = True) -> tuple[pluggy.PluginManager, list[PluginInfo]]:
    """A fresh plugin manager with the hookspecs, entry-point plugins and in-process plugins.

    Returns the manager and one :class:`PluginInfo` per plugin (including those that failed to
    import, with ``error`` set). Raises :class:`PluginError` naming the plugin when a hookimpl
    matches no hookspec or has a bad signature.
    """
    pm = pluggy.PluginManager("kdcore")
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    candidates = _entry_point_plugins(_allowed()) if entry_points else []
    candidates += [(PluginInfo(name=n, distribution=n, version="in-process"), p) for n, p in _in_process.items()]
    for info, module in candidates:
        if module is None:
            infos.append(info)
            continue
        try:
            pm.register(module, name=info.name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin '{info.name}' ({info.distribution}): {exc}") from exc
        try:
            pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(
                f"plugin '{info.name}' ({info.distribution}) implements a hook that does not exist: {exc}; "
                f"hooks are {', '.join(HOOK_OF_KIND.values())}"
            ) from exc
        hooks = tuple(sorted(c.name for c in (pm.get_hookcallers(module) or [])))
        infos.append(PluginInfo(info.name, info.distribution, info.version, hooks, info.builtin))
    return pm, infos


def load_registry(*, entry_points: bool = True) -> Registry:
    """Build the registry of every installed algorithm and engine (public API).

    ``registry.get(kind, name).fn`` is the registered callable (an engine spec for kind
    ``engine``); an unknown name raises
    :class:`~kdcore.plugin_system.registry.UnknownAlgorithmError` listing the valid names.
    """
    pm, infos = make_plugin_manager(entry_points=entry_points)
    registry = Registry(plugins=infos)
    by_name = {i.name: i for i in infos}
    for kind, hook_name in HOOK_OF_KIND.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = by_name[impl.plugin_name]
            try:
                impl.function(register=make_register(registry, kind, info))
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(f"plugin '{info.name}' failed in {hook_name}: {type(exc).__name__}: {exc}") from exc
    return registry
