"""Example kdflow plugin: the alpha-beta divergence loss of AB-KD.

Wang et al. 2025, "ABKD: Pursuing a Proper Allocation of the Probability Mass in Knowledge
Distillation via alpha-beta-Divergence". Forward KL and reverse KL are the limits
(alpha, beta) -> (1, 0) and (0, 1); alpha trades mass-covering against mode-seeking and beta
how strongly low-probability tokens are weighted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kdcore import hookimpl


@dataclass
class ABOptions:
    alpha: float = 0.5  # alpha = beta = 0.5 is 2x the squared Hellinger distance: bounded, symmetric
    beta: float = 0.5

    def __post_init__(self):
        # D_AB divides by alpha, beta and alpha + beta; their zero limits are fkl / rkl
        for option, value in (("alpha", self.alpha), ("beta", self.beta)):
            if not math.isfinite(value) or value == 0:
                raise ValueError(f"{option} must be finite and non-zero (use fkl/rkl for the limits), got {value}")
        if self.alpha + self.beta == 0:
            raise ValueError(f"alpha + beta must be non-zero, got alpha={self.alpha}, beta={self.beta}")

def ab_div(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature: float,
           alpha: float = 0.5, beta: float = 0.5) -> torch.Tensor:
    """Alpha-beta divergence D_AB(p||q) per token (AB-KD, Wang et al. 2025).

    student_logits, teacher_logits: Tensor[n, V]; p = softmax(teacher/T), q = softmax(student/T).
    D = -1/(alpha*beta) * sum_v [ p^a q^b - a/(a+b) p^(a+b) - b/(a+b) q^(a+b) ]  -> Tensor[n], fp32.
    Powers are taken as exp(a*log p + b*log q), so -inf logits (masked rows) contribute 0.
    """
    # fp32 at least (bf16 inputs), fp64 kept for gradchecks and limit tests: the bracket is a
    # difference of O(1) terms divided by alpha*beta, so small alpha*beta needs the precision
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    log_p = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    log_q = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    s = alpha + beta
    cross = torch.exp(alpha * log_p + beta * log_q)
    self_p = torch.exp(s * log_p)
    self_q = torch.exp(s * log_q)
    terms = cross - (alpha / s) * self_p - (beta / s) * self_q
    return -terms.sum(dim=-1) / (alpha * beta)


@hookimpl
def register_losses(register):
    register("ab_div", ab_div, options=ABOptions)
