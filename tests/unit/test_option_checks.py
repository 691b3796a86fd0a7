"""Every built-in options dataclass rejects an out-of-range value when it is constructed, with
one line naming the option, its allowed range and the value (what ``kdcore validate`` shows)."""

from __future__ import annotations

import math

import pytest

import kdcore
from kdflow_algorithms.aligners.dskd import DSKDOptions
from kdflow_algorithms.aligners.mined import MinEDOptions
from kdflow_algorithms.aligners.overlap import OverlapOptions
from kdflow_algorithms.aligners.uld import ULDOptions
from kdflow_algorithms.checks import check_range
from kdflow_algorithms.losses import AKLOptions, JSOptions, SKLOptions, SRKLOptions
from kdflow_algorithms.rollouts import AdaptiveOptions, MixedOptions

BAD = [
    (JSOptions, {"beta": 2}, "beta must be in (0, 1), got 2"),
    (JSOptions, {"beta": 0.0}, "beta must be in (0, 1), got 0.0"),
    (JSOptions, {"beta": 1.0}, "beta must be in (0, 1), got 1.0"),
    (SKLOptions, {"alpha": 1.0}, "alpha must be in [0, 1), got 1.0"),
    (SKLOptions, {"alpha": -0.1}, "alpha must be in [0, 1), got -0.1"),
    (SRKLOptions, {"alpha": 1.5}, "alpha must be in [0, 1), got 1.5"),
    (AKLOptions, {"mu": 0.0}, "mu must be in (0, 1], got 0.0"),
    (AKLOptions, {"mu": 1.01}, "mu must be in (0, 1], got 1.01"),
    (AKLOptions, {"mu": math.nan}, "mu must be in (0, 1], got nan"),
    (OverlapOptions, {"min_shared": -1}, "min_shared must be >= 0, got -1"),
    (DSKDOptions, {"mode": "attention"}, "mode must be one of eta, cma, got 'attention'"),
    (DSKDOptions, {"projector_lr_scale": 0.0}, "projector_lr_scale must be > 0, got 0.0"),
    (DSKDOptions, {"student_hidden_size": -8}, "student_hidden_size must be >= 0, got -8"),
    (DSKDOptions, {"teacher_hidden_size": -1}, "teacher_hidden_size must be >= 0, got -1"),
    (ULDOptions, {"top_k": -1}, "top_k must be >= 0, got -1"),
    (MinEDOptions, {"max_distance": -2}, "max_distance must be >= -1, got -2"),
    (MinEDOptions, {"workers": 0}, "workers (-1 = all cores) must be >= 1, got 0"),
    (MixedOptions, {"lam": 1.5}, "lam must be in [0, 1], got 1.5"),
    (MixedOptions, {"off_policy": "student"}, "off_policy must be one of data, teacher, got 'student'"),
    (AdaptiveOptions, {"init_probability": -0.1}, "init_probability must be in [0, 1], got -0.1"),
    (AdaptiveOptions, {"probability_step": 2}, "probability_step must be in [0, 1], got 2"),
    (AdaptiveOptions, {"loss_eps": -0.5}, "loss_eps must be >= 0, got -0.5"),
    (AdaptiveOptions, {"capacity": 0}, "capacity must be >= 1, got 0"),
    (AdaptiveOptions, {"schedule": "cosine"}, "schedule must be one of decreasing, constant, increasing, got 'cosine'"),
    (AdaptiveOptions, {"signal": "loss"}, "signal must be one of ce, kd, got 'loss'"),
]

GOOD = [
    (JSOptions, {"beta": 0.1}), (JSOptions, {"beta": 0.9}),
    (SKLOptions, {"alpha": 0.0}), (SRKLOptions, {"alpha": 0.99}),
    (AKLOptions, {"mu": 1.0}), (AKLOptions, {"mu": 0.01}),
    (OverlapOptions, {"min_shared": 0}),
    (DSKDOptions, {"mode": "eta", "projector_lr_scale": 10.0, "student_hidden_size": 8, "teacher_hidden_size": 12}),
    (ULDOptions, {"top_k": 0}), (ULDOptions, {"top_k": 50}),
    (MinEDOptions, {"max_distance": -1, "workers": -1}), (MinEDOptions, {"max_distance": 0, "workers": 2}),
    (MixedOptions, {"lam": 0.0, "off_policy": "teacher"}), (MixedOptions, {"lam": 1.0}),
    (AdaptiveOptions, {"init_probability": 1.0, "probability_step": 0.0, "loss_eps": 0.0, "capacity": 1,
                       "schedule": "increasing", "signal": "kd"}),
]


@pytest.mark.parametrize("cls, values, message", BAD, ids=[f"{c.__name__}-{next(iter(v))}" for c, v, _ in BAD])
def test_a_bad_value_is_one_line_naming_option_range_and_value(cls, values, message):
    with pytest.raises(ValueError) as err:
        cls(**values)
    assert str(err.value) == message


@pytest.mark.parametrize("cls, values", GOOD, ids=[c.__name__ for c, _ in GOOD])
def test_good_values_pass(cls, values):
    opts = cls(**values)
    assert all(getattr(opts, k) == v for k, v in values.items())


def test_every_registered_default_is_valid():
    registry = kdcore.load_registry()
    for kind in ("loss", "aligner", "rollout"):
        for name in registry.names(kind):
            entry = registry.get(kind, name)
            if entry.options is not None:
                entry.make_options({})  # defaults pass their own checks


def test_check_range_rejects_non_numbers():
    with pytest.raises(ValueError, match="beta must be a number, got 'half'"):
        check_range("beta", "half", low=0.0, high=1.0)
    with pytest.raises(ValueError, match="top_k must be a number, got True"):
        check_range("top_k", True, low=0)
