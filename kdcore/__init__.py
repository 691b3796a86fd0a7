"""kdflow's thin core: teacher engine, FSDP2 student, hidden-state channel, plugin registry.

Public API:
    kdcore.hookimpl          marker for plugin hook implementations
    kdcore.load_registry()   registry of every installed loss / aligner / rollout
    kdcore.register_plugin(obj, name) / kdcore.unregister_plugin(name)   in-process plugins
    kdcore.load_recipe(path_or_name, overrides)   validated recipe (raises RecipeError)
    kdcore.train(recipe, overrides) / kdcore.evaluate(run) / kdcore.cache_teacher(recipe, out)
                             the commands as functions, returning the folder and its figures
                             (kdcore/api.py, docs/api.md)

Importing kdcore loads neither torch nor any heavy backend; those come with the modules that
need them (kdcore.api on the first call of train / evaluate / cache_teacher).
"""

import sys as _sys
import types as _types

from kdcore.config import RecipeError, load_recipe
from kdcore.plugins import hookimpl, load_registry, register_plugin, unregister_plugin

__version__ = "0.1.0"
_API = ("train", "evaluate", "cache_teacher")
__all__ = ["hookimpl", "load_registry", "register_plugin", "unregister_plugin", "load_recipe", "RecipeError", *_API]


def train(recipe, overrides=None, **options):
    """``kdcore train`` as a function; see :func:`kdcore.api.train`."""
    from kdcore.api import train as run

    return run(recipe, overrides, **options)


def evaluate(run, overrides=None, **options):
    """``kdcore eval`` as a function; see :func:`kdcore.api.evaluate`."""
    from kdcore.api import evaluate as run_eval

    return run_eval(run, overrides, **options)


def cache_teacher(recipe, out, overrides=None, **options):
    """``kdcore cache-teacher`` as a function; see :func:`kdcore.api.cache_teacher`."""
    from kdcore.api import cache_teacher as build

    return build(recipe, out, overrides, **options)


class _Package(_types.ModuleType):
    """``kdcore.evaluate`` is also a submodule (kdcore/evaluate.py): importing it would make the
    package attribute the module, and ``kdcore.evaluate(run)`` would stop working after the first
    ``kdcore eval``. The functions stay the attributes; the modules stay in ``sys.modules``, where
    ``from kdcore.evaluate import X`` finds them."""

    def __setattr__(self, name, value):
        if name in _API and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package
