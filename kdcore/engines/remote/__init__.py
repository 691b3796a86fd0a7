"""The ``remote`` teacher engine: hidden states from a ``kdcore serve-teacher`` elsewhere, over ZeroMQ.

``config``: its recipe section ``teacher.remote`` and the section's checks (light); ``spec``:
the registered :class:`kdcore.engines.remote.spec.RemoteEngine`; ``client``: the engine the
trainer uses; ``server``: ``kdcore serve-teacher``; ``wire``: the message format both speak
(nothing pickled). Import the submodule you need: this package itself stays light.
"""
