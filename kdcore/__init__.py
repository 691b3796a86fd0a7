"""kdflow's thin core: teacher engine, FSDP2 student, hidden-state channel, plugin registry.

Public API:
    kdcore.hookimpl          marker for plugin hook implementations
    kdcore.load_registry()   registry of every installed loss / aligner / rollout
    kdcore.register_plugin(obj, name) / kdcore.unregister_plugin(name)   in-process plugins
    kdcore.load_recipe(path_or_name, overrides)   validated recipe (raises RecipeError)
    kdcore.train(recipe, overrides) / kdcore.evaluate(run) / kdcore.cache_teacher(recipe, out)
                             the commands as functions, returning the folder and its figures
                             (kdcore/commands/api.py, docs/api.md)

Importing kdcore loads neither torch nor any heavy backend; those come with the modules that
need them (kdcore.commands.api on the first call of train / evaluate / cache_teacher).
"""

from kdcore.recipe.loading import RecipeError, load_recipe
from kdcore.plugin_system.manager import hookimpl, load_registry, register_plugin, unregister_plugin

__version__ = "0.1.0"
_API = ("train", "evaluate", "cache_teacher")
__all__ = ["hookimpl", "load_registry", "register_plugin", "unregister_plugin", "load_recipe", "RecipeError", *_API]


def train(recipe, overrides=None, **options):
    """``kdcore train`` as a function; see :func:`kdcore.commands.api.train`."""
    from kdcore.commands.api import train as run

    return run(recipe, overrides, **options)


def evaluate(run, overrides=None, **options):
    """``kdcore eval`` as a function; see :func:`kdcore.commands.api.evaluate`."""
    from kdcore.commands.api import evaluate as run_eval

    return run_eval(run, overrides, **options)


def cache_teacher(recipe, out, overrides=None, **options):
    """``kdcore cache-teacher`` as a function; see :func:`kdcore.commands.api.cache_teacher`."""
    from kdcore.commands.api import cache_teacher as build

    return build(recipe, out, overrides, **options)

