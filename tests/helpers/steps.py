"""A step preparer over a few rows of the quickstart's data, with one same-vocabulary teacher:
for tests of which training rows get CE and which a KD pair."""

from __future__ import annotations

from helpers.assets import PYDOC


def one_teacher_preparer(tok, tmp_path, rows: int, **preparer):
    """``(StepPreparer, samples)``: the first ``rows`` rows of PYDOC, teacher ``t`` reading the
    student's ids through ``same_vocab``; ``preparer`` adds StepPreparer settings (rollout, kd, ...)."""
    from kdcore.data import prepare_data
    from kdcore.modeling.tokenizers import pad_token_id
    from kdcore.plugin_system.manager import load_registry
    from kdcore.training.steps import StepPreparer
    from kdcore.training.teachers import TeacherPart
    from kdcore.training.types import LatestEval

    entry = load_registry().get("aligner", "same_vocab")
    aligner = entry.fn(student_tokenizer=tok, teacher_tokenizer=tok, options=entry.make_options({}))
    part = TeacherPart(name="t", section=None, tokenizer=tok, aligner=aligner, weight=1.0, temperature=1.0,
                       own_tokens=False, pad_id=pad_token_id(tok))
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(x + "\n" for x in PYDOC.read_text().splitlines()[:rows]))
    samples = prepare_data({"train": str(data), "eval_size": 0, "max_length": 256}, tok, None).train
    settings = {"rollout": None, **preparer}
    prep = StepPreparer(parts=[part], train_samples=samples, train_cfg=None, shuffle=False, env=None, kdist=None,
                        pad_id=pad_token_id(tok), teacher_pad_id=pad_token_id(tok), latest_eval=LatestEval(),
                        **settings)
    return prep, samples
