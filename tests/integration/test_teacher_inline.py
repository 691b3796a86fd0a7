"""The inline teacher engine (the transformers teacher in the trainer's process) against the
``hf`` process engine and an independent in-process forward, and a training run with it."""

from __future__ import annotations

import pytest
import torch

import kdcore
from kdcore.engines import HiddenRequest, TeacherError
from kdcore.engines.hf import HFTeacher, InlineTeacher
from kdcore.infra.channel import ChannelError
from kdcore.recipe.loading import validate_raw
from helpers.teacher_hf import HIDDEN, VOCAB, check_update_weights, make_batch, model_dir, ref_hidden, reference  # noqa: F401
from helpers.train import run_train, train_steps, evals, write_recipe


@pytest.fixture(scope="module")
def inline(model_dir):
    eng = InlineTeacher(str(model_dir), max_rows=64).start()
    yield eng
    eng.close()


@pytest.fixture(scope="module")
def process(model_dir):
    eng = HFTeacher(str(model_dir), threads=torch.get_num_threads(), max_rows=64).start()
    yield eng
    eng.close()


@pytest.mark.parametrize("left", [False, True], ids=["right-padded", "left-padded"])
def test_hidden_states_equal_the_process_engines_and_a_reference_forward(inline, process, reference, left):
    lengths, L = [9, 5, 12], 12
    ids, mask, seqs = make_batch(lengths, L, left=left, seed=int(left))
    want = [[0, 4, 8, 2], [4, 1], [11, 0, 5]]
    shift = [L - n if left else 0 for n in lengths]
    req = HiddenRequest(ids, mask, [[p + s for p in ps] for ps, s in zip(want, shift)])
    with inline.hidden_states(req) as h, process.hidden_states(req) as h_process:
        assert h.shape == (9, HIDDEN) and h.dtype == torch.float32
        torch.testing.assert_close(h, h_process, rtol=0, atol=1e-6)  # one model class, same threads
        expected = torch.cat([ref_hidden(reference, s)[ps] for s, ps in zip(seqs, want)])
        torch.testing.assert_close(h, expected, rtol=0, atol=1e-5)  # unpadded forwards: fp32 rounding only


def test_tickets_bound_results_held_and_released(inline, reference):
    ids0, mask0, seqs0 = make_batch([7], 7, seed=10)
    ids1, mask1, seqs1 = make_batch([5], 5, seed=11)
    t0 = inline.submit(HiddenRequest(ids0, mask0, [[6]]))
    t1 = inline.submit(HiddenRequest(ids1, mask1, [[0, 4]]))  # batch k+1 while batch k is held
    with pytest.raises(ChannelError, match="2 requests already in flight"):
        inline.submit(HiddenRequest(ids1, mask1, [[0]]))
    torch.testing.assert_close(inline.result(t0), ref_hidden(reference, seqs0[0])[[6]], rtol=0, atol=1e-5)
    torch.testing.assert_close(inline.result(t1), ref_hidden(reference, seqs1[0])[[0, 4]], rtol=0, atol=1e-5)
    inline.release(t0)
    with pytest.raises(ChannelError, match="not outstanding"):
        inline.release(t0)
    with pytest.raises(ChannelError, match="not outstanding"):
        inline.result(t0)
    inline.release(t1)
    with pytest.raises(TeacherError, match="release all hidden-state tickets"):
        with inline.hidden_states(HiddenRequest(ids1, mask1, [[0]])):
            inline.generate(ids1, mask1, max_new_tokens=2)


def test_rows_are_ordinary_tensors_an_aligner_can_train_through(inline):
    ids, mask, _ = make_batch([6], 6, seed=4)
    with inline.hidden_states(HiddenRequest(ids, mask, [[1, 5]])) as h:
        assert not h.requires_grad and not h.is_inference()
        proj = torch.nn.Linear(HIDDEN, 3)
        proj(h).sum().backward()  # a projector on the teacher's rows, as DSKD's
        assert proj.weight.grad is not None and torch.equal(proj.weight.grad[0], h.sum(0))


def test_bad_requests_are_refused_and_the_engine_keeps_working(inline, reference):
    ids, mask, seqs = make_batch([4, 2], 4)
    for req, msg in [
        (HiddenRequest(ids, mask, [[1], [3]]), "sample 1: position 3 is padding"),
        (HiddenRequest(torch.full((1, 3), VOCAB + 5), torch.ones((1, 3)), [[0]]),
         f"token id {VOCAB + 5} is outside the teacher's vocabulary"),
        (HiddenRequest(torch.zeros((1, 80), dtype=torch.long), torch.ones((1, 80)), [list(range(70))]),
         "70 hidden-state rows but channel slots hold 64"),
        (HiddenRequest(ids, mask, [[1], [0]], vision={"pixel_values": torch.zeros(1, 3, 4, 4)}),
         "use teacher.engine: hf for image inputs"),
    ]:
        with pytest.raises(TeacherError, match=msg):
            inline.submit(req)
    with inline.hidden_states(HiddenRequest(ids, mask, [[3], [1]])) as h:
        torch.testing.assert_close(h[0], ref_hidden(reference, seqs[0])[3], rtol=0, atol=1e-5)


def test_generation_and_weight_updates_as_the_process_engine_does(inline, process, reference):
    ids, mask, _ = make_batch([5, 3], 5, seed=3)
    assert inline.generate(ids, mask, max_new_tokens=6, do_sample=False) == \
        process.generate(ids, mask, max_new_tokens=6, do_sample=False)
    a = inline.generate(ids, mask, max_new_tokens=5, do_sample=True, seed=7)
    assert a == inline.generate(ids, mask, max_new_tokens=5, do_sample=True, seed=7)
    check_update_weights(inline, reference)
    assert torch.equal(inline.lm_head(), reference.lm_head.weight)


def test_a_closed_or_unstarted_engine_says_so(model_dir):
    eng = InlineTeacher(str(model_dir))
    ids, mask, _ = make_batch([3], 3)
    with pytest.raises(TeacherError, match="not started"):
        eng.submit(HiddenRequest(ids, mask, [[0]]))
    with eng:
        eng.hidden_states(HiddenRequest(ids, mask, [[0]])).release()
    with pytest.raises(TeacherError, match="closed"):
        eng.submit(HiddenRequest(ids, mask, [[0]]))


def test_recipe_threads_are_refused_with_the_inline_engine():
    base = {"student": {"path": "s"}, "data": {"train": "d.jsonl"}, "train": {"output_dir": "o"}}
    errors = validate_raw({**base, "teacher": {"path": "t", "engine": "inline", "threads": 2}}, kdcore.load_registry())
    assert "teacher.threads: the inline engine computes with the trainer's own threads; " \
           "leave it 0 or use teacher.engine: hf" in errors


def test_training_with_the_inline_teacher_equals_the_process_teacher(tmp_path, tiny_teacher):
    runs = {}
    for engine in ("hf", "inline"):
        recipe = write_recipe(tmp_path / engine, tiny_teacher, teacher={"engine": engine}, train={"max_steps": 3})
        done = run_train(recipe)
        assert done.returncode == 0, done.stderr[-2000:]
        runs[engine] = (train_steps(tmp_path / engine / "out"), evals(tmp_path / engine / "out"))
    (steps_hf, evals_hf), (steps_in, evals_in) = runs["hf"], runs["inline"]
    assert len(steps_in) == len(steps_hf) == 3
    for a, b in zip(steps_in, steps_hf):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    assert evals_in[-1]["eval_teacher_kl"] == pytest.approx(evals_hf[-1]["eval_teacher_kl"], rel=1e-5)
