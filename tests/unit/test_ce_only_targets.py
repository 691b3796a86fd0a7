"""distill.kd_at_stop / kd_at_opening false: no KD pair where a training row's target is a stop
token or an answer's first token (CE only there, so the references decide where answers end and
how they open); every other row keeps its pair, and the held-out evaluation (micro_batch without
``ce_only``) still pairs every row."""

from __future__ import annotations

from types import SimpleNamespace

from helpers.assets import PYDOC
from helpers.steps import one_teacher_preparer

from kdcore.training.steps import CEOnlyTargets


def test_stop_targets_lose_their_kd_pair_and_keep_their_ce(smollm2_tokenizer, tmp_path):
    from kdcore.data.rollout_samples import stop_ids
    from kdcore.distill.loss import IGNORE_INDEX
    from kdcore.training.trainer import Trainer

    tok = smollm2_tokenizer
    def ce_only(**distill):
        settings = {"kd_at_stop": True, "kd_at_opening": True, **distill}
        return Trainer._ce_only_targets(SimpleNamespace(cfg=SimpleNamespace(distill=SimpleNamespace(**settings)),
                                                        student_tok=tok))

    stops = ce_only(kd_at_stop=False).labels
    assert set(stops) == set(stop_ids(tok)) and tok.convert_tokens_to_ids("<|im_end|>") in stops
    assert not ce_only() and not ce_only(kd_at_opening=False).labels and ce_only(kd_at_opening=False).openings

    prep, samples = one_teacher_preparer(tok, tmp_path, 4)
    every = prep.micro_batch(0, 0, True, samples)  # what the held-out evaluation builds
    skipped = prep.micro_batch(0, 0, True, samples, ce_only=CEOnlyTargets(labels=stops))
    labels = every.batch.labels
    assert torch_equal(skipped.batch.labels, labels)  # CE untouched, stop targets included
    at_stop = {i for i, y in enumerate(labels.tolist()) if y != IGNORE_INDEX and y in stops}
    assert len(at_stop) >= len(samples)  # each answer ends with a stop target
    paired_all = set(every.teachers["t"].student_index.tolist())
    paired = set(skipped.teachers["t"].student_index.tolist())
    assert paired_all == set(range(labels.numel()))
    assert paired == paired_all - at_stop
    assert skipped.teachers["t"].kd_rows == len(paired)  # the KD mean is over the kept rows only
    share = skipped.teachers["t"]
    assert share.teacher_index.numel() == share.student_index.numel()  # pairs stay one-to-one


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_answer_openings_lose_their_kd_pair_and_keep_their_ce(smollm2_tokenizer, tmp_path):
    """distill.kd_at_opening false: the first loss row of each answer (its target the answer's first
    token, decoded here against the reference) has no KD pair; CE and every other pair stay."""
    import json

    tok = smollm2_tokenizer
    prep, samples = one_teacher_preparer(tok, tmp_path, 4)
    every = prep.micro_batch(0, 0, True, samples)
    skipped = prep.micro_batch(0, 0, True, samples, ce_only=CEOnlyTargets(openings=True))
    assert torch_equal(skipped.batch.labels, every.batch.labels)
    openings, base = set(), 0
    rows = [json.loads(x) for x in PYDOC.read_text().splitlines()[:4]]
    for s, row in zip(samples, rows):
        pos = list(s.student.loss_positions)
        first = [k for k in range(len(pos)) if k == 0 or pos[k] != pos[k - 1] + 1]
        assert len(first) == 1  # one assistant turn per row here
        answer = next(m["content"] for m in row["messages"] if m["role"] == "assistant")
        assert answer.startswith(tok.decode([int(s.student.input_ids[pos[first[0]] + 1])]).strip())
        openings |= {base + k for k in first}
        base += len(pos)
    paired = set(skipped.teachers["t"].student_index.tolist())
    assert paired == set(every.teachers["t"].student_index.tolist()) - openings
    assert skipped.teachers["t"].kd_rows == len(paired)
    both = prep.micro_batch(0, 0, True, samples, ce_only=CEOnlyTargets(
        labels=frozenset([tok.convert_tokens_to_ids("<|im_end|>")]), openings=True))
    assert len(both.teachers["t"].student_index) == len(paired) - len(samples)  # the two gates add up
