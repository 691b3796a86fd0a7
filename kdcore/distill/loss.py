"""The chunked KD loss driver: hidden states → logits per chunk → registered loss, no [N, V] buffer.

:func:`chunked_distill` is the one driver. It takes the student's last hidden states
``h_s [N, H_s]`` (with grad) and head ``W_s [V_s, H_s]``, the teacher's last hidden states
``h_t [N_t, H_t]`` and head ``W_t [V_t, H_t]``, which teacher row each KD row learns from, and
returns ``kd_scale · Σ_kd-rows loss_fn(...) + ce_scale · Σ_ce-rows CE`` together with the detached
sums and token counts (:class:`LossOutput`). It works on ``chunk_size`` rows at a time: per
chunk ``logits_s = h_s·W_sᵀ`` and ``logits_t = h_t·W_tᵀ`` are built, optionally turned into the
space the loss compares by per-chunk views (a shared-vocabulary gather, a vocabulary map: the
callers' business, this module holds no algorithm), the per-token divergence (any registered
loss) and the cross-entropy against ``labels`` are computed from the *same* chunk logits, and
the chunk logits are freed. Peak extra memory is a few ``[chunk_size, V]`` buffers plus one
``[V, H_s]`` gradient, instead of several ``[N, V]``. :func:`distill_loss` is its same-vocabulary
form (row ``i`` pairs with row ``i``, both heads of one size), used by same-vocabulary runs and
by aligners whose sides are both linear heads over one vocabulary.

Backward strategy (measured by ``bench/loss_memory.py``):
gradients are computed *in the forward pass* (``strategy="fused"``, as Liger-Kernel's fused
linear losses do): per chunk, autograd of the KD loss with respect to the chunk logits, plus CE's
gradient written out (:func:`_cross_entropy`), gives
``G [c, V]``, then ``∂h_s = G·W_s`` and ``∂W_s += Gᵀ·h_s`` (and the same for the teacher side
when its inputs require grad, e.g. DSKD projections). The backward pass only scales the stored
gradients by the incoming scalar. This costs exactly the four ``N×V×H`` matmuls of the dense
computation, whereas recomputing the chunk logits in backward (``strategy="recompute"``) costs
six (both logits matmuls twice) and runs the loss twice — measured 1.54-1.57x the CPU time of
fused at V = 152064, H = 1024, N = 1024 — for the same peak memory (1063 / 1509 MiB at 128 / 256
rows for both): the only thing fused keeps alive between forward and backward is ``∂W_s``
(head-sized), which the dense backward allocates as well. Without grad mode (evaluation) or
without inputs that require grad, no gradient work is done at all.

Exact token mean under gradient accumulation and data parallelism. The objective of one
optimizer step is, over every micro-batch ``m`` on every rank ``r``::

    L = kd_ratio · Σ_{r,m} KD_sum[r,m] / N_kd + (1 − kd_ratio) · Σ_{r,m} CE_sum[r,m] / N_ce

where ``N_kd``/``N_ce`` are the KD/CE token counts of the whole global batch. The trainer counts
the tokens of all its micro-batches first (the masks are known from the data before any
forward), all-reduces the two counts (SUM), and passes ``kd_scale = kd_ratio / N_kd`` and
``ce_scale = (1 − kd_ratio) / N_ce`` (0 when a count is 0) to every call. Each call's ``loss``
is then that micro-batch's exact share of ``L``, so summing gradients over micro-batches
(plain accumulation, no division by their number) and over ranks gives ``∇L`` exactly — no
matter how tokens are spread over micro-batches and ranks, unlike averaging per-micro-batch
means, which over-weights short sequences. Data-parallel wrappers *average* gradients over
the world size ``W`` (FSDP2's reduce-scatter, DDP's all-reduce), so the trainer multiplies both
scales by ``W`` (or sets FSDP2's gradient divide factor to 1). The logged token mean is
``Σ kd_sum / N_kd`` over the same reductions.

Dtypes: logits are computed in the inputs' dtype (for bf16 heads, bf16 matmuls with fp32
accumulation, which is what the model's own ``lm_head`` computes and 2.3× faster than fp32 on
these CPUs), and the loss and CE are computed in fp32 from them (the loss contract). The head
gradient is accumulated over chunks in fp32 and cast back once, so chunking adds no rounding
that the dense computation does not have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["LossOutput", "ChunkView", "chunked_distill", "distill_loss", "DEFAULT_CHUNK_SIZE", "IGNORE_INDEX"]

# Rows per chunk, measured with bench/loss_memory.py (V = 152064, H = 1024, fp32, fkl, 2 CPU threads).
# Peak extra memory is the [V, H] head gradient plus ~6 [chunk, V] fp32 buffers (the loss's autograd
# graph and its gradient): at N = 4096, 256 rows peak at 1521 MiB of live tensors = 0.107 of dense
# (14273 MiB), 512 rows at 0.169, so 256 is the largest power of two within the 1/8 target. CPU time
# per step matches dense (1.00x at N = 1024 and 4096); 128 rows cost ~15% more (smaller matmuls).
# With MALLOC_MMAP_MAX_=0 (kdflow's default allocator settings) the heap's high-water mark is ~2x
# the live peak (fragmentation): ~3.2 GiB at 256 rows, while dense at N = 4096 no longer fits in
# 24 GiB. On a GPU larger chunks are affordable: pass chunk_size (distill.chunk_size in a recipe).
# Measured before CE's gradient was written out and fkl made closed-form (2026-12-07), which hold
# fewer buffers: fkl + CE at V = 49152, N = 512, 256 rows, tuned heap 689 -> 402 MiB (bench/README.md).
DEFAULT_CHUNK_SIZE = 256

IGNORE_INDEX = -100  # label value excluded from CE (the transformers / PyTorch convention)


@dataclass
class LossOutput:
    """What :func:`distill_loss` (and every aligner's ``forward``) returns for one micro-batch."""

    loss: Tensor  # differentiable scalar = kd_scale * kd_sum + ce_scale * ce_sum
    kd_sum: Tensor  # detached sum of per-token KD over KD rows
    ce_sum: Tensor  # detached sum of CE over rows with label != -100
    kd_tokens: int
    ce_tokens: int


ChunkView = Callable[[Tensor], Tensor]
"""A per-chunk transform of one side's logits ``[k, V]`` (the chunk's KD rows) into what the loss
compares, e.g. a column gather onto a shared vocabulary or a teacher distribution moved into the
student's vocabulary. It runs under autograd when that side's inputs require grad."""


class _Plan:
    """Non-tensor settings and the per-row data of one call, shared by forward and backward."""

    def __init__(self, loss_fn, options, temperature, kd_scale, ce_scale, chunk_size, labels, kd_mask, strategy,
                 teacher_rows=None, student_view=None, teacher_view=None):
        self.loss_fn = loss_fn
        self.options = options
        self.temperature = temperature
        self.kd_scale = kd_scale
        self.ce_scale = ce_scale
        self.chunk_size = chunk_size
        self.labels = labels  # [n] or None
        self.kd_mask = kd_mask  # [n] bool or None (every row is a KD row)
        self.strategy = strategy
        self.teacher_rows = teacher_rows  # [n] teacher row of each student row, or None (row i pairs with row i)
        self.student_view = student_view
        self.teacher_view = teacher_view
        self.kd_sum: Tensor | None = None
        self.ce_sum: Tensor | None = None

    def _chunk_rows(self, start: int, stop: int) -> tuple[Tensor | None, Tensor | None]:
        """(local KD rows of the chunk, ``None`` = all of them; their teacher rows, ``None`` when
        rows are paired by position)."""
        kd_rows = None
        if self.kd_mask is not None:
            local = self.kd_mask[start:stop]
            kd_rows = local.nonzero().squeeze(1) if not bool(local.all()) else None
        if self.teacher_rows is None:
            return kd_rows, None
        rows = self.teacher_rows[start:stop]
        return kd_rows, rows if kd_rows is None else rows.index_select(0, kd_rows)

    def run(self, h_s: Tensor, w_s: Tensor, h_t: Tensor, w_t: Tensor, need: tuple[bool, bool, bool, bool]):
        """One pass over the chunks: (kd_sum, ce_sum) and the gradients of the scaled objective
        w.r.t. the inputs flagged in ``need`` (``None`` for the others)."""
        n = h_s.shape[0]
        acc = torch.promote_types(h_s.dtype, torch.float32)
        kd_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        ce_sum = torch.zeros((), dtype=torch.float64, device=h_s.device)
        need_ls = need[0] or need[1]
        need_lt = need[2] or need[3]
        g_hs = torch.zeros_like(h_s) if need[0] else None
        # Head gradients accumulate in fp32 over chunks (one rounding at the end, as dense).
        g_ws = torch.zeros(w_s.shape, dtype=torch.promote_types(w_s.dtype, torch.float32), device=w_s.device) if need[1] else None
        g_ht = torch.zeros_like(h_t) if need[2] else None
        g_wt = torch.zeros(w_t.shape, dtype=torch.promote_types(w_t.dtype, torch.float32), device=w_t.device) if need[3] else None
        for start in range(0, n, self.chunk_size):
            stop = min(n, start + self.chunk_size)
            hs = h_s[start:stop]
            kd_rows, t_rows = self._chunk_rows(start, stop)
            if t_rows is not None:
                ht = h_t.index_select(0, t_rows)
            else:
                ht = h_t[start:stop] if kd_rows is None else h_t[start:stop].index_select(0, kd_rows)
            labels = self.labels[start:stop] if self.labels is not None else None
            kd_chunk, ce_chunk, g_ls, g_lt = self._chunk(hs, w_s, ht, w_t, kd_rows, labels, need_ls, need_lt)
            kd_sum += kd_chunk
            ce_sum += ce_chunk
            if g_ls is not None:
                if g_hs is not None:
                    g_hs[start:stop] = g_ls @ w_s
                if g_ws is not None:
                    _add_outer(g_ws, g_ls, hs)
            if g_lt is not None:
                if g_ht is not None:
                    g_rows = g_lt @ w_t
                    if t_rows is not None:  # a teacher row may teach several student rows
                        g_ht.index_add_(0, t_rows, g_rows)
                    elif kd_rows is None:
                        g_ht[start:stop] = g_rows
                    else:
                        g_ht[start:stop].index_copy_(0, kd_rows, g_rows)
                if g_wt is not None:
                    _add_outer(g_wt, g_lt, ht)
            del g_ls, g_lt  # before the next chunk's logits exist
        if g_ws is not None and g_ws.dtype != w_s.dtype:
            g_ws = g_ws.to(w_s.dtype)
        if g_wt is not None and g_wt.dtype != w_t.dtype:
            g_wt = g_wt.to(w_t.dtype)
        return kd_sum.to(acc), ce_sum.to(acc), (g_hs, g_ws, g_ht, g_wt)

    def _chunk(self, hs, w_s, ht, w_t, kd_rows, labels, need_ls: bool, need_lt: bool):
        """Loss sums of one chunk and the gradients of the scaled objective w.r.t. its logits.

        A separate frame on purpose: every reference into the chunk's graph (which ends in the
        leaf logits) dies on return, so no ``[chunk, V]`` buffer outlives its chunk.
        """
        acc = torch.promote_types(hs.dtype, torch.float32)
        n_kd = hs.shape[0] if kd_rows is None else kd_rows.numel()
        with torch.no_grad():
            ls = hs @ w_s.T
            lt = ht @ w_t.T if n_kd else None
        if need_ls:
            ls.requires_grad_(True)
        if need_lt and lt is not None:
            lt.requires_grad_(True)
        kd_grad, ce_grad = self.kd_scale != 0.0, self.ce_scale != 0.0
        kd_value = ce_value = torch.zeros((), dtype=torch.float64, device=hs.device)
        objective = None
        with torch.enable_grad() if (need_ls or need_lt) else torch.no_grad():
            if n_kd:
                ls_kd = ls if kd_rows is None else ls.index_select(0, kd_rows)
                lt_kd = lt
                if not kd_grad:  # KD is only a metric here: no graph through the loss
                    ls_kd, lt_kd = ls_kd.detach(), lt.detach()
                if self.student_view is not None:
                    ls_kd = self.student_view(ls_kd)
                if self.teacher_view is not None:
                    lt_kd = self.teacher_view(lt_kd)
                per_token = self.loss_fn(ls_kd, lt_kd, temperature=self.temperature, **self.options)
                if per_token.shape != (n_kd,):
                    raise ValueError(
                        f"loss {getattr(self.loss_fn, '__name__', self.loss_fn)!r} returned shape "
                        f"{tuple(per_token.shape)}, expected [{n_kd}] (one value per token)"
                    )
                kd_chunk = per_token.to(acc).sum()
                del per_token, ls_kd, lt_kd
                if not need_lt:
                    lt = None  # the graph holds what it needs of the teacher logits
                kd_value = kd_chunk.detach().double()
                if kd_grad and kd_chunk.requires_grad:
                    objective = kd_chunk * self.kd_scale
                del kd_chunk
        g_ls = g_lt = None
        use_lt = need_lt and lt is not None
        if objective is not None and (need_ls or use_lt):
            grads = torch.autograd.grad(objective, ([ls] if need_ls else []) + ([lt] if use_lt else []),
                                        allow_unused=True)
            g_ls, g_lt = grads[0] if need_ls else None, grads[-1] if use_lt else None
        del objective  # the KD graph is gone: nothing holds ``ls`` now, and CE may write over it
        if labels is not None:
            ce_sum, g_ce = _cross_entropy(ls.detach(), labels, acc, self.ce_scale if need_ls and ce_grad else None)
            ce_value = ce_sum.double()
            if g_ce is not None:
                if g_ls is not None:
                    g_ce.add_(g_ls)
                g_ls = g_ce if g_ce.dtype == ls.dtype else g_ce.to(ls.dtype)
        return kd_value, ce_value, g_ls, g_lt


def _cross_entropy(logits: Tensor, labels: Tensor, acc: torch.dtype, grad_scale: float | None):
    """(Σ CE over the labelled rows, ``grad_scale``·∂CE/∂logits or ``None``).

    The gradient ``softmax − one-hot`` (0 on rows labelled -100) is written out here instead of
    taken by autograd: autograd would keep the log-softmax and allocate its gradient and the sum
    with the KD gradient, three ``[chunk, V]`` buffers that this builds in the logits' own memory
    (fp32 logits are overwritten; others are copied to fp32 once). Measured in
    ``bench/README.md`` (memory breakdown)."""
    keep = labels != IGNORE_INDEX
    target = labels.clamp_min(0).unsqueeze(1)
    if grad_scale is None:
        logits = logits.to(acc)
        picked = logits.gather(1, target).squeeze(1)
        return torch.where(keep, torch.logsumexp(logits, dim=-1) - picked, 0.0).sum(), None
    work = logits.to(acc, copy=logits.dtype != acc)
    picked = work.gather(1, target).squeeze(1)
    top = work.amax(dim=-1, keepdim=True)
    total = work.sub_(top).exp_().sum(dim=-1, keepdim=True)  # work now holds exp(logits − max)
    lse = (top + total.log()).squeeze(1)
    value = torch.where(keep, lse - picked, 0.0).sum()
    grad = work.div_(total)  # softmax
    rows = keep.nonzero().squeeze(1)
    grad.index_put_((rows, labels.index_select(0, rows)), torch.tensor(-1.0, dtype=acc, device=grad.device),
                    accumulate=True)
    grad.mul_(keep.unsqueeze(1).to(acc) * grad_scale)
    return value, grad


def _add_outer(acc: Tensor, g: Tensor, h: Tensor) -> None:
    """acc += gᵀ·h; in place when dtypes allow, else via one temporary in g's dtype."""
    if acc.dtype == g.dtype == h.dtype:
        acc.addmm_(g.T, h)
    else:
        acc.add_(g.T @ h)


class _ChunkedDistill(torch.autograd.Function):
    """Autograd node for the whole chunked loss; see the module docstring for the strategy."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, plan: _Plan):
        need = tuple(ctx.needs_input_grad[:4])
        if plan.strategy == "fused":
            kd_sum, ce_sum, grads = plan.run(h_s, w_s, h_t, w_t, need)
            ctx.save_for_backward(*grads)
        else:
            kd_sum, ce_sum, _ = plan.run(h_s, w_s, h_t, w_t, (False, False, False, False))
            ctx.save_for_backward(h_s, w_s, h_t, w_t)
        ctx.plan = plan
        plan.kd_sum, plan.ce_sum = kd_sum, ce_sum
        return kd_sum * plan.kd_scale + ce_sum * plan.ce_scale

    @staticmethod
    @once_differentiable  # the stored gradients are constants: no double backward through them
    def backward(ctx, grad_out):
        plan: _Plan = ctx.plan
        if plan.strategy == "fused":
            grads = ctx.saved_tensors
        else:
            h_s, w_s, h_t, w_t = ctx.saved_tensors
            _, _, grads = plan.run(h_s, w_s, h_t, w_t, tuple(ctx.needs_input_grad[:4]))
        scale = float(grad_out)
        if scale != 1.0:  # the usual loss.backward() passes 1: skip a pass over head-sized grads
            grads = tuple(None if g is None else g * scale for g in grads)
        return (*grads, None)


def _check_pair(side: str, hidden: Tensor, head: Tensor) -> None:
    if hidden.dim() != 2 or head.dim() != 2:
        raise ValueError(
            f"{side}_hidden must be [N, H] and {side}_head [V, H], got {tuple(hidden.shape)} and {tuple(head.shape)}"
        )
    if hidden.shape[1] != head.shape[1]:
        raise ValueError(
            f"{side}_hidden has hidden size {hidden.shape[1]} but {side}_head [V, H] has H = {head.shape[1]}"
        )
    if not hidden.is_floating_point() or hidden.dtype != head.dtype:
        raise ValueError(
            f"{side}_hidden ({hidden.dtype}) and {side}_head ({head.dtype}) must share one floating dtype"
        )


def distill_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    *,
    loss_fn: Callable[..., Tensor],
    loss_options: dict[str, Any] | None = None,
    labels: Tensor | None = None,
    kd_mask: Tensor | None = None,
    temperature: float = 1.0,
    kd_scale: float = 1.0,
    ce_scale: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    strategy: str = "fused",
) -> LossOutput:
    """KD (and CE) loss of row-paired inputs over one shared vocabulary, chunk by chunk.

    - ``student_hidden [N, H_s]``, ``student_head [V, H_s]`` (same dtype; the head may be a tied
      input embedding), ``teacher_hidden [N, H_t]`` (row ``i`` is the teacher for student row
      ``i``), ``teacher_head [V, H_t]`` (same dtype as ``teacher_hidden``). Both heads must
      already have the same ``V`` (slice padded rows first: ``kdcore.modeling.vocab.shared_vocab_size``).
    - ``loss_fn``: a registered loss (``fn(student_logits [n, V], teacher_logits [n, V], *,
      temperature, **loss_options) -> [n]``), applied to the rows where ``kd_mask`` (``[N]``
      bool, default all rows) is true.
    - the other arguments as in :func:`chunked_distill`, which this calls.
    """
    _check_pair("student", student_hidden, student_head)
    _check_pair("teacher", teacher_hidden, teacher_head)
    n = student_hidden.shape[0]
    if teacher_hidden.shape[0] != n:
        raise ValueError(
            f"teacher_hidden has {teacher_hidden.shape[0]} rows but student_hidden has {n}; rows must be paired"
        )
    if teacher_head.shape[0] != student_head.shape[0]:
        raise ValueError(
            f"student_head has {student_head.shape[0]} rows but teacher_head has {teacher_head.shape[0]}; slice both "
            f"to the shared vocabulary (kdcore.modeling.vocab.shared_vocab_size) or use a cross-tokenizer aligner"
        )
    return chunked_distill(
        student_hidden, student_head, teacher_hidden, teacher_head, loss_fn=loss_fn, loss_options=loss_options,
        labels=labels, kd_mask=kd_mask, temperature=temperature, kd_scale=kd_scale, ce_scale=ce_scale,
        chunk_size=chunk_size, strategy=strategy,
    )


def chunked_distill(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    *,
    loss_fn: Callable[..., Tensor],
    loss_options: dict[str, Any] | None = None,
    labels: Tensor | None = None,
    kd_mask: Tensor | None = None,
    teacher_rows: Tensor | None = None,
    student_view: ChunkView | None = None,
    teacher_view: ChunkView | None = None,
    temperature: float = 1.0,
    kd_scale: float = 1.0,
    ce_scale: float = 0.0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    strategy: str = "fused",
) -> LossOutput:
    """The chunked driver: KD (and CE) loss without an ``[N, V]`` buffer, for any pairing and space.

    - ``student_hidden [N, H_s]``, ``student_head [V_s, H_s]`` (same dtype): the student logits
      ``h_s·W_sᵀ``, on which CE is taken.
    - ``teacher_hidden [N_t, H_t]``, ``teacher_head [V_t, H_t]`` (same dtype): the teacher logits
      ``h_t·W_tᵀ`` (the head may be pre-sliced or pre-gathered, e.g. to a shared vocabulary).
    - ``kd_mask [N]`` bool: the student rows that take KD (default all rows).
    - ``teacher_rows [N]`` int: the teacher row paired with each student row (read at KD rows;
      a teacher row may be paired with several); ``None`` pairs row ``i`` with teacher row ``i``
      (then ``N_t = N``).
    - ``student_view``/``teacher_view`` (:data:`ChunkView`): per chunk, turn the KD rows' logits
      of that side into what ``loss_fn`` compares (default: the logits themselves).
    - ``loss_fn(student_side [k, ·], teacher_side [k, ·], *, temperature, **loss_options) -> [k]``:
      a registered loss, or any per-token divergence of the two sides.
    - ``labels [N]`` (int, ``-100`` = ignored): CE on the *student* logits at temperature 1 for
      every row with a label, from the same chunk logits as KD. Required when ``ce_scale != 0``.
    - ``kd_scale``/``ce_scale``: the global token-mean factors (module docstring); the result's
      ``loss = kd_scale·kd_sum + ce_scale·ce_sum``.
    - ``chunk_size``: rows per chunk (peak memory ∝ ``chunk_size × V``).
    - ``strategy``: ``"fused"`` (gradients in forward, default) or ``"recompute"``.

    Gradients reach every input that requires grad (teacher inputs too, e.g. for projectors).
    With no rows (``N = 0``, or every row masked and unlabelled) the loss is 0 and the gradients
    are zeros.
    """
    _check_pair("student", student_hidden, student_head)
    _check_pair("teacher", teacher_hidden, teacher_head)
    n = student_hidden.shape[0]
    vocab = student_head.shape[0]
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if strategy not in ("fused", "recompute"):
        raise ValueError(f"strategy must be 'fused' or 'recompute', got {strategy!r}")
    kd_scale, ce_scale = float(kd_scale), float(ce_scale)
    options = dict(loss_options or {})
    device = student_hidden.device

    if kd_mask is not None:
        if kd_mask.shape != (n,) or kd_mask.dtype != torch.bool:
            raise ValueError(f"kd_mask must be a bool tensor of shape [{n}], got {kd_mask.dtype} {tuple(kd_mask.shape)}")
        kd_rows = kd_mask
    else:
        kd_rows = torch.ones(n, dtype=torch.bool, device=device)
    if teacher_rows is not None:
        _check_teacher_rows(teacher_rows, kd_rows, teacher_hidden.shape[0])
        teacher_rows = teacher_rows.long()
    elif teacher_hidden.shape[0] != n:
        raise ValueError(
            f"teacher_hidden has {teacher_hidden.shape[0]} rows but student_hidden has {n}; pass teacher_rows "
            f"or pair the rows"
        )
    labels, ce_rows = _ce_rows(labels, n, vocab, ce_scale, device)
    kd_tokens = int(kd_rows.sum())
    ce_tokens = int(ce_rows.sum())

    # Rows that take neither KD nor CE cost nothing: keep only the active ones.
    active = kd_rows | ce_rows
    n_active = int(active.sum())
    h_s, h_t = student_hidden, teacher_hidden
    if n_active != n:
        index = active.nonzero().squeeze(1)
        h_s = h_s.index_select(0, index)
        if teacher_rows is None:
            h_t = h_t.index_select(0, index)
        else:
            teacher_rows = teacher_rows.index_select(0, index)
        kd_rows = kd_rows.index_select(0, index)
        labels = labels.index_select(0, index) if labels is not None else None
    plan = _Plan(loss_fn, options, float(temperature), kd_scale, ce_scale, chunk_size,
                 labels if ce_tokens else None, None if kd_tokens == n_active else kd_rows, strategy,
                 teacher_rows, student_view, teacher_view)

    inputs = (h_s, student_head, h_t, teacher_head)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        loss = _ChunkedDistill.apply(*inputs, plan)
        kd_sum, ce_sum = plan.kd_sum, plan.ce_sum
    else:
        with torch.no_grad():
            kd_sum, ce_sum, _ = plan.run(*inputs, (False, False, False, False))
        loss = kd_sum * kd_scale + ce_sum * ce_scale
    return LossOutput(loss=loss, kd_sum=kd_sum.detach(), ce_sum=ce_sum.detach(),
                      kd_tokens=kd_tokens, ce_tokens=ce_tokens)


def _ce_rows(labels: Tensor | None, n: int, vocab: int, ce_scale: float, device) -> tuple[Tensor | None, Tensor]:
    """(labels as int64, the rows that take CE), checked."""
    if labels is None:
        if ce_scale != 0.0:
            raise ValueError(f"ce_scale = {ce_scale} needs labels (the CE targets)")
        return None, torch.zeros(n, dtype=torch.bool, device=device)
    if labels.shape != (n,) or labels.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"labels must be an int tensor of shape [{n}], got {labels.dtype} {tuple(labels.shape)}")
    labels = labels.long()
    ce_rows = labels != IGNORE_INDEX
    if bool(ce_rows.any()):
        bad = ce_rows & ((labels < 0) | (labels >= vocab))
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels[{i}] = {int(labels[i])} is outside the vocabulary [0, {vocab}) and is not -100")
    return labels, ce_rows


def _check_teacher_rows(teacher_rows: Tensor, kd_rows: Tensor, n_teacher: int) -> None:
    n = kd_rows.shape[0]
    if teacher_rows.shape != (n,) or teacher_rows.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"teacher_rows must be an int tensor of shape [{n}], got {teacher_rows.dtype} "
                         f"{tuple(teacher_rows.shape)}")
    used = teacher_rows[kd_rows]
    if used.numel() and (int(used.min()) < 0 or int(used.max()) >= n_teacher):
        bad = int(((teacher_rows < 0) | (teacher_rows >= n_teacher)).logical_and(kd_rows).nonzero()[0, 0])
        raise ValueError(f"teacher_rows[{bad}] = {int(teacher_rows[bad])} is outside the {n_teacher} teacher rows")
