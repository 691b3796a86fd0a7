"""The sglang teacher and rollout engines: everything that does not need SGLang to run.

SGLang never runs in these CPU tests (it needs CUDA and does not install on CPU machines). Where
a test needs what SGLang *hands over* — the ``meta_info.hidden_states`` lists of a ``/generate``
reply, or the ``req`` / ``logits_output`` / capture-mode objects its scheduler passes to
``_append_prefill_hidden_states`` — it builds a small stand-in with the fields and shapes read
from sglang 0.5.23's source. **Those stand-ins are not SGLang**: they only check kdflow's own
bookkeeping against those formats. Hidden states themselves come from real (tiny) transformers
models. The GPU tests at the end run the real thing and are skipped without CUDA + sglang;
checks/gpu/gpu_check.sh part (b) runs the same checks at scale.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from kdcore.recipe.loading import RecipeError, SGLangConfig, load_recipe
from kdcore.engines import HiddenRequest, TeacherError, colocation, create_teacher_engine
from kdcore.engines.sglang import cli as sg_cli
from kdcore.engines.sglang import config as sg_config
from kdcore.engines.sglang import hook as sg_hook
from kdcore.engines.sglang import ipc as sg_ipc
from kdcore.engines.sglang import server as sg_server
from kdcore.engines.sglang import teacher as sg_teacher
from helpers.sglang import HAVE_SGLANG, padded_request

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------- fixtures


def tiny_llama(seed=0, vocab=61, hidden=32, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=64, tie_word_embeddings=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).float().eval()
        with torch.no_grad():  # a non-trivial final norm, so the post-norm check means something
            model.model.norm.weight.copy_(torch.rand(hidden) * 1.5 + 0.25)
    return model


def decoder_states(model, ids, mask):
    """``[B, L, H]`` last hidden states the way the hf engine's child computes them."""
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                   use_cache=False).last_hidden_state


def prompt_states(model, batch):
    """Full ``[len(prompt), H]`` states of each unpadded prompt (what SGLang computes per request)."""
    out = []
    for p in batch.prompts:
        ids = torch.tensor([p])
        out.append(decoder_states(model, ids, torch.ones_like(ids))[0])
    return out


# --------------------------------------------------------------------- imports and refusals


