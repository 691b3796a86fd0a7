"""Tiny models, tokenizers and a toy KD loss shared by the student/checkpoint tests and the
scripts they launch (importable both as ``dist_scripts.common`` and, from a script in this
folder, as ``common``)."""

from __future__ import annotations

import torch

VOCAB = 96
HIDDEN = 32


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
              tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(**overrides))
    return model.float()


def tiny_tokenizer(vocab_size: int = VOCAB):
    """A word-level fast tokenizer built in memory (no hub): tokens w0..w{n-4} + specials."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i + 4 for i in range(vocab_size - 4)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def teacher_logits(input_ids: torch.Tensor, seed: int = 123) -> torch.Tensor:
    """A fixed pseudo-teacher: logits [B, L, V] that depend only on the token ids."""
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(VOCAB, VOCAB, generator=g) * 2.0
    return table[input_ids]


def kd_token_losses(h: torch.Tensor, w: torch.Tensor, t_logits: torch.Tensor, mask: torch.Tensor,
                    chunk: int = 5) -> torch.Tensor:
    """Forward KL per masked token, computed chunk by chunk like the loss driver: [n] fp32."""
    hs = h[mask.bool()]
    ts = t_logits[mask.bool()]
    out = []
    for i in range(0, hs.shape[0], chunk):
        s = (hs[i:i + chunk] @ w.T).float()
        p = torch.log_softmax(ts[i:i + chunk].float(), -1)
        q = torch.log_softmax(s, -1)
        out.append((p.exp() * (p - q)).sum(-1))
    return torch.cat(out)
