"""The ``cache`` teacher engine: stored teacher hidden states from a ``kdcore cache-teacher`` folder.

``format``: the folder's format, manifest, fingerprints and the recipe checks that need them
(light: no torch); ``teacher``: the engine that reads a folder back; ``spec``: the registered
:class:`kdcore.engines.cache.spec.CacheEngine` (its recipe key: ``teacher.cache``, the folder).
The folder is written by :mod:`kdcore.commands.cache_teacher` (``kdcore cache-teacher``).
"""