def test_modules_import_without_sglang():
    code = ("import sys, kdcore.engines.sglang.teacher, kdcore.engines.sglang.rollout, kdcore.engines.sglang.cli; "
            "print(sorted(m for m in sys.modules if m == 'sglang' or m.startswith('sglang.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_requesting_sglang_without_gpu_or_install_is_a_clear_error():
    cfg = load_recipe("quickstart", ["teacher.engine=sglang", "teacher.dtype=bfloat16"])
    engine = create_teacher_engine(cfg.teacher, max_rows=64)
    assert isinstance(engine, sg_teacher.SGLangTeacher)  # building is free; start() checks the machine
    if not torch.cuda.is_available():
        expected = "needs a CUDA GPU"
    elif not HAVE_SGLANG:
        expected = "not installed"
    else:
        pytest.skip("CUDA and sglang are present: the GPU tests cover start()")
    with pytest.raises(TeacherError, match=expected):
        engine.start()
    with pytest.raises(TeacherError, match="not started"):
        engine.submit(padded_request())


def test_the_engine_decides_its_slots_and_colocation_from_its_section():
    """Colocated, a whole step (train.grad_accum micro-batches) is computed before the student
    trains, so the engine needs that many slots; otherwise 2 pipeline the two sides."""
    for colocate, grad_accum, slots in ((False, 5, 2), (True, 5, 5), (True, 1, 2)):
        cfg = load_recipe("quickstart", ["teacher.engine=sglang", f"teacher.sglang.colocate={str(colocate).lower()}"])
        engine = create_teacher_engine(cfg.teacher, max_rows=64, micro_batches_per_step=grad_accum)
        assert (engine.colocated, engine.n_slots) == (colocate, slots)
    hf = create_teacher_engine(load_recipe("quickstart").teacher, max_rows=64, micro_batches_per_step=5)
    assert (hf.colocated, hf.n_slots) == (False, 2)


def test_rollout_engine_without_gpu_is_a_clear_error():
    from kdcore.engines import RolloutError, create_rollout_engine

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU tests cover the rollout engine")
    with pytest.raises(RolloutError, match="rollout.engine 'sglang' needs a CUDA GPU"):
        create_rollout_engine("sglang", config=tiny_llama().config, device="cpu")


def test_version_check():
    with pytest.raises(TeacherError, match=r"sglang==0\.5\.23.*not installed.*kdflow\[sglang\]"):
        sg_config.check_version(None)
    with pytest.raises(TeacherError, match=r"written against sglang==0\.5\.23, found 0\.5\.22.*KDFLOW_SGLANG_ANY_VERSION"):
        sg_config.check_version("0.5.22")
    sg_config.check_version("0.5.23")


def test_version_override(monkeypatch):
    monkeypatch.setenv(sg_config.ANY_VERSION_ENV, "1")
    sg_config.check_version("0.6.0")  # tolerated on request
    with pytest.raises(TeacherError, match="not installed"):
        sg_config.check_version(None)  # but never a missing one


def test_pyproject_pins_sglang_and_declares_the_plugin():
    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert meta["optional-dependencies"]["sglang"] == [f"sglang=={sg_config.SGLANG_VERSION}"]
    target = meta["entry-points"]["sglang.srt.plugins"]["kdflow_hidden_states"]
    mod, fn = target.split(":")
    assert getattr(__import__(mod, fromlist=[fn]), fn) is sg_hook.sglang_plugin


def test_plugin_is_inert_without_the_environment_switch(monkeypatch):
    monkeypatch.delenv(sg_config.HOOK_ENV, raising=False)
    sg_hook.sglang_plugin()  # must return before touching sglang (not installed here)
    monkeypatch.setenv(sg_config.HOOK_ENV, "1")
    if not HAVE_SGLANG:  # wrong/missing version: logs and stays off instead of failing the server
        sg_hook.sglang_plugin()
    assert "sglang" not in sys.modules


def test_architecture_check(monkeypatch):
    assert sg_config.check_architecture({"architectures": ["Qwen3ForCausalLM"]}) == "Qwen3ForCausalLM"
    with pytest.raises(TeacherError, match="DeepseekV3ForCausalLM.*pre-norm"):
        sg_config.check_architecture({"architectures": ["DeepseekV3ForCausalLM"]})
    monkeypatch.setenv(sg_config.ANY_ARCH_ENV, "1")
    assert sg_config.check_architecture({"architectures": ["DeepseekV3ForCausalLM"]}) == "DeepseekV3ForCausalLM"


# ------------------------------------------------------------------------------- recipes


def test_recipe_accepts_sglang_options():
    cfg = load_recipe("quickstart", ["teacher.engine=sglang", "teacher.sglang.tp_size=2", "teacher.sglang.dp_size=2",
                                     "teacher.sglang.quantization=fp8", "teacher.sglang.colocate=true",
                                     "teacher.sglang.transport=lists", "teacher.sglang.port=31000",
                                     "teacher.sglang.server_args.attention_backend=triton"])
    s = cfg.teacher.sglang
    assert (s.tp_size, s.dp_size, s.quantization, s.colocate, s.transport, s.port) == (2, 2, "fp8", True, "lists", 31000)
    assert dict(s.server_args) == {"attention_backend": "triton"}


def test_recipe_reports_every_sglang_problem_at_once():
    with pytest.raises(RecipeError) as exc:
        load_recipe("quickstart", ["teacher.engine=sglang", "teacher.device=cpu", "teacher.sglang.tp_size=0",
                                   "teacher.sglang.mem_fraction_static=1.5", "teacher.sglang.quantization=fp9",
                                   "teacher.sglang.transport=hooks", "teacher.sglang.server_url=localhost:30000",
                                   "teacher.sglang.server_args.disable_radix_cache=false",
                                   "teacher.sglang.server_args.tp_size=4"])
    text = str(exc.value)
    for needle in ("teacher.device: 'cpu' cannot run the sglang engine", "teacher.sglang.tp_size: must be >= 1",
                   "mem_fraction_static: must be within (0, 1)", "did you mean 'fp8'",
                   "teacher.sglang.transport: 'hooks' is not one of auto, hook, lists; did you mean 'hook'",
                   "server_url: 'localhost:30000' must start with http://",
                   "server_args.disable_radix_cache: kdflow's hidden-state path needs disable_radix_cache=True",
                   "server_args.tp_size: set it through the recipe"):
        assert needle in text, f"missing: {needle}\n{text}"


def test_sglang_options_are_ignored_for_the_hf_engine():
    load_recipe("quickstart", ["teacher.sglang.quantization=fp9"])  # only checked when engine is sglang


# --------------------------------------------------------------------- requests and rows


def test_build_prompts_against_a_reference():
    req = padded_request()
    req.validate(vocab_size=61)
    batch = sg_teacher.build_prompts(req)
    assert batch.samples == [0, 1, 2, 4]  # sample 3 asks for nothing and is not sent
    assert batch.rows == req.rows == 15
    assert batch.row_offsets == [0, 4, 8, 11]
    for k, b in enumerate(batch.samples):
        real = [j for j in range(req.input_ids.shape[1]) if req.attention_mask[b, j]]
        assert batch.prompts[k] == [int(req.input_ids[b, j]) for j in real]
        assert batch.positions[k] == [real.index(p) for p in req.positions[b]]  # padded -> prompt coordinates


def test_rows_match_the_hf_engine_formula():
    """SGLang computes each unpadded prompt; gathering its rows must give what the hf engine
    writes from the padded batch (position ids = cumsum(mask) - 1, rows in request order)."""
    model = tiny_llama()
    req = padded_request()
    batch = sg_teacher.build_prompts(req)
    got = sg_teacher.reference_rows(prompt_states(model, batch), batch)
    h = decoder_states(model, req.input_ids, req.attention_mask)
    want = h.reshape(-1, h.shape[-1])[req.flat_index()]
    assert got.shape == want.shape == (15, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hook_request_body_is_json_and_carries_the_bookkeeping():
    req = padded_request()
    batch = sg_teacher.build_prompts(req)
    body = sg_teacher.hidden_request_body(batch, transport="hook", dest="HANDLE", slot=1)
    json.dumps(body)  # goes over HTTP as is
    assert body["input_ids"] == batch.prompts and body["return_hidden_states"] is True
    for k, p in enumerate(body["sampling_params"]):
        assert p["max_new_tokens"] == 0  # prefill only
        cp = p["custom_params"]
        assert cp == {sg_hook.K_DEST: "HANDLE", sg_hook.K_SLOT: 1, sg_hook.K_ROW: batch.row_offsets[k], sg_hook.K_SAMPLE: k,
                      sg_hook.K_POS: batch.positions[k], sg_hook.K_LEN: len(batch.prompts[k])}
        # sglang 0.5.23 CustomParamValue: JSON scalars, lists of scalars, dicts of scalars
        assert all(isinstance(v, (str, int)) or (isinstance(v, list) and all(isinstance(x, int) for x in v))
                   for v in cp.values())
    lists = sg_teacher.hidden_request_body(batch, transport="lists")
    assert all(p == {"max_new_tokens": 1, "temperature": 0.0} for p in lists["sampling_params"])
    with pytest.raises(ValueError, match="transport"):
        sg_teacher.hidden_request_body(batch, transport="fast")


def fake_generate_reply(states, *, drop=0):
    """A stand-in (NOT SGLang) for a /generate reply with return_hidden_states and
    max_new_tokens 1: per prompt, meta_info.hidden_states == [prefill block as nested lists]."""
    return [{"output_ids": [0], "meta_info": {"hidden_states": [s[drop:].tolist()], "finish_reason": {"type": "length"}}}
            for s in states]


def test_lists_transport_parses_and_refuses_partial_states():
    model = tiny_llama()
    req = padded_request()
    batch = sg_teacher.build_prompts(req)
    states = prompt_states(model, batch)
    parsed = sg_teacher.parse_lists(fake_generate_reply(states), batch)
    torch.testing.assert_close(sg_teacher.reference_rows(parsed, batch), sg_teacher.reference_rows(states, batch))
    with pytest.raises(TeacherError, match="chunked prefill or a radix-cached prefix"):
        sg_teacher.parse_lists(fake_generate_reply(states, drop=2), batch)
    with pytest.raises(TeacherError, match="no hidden states for prompt 0"):
        sg_teacher.parse_lists([{"meta_info": {}}] * len(states), batch)
    with pytest.raises(TeacherError, match="3 outputs for 4 prompts"):
        sg_teacher.parse_lists(fake_generate_reply(states[:3]), batch)


def test_status_words_explain_failures():
    batch = sg_teacher.build_prompts(padded_request())
    ok = [len(p) for p in batch.positions]
    sg_teacher.check_status(ok, batch)
    cases = [(sg_hook.ST_PENDING, "did not run kdflow's hidden-state hook"), (sg_hook.ST_PARTIAL, "only part of the prompt"),
             (sg_hook.ST_BAD_POSITION, "outside its"), (sg_hook.ST_FAILED, "see the server log"),
             (sg_hook.ST_NOT_FULL, "only the last position"), (2, "wrote 2 rows, 4 were asked for")]
    for code, msg in cases:
        with pytest.raises(TeacherError, match=msg):
            sg_teacher.check_status([ok[0], code, ok[2], ok[3]] if code != 2 else [code, *ok[1:]], batch)


# ----------------------------------------------------------------------- the server hook


class _Mode:
    """Stand-in (NOT SGLang) for sglang's CaptureHiddenMode: is_full / is_last."""

    def __init__(self, kind):
        self.kind = kind

    def is_full(self):
        return self.kind == "full"

    def is_last(self):
        return self.kind == "last"


def run_fake_prefill(batch, states, dest, status, monkeypatch, *, slot=0, extend=None, store=True, mode="full",
                     extra_reqs=()):
    """Drive capture_prefill_hidden the way sglang 0.5.23's process_batch_result_prefill does:
    one call per request, ``hidden_state_offset`` threaded through, ``logits_output.hidden_states``
    the batch's concatenated ``[sum(extend), H]`` states. Stand-ins, not SGLang."""
    monkeypatch.setattr(sg_hook, "_open_destination", lambda payload: (dest, status))
    monkeypatch.setattr(sg_hook, "_writes_output", lambda: True)
    body = sg_teacher.hidden_request_body(batch, transport="hook", dest="HANDLE", slot=slot)
    reqs = [SimpleNamespace(origin_input_ids=list(p), sampling_params=SimpleNamespace(custom_params=cp["custom_params"]))
            for p, cp in zip(batch.prompts, body["sampling_params"])]
    reqs += list(extra_reqs)
    extend = extend or [len(r.origin_input_ids) for r in reqs]
    hidden = torch.cat([s[len(s) - e:] for s, e in zip(list(states) + [torch.zeros(len(r.origin_input_ids), states[0].shape[1])
                                                                    for r in extra_reqs], extend)])
    originals = []

    def original(self, *, req, logits_output, hidden_state_offset, capture_hidden_mode, extend_input_len, store=True):
        originals.append(req)
        return hidden_state_offset + extend_input_len

    offset = 0
    out = SimpleNamespace(hidden_states=hidden)
    for req, e in zip(reqs, extend):
        offset = sg_hook.capture_prefill_hidden(original, object(), req=req, logits_output=out, hidden_state_offset=offset,
                                           capture_hidden_mode=_Mode(mode), extend_input_len=e, store=store)
    return offset, originals, hidden


def test_hook_writes_requested_rows_into_the_slot(monkeypatch):
    model = tiny_llama()
    req = padded_request()
    batch = sg_teacher.build_prompts(req)
    states = prompt_states(model, batch)
    dest = torch.full((2, 40, 32), float("nan"))
    status = torch.full((2, 40), sg_hook.ST_PENDING, dtype=torch.int64)
    other = SimpleNamespace(origin_input_ids=[1, 2, 3], sampling_params=SimpleNamespace(custom_params=None))
    end, originals, hidden = run_fake_prefill(batch, states, dest, status, monkeypatch, slot=1, extra_reqs=[other])
    assert end == hidden.shape[0]  # offsets advance exactly as sglang's own method would
    assert originals == [other]  # requests without kdflow params go to sglang's method untouched
    torch.testing.assert_close(dest[1, :batch.rows], sg_teacher.reference_rows(states, batch), rtol=0, atol=0)
    assert torch.isnan(dest[0]).all() and torch.isnan(dest[1, batch.rows:]).all()  # nothing else touched
    assert status[1, :4].tolist() == [len(p) for p in batch.positions]
    sg_teacher.check_status(status[1, :4].tolist(), batch)


def test_hook_casts_into_a_bf16_slot(monkeypatch):
    model = tiny_llama()
    batch = sg_teacher.build_prompts(padded_request())
    states = prompt_states(model, batch)
    dest = torch.zeros((2, 40, 32), dtype=torch.bfloat16)
    status = torch.full((2, 40), sg_hook.ST_PENDING, dtype=torch.int64)
    run_fake_prefill(batch, states, dest, status, monkeypatch)
    assert torch.equal(dest[0, :batch.rows], sg_teacher.reference_rows(states, batch).to(torch.bfloat16))


def test_hook_flags_partial_prefill_and_skips_discarded_output(monkeypatch):
    model = tiny_llama()
    batch = sg_teacher.build_prompts(padded_request())
    states = prompt_states(model, batch)
    dest = torch.zeros((2, 40, 32))
    status = torch.full((2, 40), sg_hook.ST_PENDING, dtype=torch.int64)
    extend = [len(p) for p in batch.prompts]
    extend[1] -= 3  # a cached prefix / last chunk only
    run_fake_prefill(batch, states, dest, status, monkeypatch, extend=extend)
    assert status[0, 1] == sg_hook.ST_PARTIAL and status[0, 0] == len(batch.positions[0])
    with pytest.raises(TeacherError, match="only part of the prompt"):
        sg_teacher.check_status(status[0, :4].tolist(), batch)
    status.fill_(sg_hook.ST_PENDING)
    end, _, hidden = run_fake_prefill(batch, states, dest, status, monkeypatch, store=False)
    assert end == hidden.shape[0] and (status == sg_hook.ST_PENDING).all()
    end, _, _ = run_fake_prefill(batch, states, dest, status, monkeypatch, mode="last")
    assert end == len(batch.prompts) and (status[0, :4] == sg_hook.ST_NOT_FULL).all()


def test_write_rows_refuses_out_of_range_positions():
    h = torch.randn(5, 8)
    dest = torch.zeros(2, 6, 8)
    status = torch.full((2, 4), sg_hook.ST_PENDING, dtype=torch.int64)
    params = {sg_hook.K_SLOT: 0, sg_hook.K_ROW: 0, sg_hook.K_SAMPLE: 0, sg_hook.K_POS: [0, 5], sg_hook.K_LEN: 5}
    assert sg_hook.write_rows(h, params, 5, dest, status) == sg_hook.ST_BAD_POSITION
    params = {sg_hook.K_SLOT: 0, sg_hook.K_ROW: 4, sg_hook.K_SAMPLE: 1, sg_hook.K_POS: [0, 1, 2], sg_hook.K_LEN: 5}  # past the slot
    assert sg_hook.write_rows(h, params, 5, dest, status) == sg_hook.ST_BAD_POSITION
    assert (dest == 0).all()


# ---------------------------------------------------------------------- post-norm check


def test_post_norm_check_tells_final_norm_output_from_the_residual_stream():
    model = tiny_llama(layers=3)
    ids = torch.randint(0, 61, (2, 10), generator=torch.Generator().manual_seed(1))
    captured = {}
    handle = model.model.norm.register_forward_hook(lambda m, args, out: captured.update(pre=args[0]))
    post = decoder_states(model, ids, torch.ones_like(ids)).reshape(-1, 32)
    handle.remove()
    pre = captured["pre"].reshape(-1, 32) * 4  # the residual stream grows with depth in real models
    w = model.model.norm.weight
    # not exactly 0: eps/(mean(x^2)+eps) with a tiny random model's small activations (~3e-3)
    assert sg_teacher.check_post_norm(post, w) < 1e-2
    assert sg_teacher.check_post_norm(post.to(torch.bfloat16), w) < sg_teacher.POST_NORM_TOL  # bf16 rounding passes
    with pytest.raises(TeacherError, match="not final-norm outputs"):
        sg_teacher.check_post_norm(pre, w)


def test_norm_weight_is_read_alone_from_the_folder(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path)
    torch.testing.assert_close(sg_teacher.load_norm_weight(str(tmp_path)), model.model.norm.weight.detach())
    assert sg_teacher.load_norm_weight(str(tmp_path / "nowhere")) is None


# ----------------------------------------------------------------------- server arguments


def test_teacher_server_arguments():
    s = SGLangConfig(tp_size=2, dp_size=3, mem_fraction_static=0.3, quantization="fp8", colocate=True, base_gpu_id=4,
                     server_args={"attention_backend": "triton"})
    kw = sg_server.server_kwargs(s, model_path="/m", dtype="bfloat16", max_rows=40000, port=31000, seed=7)
    for k, v in sg_config.TEACHER_FIXED_ARGS.items():
        assert kw[k] == v
    assert kw["max_prefill_tokens"] == 40000  # a whole micro-batch in one forward
    assert sg_server.server_kwargs(s, model_path="/m", dtype="bfloat16", max_rows=10, port=1)["max_prefill_tokens"] == 16384
    assert (kw["tp_size"], kw["dp_size"], kw["mem_fraction_static"], kw["quantization"], kw["base_gpu_id"]) == (2, 3, 0.3, "fp8", 4)
    assert kw["enable_memory_saver"] and kw["enable_weights_cpu_backup"]  # the teacher's weights survive sleep
    assert kw["attention_backend"] == "triton" and kw["random_seed"] == 7 and kw["port"] == 31000
    with pytest.raises(TeacherError, match="chunked_prefill_size=-1"):
        sg_server.server_kwargs(SGLangConfig(server_args={"chunked_prefill_size": 8192}), model_path="/m", dtype="bfloat16",
                         max_rows=8, port=1)


def test_rollout_server_arguments():
    kw = sg_server.server_kwargs(SGLangConfig(colocate=True), model_path="/m", dtype="bfloat16", max_rows=0, port=1,
                          role="rollout")
    assert kw["load_format"] == "dummy" and kw["skip_tokenizer_init"]
    assert kw["enable_memory_saver"] and not kw["enable_weights_cpu_backup"]  # the copy is re-synced after wake
    assert not any(k in kw for k in ("enable_return_hidden_states", "disable_radix_cache", "chunked_prefill_size"))


# Names read from sglang 0.5.23's srt/arg_groups/fields/*.py (all have CLI flags there).
SGLANG_0_5_23_FIELDS = {
    "model_path", "host", "port", "dtype", "tp_size", "dp_size", "mem_fraction_static", "base_gpu_id", "random_seed",
    "skip_tokenizer_init", "log_level", "quantization", "enable_memory_saver", "enable_weights_cpu_backup",
    "disable_decode_cuda_graph", "disable_prefill_cuda_graph", "max_prefill_tokens", "enable_return_hidden_states",
    "disable_radix_cache", "chunked_prefill_size", "disable_overlap_schedule", "load_format",
    "enable_deterministic_inference",
}


def test_launch_command_uses_only_known_flags():
    from kdcore.engines.sglang.rollout import ROLLOUT_DEFAULT_ARGS

    for role in ("teacher", "rollout"):
        kw = sg_server.server_kwargs(SGLangConfig(quantization="fp8", colocate=True), model_path="/m", dtype="bfloat16",
                              max_rows=8, port=30001, role=role)
        kw = {**ROLLOUT_DEFAULT_ARGS, **kw} if role == "rollout" else kw
        assert set(kw) <= SGLANG_0_5_23_FIELDS, set(kw) - SGLANG_0_5_23_FIELDS
    argv = sg_server.launch_command({"model_path": "/m", "chunked_prefill_size": -1, "disable_radix_cache": True,
                              "enable_memory_saver": False, "quantization": None, "json_model_override_args": {"a": 1}},
                             python="py")
    assert argv == ["py", "-m", "sglang.launch_server", "--model-path", "/m", "--chunked-prefill-size", "-1",
                    "--disable-radix-cache", "--json-model-override-args", '{"a": 1}']


def test_serve_command_for_a_multi_node_recipe(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "teacher")
    cmd, env = sg_cli.serve_command("quickstart", [f"teacher.path={tmp_path / 'teacher'}", "teacher.engine=sglang",
                                               "teacher.dtype=bfloat16", "teacher.sglang.tp_size=8"], port=30123)
    assert env == {sg_config.HOOK_ENV: "1"}
    text = " ".join(cmd)
    assert "--tp-size 8" in text and "--port 30123" in text and "--disable-radix-cache" in text
    assert f"--model-path {tmp_path / 'teacher'}" in text and "--dtype bfloat16" in text
    printed = subprocess.run([sys.executable, "-m", "kdcore.engines.sglang.cli", "serve", "quickstart",
                              f"teacher.path={tmp_path / 'teacher'}", "teacher.engine=sglang", "--print"],
                             capture_output=True, text=True, timeout=120, cwd=REPO)
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith(f"{sg_config.HOOK_ENV}=1 ") and "sglang.launch_server" in printed.stdout


# ------------------------------------------------------------------------ CUDA IPC payloads


def test_payload_names_devices_by_uuid_and_stays_within_sglangs_allow_list(monkeypatch):
    """torch's CUDA reducer needs a GPU, so its output tuple is stood in (NOT torch's real IPC
    handles): what is checked is kdflow's rewrite of the device and that the pickle only
    references globals sglang 0.5.23's SafeUnpickler admits."""
    import base64
    import io
    import pickle

    from torch.multiprocessing import reductions

    args = (torch.Tensor, torch.Size([2, 3]), (3, 1), 0, torch.storage.TypedStorage, torch.bfloat16, 1,
            b"handle", 24, 0, False, b"/torch_refcount", 0, b"event", True)
    assert sg_ipc.with_device_uuid(args, uuid_of=lambda i: f"GPU-{i}")[6] == "GPU-1"
    t = torch.zeros(2, 3)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(reductions, "reduce_tensor", lambda x: (reductions.rebuild_cuda_tensor, args))
    monkeypatch.setattr(sg_ipc, "_device_uuid", lambda i: f"GPU-uuid-{i}")
    payload = base64.b64decode(sg_ipc.cuda_ipc_payload((t, [("w", t)])))
    seen = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            seen.add((module, name))
            if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
                return lambda *a: ("rebuilt", a)  # no GPU here: keep the arguments instead
            return super().find_class(module, name)

    first, [(name, second)] = Recording(io.BytesIO(payload)).load()
    allowed = {("torch.multiprocessing.reductions", "rebuild_cuda_tensor"), ("torch", "Tensor"), ("torch", "Size"),
               ("torch.storage", "TypedStorage"), ("torch", "bfloat16")}  # from sglang 0.5.23 SafeUnpickler
    assert seen <= allowed, seen - allowed
    assert first[0] == "rebuilt" and first[1][6] == "GPU-uuid-1" and first[1][7] == b"handle"
    assert name == "w" and second == first


def test_payload_refuses_host_tensors():
    with pytest.raises(TeacherError, match="only CUDA tensors"):
        sg_ipc.cuda_ipc_payload([torch.zeros(2)])


# ---------------------------------------------------------------------- sampling requests


def test_sampling_params_and_eos_cut():
    p = sg_server.sampling_params(max_new_tokens=5, temperature=0.7, top_p=0.9, eos_ids=[2, 0, 2], seed=11)
    assert p == {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.9, "top_k": -1, "skip_special_tokens": False,
                 "no_stop_trim": True, "stop_token_ids": [0, 2], "sampling_seed": 11}
    assert sg_server.sampling_params(max_new_tokens=3, temperature=0.0)["ignore_eos"] is True
    assert sg_server.cut_at_eos([5, 6, 2, 7, 2], [2]) == [5, 6, 2]
    assert sg_server.cut_at_eos([5, 6], [2]) == [5, 6]


def test_rollout_generate_body_and_reply():
    from kdcore.engines.sglang.rollout import generate_body, parse_generations

    body = generate_body([[1, 2], [3]], [4, 4, 2, 2], n=2, temperature=1.0, top_p=1.0, eos_ids=[9], seed=100)
    assert body["input_ids"] == [[1, 2], [1, 2], [3], [3]]  # prompt-major
    assert [p["sampling_seed"] for p in body["sampling_params"]] == [100, 101, 102, 103]
    assert [p["max_new_tokens"] for p in body["sampling_params"]] == [4, 4, 2, 2]
    # stand-in (NOT SGLang) replies: output_ids per row, EOS kept (no_stop_trim)
    reply = [{"output_ids": [5, 9, 6]}, {"output_ids": [5, 6, 7, 8, 1]}, {"output_ids": [9]}, {"output_ids": [4, 4]}]
    gens = parse_generations(reply, [4, 4, 2, 2], [9])
    assert [(g.token_ids, g.finished_by_eos) for g in gens] == [([5, 9], True), ([5, 6, 7, 8], False), ([9], True),
                                                                 ([4, 4], False)]


def test_rollout_name_and_shape_checks():
    from kdcore.engines import RolloutError
    from kdcore.engines.sglang.rollout import check_names, expected_tensors

    model = tiny_llama()
    expected = expected_tensors(model.config)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert expected == state
    check_names(state, expected, complete=True)
    with pytest.raises(RolloutError, match="no tensor named model.extra"):
        check_names({**state, "model.extra": (1,)}, expected, complete=True)
    with pytest.raises(RolloutError, match=r"shape mismatch for lm_head.weight \(3, 3\)"):
        check_names({**state, "lm_head.weight": (3, 3)}, expected, complete=True)
    partial = dict(list(state.items())[:3])
    check_names(partial, expected, complete=False)
    with pytest.raises(RolloutError, match="lack"):
        check_names(partial, expected, complete=True)


# ------------------------------------------------------------------ optimizer offload


def test_optimizer_offload_round_trip_keeps_state():
    """The transfer is recorded instead of done (a CPU machine has nowhere to move tensors
    to); the bookkeeping — what moves, where it returns, values intact — is real."""
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    before = {(id(p), k): v.clone() for p, s in opt.state.items() for k, v in s.items()}
    moves = []

    def move(t, d):
        moves.append(d.type)
        return t.clone()

    restore = colocation.offload_optimizer_state(opt, "cuda", move=move)
    assert moves == ["cuda"] * len(before)  # every state tensor (exp_avg, exp_avg_sq, step) of both params
    restore()
    assert moves[len(before):] == ["cpu"] * len(before)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, before[(id(p), k)])
    assert colocation.offload_optimizer_state(opt, "cpu", move=move) is not None and len(moves) == 2 * len(before)  # nothing to move


def test_colocation_phase_orders_sleep_wake_and_offload():
    """A recording engine stands in for the teacher: only the call order is under test."""
    calls = []

    class Recorder:
        def wake(self):
            calls.append("wake")

        def sleep(self):
            calls.append("sleep")

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(1, 2)).sum().backward()
    opt.step()
    col = colocation.Colocation(Recorder(), opt, offload_optimizer=False)
    with col.teacher_phase():
        calls.append("work")
    assert calls == ["wake", "work", "sleep"] and col.phases == 1
    calls.clear()
    with pytest.raises(RuntimeError):
        with col.teacher_phase():
            raise RuntimeError("boom")
    assert calls == ["wake", "sleep"]  # asleep again even when the phase fails


