"""``chunked_distill`` beyond ``distill_loss``: teacher rows paired by index, per-chunk views,
different vocabularies on the two sides — against the dense computation written out here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdcore
from kdcore.distill.loss import chunked_distill

REGISTRY = kdcore.load_registry()
N, N_T, H_S, H_T, V_S, V_T = 29, 17, 8, 6, 40, 55


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(N, H_S, generator=g, dtype=torch.float64)
    w_s = torch.randn(V_S, H_S, generator=g, dtype=torch.float64) * 0.5
    h_t = torch.randn(N_T, H_T, generator=g, dtype=torch.float64)
    w_t = torch.randn(V_T, H_T, generator=g, dtype=torch.float64) * 0.5
    labels = torch.randint(0, V_S, (N,), generator=g)
    labels[::3] = -100
    kd_mask = torch.rand(N, generator=g) > 0.35
    kd_mask[0] = False  # an unlabelled row without KD: filtered out before chunking
    teacher_rows = torch.randint(0, N_T, (N,), generator=g)
    teacher_rows[1] = teacher_rows[2] = 4  # one teacher row teaches two student rows
    kd_mask[1] = kd_mask[2] = True
    teacher_rows[~kd_mask] = -1  # ignored at rows without KD
    return h_s, w_s, h_t, w_t, labels, kd_mask, teacher_rows


# A student-side column gather (onto a shared vocabulary) and a teacher-side map into that
# vocabulary: the two view kinds the aligners use, here on made-up index sets.
SHARED_S = torch.tensor([0, 3, 5, 7, 11, 12, 20, 31, 39])
SHARED_T = torch.tensor([2, 9, 4, 50, 13, 0, 33, 21, 8])


def student_view(ls):
    return ls.index_select(1, SHARED_S)


def teacher_view(lt):
    return lt.index_select(1, SHARED_T) * 0.7


@pytest.mark.parametrize("strategy", ["fused", "recompute"])
@pytest.mark.parametrize("name", ["fkl", "js"])
def test_indexed_pairs_with_views_match_dense(name, strategy):
    fn = REGISTRY.get("loss", name).fn
    h_s, w_s, h_t, w_t, labels, kd_mask, teacher_rows = _inputs()
    a = [x.clone().requires_grad_(True) for x in (h_s, w_s, h_t, w_t)]
    b = [x.clone().requires_grad_(True) for x in (h_s, w_s, h_t, w_t)]
    out = chunked_distill(*a, loss_fn=fn, labels=labels, kd_mask=kd_mask, teacher_rows=teacher_rows,
                          student_view=student_view, teacher_view=teacher_view, temperature=1.4,
                          kd_scale=0.6, ce_scale=0.3, chunk_size=4, strategy=strategy)

    ls = b[0] @ b[1].T
    lt = b[2][teacher_rows[kd_mask]] @ b[3].T
    kd = fn(student_view(ls[kd_mask]), teacher_view(lt), temperature=1.4).sum()
    ce = F.cross_entropy(ls, labels, ignore_index=-100, reduction="sum")
    ref = 0.6 * kd + 0.3 * ce
    assert out.kd_tokens == int(kd_mask.sum()) and out.ce_tokens == int((labels != -100).sum())
    assert out.kd_sum.item() == pytest.approx(kd.item(), rel=1e-12)
    assert out.ce_sum.item() == pytest.approx(ce.item(), rel=1e-12)
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-12)
    out.loss.backward()
    ref.backward()
    for x, y in zip(a, b):  # student and teacher sides, hidden states and heads
        torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)
    unused = torch.ones(N_T, dtype=torch.bool)
    unused[teacher_rows[kd_mask]] = False
    assert (a[2].grad[unused] == 0).all()


def test_loss_may_compare_different_vocabularies():
    # e.g. a sorted-probability distance: the driver never requires V_s == V_t
    h_s, w_s, h_t, w_t, labels, kd_mask, teacher_rows = _inputs(seed=1)

    def top_mass_gap(ls, lt, *, temperature, k):
        top = lambda z: torch.softmax(z / temperature, -1).topk(k, dim=-1).values.sum(-1)
        return (top(lt) - top(ls)).abs()

    hs = h_s.clone().requires_grad_(True)
    out = chunked_distill(hs, w_s, h_t, w_t, loss_fn=top_mass_gap, loss_options={"k": 3}, kd_mask=kd_mask,
                          teacher_rows=teacher_rows, chunk_size=5)
    ref = top_mass_gap(h_s[kd_mask] @ w_s.T, h_t[teacher_rows[kd_mask]] @ w_t.T, temperature=1.0, k=3).sum()
    assert out.kd_sum.item() == pytest.approx(ref.item(), rel=1e-12)
    out.loss.backward()
    assert hs.grad.abs().sum() > 0 and (hs.grad[~kd_mask] == 0).all()


def test_bad_teacher_rows_are_clear_errors():
    fn = REGISTRY.get("loss", "fkl").fn
    h_s, w_s, h_t, w_t, labels, kd_mask, teacher_rows = _inputs(seed=2)
    bad = teacher_rows.clone()
    i = int(kd_mask.nonzero()[3, 0])
    bad[i] = N_T
    with pytest.raises(ValueError, match=rf"teacher_rows\[{i}\] = {N_T} is outside the {N_T} teacher rows"):
        chunked_distill(h_s, w_s, h_t, w_t, loss_fn=fn, kd_mask=kd_mask, teacher_rows=bad)
    with pytest.raises(ValueError, match="teacher_rows must be an int tensor of shape"):
        chunked_distill(h_s, w_s, h_t, w_t, loss_fn=fn, kd_mask=kd_mask, teacher_rows=teacher_rows[:-1])
    with pytest.raises(ValueError, match=f"teacher_hidden has {N_T} rows but student_hidden has {N}; pass teacher_rows"):
        chunked_distill(h_s, w_s, h_t, w_t, loss_fn=fn)
