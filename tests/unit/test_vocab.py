"""Vocabulary checks (padded heads, genuine mismatches) and the same_vocab aligner."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import kdcore
from kdcore.distill.aligner import AlignedBatch, LossSpec, Tokenized
from kdcore.modeling.tokenizers import load_tokenizer
from kdcore.modeling.vocab import VocabMismatchError, real_vocab_size, shared_vocab_size
from kdflow_algorithms.aligners.same_vocab import SameVocabAligner

REGISTRY = kdcore.load_registry()
MISTRAL = "pkg://mistral_common/data/tokenizer.model.v1"


def word_tokenizer(tokens: list[str], name: str) -> PreTrainedTokenizerFast:
    """A real fast tokenizer over a word-level vocabulary (ids in list order)."""
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=tokens[0])
    tok.name_or_path = name
    return tok


WORDS = ["<unk>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "."]


@pytest.fixture(scope="module")
def mistral():
    return load_tokenizer(MISTRAL)


def test_padded_heads_of_one_family_are_sliced_to_the_real_vocab():
    # Qwen2.5 layout: 151665 real ids; 0.5B pads its head to 151936 rows, 7B to 152064.
    tokens = ["<unk>"] + [f"t{i}" for i in range(1, 151665)]
    small, large = word_tokenizer(tokens, "org/family-0.5b"), word_tokenizer(tokens, "org/family-7b")
    assert shared_vocab_size(small, large, 151936, 152064) == 151665
    assert shared_vocab_size(small, large, 151665, 151665) == 151665  # unpadded heads: nothing to slice


def test_same_vocab_under_different_names_is_accepted(mistral):
    # The comparison is on vocabularies: a renamed copy of the tokenizer is the same.
    renamed = load_tokenizer(MISTRAL)
    renamed.name_or_path = "someone/else"
    assert shared_vocab_size(mistral, renamed, 32000, 32768) == 32000 == real_vocab_size(mistral)


def test_genuinely_different_tokenizers_raise_one_clear_line(mistral):
    tiny = word_tokenizer(WORDS, "tiny")
    with pytest.raises(VocabMismatchError) as err:
        shared_vocab_size(mistral, tiny, 32000, 16)
    msg = str(err.value)
    assert "\n" not in msg
    assert "student vocab (32000 tokens)" in msg and "teacher vocab (10 tokens)" in msg
    assert "overlap, dskd, uld or mined" in msg


def test_same_size_same_name_but_different_ids_is_a_mismatch():
    a = word_tokenizer(WORDS, "same/name")
    b = word_tokenizer(WORDS[:2] + ["dog", "sat", "on", "mat", "a", "cat", "ran", "."], "same/name")  # cat <-> dog
    with pytest.raises(VocabMismatchError, match=r"student vocab \(10 tokens\) and teacher vocab \(10 tokens\) "
                                                 r"differ \(e\.g\. 'cat' is id 2 in the student but id 7"):
        shared_vocab_size(a, b, 10, 10)
    # an extra teacher token is a mismatch too (the heads' rows would mean different tokens)
    with pytest.raises(VocabMismatchError, match="'extra' .teacher id 10. is absent from the student"):
        shared_vocab_size(a, word_tokenizer(WORDS + ["extra"], "x"), 10, 11)


def test_head_smaller_than_vocab_is_an_error():
    a = word_tokenizer(WORDS, "a")
    with pytest.raises(VocabMismatchError, match="teacher head has 8 rows but the shared tokenizer has 10 ids"):
        shared_vocab_size(a, a, 12, 8)
    with pytest.raises(TypeError, match="cannot read a vocabulary from int"):
        shared_vocab_size(a, 3, 10, 10)


# ---------------------------------------------------------------------------------------------
# The same_vocab aligner
# ---------------------------------------------------------------------------------------------

def _build(student_tok, teacher_tok, tmp_path):
    entry = REGISTRY.get("aligner", "same_vocab")
    return entry.fn(student_tokenizer=student_tok, teacher_tokenizer=teacher_tok,
                    options=entry.make_options(), cache_dir=tmp_path)


def test_registered_and_fails_at_build_on_a_mismatch(mistral, tmp_path):
    tiny = word_tokenizer(WORDS, "tiny")
    aligner = _build(tiny, word_tokenizer(WORDS, "tiny-copy"), tmp_path)
    assert isinstance(aligner, SameVocabAligner) and isinstance(aligner, torch.nn.Module)
    assert aligner.cross_tokenizer is False and aligner.vocab_size == 10
    assert list(aligner.parameters()) == []
    with pytest.raises(VocabMismatchError, match="overlap, dskd, uld or mined"):
        _build(mistral, tiny, tmp_path)


def test_align_pairs_each_loss_position_with_itself(tmp_path):
    aligner = _build(word_tokenizer(WORDS, "a"), word_tokenizer(WORDS, "b"), tmp_path)
    ids = [1, 2, 3, 4, 1, 5, 9]
    offsets = [(0, 3), (4, 7), (8, 11), (12, 14), (15, 18), (19, 22), (22, 23)]
    student = Tokenized(input_ids=ids, offsets=offsets, loss_positions=[3, 4, 5])
    al = aligner.align(student, Tokenized(input_ids=list(ids), offsets=offsets, loss_positions=[3, 4, 5]))
    assert al.teacher_positions == [3, 4, 5]
    assert al.student_index == [0, 1, 2] and al.teacher_index == [0, 1, 2]
    with pytest.raises(ValueError, match="teacher token ids differ from the student's at position 2"):
        aligner.align(student, Tokenized(input_ids=[1, 2, 7, 4, 1, 5, 9], offsets=offsets, loss_positions=[3]))


def _dense_reference(h_s, w_s, h_t, w_t, fn, s_idx, t_idx, labels, spec):
    ls = h_s @ w_s.T
    lt = h_t @ w_t.T
    kd = fn(ls[s_idx], lt[t_idx], temperature=spec.temperature, **spec.options).sum()
    ce = F.cross_entropy(ls, labels, ignore_index=-100, reduction="sum")
    return spec.kd_scale * kd + spec.ce_scale * ce


@pytest.mark.parametrize("pairs", ["identity", "subset"])
def test_forward_slices_padded_heads_and_matches_dense(pairs, tmp_path):
    v, hs_dim, ht_dim, n = 10, 8, 6, 9
    aligner = _build(word_tokenizer(WORDS, "a"), word_tokenizer(WORDS, "b"), tmp_path)
    g = torch.Generator().manual_seed(0)
    h_s = torch.randn(n, hs_dim, generator=g)
    head_s = torch.randn(v + 6, hs_dim, generator=g)  # padded student head
    head_t = torch.randn(v + 22, ht_dim, generator=g)  # differently padded teacher head
    labels = torch.randint(0, v, (n,), generator=g)
    labels[0] = -100
    if pairs == "identity":
        h_t = torch.randn(n, ht_dim, generator=g)
        s_idx = t_idx = torch.arange(n)
    else:  # the teacher returned 5 rows, paired with 5 of the 9 student rows in another order
        h_t = torch.randn(5, ht_dim, generator=g)
        s_idx, t_idx = torch.tensor([0, 2, 3, 6, 8]), torch.tensor([4, 1, 0, 3, 2])
    fn = REGISTRY.get("loss", "js").fn
    spec = LossSpec(fn=fn, options={"beta": 0.4}, temperature=1.5, kd_ratio=0.8, chunk_size=4,
                    kd_scale=0.8 / len(s_idx), ce_scale=0.2 / 8)
    a_h, a_w = h_s.clone().requires_grad_(True), head_s.clone().requires_grad_(True)
    batch = AlignedBatch(student_hidden=a_h, student_head=a_w, labels=labels, teacher_hidden=h_t,
                         teacher_head=head_t, student_index=s_idx, teacher_index=t_idx)
    out = aligner(batch, spec)
    assert out.kd_tokens == len(s_idx) and out.ce_tokens == 8
    b_h, b_w = h_s.clone().requires_grad_(True), head_s.clone().requires_grad_(True)
    ref = _dense_reference(b_h, b_w[:v], h_t, head_t[:v], fn, s_idx, t_idx, labels, spec)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=0)
    out.loss.backward()
    ref.backward()
    torch.testing.assert_close(a_h.grad, b_h.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(a_w.grad, b_w.grad, rtol=1e-5, atol=1e-7)
    assert (a_w.grad[v:] == 0).all()  # padded rows take no part


def test_forward_rejects_a_head_smaller_than_the_vocab(tmp_path):
    aligner = _build(word_tokenizer(WORDS, "a"), word_tokenizer(WORDS, "b"), tmp_path)
    assert aligner.check_heads(10, 16) == 10
    batch = AlignedBatch(student_hidden=torch.randn(3, 4), student_head=torch.randn(9, 4),
                         labels=torch.zeros(3, dtype=torch.long), teacher_hidden=torch.randn(3, 4),
                         teacher_head=torch.randn(10, 4), student_index=torch.arange(3), teacher_index=torch.arange(3))
    spec = LossSpec(fn=REGISTRY.get("loss", "fkl").fn, options={}, temperature=1.0, kd_ratio=1.0, chunk_size=4,
                    kd_scale=1.0, ce_scale=0.0)
    with pytest.raises(VocabMismatchError, match="student head has 9 rows but the shared tokenizer has 10 ids"):
        aligner(batch, spec)
