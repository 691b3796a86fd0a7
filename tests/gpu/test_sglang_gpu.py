"""The SGLang teacher engine against the hf engine on a real GPU (needs CUDA and sglang==0.5.23)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from helpers.sglang import HAVE_SGLANG, padded_request
from kdcore.engines.sglang.config import SGLangConfig
from kdcore.engines.sglang import teacher as sg_teacher

gpu = pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_SGLANG), reason="needs CUDA and sglang==0.5.23")


@pytest.mark.gpu
@gpu
def test_gpu_sglang_rows_match_hf(tmp_path):  # pragma: no cover - never run on the CPU machines
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdcore.engines.hf import HFTeacher

    cfg = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "m")
    teacher = SimpleNamespace(path=str(tmp_path / "m"), dtype="bfloat16", sglang=SGLangConfig(mem_fraction_static=0.3))
    req = padded_request(vocab=512)
    with sg_teacher.SGLangTeacher(teacher, max_rows=64) as eng, \
            HFTeacher(str(tmp_path / "m"), dtype="bfloat16", device="cuda", max_rows=64) as ref:
        assert eng.info["transport"] == "hook"
        with eng.hidden_states(req) as a, ref.hidden_states(req) as b:
            torch.testing.assert_close(a.float(), b.float(), rtol=0.05, atol=0.05)
