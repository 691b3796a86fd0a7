"""A tiny Llama saved as a folder, a request batch and the reference hidden states the hf engine must
return."""

from __future__ import annotations

from transformers import AutoModelForCausalLM, LlamaConfig
import pytest
import torch


VOCAB, HIDDEN = 97, 32


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      tie_word_embeddings=False, eos_token_id=2, bos_token_id=1, pad_token_id=0)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    tiny_llama().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same checkpoint loaded in-process: the independent reference forward."""
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def ref_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    """Unpadded single-sequence reference: ``[L, H]`` after the final norm."""
    with torch.no_grad():
        return model.get_decoder()(input_ids=ids[None]).last_hidden_state[0]


def make_batch(lengths, L, left=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), L), -100, dtype=torch.int64)  # pad ids need not be valid tokens
    mask = torch.zeros((len(lengths), L), dtype=torch.int64)
    seqs = []
    for b, n in enumerate(lengths):
        s = torch.randint(3, VOCAB, (n,), generator=g)
        seqs.append(s)
        sl = slice(L - n, L) if left else slice(0, n)
        ids[b, sl], mask[b, sl] = s, 1
    return ids, mask, seqs


def check_update_weights(engine, reference) -> None:
    """A teacher engine takes new weights by name (the norm scaled by 3 scales its states by 3),
    refuses unknown names and wrong shapes with one line each, and serves again once restored."""
    from kdcore.engines import HiddenRequest, TeacherError

    ids, mask, seqs = make_batch([6], 6, seed=5)
    req = HiddenRequest(ids, mask, [[5]])
    norm = reference.model.norm.weight.detach().clone()
    assert engine.update_weights({"model.norm.weight": norm * 3.0}) == 1
    with engine.hidden_states(req) as h:
        torch.testing.assert_close(h[0], 3.0 * ref_hidden(reference, seqs[0])[5], rtol=1e-6, atol=1e-5)
    with pytest.raises(TeacherError, match="no parameter or buffer named model.nope"):
        engine.update_weights({"model.nope": norm})
    with pytest.raises(TeacherError, match="shape mismatch for model.norm.weight"):
        engine.update_weights({"model.norm.weight": norm[:3]})
    assert engine.update_weights({"model.norm.weight": norm}) == 1  # restore; the engine still serves
    with engine.hidden_states(req) as h:
        torch.testing.assert_close(h[0], ref_hidden(reference, seqs[0])[5], rtol=0, atol=1e-5)
