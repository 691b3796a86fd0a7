"""Built-in per-token divergences between the teacher and the student distribution.

Every loss follows the loss contract of ``kdcore.plugin_system.hookspecs.register_losses``::

    fn(student_logits: Tensor[n, V], teacher_logits: Tensor[n, V], *, temperature, **options) -> Tensor[n]

with ``p = softmax(teacher_logits / T)`` (teacher), ``q = softmax(student_logits / T)``
(student), no ``T**2`` factor, computed in float32 whatever the input dtype (float64 inputs
stay float64, so the losses can be gradchecked). Sums ``Σ`` run over the vocabulary axis.

Masked vocabulary entries: a ``-inf`` logit on *either* side removes that entry from the
comparison for both sides, i.e. ``p`` and ``q`` are renormalised over the entries both sides
keep, and every term of a removed entry is exactly 0 (never ``0·(-inf) = NaN``). This keeps
every result finite and every loss a divergence (``≥ 0``, ``0`` iff ``p = q`` on the
kept entries); it equals the plain formula whenever both sides mask the same entries (padded
or restricted vocabularies), and otherwise it avoids the infinities that e.g. RKL has when the
teacher masks a token the student still predicts. A row whose every entry is masked gives 0.
Gradients with respect to removed entries are 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from kdcore import hookimpl
from kdflow_algorithms.checks import check_range

__all__ = ["fkl", "rkl", "js", "skl", "srkl", "tvd", "akl",
           "JSOptions", "SKLOptions", "SRKLOptions", "AKLOptions"]


@dataclass
class JSOptions:
    beta: float = 0.5  # 0.5: the symmetric Jensen-Shannon divergence (TRL's GKD default)

    def __post_init__(self):
        check_range("beta", self.beta, low=0.0, high=1.0, low_open=True, high_open=True)


@dataclass
class SKLOptions:
    alpha: float = 0.1  # DistiLLM's skew; small alpha keeps SKL close to FKL but bounded

    def __post_init__(self):
        check_range("alpha", self.alpha, low=0.0, high=1.0, high_open=True)  # alpha = 0 is FKL


@dataclass
class SRKLOptions:
    alpha: float = 0.1  # DistiLLM's skew for the reverse direction

    def __post_init__(self):
        check_range("alpha", self.alpha, low=0.0, high=1.0, high_open=True)  # alpha = 0 is RKL


@dataclass
class AKLOptions:
    mu: float = 0.5  # head/tail split at half the teacher mass, as in the AKL paper (Wu et al. 2024)

    def __post_init__(self):
        check_range("mu", self.mu, low=0.0, high=1.0, low_open=True)  # mu = 1: every token is head


class _LogProbs:
    """``log p``, ``log q`` (and lazily ``p``, ``q``) of one chunk, safe to multiply.

    ``logp``/``logq`` hold 0 (not ``-inf``) at removed entries and ``p``/``q`` hold exactly 0
    there, so products like ``p * (logp - logq)`` vanish instead of turning into NaN, in the
    forward pass and in the backward pass. ``p``/``q`` are built on first use: at ``V`` = 150k
    every ``[n, V]`` buffer a loss does not need is memory the chunked driver must budget for.
    """

    __slots__ = ("logp", "logq", "_p", "_q")

    def __init__(self, student_logits: Tensor, teacher_logits: Tensor, temperature: float, name: str,
                 prepared: "tuple[Tensor, Tensor, bool] | None" = None):
        s, t, masked = prepared if prepared is not None else _prepare(student_logits, teacher_logits, temperature, name)
        removed = None
        if masked:
            removed = torch.isneginf(s) | torch.isneginf(t)
            s = s.masked_fill(removed, -math.inf)
            t = t.masked_fill(removed, -math.inf)
            empty = removed.all(dim=-1, keepdim=True)
            if bool(empty.any()):
                # A fully masked row becomes uniform on both sides: divergence 0, gradient 0.
                s = s.masked_fill(empty, 0.0)
                t = t.masked_fill(empty, 0.0)
        self.logq = torch.log_softmax(s, dim=-1)
        del s
        self.logp = torch.log_softmax(t, dim=-1)
        del t
        self._p = self._q = None
        if removed is not None:
            # p = q = 0 exactly at removed entries (fully masked rows were made uniform above).
            self._q = self.logq.exp().masked_fill(removed, 0.0)
            self._p = self.logp.exp().masked_fill(removed, 0.0)
            self.logq = self.logq.masked_fill(removed, 0.0)
            self.logp = self.logp.masked_fill(removed, 0.0)

    @property
    def p(self) -> Tensor:
        if self._p is None:
            self._p = self.logp.exp()
        return self._p

    @property
    def q(self) -> Tensor:
        if self._q is None:
            self._q = self.logq.exp()
        return self._q


def _prepare(student_logits: Tensor, teacher_logits: Tensor, temperature: float, name: str):
    """``(s, t, masked)``: both logits in fp32 at least (fp64 stays fp64), divided by the
    temperature, and whether any entry is ``-inf`` on either side."""
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"{name}: student_logits {tuple(student_logits.shape)} and teacher_logits "
            f"{tuple(teacher_logits.shape)} must both be [n, V]"
        )
    if not temperature > 0:
        raise ValueError(f"{name}: temperature must be > 0, got {temperature}")
    # fp32 at least: bf16/fp16 softmax over 150k entries loses the tail; fp64 stays fp64.
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    if temperature != 1.0:
        s = s / temperature
        t = t / temperature
    # Two reductions and one host sync decide whether any entry is masked, so the common
    # unmasked case builds no [n, V] mask and skips every masking op.
    masked = bool(s.numel()) and bool(torch.isneginf(torch.stack([s.detach().amin(), t.detach().amin()])).any())
    return s, t, masked


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_v a·b`` per row, as a contraction: no ``[n, V]`` product is allocated."""
    return torch.einsum("nv,nv->n", a, b)


