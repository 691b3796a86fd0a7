"""Vision-language end to end: the hf engine's VL teacher against an in-process forward, a VL
student that learns and resumes bit for bit, and a VL teacher into a text-only student."""

from __future__ import annotations


import pytest
import torch

from kdcore.data import collate, prepare_data
from kdcore.modeling.tokenizers import load_tokenizer
from helpers.train import assert_resume_after_step_2_is_exact, dump_recipe, evals, run_train, train_steps


def vl_recipe(tmp_path, vl, student=None, **sections):
    recipe = {
        "teacher": {"path": str(vl["teacher"]), "threads": 1},
        "student": {"path": str(student or vl["student"]), "train_vision": False},
        "data": {"train": str(vl["train"]), "eval": str(vl["eval"]), "max_length": 64},
        "distill": {"loss": "fkl", "kd_ratio": 1.0},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 4, "micro_batch_size": 4, "lr": 3e-3,
                  "warmup_steps": 1, "eval_every": 4, "eval_batches": 2, "threads": 1},
        "checkpoint": {"every": 2, "keep": 3},
        "logging": {"progress": False},
    }
    return dump_recipe(tmp_path, recipe, sections)


def test_vl_teacher_rows_equal_an_in_process_forward(vl_assets):
    from kdcore.engines import HiddenRequest, TeacherError
    from kdcore.engines.hf import HFTeacher
    from kdcore.modeling.models import load_causal_lm

    tok = load_tokenizer(str(vl_assets["teacher"]))
    data = prepare_data({"train": str(vl_assets["train"]), "eval_size": 0}, tok)
    mb = collate(data.train[:3], pad_id=0)
    assert mb.vision["pixel_values"].shape[0] == 3
    model = load_causal_lm(str(vl_assets["teacher"]))
    with torch.inference_mode():
        ref = model.model(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False,
                          **mb.vision).last_hidden_state
    want = ref.reshape(-1, ref.shape[-1])[mb.loss_index]
    with HFTeacher(str(vl_assets["teacher"]), threads=1, max_rows=512) as teacher:
        assert teacher.info["vision"] and teacher.accepts_vision
        with teacher.hidden_states(HiddenRequest(mb.input_ids, mb.attention_mask, mb.loss_positions,
                                                 mb.vision)) as rows:
            assert rows.shape == want.shape
            torch.testing.assert_close(rows, want, atol=1e-5, rtol=1e-5)
        # without the pixels the model reads <image> as a text token: different states
        with teacher.hidden_states(HiddenRequest(mb.input_ids, mb.attention_mask, mb.loss_positions)) as rows:
            assert not torch.allclose(rows, want, atol=1e-3)
        left = mb.attention_mask.flip(-1)
        with pytest.raises(TeacherError, match="right-padded"):
            teacher.submit(HiddenRequest(mb.input_ids.flip(-1), left,
                                         [[p for p in range(left.shape[1]) if left[b, p]][:1] for b in range(3)],
                                         mb.vision))


def test_vl_student_learns_and_resumes_bit_for_bit(tmp_path, vl_assets):
    from safetensors.torch import load_file

    recipe = vl_recipe(tmp_path, vl_assets)
    res = run_train(recipe)
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    ev = evals(out)
    assert [e["step"] for e in ev] == [0, 4] and ev[1]["eval_teacher_kl"] < ev[0]["eval_teacher_kl"], ev
    # train_vision: false left the tower as it was; the language model moved
    before, after = load_file(vl_assets["student"] / "model.safetensors"), load_file(out / "hf" / "model.safetensors")
    tower = [k for k in before if "vision_tower" in k]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)
    assert set(before) == set(after)
    lm = [k for k in before if "layers.0.mlp.up_proj" in k and "vision" not in k]
    assert lm and not torch.equal(before[lm[0]], after[lm[0]])
    assert (out / "hf" / "processor_config.json").is_file()  # the export reads images like the student did
    assert_resume_after_step_2_is_exact(recipe, out)


def test_vl_teacher_teaches_a_text_only_student(tmp_path, vl_assets):
    recipe = vl_recipe(tmp_path, vl_assets, student=vl_assets["text_student"],
                       distill={"aligner": "overlap"}, checkpoint={"every": 0, "export_hf": False})
    res = run_train(recipe)
    assert res.returncode == 0, res.stderr[-3000:]
    ev = evals(tmp_path / "out")
    assert ev[-1]["eval_teacher_kl"] < ev[0]["eval_teacher_kl"], ev
    # every trained text token of the text student found its teacher position past the image tokens
    assert all(e["eval_align_ratio"] == 1.0 for e in ev), ev


@pytest.mark.long  # two torchrun runs (~1 min); fast twin: test_student.py's two-rank FSDP check with a tiny LLaVA
def test_a_vl_student_on_two_ranks_trains_like_one_rank(tmp_path, vl_assets):
    """Same global batch: 2 ranks x 1 micro-batch of 2 == 1 rank x 2 micro-batches of 2, image
    rows and all; the export gathered from both ranks reads images like the student did."""
    recipes = {}
    for name, accum in (("one", 2), ("two", 1)):
        (tmp_path / name).mkdir()
        recipes[name] = vl_recipe(tmp_path / name, vl_assets, checkpoint={"every": 0},
                                  train={"max_steps": 2, "micro_batch_size": 2, "grad_accum": accum, "eval_every": 2})
    one, two = recipes["one"], recipes["two"]
    for recipe, nproc in ((one, 1), (two, 2)):
        res = run_train(recipe, nproc=nproc, timeout=400)
        assert res.returncode == 0, res.stderr[-3000:]
    a, b = (train_steps(tmp_path / n / "out") for n in ("one", "two"))
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5) and x["tokens"] == y["tokens"], (a, b)
    for x, y in zip(evals(tmp_path / "one" / "out"), evals(tmp_path / "two" / "out")):
        assert x["eval_teacher_kl"] == pytest.approx(y["eval_teacher_kl"], rel=1e-5), (x, y)
    assert (tmp_path / "two" / "out" / "hf" / "processor_config.json").is_file()
