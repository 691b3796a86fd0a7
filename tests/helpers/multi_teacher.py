"""Fixtures for two teachers (one over Mistral v1's vocabulary) and a tiny student, and their
recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from helpers.assets import PYDOC, PYDOC_EVAL, save_tiny_llama


MISTRAL_V1 = "pkg://mistral_common/data/tokenizer.model.v1"


@pytest.fixture(scope="module")
def mistral_teacher(tmp_path_factory) -> Path:
    """A tiny random Llama over Mistral v1's 32000 ids (its tokenizer is given in the recipe)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("mistral_teacher")
    cfg = LlamaConfig(vocab_size=32000, hidden_size=48, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      initializer_range=0.3)
    torch.manual_seed(3)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_student(tmp_path_factory, smollm2_tokenizer) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_student"), smollm2_tokenizer, hidden=32, layers=1,
                           inter=64, seed=5)


def recipe(tmp: Path, student: Path, teachers: list[dict] | None = None, teacher: dict | None = None,
           **sections) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    r = {"student": {"path": str(student)},
         "data": {"train": str(PYDOC), "eval": str(PYDOC_EVAL), "limit": 24, "max_length": 64},
         "distill": {"loss": "fkl"},
         "train": {"output_dir": str(tmp / "out"), "max_steps": 1, "micro_batch_size": 4, "lr": 1e-2,
                   "warmup_steps": 1, "eval_batches": 1, "threads": 1},
         "checkpoint": {"every": 0, "export_hf": False}, "logging": {"progress": False}}
    if teachers is not None:
        r["teachers"] = teachers
    if teacher is not None:
        r["teacher"] = teacher
    for name, values in sections.items():
        r.setdefault(name, {}).update(values)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(r))
    return path


def two_teachers(tiny_teacher, mistral_teacher, wa=0.7, wb=0.3) -> list[dict]:
    return [{"name": "a", "path": str(tiny_teacher), "weight": wa, "threads": 1},
            {"name": "b", "path": str(mistral_teacher), "tokenizer": MISTRAL_V1, "aligner": "overlap",
             "weight": wb, "threads": 1}]