class _ClosedFormJS(torch.autograd.Function):
    """Generalised JS with its gradient written out, computed in the forward pass.

    With ``d_q = log q − log m`` and ``d_p = log p − log m``: ``∂js/∂s = (1−β)·q·(d_q − Σ q·d_q)``
    and ``∂js/∂t = β·p·(d_p − Σ p·d_p)`` per row (the ``m``-terms of the mixture cancel).
    Autograd through the log-space formula takes about twice the passes over ``[n, V]``
    (measured: 87 vs 39 ms for a 256 × 49152 chunk on 2 threads; the whole chunked loss step
    at N = 508: about 540 vs 490 ms). For ``fkl`` the same treatment saves memory, not time
    (:class:`_ClosedFormFKL`).
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, beta: float) -> Tensor:
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # Ordered so that at most four [n, V] buffers live beside the inputs (autograd keeps
        # none): the mixture is built in place, each side's gradient overwrites its own log
        # probabilities, and the row sums Σ q·d_q are contractions, not products then sums.
        d_q = torch.log_softmax(s, dim=-1)
        d_p = torch.log_softmax(t, dim=-1)
        log_m = d_p + math.log(beta)
        torch.logaddexp(log_m, d_q + math.log1p(-beta), out=log_m)
        q = d_q.exp()
        d_q.sub_(log_m)
        kl_q = _row_dot(q, d_q)
        g_s = d_q.sub_(kl_q.unsqueeze(-1)).mul_(q).mul_(1.0 - beta) if need_s else None
        del q, d_q
        p = d_p.exp()
        d_p.sub_(log_m)
        del log_m
        kl_p = _row_dot(p, d_p)
        g_t = d_p.sub_(kl_p.unsqueeze(-1)).mul_(p).mul_(beta) if need_t else None
        del p, d_p
        ctx.save_for_backward(g_s, g_t)
        return beta * kl_p + (1.0 - beta) * kl_q

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        g_s, g_t = ctx.saved_tensors
        scale = grad_out.unsqueeze(-1)
        return (None if g_s is None else g_s * scale, None if g_t is None else g_t * scale, None)


class _ClosedFormFKL(torch.autograd.Function):
    """Forward KL with its gradient written out, computed in the forward pass.

    With ``d = log p − log q``: ``∂fkl/∂s = q − p`` and ``∂fkl/∂t = p·(d − Σ p·d)`` per row.
    Written out for memory: the forward holds three ``[n, V]`` buffers beside the inputs and
    keeps one gradient per side, where autograd through the log-space formula keeps ``log q``,
    ``p`` and the product and allocates their gradients in backward. Measured in
    ``bench/README.md`` (memory breakdown).
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor) -> Tensor:
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        logq = torch.log_softmax(s, dim=-1)
        d = torch.log_softmax(t, dim=-1)
        p = d.exp()
        d.sub_(logq)
        if not need_s:
            del logq
        kl = _row_dot(p, d)
        g_t = d.sub_(kl.unsqueeze(-1)).mul_(p) if need_t else None
        del d
        g_s = logq.exp_().sub_(p) if need_s else None
        ctx.save_for_backward(g_s, g_t)
        return kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        g_s, g_t = ctx.saved_tensors
        scale = grad_out.unsqueeze(-1)
        return None if g_s is None else g_s * scale, None if g_t is None else g_t * scale


