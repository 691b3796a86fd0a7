"""A cross-tokenizer recipe: a tiny student around Mistral v1's tokenizer taught by a
SmolLM2-vocabulary teacher."""

from __future__ import annotations

from pathlib import Path

from helpers.train import write_recipe


MISTRAL_V1 = "pkg://mistral_common/data/tokenizer.model.v1"


# A tiny student around Mistral v1's tokenizer (32000 ids; <s>=1, </s>=2, <unk>=0 pads: it is
# never an input, while EOS must keep a trainable embedding row).
MISTRAL_STUDENT = {"init": "config", "tokenizer": MISTRAL_V1,
                   "config_overrides": {"vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64,
                                        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                        "head_dim": 8, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                        "initializer_range": 0.02}}  # the tiny teacher's is a wide 0.3


def xtok_recipe(tmp_path: Path, teacher: Path, aligner: str, **sections) -> Path:
    """A cross-tokenizer recipe on the tiny teacher; ``sections`` update the defaults."""
    base = {"student": MISTRAL_STUDENT, "distill": {"loss": "fkl", "aligner": aligner},
            "data": {"limit": 48, "max_length": 64},
            "train": {"max_steps": 6, "micro_batch_size": 2, "grad_accum": 2, "lr": 3e-2, "warmup_steps": 1,
                      "eval_batches": 2, "threads": 1},
            "teacher": {"threads": 1}, "checkpoint": {"every": 0, "export_hf": False}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return write_recipe(tmp_path, teacher, **base)
