"""The built-in losses against references written here from the formulas in DESIGN.md §4."""

from __future__ import annotations

import math

import pytest
import torch

import kdcore
from kdflow_algorithms import losses as L

NAMES = ["fkl", "rkl", "js", "skl", "srkl", "tvd", "akl"]
FNS = {name: getattr(L, name) for name in NAMES}


# ---------------------------------------------------------------------------------------------
# References: probabilities first, then the textbook formula, in float64, one line per loss.
# ---------------------------------------------------------------------------------------------

def _kl_ref(a, b):
    return (a * (a.log() - b.log())).sum(-1)


def _akl_ref(p, q, mu):
    out = []
    for i in range(p.shape[0]):
        pi, qi = p[i], q[i]
        order = sorted(range(p.shape[1]), key=lambda v: -float(pi[v]))
        head, mass = set(), 0.0
        for v in order:
            if mass < mu:
                head.add(v)
            mass += float(pi[v])
        gap = (pi - qi).abs().detach()
        g_head = sum(float(gap[v]) for v in head)
        g_tail = sum(float(gap[v]) for v in range(p.shape[1]) if v not in head)
        fwd, rev = _kl_ref(pi, qi), _kl_ref(qi, pi)
        out.append((g_head * fwd + g_tail * rev) / (g_head + g_tail))
    return torch.stack(out)


def reference(name, s, t, temperature=1.0, **opt):
    p = torch.softmax(t.double() / temperature, -1)
    q = torch.softmax(s.double() / temperature, -1)
    if name == "fkl":
        return _kl_ref(p, q)
    if name == "rkl":
        return _kl_ref(q, p)
    if name == "js":
        beta = opt.get("beta", 0.5)
        m = beta * p + (1 - beta) * q
        return beta * _kl_ref(p, m) + (1 - beta) * _kl_ref(q, m)
    if name == "skl":
        alpha = opt.get("alpha", 0.1)
        return _kl_ref(p, alpha * p + (1 - alpha) * q)
    if name == "srkl":
        alpha = opt.get("alpha", 0.1)
        return _kl_ref(q, alpha * q + (1 - alpha) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    if name == "akl":
        return _akl_ref(p, q, opt.get("mu", 0.5))
    raise AssertionError(name)


OPTIONS = {"fkl": {}, "rkl": {}, "tvd": {}, "js": {"beta": 0.3}, "skl": {"alpha": 0.2}, "srkl": {"alpha": 0.25},
           "akl": {"mu": 0.6}}


def _logits(n=6, v=13, scale=2.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * scale).to(dtype), (torch.randn(n, v, generator=g) * scale).to(dtype)


# ---------------------------------------------------------------------------------------------
# Values and gradients against the references
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("name", NAMES)
def test_value_and_grad_match_reference(name, temperature):
    s, t = _logits(seed=3)
    opt = OPTIONS[name]
    s32 = s.clone().requires_grad_(True)
    out = FNS[name](s32, t, temperature=temperature, **opt)
    assert out.shape == (6,) and out.dtype == torch.float32
    s64 = s.double().requires_grad_(True)
    ref = reference(name, s64, t.double(), temperature, **opt)
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-7)
    w = torch.linspace(0.5, 1.5, 6)  # a non-uniform upstream gradient
    (g,) = torch.autograd.grad((out * w).sum(), s32)
    (g_ref,) = torch.autograd.grad((ref * w.double()).sum(), s64)
    torch.testing.assert_close(g.double(), g_ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["fkl", "rkl", "js", "skl", "srkl", "tvd"])
def test_gradcheck_fp64_student_and_teacher(name):
    # akl is excluded by definition: its head/tail weights are detached, so its gradient is not
    # the numerical derivative of its value (test_value_and_grad_match_reference covers it).
    s, t = _logits(n=3, v=7, seed=1, dtype=torch.float64)
    s.requires_grad_(True)
    t.requires_grad_(True)  # teacher-side gradients too (projected teachers in DSKD)
    fn = FNS[name]
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, temperature=1.7, **OPTIONS[name]), (s, t))


