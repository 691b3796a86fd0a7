"""Which rows a training step sends to the teacher and which it learns from.

- A CE-only run (``kd_ratio 0``) sends the teacher no request while training: only the held-out
  evaluations ask it (they still report teacher-KL).
- Under a rollout that samples from the student, the student's samples get the KD term and the
  data set's references of the same prompts get the CE term (the teacher never computes the
  CE-only rows); CE on the student's own samples would have zero expected gradient.

In-process trainers on tiny models built from a config, with the teacher engine's ``submit``
wrapped to record every hidden-state request.
"""

from __future__ import annotations

import math

import pytest

from helpers.train import write_recipe

pytestmark = pytest.mark.usefixtures("cpu_process_group")


def trainer_for(tmp_path, tiny_teacher, **sections):
    from kdcore.recipe.loading import load_recipe
    from kdcore.training.trainer import Trainer

    recipe = write_recipe(tmp_path, tiny_teacher, **sections)
    return Trainer(load_recipe(str(recipe)))


def record_requests(trainer) -> list:
    """Every HiddenRequest the teacher engine receives from now on, tagged train/eval."""
    (part,) = trainer.parts
    engine = part.engine
    seen: list = []
    submit = engine.submit
    evaluate = trainer.evaluator.evaluate
    phase = {"now": "train"}

    def recording_submit(request):
        seen.append((phase["now"], request))
        return submit(request)

    def tagged_evaluate(step):
        phase["now"] = "eval"
        try:
            return evaluate(step)
        finally:
            phase["now"] = "train"

    engine.submit = recording_submit
    trainer.evaluator.evaluate = tagged_evaluate
    return seen


def test_a_ce_only_run_sends_the_teacher_nothing_while_training(tmp_path, tiny_teacher):
    trainer = trainer_for(tmp_path, tiny_teacher, distill={"loss": "fkl", "kd_ratio": 0.0},
                          train={"max_steps": 3, "eval_batches": 2, "threads": 1}, teacher={"threads": 1})
    seen = record_requests(trainer)
    result = trainer.run()
    assert [phase for phase, _ in seen] == ["eval"] * 4  # steps 0 and 3, two held-out batches each
    steps = [r for r in result.evals]
    assert len(steps) == 2 and all(math.isfinite(r["eval_teacher_kl"]) and r["eval_teacher_kl"] > 0 for r in steps)
    import json

    train = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if "loss" in r]
    assert len(train) == 3 and all(r["loss"] == pytest.approx(r["ce_loss"]) for r in train)


def test_student_samples_get_kd_and_the_references_of_their_prompts_get_ce(tmp_path, tiny_teacher):
    from kdcore.data import DataPosition
    from kdcore.distill.loss import IGNORE_INDEX

    trainer = trainer_for(tmp_path, tiny_teacher, distill={"loss": "fkl", "kd_ratio": 0.5, "rollout": "on_policy"},
                          rollout={"max_new_tokens": 4}, teacher={"threads": 1},
                          train={"max_steps": 2, "micro_batch_size": 3, "eval_batches": 1, "threads": 1})
    try:
        step = next(trainer.preparer.steps(0, DataPosition()))
        pmb = step.micro_batches[0]
        (share,) = pmb.teachers.values()
        samples = pmb.batch.samples
        sampled = [s for s in samples if getattr(s, "origin", "data") == "student"]
        data = samples[len(sampled):]
        assert len(sampled) == 3 and len(data) == 3  # the prompts' own data rows follow their samples
        assert [s.row for s in sampled] == [s.row for s in data]
        starts = [0]
        for s in samples:
            starts.append(starts[-1] + len(s.student.loss_positions))
        labels = pmb.batch.labels.tolist()
        for b, s in enumerate(samples):
            mine = labels[starts[b]:starts[b + 1]]
            if b < 3:  # a student sample: KD only
                assert set(mine) == {IGNORE_INDEX}
                assert share.teacher_positions[b]
            else:  # a reference: CE on its tokens, no teacher position
                assert mine == [s.student.input_ids[p + 1] for p in s.student.loss_positions]
                assert share.teacher_positions[b] == []
        assert pmb.ce_rows == starts[6] - starts[3]
        assert set(share.student_index.tolist()) == set(range(starts[3]))  # KD rows: the samples' own
    finally:
        trainer.close()

    trainer = trainer_for(tmp_path / "run", tiny_teacher,
                          distill={"loss": "fkl", "kd_ratio": 0.5, "rollout": "on_policy"},
                          rollout={"max_new_tokens": 4}, teacher={"threads": 1},
                          train={"max_steps": 2, "micro_batch_size": 3, "eval_batches": 1, "threads": 1})
    seen = record_requests(trainer)
    trainer.run()
    train = [r for phase, r in seen if phase == "train"]
    # the teacher computes the sampled rows only, never the CE-only references
    assert len(train) == 2 and all(r.input_ids.shape[0] == 3 for r in train)
