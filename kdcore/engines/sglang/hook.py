"""kdflow's in-server SGLang hook, as kdflow's own code imports it.

The code lives in ``kdcore/engines/sglang/plugin/`` and is installed as the top-level package
``kdflow_sglang_plugin``: SGLang's plugin loader imports that name, which does not run
``kdcore/__init__`` (omegaconf, pluggy: not in an SGLang environment). This name is an alias
of that module (the same object in ``sys.modules``), so there is one ``_DESTINATIONS`` cache
and one ``sglang_plugin``, and a test that patches one patches both.
"""

import sys

import kdflow_sglang_plugin

sys.modules[__name__] = kdflow_sglang_plugin