def test_akl_gradient_treats_gaps_as_constants():
    s, t = _logits(n=4, v=9, seed=5, dtype=torch.float64)
    s.requires_grad_(True)
    out = L.akl(s, t, temperature=1.0, mu=0.5)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    w = reference("akl", s.detach(), t, mu=0.5)  # only to get the weights below
    fwd, rev = _kl_ref(p, q), _kl_ref(q, p)
    w_head = ((w - rev) / (fwd - rev)).detach()  # akl = w_head*fwd + (1-w_head)*rev
    (g,) = torch.autograd.grad(out.sum(), s)
    (g_ref,) = torch.autograd.grad((w_head * fwd + (1 - w_head) * rev).sum(), s)
    torch.testing.assert_close(g, g_ref, rtol=1e-6, atol=1e-9)


def test_akl_head_is_shortest_prefix_reaching_mu():
    # p = [0.5, 0.3, 0.2] (up to rounding): mu = 0.5 → head {0}; mu = 0.6 → head {0, 1}.
    t = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]], dtype=torch.float64)
    s = torch.tensor([[0.0, 0.0, 0.0]], dtype=torch.float64)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    gap = (p - q).abs()[0]
    fwd, rev = _kl_ref(p, q), _kl_ref(q, p)
    for mu, head in [(0.5, [0]), (0.6, [0, 1]), (1.0, [0, 1, 2])]:
        g_head = gap[head].sum()
        g_tail = gap.sum() - g_head
        expected = (g_head * fwd + g_tail * rev) / (g_head + g_tail)
        torch.testing.assert_close(L.akl(s, t, temperature=1.0, mu=mu), expected)


# ---------------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_nonnegative_and_zero_iff_equal(name):
    s, t = _logits(n=64, v=31, scale=3.0, seed=7)
    assert (FNS[name](s, t, temperature=1.0) > 0).all()
    same = t + 4.0  # shifted logits: the same distribution
    same.requires_grad_(True)
    zero = FNS[name](same, t, temperature=1.3)
    torch.testing.assert_close(zero, torch.zeros(64), atol=2e-6, rtol=0)
    (g,) = torch.autograd.grad(zero.sum(), same)
    if name != "tvd":  # |p - q| has no gradient at p = q (rounding noise picks a subgradient)
        assert g.abs().max() < 1e-5


def test_symmetries_and_bounds():
    s, t = _logits(n=32, v=17, scale=3.0, seed=11)
    torch.testing.assert_close(L.js(s, t, temperature=1.0, beta=0.5), L.js(t, s, temperature=1.0, beta=0.5))
    torch.testing.assert_close(L.tvd(s, t, temperature=1.0), L.tvd(t, s, temperature=1.0))
    # beta != 0.5 is genuinely asymmetric
    assert not torch.allclose(L.js(s, t, temperature=1.0, beta=0.2), L.js(t, s, temperature=1.0, beta=0.2))
    assert (L.js(s, t, temperature=1.0) <= math.log(2) + 1e-6).all()
    assert (L.tvd(s, t, temperature=1.0) <= 1.0 + 1e-6).all()