def _kl(a: Tensor, log_a: Tensor, log_b: Tensor) -> Tensor:
    """Σ a·(log a − log b) per row; ``a`` is 0 wherever the safe logs were zeroed."""
    diff = log_a - log_b
    if a.requires_grad:
        return (a * diff).sum(dim=-1)
    # a is a constant (the teacher side): multiply in place, autograd then saves only a.
    return diff.mul_(a).sum(dim=-1)


def _check_open_unit(name: str, option: str, value: float, *, closed_low: bool = False) -> None:
    ok = (0.0 <= value < 1.0) if closed_low else (0.0 < value < 1.0)
    if not ok:
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise ValueError(f"{name}: {option} must be in {interval}, got {value}")


def fkl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Forward KL KL(p‖q): mean-seeking, the classic KD loss (Hinton et al. 2015).

    ``fkl[i] = Σ_v p[i,v]·(log p[i,v] − log q[i,v])`` for logits ``[n, V]``; returns ``[n]``.
    """
    prepared = _prepare(student_logits, teacher_logits, temperature, "fkl")
    s, t, masked = prepared
    if not masked and s.numel():  # the closed form covers the common case; masks take the general path
        return _ClosedFormFKL.apply(s, t)
    lp = _LogProbs(student_logits, teacher_logits, temperature, "fkl", prepared)
    return _kl(lp.p, lp.logp, lp.logq)


def rkl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Reverse KL KL(q‖p): mode-seeking (MiniLLM, GKD).

    ``rkl[i] = Σ_v q[i,v]·(log q[i,v] − log p[i,v])`` for logits ``[n, V]``; returns ``[n]``.
    """
    lp = _LogProbs(student_logits, teacher_logits, temperature, "rkl")
    return _kl(lp.q, lp.logq, lp.logp)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """log(w·a + (1−w)·b) in log space (logsumexp of two terms), stable for tiny masses."""
    log_w = math.log(w) if w > 0 else -math.inf
    return torch.logaddexp(log_a + log_w, log_b + math.log1p(-w))


def js(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, beta: float = 0.5) -> Tensor:
    """Generalised Jensen-Shannon divergence with weight beta (GKD).

    ``m = β·p + (1−β)·q`` (computed as ``logsumexp`` of ``log β + log p`` and
    ``log(1−β) + log q``);
    ``js[i] = β·Σ_v p[i,v]·(log p − log m)[i,v] + (1−β)·Σ_v q[i,v]·(log q − log m)[i,v]``
    for logits ``[n, V]``, ``0 < β < 1``; returns ``[n]``. Symmetric in p and q at β = 0.5.
    """
    _check_open_unit("js", "beta", beta)
    prepared = _prepare(student_logits, teacher_logits, temperature, "js")
    s, t, masked = prepared
    if not masked and s.numel():  # the closed form covers the common case; masks take the general path
        return _ClosedFormJS.apply(s, t, beta)
    lp = _LogProbs(student_logits, teacher_logits, temperature, "js", prepared)
    log_m = _log_mix(lp.logp, lp.logq, beta)
    return beta * _kl(lp.p, lp.logp, log_m) + (1.0 - beta) * _kl(lp.q, lp.logq, log_m)