# ------------------------------------------------------------ FSDP2 gather (2 ranks, gloo)


GATHER_SCRIPT = textwrap.dedent('''
    import json, sys, copy
    import torch
    from kdcore.infra import distributed as kdist
    from kdcore.modeling.student import shard_student
    from kdcore.engines.sglang.rollout import iter_full_buckets, gather_full
    from transformers import LlamaConfig, LlamaForCausalLM

    env = kdist.init_distributed("cpu")
    rank = env.rank
    cfg = LlamaConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=37, max_position_embeddings=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).float()
    ref = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shard_student(model, "fp32")
    res = {"rank": rank, "buckets": [], "none_on_others": True, "max_err": 0.0, "names": []}
    bucket_bytes = 6000
    for bucket in iter_full_buckets(model, dst=0, dtype=torch.bfloat16, bucket_bytes=bucket_bytes):
        nbytes = 0
        for name, t in bucket:
            res["names"].append(name)
            if rank == 0:
                assert t.dtype == ref[name].dtype or t.dtype == torch.bfloat16
                err = (t.float() - ref[name].to(torch.bfloat16).float()).abs().max().item()
                res["max_err"] = max(res["max_err"], err)
                nbytes += t.numel() * t.element_size()
            elif t is not None and name.endswith("weight") and t.dim() > 0 and not name.endswith("norm.weight"):
                res["none_on_others"] = False
        res["buckets"].append(nbytes)
    full = {k: gather_full(v, dst=None) for k, v in model.state_dict(keep_vars=True).items()}
    res["allgather_err"] = max((full[k] - ref[k]).abs().max().item() for k in ref)
    res["ref_names"] = list(ref)
    if rank == 0:
        json.dump(res, open(sys.argv[1], "w"))
    kdist.teardown()
''')


def test_bucketed_gather_of_an_fsdp2_student_to_one_rank(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    out = tmp_path / "res.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="kdflow_sglang_ws2_") as d:
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                               str(script), str(out)], capture_output=True, text=True, timeout=240, env=env, cwd=d)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = json.loads(out.read_text())
    assert res["names"] == res["ref_names"]  # every tensor, in state-dict order
    assert res["max_err"] == 0.0  # exact: the bf16 cast happens before the gather on both sides
    assert res["allgather_err"] == 0.0
    assert res["none_on_others"]  # rank 1 never held a full sharded tensor
    assert len(res["buckets"]) > 3 and all(b >= 6000 for b in res["buckets"][:-1])  # bounded buckets
