"""The chunked driver against the dense computation written out here (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdcore
from kdcore.distill.loss import DEFAULT_CHUNK_SIZE, LossOutput, distill_loss

LOSSES = ["fkl", "rkl", "js", "skl", "srkl", "tvd", "akl"]
REGISTRY = kdcore.load_registry()
N, H_S, H_T, V = 37, 16, 12, 50


def _inputs(n=N, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, H_S, generator=g)
    w_s = torch.randn(V, H_S, generator=g) * 0.4
    h_t = torch.randn(n, H_T, generator=g)
    w_t = torch.randn(V, H_T, generator=g) * 0.5
    labels = torch.randint(0, V, (n,), generator=g)
    labels[::4] = -100
    kd_mask = torch.rand(n, generator=g) > 0.3
    return [x.to(dtype) for x in (h_s, w_s, h_t, w_t)] + [labels, kd_mask]


def dense(h_s, w_s, h_t, w_t, fn, *, labels=None, kd_mask=None, temperature=1.0, kd_scale=1.0, ce_scale=0.0,
          options=None):
    """The plain computation: full [N, V] logits, the loss on the KD rows, CE on labelled rows."""
    logits_s = h_s @ w_s.T
    logits_t = h_t @ w_t.T
    rows = kd_mask if kd_mask is not None else torch.ones(h_s.shape[0], dtype=torch.bool)
    kd = fn(logits_s[rows], logits_t[rows], temperature=temperature, **(options or {})).sum()
    ce = F.cross_entropy(logits_s.float(), labels, ignore_index=-100, reduction="sum") if labels is not None else 0.0
    return kd_scale * kd + ce_scale * ce, kd, ce


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("strategy", ["fused", "recompute"])
@pytest.mark.parametrize("name", LOSSES)
def test_chunked_matches_dense_with_ce_mix(name, strategy):
    fn = REGISTRY.get("loss", name).fn
    h_s, w_s, h_t, w_t, labels, kd_mask = _inputs()
    a = [x.clone().requires_grad_(True) for x in (h_s, w_s)]
    b = [x.clone().requires_grad_(True) for x in (h_s, w_s)]
    kw = dict(labels=labels, kd_mask=kd_mask, temperature=1.7, kd_scale=0.6 / 20, ce_scale=0.4 / 28)
    out = distill_loss(a[0], a[1], h_t, w_t, loss_fn=fn, chunk_size=7, strategy=strategy, **kw)
    ref, kd, ce = dense(b[0], b[1], h_t, w_t, fn, **kw)
    assert isinstance(out, LossOutput)
    assert out.kd_tokens == int(kd_mask.sum()) and out.ce_tokens == int((labels != -100).sum())
    assert _rel(out.loss, ref) < 1e-5 and _rel(out.kd_sum, kd) < 1e-5 and _rel(out.ce_sum, ce) < 1e-5
    assert not out.kd_sum.requires_grad and not out.ce_sum.requires_grad
    out.loss.backward()
    ref.backward()
    assert _rel(a[0].grad, b[0].grad) < 1e-5  # w.r.t. the student hidden states
    assert _rel(a[1].grad, b[1].grad) < 1e-5  # w.r.t. the student head


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kd_scale", [0.0, 0.3])
def test_cross_entropy_gradient_matches_autograd(kd_scale, dtype):
    """The driver writes CE's gradient out (softmax − one-hot, over the logits' own memory):
    against autograd of F.cross_entropy, with KD off (a CE-only twin) and on, unlabelled rows
    and a chunk whose rows are all unlabelled."""
    fn = REGISTRY.get("loss", "fkl").fn
    h_s, w_s, h_t, w_t, labels, kd_mask = _inputs(dtype=dtype, seed=3)
    labels[:7] = -100  # the first chunk takes no CE at all
    a = [x.clone().requires_grad_(True) for x in (h_s, w_s)]
    b = [x.clone().requires_grad_(True) for x in (h_s, w_s)]
    kw = dict(labels=labels, kd_mask=kd_mask, kd_scale=kd_scale, ce_scale=0.05)
    out = distill_loss(a[0], a[1], h_t, w_t, loss_fn=fn, chunk_size=7, **kw)
    ref, _, ce = dense(b[0], b[1], h_t, w_t, fn, **kw)
    assert _rel(out.ce_sum, ce) < 1e-6
    out.loss.backward()
    ref.backward()
    assert _rel(a[0].grad, b[0].grad) < 1e-6 and _rel(a[1].grad, b[1].grad) < 1e-6


@pytest.mark.parametrize("chunk", [1, 5, 8, N - 1, N, N + 3, 4096])
def test_odd_chunk_sizes(chunk):
    fn = REGISTRY.get("loss", "js").fn
    h_s, w_s, h_t, w_t, labels, kd_mask = _inputs(seed=1)
    seen = []

    def spy(s, t, **kw):
        seen.append(s.shape[0])
        return fn(s, t, **kw)

    a = [x.clone().requires_grad_(True) for x in (h_s, w_s)]
    b = [x.clone().requires_grad_(True) for x in (h_s, w_s)]
    out = distill_loss(a[0], a[1], h_t, w_t, loss_fn=spy, loss_options={"beta": 0.3}, labels=labels,
                       kd_mask=kd_mask, ce_scale=0.5, chunk_size=chunk)
    ref, _, _ = dense(b[0], b[1], h_t, w_t, fn, labels=labels, kd_mask=kd_mask, ce_scale=0.5, options={"beta": 0.3})
    assert max(seen) <= chunk and sum(seen) == int(kd_mask.sum())  # the loss only ever sees a chunk
    out.loss.backward()
    ref.backward()
    assert _rel(out.loss, ref) < 1e-5 and _rel(a[0].grad, b[0].grad) < 1e-5 and _rel(a[1].grad, b[1].grad) < 1e-5


def test_tied_embedding_head_gets_both_gradients():
    # The head is the input embedding: its gradient = embedding-lookup part + head part.
    torch.manual_seed(2)
    ids = torch.randint(0, V, (N,))
    fn = REGISTRY.get("loss", "fkl").fn
    _, _, h_t, w_t, labels, _ = _inputs(seed=2)
    grads = []
    for chunked in (True, False):
        torch.manual_seed(5)  # same initial weights for both runs
        emb = torch.nn.Embedding(V, H_S)
        torch.nn.init.normal_(emb.weight, std=0.4, generator=torch.Generator().manual_seed(3))
        proj = torch.nn.Linear(H_S, H_S)
        torch.nn.init.normal_(proj.weight, std=0.3, generator=torch.Generator().manual_seed(4))
        hidden = torch.tanh(proj(emb(ids)))
        if chunked:
            loss = distill_loss(hidden, emb.weight, h_t, w_t, loss_fn=fn, labels=labels, ce_scale=0.3, chunk_size=6).loss
        else:
            loss = dense(hidden, emb.weight, h_t, w_t, fn, labels=labels, ce_scale=0.3)[0]
        loss.backward()
        grads.append((emb.weight.grad.clone(), proj.weight.grad.clone()))
    assert _rel(grads[0][0], grads[1][0]) < 1e-5 and _rel(grads[0][1], grads[1][1]) < 1e-5


def test_teacher_side_gradients_when_teacher_inputs_require_grad():
    # e.g. a trainable projection of the teacher hidden states (DSKD)
    fn = REGISTRY.get("loss", "srkl").fn
    h_s, w_s, h_t, w_t, labels, kd_mask = _inputs(seed=3)
    a = [x.clone().requires_grad_(True) for x in (h_s, w_s, h_t, w_t)]
    b = [x.clone().requires_grad_(True) for x in (h_s, w_s, h_t, w_t)]
    distill_loss(*a, loss_fn=fn, kd_mask=kd_mask, chunk_size=9).loss.backward()
    dense(*b, fn, kd_mask=kd_mask)[0].backward()
    for x, y in zip(a, b):
        assert _rel(x.grad, y.grad) < 1e-5
    assert (a[2].grad[~kd_mask] == 0).all()  # rows outside KD get no teacher gradient


def test_micro_batches_with_global_scales_equal_one_batch():
    # The documented token-mean contract: per-micro-batch sums scaled by global counts add up to
    # the gradient of the global token mean, however the tokens are split.
    fn = REGISTRY.get("loss", "fkl").fn
    h_s, w_s, h_t, w_t, labels, kd_mask = _inputs(seed=4)
    kd_ratio = 0.7
    n_kd, n_ce = int(kd_mask.sum()), int((labels != -100).sum())
    scales = dict(kd_scale=kd_ratio / n_kd, ce_scale=(1 - kd_ratio) / n_ce)
    whole = w_s.clone().requires_grad_(True)
    distill_loss(h_s, whole, h_t, w_t, loss_fn=fn, labels=labels, kd_mask=kd_mask, **scales).loss.backward()
    split = w_s.clone().requires_grad_(True)
    total = 0.0
    for sl in (slice(0, 5), slice(5, 37)):  # very unequal micro-batches
        out = distill_loss(h_s[sl], split, h_t[sl], w_t, loss_fn=fn, labels=labels[sl], kd_mask=kd_mask[sl], **scales)
        out.loss.backward()
        total += float(out.loss.detach())
    mean = kd_ratio * dense(h_s, w_s, h_t, w_t, fn, kd_mask=kd_mask)[1] / n_kd + (1 - kd_ratio) * dense(
        h_s, w_s, h_t, w_t, fn, labels=labels)[2] / n_ce
    assert abs(total - float(mean)) < 1e-5 * abs(float(mean))
    assert _rel(split.grad, whole.grad) < 1e-5


@pytest.mark.parametrize("strategy", ["fused", "recompute"])
def test_upstream_gradient_scales_the_result(strategy):
    fn = REGISTRY.get("loss", "tvd").fn
    h_s, w_s, h_t, w_t, labels, _ = _inputs(seed=5)
    a = h_s.clone().requires_grad_(True)
    b = h_s.clone().requires_grad_(True)
    (distill_loss(a, w_s, h_t, w_t, loss_fn=fn, strategy=strategy).loss * 3.0).backward()
    distill_loss(b, w_s, h_t, w_t, loss_fn=fn, strategy=strategy).loss.backward()
    torch.testing.assert_close(a.grad, 3.0 * b.grad)


def test_empty_inputs_give_zero_loss_and_zero_grads():
    fn = REGISTRY.get("loss", "akl").fn
    h_s, w_s, h_t, w_t, labels, _ = _inputs(seed=6)
    cases = [
        dict(h=(h_s[:0], h_t[:0]), labels=labels[:0], kd_mask=torch.zeros(0, dtype=torch.bool)),  # N = 0
        dict(h=(h_s, h_t), labels=torch.full((N,), -100), kd_mask=torch.zeros(N, dtype=torch.bool)),  # all masked
        dict(h=(h_s, h_t), labels=None, kd_mask=torch.zeros(N, dtype=torch.bool)),
    ]
    for case in cases:
        hs = case["h"][0].clone().requires_grad_(True)
        ws = w_s.clone().requires_grad_(True)
        out = distill_loss(hs, ws, case["h"][1], w_t, loss_fn=fn, labels=case["labels"], kd_mask=case["kd_mask"],
                           kd_scale=1.0, ce_scale=0.5 if case["labels"] is not None else 0.0)
        assert float(out.loss.detach()) == 0.0 and out.kd_tokens == 0 and out.ce_tokens == 0
        assert float(out.kd_sum) == 0.0 and float(out.ce_sum) == 0.0
        out.loss.backward()
        assert hs.grad is not None and ws.grad is not None
        assert (hs.grad == 0).all() and (ws.grad == 0).all() and hs.grad.shape == hs.shape


def test_bf16_inputs_fp32_loss_and_grads_close_to_dense_bf16():
    fn = REGISTRY.get("loss", "fkl").fn
    h_s, w_s, h_t, w_t, labels, kd_mask = _inputs(dtype=torch.bfloat16, seed=7)
    a = [x.clone().requires_grad_(True) for x in (h_s, w_s)]
    b = [x.clone().requires_grad_(True) for x in (h_s, w_s)]
    out = distill_loss(a[0], a[1], h_t, w_t, loss_fn=fn, labels=labels, kd_mask=kd_mask, ce_scale=0.5, chunk_size=8)
    ref, _, _ = dense(b[0], b[1], h_t, w_t, fn, labels=labels, kd_mask=kd_mask, ce_scale=0.5)
    assert out.loss.dtype == torch.float32 and out.kd_sum.dtype == torch.float32
    # same bf16 logits per row, losses in fp32: only the summation order differs
    assert _rel(out.loss, ref) < 1e-5
    out.loss.backward()
    ref.backward()
    assert a[0].grad.dtype == torch.bfloat16 and a[1].grad.dtype == torch.bfloat16
    assert _rel(a[0].grad, b[0].grad) < 1e-2 and _rel(a[1].grad, b[1].grad) < 1e-2
    # and both are close to the fp32 computation on the same (bf16-valued) inputs
    c = [x.float().requires_grad_(True) for x in (h_s, w_s)]
    dense(c[0], c[1], h_t.float(), w_t.float(), fn, labels=labels, kd_mask=kd_mask, ce_scale=0.5)[0].backward()
    assert _rel(a[1].grad, c[1].grad) < 2e-2


def test_without_grad_mode_no_graph_and_same_value():
    fn = REGISTRY.get("loss", "rkl").fn
    h_s, w_s, h_t, w_t, labels, kd_mask = _inputs(seed=8)
    hs = h_s.clone().requires_grad_(True)
    with torch.no_grad():
        out = distill_loss(hs, w_s, h_t, w_t, loss_fn=fn, labels=labels, kd_mask=kd_mask, ce_scale=0.2)
    assert out.loss.grad_fn is None
    ref = dense(h_s, w_s, h_t, w_t, fn, labels=labels, kd_mask=kd_mask, ce_scale=0.2)[0]
    assert _rel(out.loss, ref) < 1e-5


def test_default_chunk_size_is_positive_and_used():
    fn = REGISTRY.get("loss", "fkl").fn
    h_s, w_s, h_t, w_t, _, _ = _inputs(n=DEFAULT_CHUNK_SIZE + 3, seed=9)
    seen = []
    distill_loss(h_s, w_s, h_t, w_t, loss_fn=lambda s, t, **kw: (seen.append(s.shape[0]), fn(s, t, **kw))[1])
    assert seen == [DEFAULT_CHUNK_SIZE, 3]


def test_bad_inputs_are_clear_errors():
    fn = REGISTRY.get("loss", "fkl").fn
    h_s, w_s, h_t, w_t, labels, kd_mask = _inputs(seed=10)
    with pytest.raises(ValueError, match="student_head has 50 rows but teacher_head has 49"):
        distill_loss(h_s, w_s, h_t, w_t[:49], loss_fn=fn)
    with pytest.raises(ValueError, match="ce_scale = 0.5 needs labels"):
        distill_loss(h_s, w_s, h_t, w_t, loss_fn=fn, ce_scale=0.5)
    bad = labels.clone()
    bad[3] = V
    with pytest.raises(ValueError, match=r"labels\[3\] = 50 is outside the vocabulary \[0, 50\)"):
        distill_loss(h_s, w_s, h_t, w_t, loss_fn=fn, labels=bad)
    with pytest.raises(ValueError, match="student_hidden .torch.float32. and student_head .torch.bfloat16."):
        distill_loss(h_s, w_s.bfloat16(), h_t, w_t, loss_fn=fn)
    with pytest.raises(ValueError, match="teacher_hidden has 36 rows but student_hidden has 37"):
        distill_loss(h_s, w_s, h_t[:36], w_t, loss_fn=fn)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        distill_loss(h_s, w_s, h_t, w_t, loss_fn=fn, chunk_size=0)
    with pytest.raises(ValueError, match="returned shape"):
        distill_loss(h_s, w_s, h_t, w_t, loss_fn=lambda s, t, **kw: fn(s, t, **kw).sum())
