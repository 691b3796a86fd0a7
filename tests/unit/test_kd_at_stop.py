"""distill.kd_at_stop false: no KD pair where a training row's target is a stop token (CE only
there, so the references decide where answers end); every other row keeps its pair, and the
held-out evaluation (micro_batch without skip ids) still pairs every row."""

from __future__ import annotations

from types import SimpleNamespace

from helpers.assets import PYDOC


def _setup(tok, tmp_path):
    from kdcore.data import prepare_data
    from kdcore.plugin_system.manager import load_registry
    from kdcore.modeling.tokenizers import pad_token_id
    from kdcore.training.steps import StepPreparer
    from kdcore.training.teachers import TeacherPart
    from kdcore.training.types import LatestEval

    reg = load_registry()
    entry = reg.get("aligner", "same_vocab")
    aligner = entry.fn(student_tokenizer=tok, teacher_tokenizer=tok, options=entry.make_options({}))
    part = TeacherPart(name="t", section=None, tokenizer=tok, aligner=aligner, weight=1.0, temperature=1.0,
                       own_tokens=False, pad_id=pad_token_id(tok))
    data = tmp_path / "four.jsonl"
    data.write_text("".join(x + "\n" for x in PYDOC.read_text().splitlines()[:4]))
    samples = prepare_data({"train": str(data), "eval_size": 0, "max_length": 256}, tok, None).train
    prep = StepPreparer(parts=[part], rollout=None, train_samples=samples, train_cfg=None, shuffle=False, env=None,
                        kdist=None, pad_id=pad_token_id(tok), teacher_pad_id=pad_token_id(tok), latest_eval=LatestEval())
    return prep, samples


def test_stop_targets_lose_their_kd_pair_and_keep_their_ce(smollm2_tokenizer, tmp_path):
    from kdcore.data.rollout_samples import stop_ids
    from kdcore.distill.loss import IGNORE_INDEX
    from kdcore.training.trainer import Trainer

    tok = smollm2_tokenizer
    stops = Trainer._kd_skip_labels(SimpleNamespace(cfg=SimpleNamespace(distill=SimpleNamespace(kd_at_stop=False)),
                                                    student_tok=tok))
    assert set(stops) == set(stop_ids(tok)) and tok.convert_tokens_to_ids("<|im_end|>") in stops
    on = SimpleNamespace(cfg=SimpleNamespace(distill=SimpleNamespace(kd_at_stop=True)), student_tok=tok)
    assert Trainer._kd_skip_labels(on) == []

    prep, samples = _setup(tok, tmp_path)
    every = prep.micro_batch(0, 0, True, samples)  # what the held-out evaluation builds
    skipped = prep.micro_batch(0, 0, True, samples, kd_skip_labels=frozenset(stops))
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
