"""The parts the training loop drives, each on its own: teacher schedule, run log, intervals."""

from __future__ import annotations

import contextlib
import json
from types import SimpleNamespace

import pytest
import torch

from kdcore.training.checkpointing import Checkpointer
from kdcore.training.evaluation import Evaluator, fkl_reference, mean_over_ranks
from kdcore.training.metrics import RunLog, StepMeter
from kdcore.training.teacher_schedule import TeacherSchedule
from kdcore.training.types import LatestEval, PreparedMicroBatch, PreparedStep, TeacherShare, TrainingError


class FakeEngine:
    """Records what the schedule asks of a teacher; rows are the ticket number."""

    def __init__(self, n_slots: int = 2):
        self.n_slots = n_slots
        self.events: list[tuple[str, int]] = []
        self.outstanding: set[int] = set()
        self._seq = 0

    def submit(self, request):
        if len(self.outstanding) >= self.n_slots:
            raise AssertionError("more requests in flight than slots")
        ticket = self._seq
        self._seq += 1
        self.outstanding.add(ticket)
        self.events.append(("submit", ticket))
        return ticket

    def result(self, ticket):
        assert ticket in self.outstanding
        self.events.append(("result", ticket))
        return torch.full((1, 1), float(ticket))

    def release(self, ticket):
        self.outstanding.remove(ticket)
        self.events.append(("release", ticket))


def _mb(step: int, index: int, last: bool) -> PreparedMicroBatch:
    batch = SimpleNamespace(input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2))
    share = TeacherShare(batch=batch, rows=[0], alignments=[], teacher_positions=[[0]], student_index=torch.zeros(1, dtype=torch.long),
                         teacher_index=torch.zeros(1, dtype=torch.long), extra={}, kd_rows=1)
    return PreparedMicroBatch(step=step, index=index, last=last, batch=batch, ce_rows=1, teachers={"teacher": share})


def _steps(n_steps: int, accum: int, taken: list[int] | None = None):
    for s in range(n_steps):
        if taken is not None:
            taken.append(s)
        yield PreparedStep(step=s, micro_batches=[_mb(s, i, i == accum - 1) for i in range(accum)], data_next=None)


def _consume(schedule: TeacherSchedule, steps, engine: FakeEngine, taken=None, start: int = 0):
    seen = []
    for pmb, prepared in schedule.micro_batches(steps, start):
        assert pmb.step == prepared.step
        in_flight = sorted(engine.outstanding)
        rows = schedule.hidden(pmb, "teacher")
        seen.append((pmb.step, pmb.index, int(rows[0, 0]), in_flight, list(taken) if taken is not None else None))
        schedule.release(pmb)
    return seen


def test_pipelined_the_next_micro_batch_is_in_flight_while_the_student_trains():
    engine = FakeEngine()
    schedule = TeacherSchedule({"teacher": engine}, looks_ahead=True, max_steps=3)
    seen = _consume(schedule, _steps(3, 2), engine)
    assert [(s, i) for s, i, *_ in seen] == [(s, i) for s in range(3) for i in range(2)]
    # while micro-batch k is read, k + 1 (also across a step boundary) is already submitted
    assert [flight for *_, flight, _ in seen[:-1]] == [[k, k + 1] for k in range(5)]
    assert seen[-1][3] == [5]
    assert [rows for _, _, rows, _, _ in seen] == list(range(6))


def test_a_policy_that_samples_from_the_student_waits_for_the_update():
    engine = FakeEngine()
    taken: list[int] = []
    schedule = TeacherSchedule({"teacher": engine}, looks_ahead=False, max_steps=2)
    seen = _consume(schedule, _steps(2, 2, taken), engine, taken)
    # the last micro-batch of step 0 is trained before step 1 is even prepared
    last_of_step0 = seen[1]
    assert (last_of_step0[0], last_of_step0[1]) == (0, 1)
    assert last_of_step0[4] == [0] and last_of_step0[3] == [1]
    assert seen[2][4] == [0, 1]


def test_colocated_one_teacher_phase_computes_a_whole_step():
    engine = FakeEngine(n_slots=3)
    phases: list[list[tuple[str, int]]] = []

    class Colocation:
        @contextlib.contextmanager
        def teacher_phase(self):
            start = len(engine.events)
            yield
            phases.append(engine.events[start:])

    schedule = TeacherSchedule({"teacher": engine}, looks_ahead=True, max_steps=2, colocation=Colocation())
    seen = _consume(schedule, _steps(2, 3), engine)
    assert len(seen) == 6
    # each phase: submit the step's three micro-batches, then read all three
    assert [[kind for kind, _ in p] for p in phases] == [["submit"] * 3 + ["result"] * 3] * 2


def test_colocated_refuses_a_step_larger_than_the_teacher_slots():
    engine = FakeEngine(n_slots=2)
    colocation = SimpleNamespace(teacher_phase=contextlib.nullcontext)
    schedule = TeacherSchedule({"teacher": engine}, looks_ahead=True, max_steps=1, colocation=colocation)
    with pytest.raises(TrainingError, match="lower train.grad_accum"):
        _consume(schedule, _steps(1, 3), engine)