def test_skew_losses_tend_to_fkl_rkl_as_alpha_goes_to_zero():
    s, t = _logits(n=16, v=23, seed=13)
    fkl, rkl = L.fkl(s, t, temperature=1.0), L.rkl(s, t, temperature=1.0)
    # the gap shrinks like alpha·p/q, so it takes tiny alphas where the student's q is tiny
    alphas = (0.3, 0.1, 1e-2, 1e-4, 1e-6, 1e-8)
    gaps = [(L.skl(s, t, temperature=1.0, alpha=a) - fkl).abs().max().item() for a in alphas]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-4 * fkl.abs().max()
    torch.testing.assert_close(L.skl(s, t, temperature=1.0, alpha=0.0), fkl)
    torch.testing.assert_close(L.srkl(s, t, temperature=1.0, alpha=0.0), rkl)
    torch.testing.assert_close(L.srkl(s, t, temperature=1.0, alpha=1e-8), rkl, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_temperature_divides_both_sides(name):
    s, t = _logits(seed=17)
    torch.testing.assert_close(FNS[name](s, t, temperature=3.0), FNS[name](s / 3.0, t / 3.0, temperature=1.0))


# ---------------------------------------------------------------------------------------------
# Stability and dtypes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_huge_logits_are_finite(name):
    s, t = _logits(n=8, v=50, scale=1.0, seed=19)
    # logits within ±1e4 (a few exactly ±1e4): softmax is one-hot, logs reach -2e4
    s = (s * 5e3).clamp(-1e4, 1e4).requires_grad_(True)
    t = (t * 5e3).clamp(-1e4, 1e4)
    out = FNS[name](s, t, temperature=1.0)
    (g,) = torch.autograd.grad(out.sum(), s)
    assert torch.isfinite(out).all() and torch.isfinite(g).all() and (out >= 0).all()
    # float64 evaluation of the same inputs agrees (values are O(1e4) for KL-type losses)
    torch.testing.assert_close(out.double(), FNS[name](s.detach().double(), t.double(), temperature=1.0),
                               rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_masked_vocab_entries_are_removed_for_both_sides(name):
    s, t = _logits(n=5, v=12, seed=23)
    keep = torch.ones(12, dtype=torch.bool)
    keep[[2, 7, 11]] = False
    opt = OPTIONS[name]
    # the teacher masks three entries; the student does not (and masks one of them itself in row 1)
    t_masked = t.masked_fill(~keep, -math.inf)
    s_in = s.clone()
    s_in[1, 7] = -math.inf
    s_in.requires_grad_(True)
    out = FNS[name](s_in, t_masked, temperature=1.5, **opt)
    (g,) = torch.autograd.grad(out.sum(), s_in)
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    expected = reference(name, s[:, keep], t[:, keep], 1.5, **opt)
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-7)
    assert (g[:, ~keep] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_row_gives_zero(name):
    s, t = _logits(n=3, v=6, seed=29)
    t[1] = -math.inf
    s[2, :3] = -math.inf
    t[2, 3:] = -math.inf  # the union masks all of row 2
    s.requires_grad_(True)
    out = FNS[name](s, t, temperature=1.0)
    (g,) = torch.autograd.grad(out.sum(), s)
    assert out[1] == 0 and out[2] == 0 and out[0] > 0
    assert torch.isfinite(g).all() and (g[1:] == 0).all()


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_compute_in_fp32(name):
    s, t = _logits(n=4, v=40, seed=31)
    s16, t16 = s.bfloat16().requires_grad_(True), t.bfloat16()
    out = FNS[name](s16, t16, temperature=1.0)
    assert out.dtype == torch.float32
    # identical to the fp32 computation on the bf16-rounded logits: nothing is computed in bf16
    assert torch.equal(out, FNS[name](s16.detach().float(), t16.float(), temperature=1.0))
    (g,) = torch.autograd.grad(out.sum(), s16)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


def test_fp64_stays_fp64():
    s, t = _logits(dtype=torch.float64)
    assert L.fkl(s, t, temperature=1.0).dtype == torch.float64


def test_bad_inputs_are_clear_errors():
    s, t = _logits()
    with pytest.raises(ValueError, match="js: beta must be in"):
        L.js(s, t, temperature=1.0, beta=1.0)
    with pytest.raises(ValueError, match="skl: alpha"):
        L.skl(s, t, temperature=1.0, alpha=1.0)
    with pytest.raises(ValueError, match="akl: mu"):
        L.akl(s, t, temperature=1.0, mu=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        L.fkl(s, t, temperature=0.0)
    with pytest.raises(ValueError, match=r"fkl: student_logits \(6, 13\) and teacher_logits \(6, 12\)"):
        L.fkl(s, t[:, :12], temperature=1.0)


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

def test_registered_with_options_and_docstrings():
    registry = kdcore.load_registry()
    defaults = {"fkl": {}, "rkl": {}, "tvd": {}, "js": {"beta": 0.5}, "skl": {"alpha": 0.1},
                "srkl": {"alpha": 0.1}, "akl": {"mu": 0.5}}
    for name in NAMES:
        entry = registry.get("loss", name)
        assert entry.fn is FNS[name] and entry.plugin == "kdflow"
        assert entry.option_fields() == defaults[name]
        assert entry.summary == FNS[name].__doc__.strip().splitlines()[0]
        assert "[n, V]" in FNS[name].__doc__ and "[n]" in FNS[name].__doc__
    # options from a recipe reach the function as keyword arguments
    js = registry.get("loss", "js")
    s, t = _logits()
    opts = vars(js.make_options({"beta": 0.3}))
    torch.testing.assert_close(js.fn(s, t, temperature=1.0, **opts).double(), reference("js", s, t, beta=0.3))
