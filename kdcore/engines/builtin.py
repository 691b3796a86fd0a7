"""The built-in engines, registered through the ``kdcore`` entry-point group like any plugin.

Each lives in its own package beside this module, holding its spec, its recipe section and
its checks: ``hf`` (transformers, CPU or CUDA, the teacher in its own process), ``inline`` (the
transformers teacher in the trainer's process), ``sglang`` (an SGLang server per node, GPU
only), ``remote`` (a ``kdcore serve-teacher`` elsewhere, teacher only), ``cache`` (stored
teacher states from a ``kdcore cache-teacher`` folder). Nothing heavy is imported here: each
spec imports its engine when it builds one.
"""

from __future__ import annotations

from kdcore.engines.cache.spec import CacheEngine
from kdcore.engines.hf.spec import HFEngine, InlineEngine
from kdcore.engines.remote.spec import RemoteEngine
from kdcore.engines.sglang.spec import SGLangEngine
from kdcore.plugin_system.manager import hookimpl


@hookimpl
def register_engines(register):
    register("hf", HFEngine())
    register("inline", InlineEngine())
    register("sglang", SGLangEngine())
    register("remote", RemoteEngine())
    register("cache", CacheEngine())


__all__ = ["HFEngine", "InlineEngine", "SGLangEngine", "RemoteEngine", "CacheEngine", "register_engines"]
