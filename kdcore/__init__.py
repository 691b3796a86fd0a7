"""kdflow's thin core: teacher engine, FSDP2 student, hidden-state channel, plugin registry.

Public API:
    kdcore.hookimpl          marker for plugin hook implementations
    kdcore.load_registry()   registry of every installed loss / aligner / rollout
    kdcore.register_plugin(obj, name) / kdcore.unregister_plugin(name)   in-process plugins
    kdcore.load_recipe(path_or_name, overrides)   validated recipe (raises RecipeError)

Importing kdcore loads neither torch nor any heavy backend; those come with the modules that
need them.
"""

from kdcore.recipe.loading import RecipeError, load_recipe
from kdcore.plugin_system.manager import hookimpl, load_registry, register_plugin, unregister_plugin

__version__ = "0.1.0"
__all__ = ["hookimpl", "load_registry", "register_plugin", "unregister_plugin", "load_recipe", "RecipeError"]