def test_drop_in_flight_hands_back_computed_slots_and_they_are_sent_again():
    engine = FakeEngine()
    schedule = TeacherSchedule({"teacher": engine}, looks_ahead=True, max_steps=2)
    stream = schedule.micro_batches(_steps(2, 1), 0)
    first, _ = next(stream)
    assert engine.outstanding == {0, 1}  # step 1's micro-batch computed ahead
    schedule.release(first)
    schedule.drop_in_flight()
    assert engine.outstanding == set()
    second, _ = next(stream)
    assert second.step == 1 and second.teachers["teacher"].ticket == 2  # submitted again, after the drop
    schedule.release(second)
    assert next(stream, None) is None


def test_teacher_wait_is_counted_for_training_reads_only():
    engine = FakeEngine()
    schedule = TeacherSchedule({"teacher": engine}, looks_ahead=True, max_steps=1)
    pmb = _mb(0, 0, True)
    schedule.submit(pmb)
    schedule.hidden(pmb, "teacher", timed=False)
    assert schedule.wait_s == 0.0
    schedule.hidden(pmb, "teacher")
    assert schedule.wait_s > 0.0


def test_step_meter_takes_a_step_and_restarts():
    meter = StepMeter()
    meter.add(2.0, 10, {"a": 1.5})
    meter.add(1.0, 5, {"a": 0.5, "b": 0.25})
    done = meter.take()
    assert (done.ce_sum, done.tokens, done.kd_by_teacher) == (3.0, 15, {"a": 2.0, "b": 0.25})
    assert (meter.ce_sum, meter.tokens, meter.kd_by_teacher) == (0.0, 0, {})


def test_run_log_appends_records_on_the_main_rank_only(tmp_path):
    main = RunLog(tmp_path / "main.jsonl", is_main=True, progress=False)
    other = RunLog(tmp_path / "other.jsonl", is_main=False, progress=False)
    for log in (main, other):
        log.record({"step": 1, "loss": 0.5})
        log.eval_record({"step": 1, "eval_teacher_kl": 0.25, "eval_tokens": 3})
        with log.progress(total=2, completed=0):
            log.advance(1, loss=0.5, tps=1.0)
    lines = [json.loads(x) for x in (tmp_path / "main.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 0.5}, {"step": 1, "eval_teacher_kl": 0.25, "eval_tokens": 3}]
    assert not (tmp_path / "other.jsonl").exists()


@pytest.mark.parametrize("every, max_steps, due", [(2, 6, [2, 4]), (0, 6, []), (5, 5, [])])
def test_evaluation_and_checkpoint_intervals_skip_the_final_step(tmp_path, every, max_steps, due):
    ev = Evaluator(samples=[], preparer=None, forward=None, schedule=None, chunk_size=8, env=None,
                   kdist=None, latest=LatestEval(),
                   train_cfg=SimpleNamespace(eval_every=every, max_steps=max_steps))
    recipe = SimpleNamespace(checkpoint=SimpleNamespace(every=every, keep=1), train=SimpleNamespace(max_steps=max_steps))
    ck = Checkpointer(tmp_path, cfg=recipe, student=None, rollout=None, latest_eval=LatestEval(), log=None)
    # the final step is evaluated and saved by the loop's end, not by the interval
    assert [s for s in range(1, max_steps + 1) if ev.due(s)] == due
    assert [s for s in range(1, max_steps + 1) if ck.due(s)] == due
    assert ev.evaluate(1) is None  # no held-out samples: nothing to report
    assert "no checkpoint was written yet" in ck.where()


def test_fkl_reference_matches_the_definition():
    torch.manual_seed(0)
    s, t = torch.randn(4, 7), torch.randn(4, 7)
    p, q = torch.softmax(t / 2, -1), torch.softmax(s / 2, -1)
    expected = (p * (p.log() - q.log())).sum(-1)
    torch.testing.assert_close(fkl_reference(s, t, temperature=2.0), expected)
    t[:, 0] = float("-inf")  # a token the teacher masks contributes nothing (not 0·inf = nan)
    s_before, t_before = s.clone(), t.clone()
    p, log_q = torch.softmax(t, -1), torch.log_softmax(s, -1)
    expected = (p[:, 1:] * (p[:, 1:].log() - log_q[:, 1:])).sum(-1)
    torch.testing.assert_close(fkl_reference(s, t, temperature=1.0), expected)
    assert torch.equal(s, s_before) and torch.equal(t, t_before)  # it works in place on its own buffers only


def test_mean_over_ranks_is_the_identity_on_one_rank():
    values = {"align_ratio": 0.75}
    assert mean_over_ranks(values, SimpleNamespace(world_size=1), aligner=None) is values


def test_an_engine_without_vision_refuses_a_step_with_images_by_name():
    pmb = _mb(0, 0, True)
    pmb.batch.vision = {"pixel_values": torch.zeros(1, 3, 4, 4)}
    with pytest.raises(TrainingError, match=r"teacher engine \(FakeEngine\) does not take image inputs, and step 0 "
                                            r"has images; use teacher.engine: hf"):
        TeacherSchedule({"teacher": FakeEngine()}, looks_ahead=True, max_steps=1).submit(pmb)
    engine = FakeEngine()
    engine.accepts_vision = True
    TeacherSchedule({"teacher": engine}, looks_ahead=True, max_steps=1).submit(pmb)
    assert engine.events == [("submit", 0)]
