"""Built-in rollout policies."""

from __future__ import annotations

from kdcore import hookimpl
from kdcore.rollout import RolloutPolicy


class OffPolicy(RolloutPolicy):
    """The data set's own responses (supervised KD, as in Hinton et al. 2015 / DistilBERT)."""

    def select(self, batch, ctx):
        return batch


def off_policy(options=None) -> RolloutPolicy:
    """The data set's own responses: supervised KD on the recipe's data (the default)."""
    return OffPolicy()


@hookimpl
def register_rollouts(register):
    register("off_policy", off_policy)
