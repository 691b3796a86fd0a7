"""kdflow's built-in algorithm zoo, installed as ``kdflow_algorithms``.

Each module registers through the ``kdcore`` entry-point group, exactly like a third-party
plugin would (see pyproject.toml).
"""
