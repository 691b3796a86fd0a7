import math

import pytest
import torch

from kdflow_plugin_example import ABOptions, ab_div


def reference(student, teacher, T, a, b):
    """Straight from the formula, in float64, one token at a time."""
    out = []
    for s_row, t_row in zip(student.double(), teacher.double()):
        p = torch.softmax(t_row / T, -1)
        q = torch.softmax(s_row / T, -1)
        total = sum(pv ** a * qv ** b - a / (a + b) * pv ** (a + b) - b / (a + b) * qv ** (a + b)
                    for pv, qv in zip(p.tolist(), q.tolist()))
        out.append(-total / (a * b))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (0.2, 0.7), (1.5, -0.3)])
def test_matches_formula(a, b):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 11, generator=g), torch.randn(5, 11, generator=g)
    got = ab_div(s, t, temperature=1.3, alpha=a, beta=b)
    assert got.dtype == torch.float32 and got.shape == (5,)
    assert ab_div(s.bfloat16(), t.bfloat16(), temperature=1.0).dtype == torch.float32
    torch.testing.assert_close(got.double(), reference(s, t, 1.3, a, b), rtol=1e-4, atol=1e-6)


def test_zero_iff_equal_and_nonnegative():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(4, 9, generator=g)
    assert ab_div(t.clone(), t, temperature=1.0).abs().max() < 1e-6
    assert (ab_div(torch.randn(4, 9, generator=g), t, temperature=1.0) > 0).all()


def test_approaches_forward_kl():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 7, generator=g), torch.randn(3, 7, generator=g)
    p, log_p, log_q = torch.softmax(t, -1), torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    fkl = (p * (log_p - log_q)).sum(-1)
    near = ab_div(s.double(), t.double(), temperature=1.0, alpha=1.0, beta=1e-6)
    torch.testing.assert_close(near, fkl.double(), rtol=1e-4, atol=1e-5)


def test_masked_rows_and_gradients():
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 6, generator=g).requires_grad_()
    t = torch.randn(2, 6, generator=g)
    t[:, -1] = -math.inf
    out = ab_div(s, t, temperature=2.0)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="alpha"):
        ABOptions(alpha=0.0)


@pytest.mark.parametrize("values, message", [
    ({"beta": 0.0}, "beta must be finite and non-zero (use fkl/rkl for the limits), got 0.0"),
    ({"alpha": math.inf}, "alpha must be finite and non-zero (use fkl/rkl for the limits), got inf"),
    ({"alpha": 0.5, "beta": -0.5}, "alpha + beta must be non-zero, got alpha=0.5, beta=-0.5"),
])
def test_each_bad_option_is_one_line_naming_it(values, message):
    with pytest.raises(ValueError) as err:
        ABOptions(**values)
    assert str(err.value) == message


def test_good_options_pass():
    for values in ({}, {"alpha": 0.2, "beta": 0.9}, {"alpha": -0.3, "beta": 1.5}):
        ABOptions(**values)
