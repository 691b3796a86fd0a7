"""kdcore eval's batched greedy answers (kdcore.engines.greedy) are transformers' own greedy
answers to each prompt alone, token for token: left padding, the attention mask, the position
ids and the rows that leave the batch early must not change a single token."""

import pytest
import torch

from kdcore.engines.greedy import batch_rows, greedy_answers


def tiny_lm(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def alone(model, prompt, n, eos):
    """transformers' generate on one unpadded prompt, cut after the first stop id."""
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=sorted(eos) or None,
                             pad_token_id=0)
    seq = out[0, len(prompt):].tolist()
    cut = next((i + 1 for i, t in enumerate(seq) if t in eos), len(seq))
    return seq[:cut]


PROMPTS = [[5, 9, 13, 2, 40, 41, 7], [3], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], [60, 61],
           [70, 1, 70, 1, 70], [8, 8, 8, 8]]


@pytest.fixture(scope="module")
def model_and_answers():
    model = tiny_lm()
    return model, [alone(model, p, 12, set()) for p in PROMPTS]


@pytest.mark.parametrize("rows", [3, 6])
def test_batched_answers_equal_each_prompt_alone(rows, model_and_answers):
    model, want = model_and_answers
    assert greedy_answers(model, PROMPTS, max_new_tokens=12, rows=rows, pad_id=0) == want
    assert all(len(a) == 12 for a in want)


def test_rows_stop_at_their_own_eos_and_leave_the_batch():
    model = tiny_lm(1)
    free = [alone(model, p, 16, set()) for p in PROMPTS]
    # a stop id that some answers emit early and others never do: rows leave at different steps
    eos = {free[0][2], free[3][5]}
    want = [alone(model, p, 16, eos) for p in PROMPTS]
    assert len({len(a) for a in want}) > 1  # the test exercises rows leaving early
    done = []
    got = greedy_answers(model, PROMPTS, max_new_tokens=16, eos_ids=sorted(eos), rows=4, pad_id=0,
                         on_batch=lambda n, tokens: done.append((n, tokens)))
    assert got == want
    assert [n for n, _ in done] == [4, 2] and sum(t for _, t in done) == sum(map(len, want))


def test_batch_rows_and_bad_inputs():
    assert batch_rows([100, 20], 28, budget=1280) == 10
    assert batch_rows([5000], 128, at_least=8, budget=1280) == 8
    model = tiny_lm()
    with pytest.raises(ValueError, match="empty prompt"):
        greedy_answers(model, [[1], []], max_new_tokens=3, rows=2)


def test_the_teacher_process_decodes_greedy_requests_the_same_way(model_and_answers):
    """The hf teacher's model (kdcore/engines/hf/model.py, which the child and the inline engine
    call) answers kdcore eval's greedy requests, right-padded as the parent sends them, with the
    batched decoder: generate's tokens."""
    from kdcore.engines.hf.model import generate

    model, want = model_and_answers
    width = max(map(len, PROMPTS))
    ids = torch.zeros((len(PROMPTS), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(PROMPTS):
        ids[b, :len(p)] = torch.tensor(p)
        mask[b, :len(p)] = 1
    kw = {"max_new_tokens": 12, "do_sample": False, "eos_token_id": None, "seed": None}
    assert generate(model, ids, mask, kw, None) == want