def skl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1) -> Tensor:
    """Skew forward KL KL(p ‖ α·p + (1−α)·q) (DistiLLM).

    ``m = α·p + (1−α)·q`` (in log space via ``logsumexp``);
    ``skl[i] = Σ_v p[i,v]·(log p − log m)[i,v]`` for logits ``[n, V]``, ``0 ≤ α < 1``
    (α = 0 is FKL); returns ``[n]``.
    """
    _check_open_unit("skl", "alpha", alpha, closed_low=True)
    lp = _LogProbs(student_logits, teacher_logits, temperature, "skl")
    return _kl(lp.p, lp.logp, _log_mix(lp.logp, lp.logq, alpha))


def srkl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL KL(q ‖ α·q + (1−α)·p) (DistiLLM).

    ``m = α·q + (1−α)·p`` (in log space via ``logsumexp``);
    ``srkl[i] = Σ_v q[i,v]·(log q − log m)[i,v]`` for logits ``[n, V]``, ``0 ≤ α < 1``
    (α = 0 is RKL); returns ``[n]``.
    """
    _check_open_unit("srkl", "alpha", alpha, closed_low=True)
    lp = _LogProbs(student_logits, teacher_logits, temperature, "srkl")
    return _kl(lp.q, lp.logq, _log_mix(lp.logq, lp.logp, alpha))


def tvd(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Total variation distance ½·Σ|p − q| (bounded in [0, 1]).

    ``tvd[i] = ½·Σ_v |p[i,v] − q[i,v]|`` for logits ``[n, V]``; returns ``[n]``.
    """
    lp = _LogProbs(student_logits, teacher_logits, temperature, "tvd")
    return 0.5 * (lp.p - lp.q).abs().sum(dim=-1)


def akl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0, mu: float = 0.5) -> Tensor:
    """Adaptive KL: FKL and RKL weighted by the gaps on the teacher's head and tail (Wu et al. 2024).

    For logits ``[n, V]``: sort ``p[i]`` descending; the head is the shortest prefix whose mass
    reaches ``mu`` (entry ``v`` is in the head iff the mass sorted before it is ``< mu``), the
    tail is the rest. ``g_head[i] = Σ_head |p − q|``, ``g_tail[i] = Σ_tail |p − q|`` (both
    detached, ``[n]``);
    ``akl[i] = (g_head·FKL + g_tail·RKL) / (g_head + g_tail)`` with FKL/RKL as in ``fkl``/``rkl``;
    rows where ``p = q`` exactly (both gaps 0) weigh FKL and RKL equally (both are 0 there).
    ``0 < mu ≤ 1``; returns ``[n]``.
    """
    if not 0.0 < mu <= 1.0:
        raise ValueError(f"akl: mu must be in (0, 1], got {mu}")
    lp = _LogProbs(student_logits, teacher_logits, temperature, "akl")
    forward = _kl(lp.p, lp.logp, lp.logq)
    reverse = _kl(lp.q, lp.logq, lp.logp)
    with torch.no_grad():
        p = lp.p.detach()
        p_sorted, order = p.sort(dim=-1, descending=True)
        mass_before = p_sorted.cumsum(dim=-1) - p_sorted
        head = torch.empty_like(p, dtype=torch.bool).scatter_(-1, order, mass_before < mu)
        gap = (p - lp.q.detach()).abs()
        g_head = gap.masked_fill(~head, 0.0).sum(dim=-1)
        g_tail = gap.masked_fill(head, 0.0).sum(dim=-1)
        total = g_head + g_tail
        w_head = torch.where(total > 0, g_head / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
        w_tail = torch.where(total > 0, g_tail / total.clamp_min(torch.finfo(total.dtype).tiny), 0.5)
    return w_head * forward + w_tail * reverse


@hookimpl
def register_losses(register):
    register("fkl", fkl, options=None)
    register("rkl", rkl, options=None)
    register("js", js, options=JSOptions)
    register("skl", skl, options=SKLOptions)
    register("srkl", srkl, options=SRKLOptions)
    register("tvd", tvd, options=None)
    register("akl", akl, options=AKLOptions)
