"""The inline teacher engine (the transformers teacher in the trainer's process) against the
``hf`` process engine and an independent in-process forward, and a training run with it."""

from __future__ import annotations

import pytest
import torch

from kdcore.engines import HiddenRequest, TeacherError
from kdcore.engines.hf import HFTeacher, InlineTeacher
from kdcore.infra.channel import ChannelError
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
         "is a text model but the request carries image inputs"),
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


def test_teacher_threads_hold_for_the_teachers_calls_only(model_dir, reference):
    before = torch.get_num_threads()
    seen = []
    with InlineTeacher(str(model_dir), threads=1) as eng:
        hook = eng._model().decoder.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        ids, mask, seqs = make_batch([5], 5, seed=6)
        with eng.hidden_states(HiddenRequest(ids, mask, [[4]])) as h:
            torch.testing.assert_close(h[0], ref_hidden(reference, seqs[0])[4], rtol=0, atol=1e-5)
        eng.generate(ids, mask, max_new_tokens=2, do_sample=True, seed=1)
        hook.remove()
    assert seen and set(seen) == {1} and torch.get_num_threads() == before


def test_a_seeded_teacher_sample_leaves_the_trainers_random_stream_alone(inline):
    ids, mask, _ = make_batch([4, 6], 6, seed=8)
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    a = inline.generate(ids, mask, max_new_tokens=4, do_sample=True, seed=5)
    assert torch.equal(torch.rand(3), want)  # as with the hf engine, whose sampling runs elsewhere
    assert a == inline.generate(ids, mask, max_new_tokens=4, do_sample=True, seed=5)


def test_the_trainer_uses_the_head_the_teacher_holds(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kdcore.modeling.models import load_lm_head
    from kdcore.training.teachers import share_resident_heads

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with InlineTeacher(str(tmp_path)) as eng:
        held = eng.resident_head()
        assert held.data_ptr() == eng._model().model.get_input_embeddings().weight.data_ptr()  # tied: one matrix
        assert not held.requires_grad
        part, other = (type("Part", (), {"engine": eng, "head": load_lm_head(str(tmp_path), dtype=d)})()
                       for d in (torch.float32, torch.bfloat16))
        share_resident_heads([part, other])
        assert part.head.data_ptr() == held.data_ptr()  # the copy read from the file is dropped
        assert other.head.dtype == torch.bfloat16 and other.head.data_ptr() != held.data_ptr()  # not the same values
        part.head = held.clone().mul_(2)
        share_resident_heads([part])
        assert part.head.data_ptr() != held.data_ptr()  # other values (an update not pushed): kept


def test_a_vision_language_teacher_rows_equal_the_process_engines(vl_assets):
    from kdcore.data import collate, prepare_data
    from kdcore.modeling.tokenizers import load_tokenizer

    tok = load_tokenizer(str(vl_assets["teacher"]))
    mb = collate(prepare_data({"train": str(vl_assets["train"]), "eval_size": 0}, tok).train[:3], pad_id=0)
    req = HiddenRequest(mb.input_ids, mb.attention_mask, mb.loss_positions, mb.vision)
    with InlineTeacher(str(vl_assets["teacher"]), max_rows=512) as eng, \
            HFTeacher(str(vl_assets["teacher"]), threads=torch.get_num_threads(), max_rows=512) as process:
        assert eng.accepts_vision and eng.info["vision"]
        with eng.hidden_states(req) as rows, process.hidden_states(req) as want:
            torch.testing.assert_close(rows, want, rtol=0, atol=1e-5)
        left = mb.attention_mask.flip(-1)
        with pytest.raises(TeacherError, match="right-padded"):
            eng.submit(HiddenRequest(mb.input_ids.flip(-1), left,
                                     [[p for p in range(left.shape[1]) if left[b, p]][:1] for b in range(3)], mb.vision))


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
