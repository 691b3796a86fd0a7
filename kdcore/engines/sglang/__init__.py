"""The ``sglang`` engines (GPU only; never run yet: see README.md in this folder).

``spec``: the registered :class:`kdcore.engines.sglang.spec.SGLangEngine`; ``config``: the
recipe section (``<teacher|rollout>.sglang``) and light checks (no torch, no sglang); ``server``: the server
process, its launch arguments and HTTP; ``ipc``: CUDA IPC payloads; ``teacher``: the teacher
engine; ``rollout``: the rollout engine; ``hook``: the code that runs inside the SGLang server;
``cli``: ``python -m kdcore.engines.sglang.cli serve RECIPE``. Import the submodule you need:
this package itself stays light.
"""
