"""kdflow's SGLang contracts, checked with sglang 0.5.23's own code on CPU (one subprocess).

Run by tests/integration/test_sglang_contracts.py: ``python probe.py OUT.json``. Importing sglang
patches transformers and torch.multiprocessing, so it happens here, never in the pytest process.
Each check builds what kdflow really sends (its own functions, not copies of their output) and
hands it to the sglang code that receives it: the server-args parser, the ``/generate`` JSON
contract gate and request dataclasses, the sampling-params checks, the msgspec/pydantic request
structs, the SafeUnpickler, the plugin loader and HookRegistry, and the scheduler's weight-update
session manager. Results: ``{check: {"ok": bool, "detail": str}}``.

What stands in for what (and so is NOT checked here): no CUDA, so torch's CUDA reducer output
(the tuple of IPC handle fields) is built by hand with torch 2.13's field order, and the
rebuild function records its arguments instead of opening a handle; the scheduler's ``req``
carries only the fields the hook reads; the model runner behind the weight-update manager
records calls; triton and torchvision are inert stubs (stubs/), since their kernels never run.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

HERE = Path(__file__).resolve().parent
RESULTS: dict = {}


def check(name):
    def deco(fn):
        try:
            detail = fn()
            RESULTS[name] = {"ok": True, "detail": str(detail or "")}
        except Exception as exc:  # noqa: BLE001 - every contract is reported, not the first failure only
            RESULTS[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"}
        return fn
    return deco


def import_sglang():
    import importlib.util

    # torch decides once whether triton exists; let it decide "no" before the stubs appear
    import torch._inductor.compile_fx  # noqa: F401

    if importlib.util.find_spec("triton") is None or importlib.util.find_spec("torchvision") is None:
        sys.path.insert(0, str(HERE / "stubs"))
    import sglang.srt.server_args  # noqa: F401


import_sglang()

import torch  # noqa: E402

from kdcore.recipe.loading import SGLangConfig  # noqa: E402
from kdcore.engines import HiddenRequest  # noqa: E402
from kdcore.engines.sglang import config as sg_config  # noqa: E402
from kdcore.engines.sglang import hook as sg_hook  # noqa: E402
from kdcore.engines.sglang import ipc as sg_ipc  # noqa: E402
from kdcore.engines.sglang import server as sg_server  # noqa: E402
from kdcore.engines.sglang import teacher as sg_teacher  # noqa: E402
from kdcore.engines.sglang.rollout import ROLLOUT_DEFAULT_ARGS, generate_body  # noqa: E402

VOCAB = 61
# torch's own rebuild function, taken before sglang's patch replaces the module attribute: what
# the trainer process (which never imports sglang) pickles by reference
from torch.multiprocessing.reductions import rebuild_cuda_tensor as TORCH_REBUILD_CUDA_TENSOR  # noqa: E402


# ------------------------------------------------------------------------------ launch commands


def kdflow_launch_kwargs() -> dict[str, dict]:
    """Every kind of server kdflow starts, with the options that change its arguments."""
    out = {}
    for name, scfg, role in [
        ("teacher", SGLangConfig(), "teacher"),
        ("teacher_colocated_fp8_tp2", SGLangConfig(tp_size=2, dp_size=2, quantization="fp8", colocate=True,
                                                   mem_fraction_static=0.3, base_gpu_id=1), "teacher"),
        ("teacher_server_args", SGLangConfig(server_args={"attention_backend": "triton", "dllm_fdfo": False,
                                                          "disable_decode_cuda_graph": False,
                                                          "enable_deterministic_inference": True}), "teacher"),
        ("rollout", SGLangConfig(), "rollout"),
        ("rollout_colocated_nondeterministic", SGLangConfig(colocate=True,
                                                            server_args={"enable_deterministic_inference": False}),
         "rollout"),
    ]:
        kw = sg_server.server_kwargs(scfg, model_path="/models/teacher", dtype="bfloat16", max_rows=40000, port=31234,
                                     seed=7, role=role)
        if role == "rollout":  # exactly as SGLangRolloutEngine builds it
            kw = {**ROLLOUT_DEFAULT_ARGS, **kw}
            kw.update(dict(scfg.server_args or {}))
        out[name] = kw
    return out


@check("launch_commands_parse")
def _launch():
    import argparse

    from sglang.srt.server_args import ServerArgs, prepare_server_args

    seen = []
    for name, kw in kdflow_launch_kwargs().items():
        argv = sg_server.launch_command(kw)
        assert argv[1:3] == ["-m", "sglang.launch_server"], argv[:3]
        try:
            args = prepare_server_args(argv[3:])
        except SystemExit as exc:
            raise AssertionError(f"{name}: sglang's parser rejected {' '.join(argv[3:])} (exit {exc.code})")
        for k, v in kw.items():
            got = getattr(args, k)
            if v is False and got is None:
                got = False  # a store_true flag left out is False in sglang
            assert got == v, f"{name}: {k}={v!r} was sent, sglang parsed {got!r} (argv: {' '.join(argv[3:])})"
        seen.append(f"{name}: {len(kw)} args")
    # the negatable-flag table kdflow keeps equals sglang's parser
    p = argparse.ArgumentParser()
    ServerArgs.add_cli_args(p)
    negatable = {a.dest for a in p._actions if isinstance(a, argparse.BooleanOptionalAction)}
    assert negatable == set(sg_config.SGLANG_NEGATABLE_FLAGS), (
        f"sglang's negatable flags changed: new {sorted(negatable - sg_config.SGLANG_NEGATABLE_FLAGS)}, "
        f"gone {sorted(sg_config.SGLANG_NEGATABLE_FLAGS - negatable)}")
    true_by_default = [a.dest for a in p._actions if isinstance(a, argparse._StoreTrueAction) and a.default]
    assert not true_by_default, f"store_true flags that default to True (False cannot be sent): {true_by_default}"
    return "; ".join(seen)


@check("fixed_server_args_exist")
def _fixed_args():
    from sglang.srt.arg_groups.arg_utils import record_fields
    from sglang.srt.arg_groups.choices import QUANTIZATION_CHOICES
    from sglang.srt.server_args import ServerArgs

    fields = {f.name: f for f in record_fields(ServerArgs)}
    names = set(sg_config.TEACHER_FIXED_ARGS) | set(sg_config.TEACHER_DEFAULT_ARGS) | set(ROLLOUT_DEFAULT_ARGS) | {
        "enable_memory_saver", "enable_weights_cpu_backup", "load_format", "max_prefill_tokens", "random_seed",
        "log_level", "base_gpu_id", "mem_fraction_static", "skip_tokenizer_init"}
    missing = sorted(names - set(fields))
    assert not missing, f"ServerArgs has no {missing}"
    assert fields["max_prefill_tokens"].default == sg_config.MIN_PREFILL_TOKENS, fields["max_prefill_tokens"]
    assert set(QUANTIZATION_CHOICES) == set(sg_config.SGLANG_QUANTIZATIONS), (
        f"quantizations: new {sorted(set(QUANTIZATION_CHOICES) - set(sg_config.SGLANG_QUANTIZATIONS))}, "
        f"gone {sorted(set(sg_config.SGLANG_QUANTIZATIONS) - set(QUANTIZATION_CHOICES))}")
    return f"{len(names)} argument names, {len(QUANTIZATION_CHOICES)} quantizations"


# ------------------------------------------------------------------------------ request bodies


def padded_request():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, 9:] = 0
    return HiddenRequest(ids, mask, [[0, 3, 11, 5], [4, 11, 7, 7], [], [2, 11, 7, 3]])


def kdflow_generate_bodies() -> dict[str, dict]:
    batch = sg_teacher.build_prompts(padded_request())
    fake_dest = base64.b64encode(b"\x80\x04payload").decode()
    bodies = {"teacher_hook": sg_teacher.hidden_request_body(batch, transport="hook", dest=fake_dest, slot=1),
              "teacher_lists": sg_teacher.hidden_request_body(batch, transport="lists")}
    # SGLangTeacher.generate's body (SeqKD), with and without EOS ids
    for tag, eos in (("teacher_generate_eos", [2, 0]), ("teacher_generate", [])):
        params = [sg_server.sampling_params(max_new_tokens=5, temperature=0.7, top_p=0.9, top_k=20, eos_ids=eos,
                                            seed=3 + i) for i in range(2)]
        if not eos:
            for p in params:
                p.pop("ignore_eos", None)
        bodies[tag] = {"input_ids": [[1, 2, 3], [4, 5]], "sampling_params": params}
    bodies["rollout"] = generate_body([[1, 2], [3]], [4, 4, 2, 2], n=2, temperature=1.0, top_p=0.95, eos_ids=[9],
                                      seed=100)
    bodies["rollout_greedy_no_eos"] = generate_body([[5, 6, 7]], [3], n=1, temperature=0.0, top_p=1.0, eos_ids=[],
                                                    seed=None)
    return bodies


@check("generate_bodies_pass_sglang_checks")
def _generate():
    import pydantic

    from sglang.srt.entrypoints.api_contract import generate_contract_error
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.sampling.sampling_params import TOP_K_ALL, SamplingParams

    fields = set(GenerateReqInput.__dataclass_fields__)
    adapter = pydantic.TypeAdapter(GenerateReqInput)
    done = []
    for name, body in kdflow_generate_bodies().items():
        unknown = set(body) - fields
        assert not unknown, f"{name}: GenerateReqInput has no {sorted(unknown)} (FastAPI would drop them silently)"
        err = generate_contract_error(json.loads(json.dumps(body)))
        assert err is None, f"{name}: sglang's /generate contract gate refuses the body: {err}"
        obj = adapter.validate_json(json.dumps(body))  # what FastAPI does with the request body
        obj.normalize_batch_and_arguments()
        n = len(body["input_ids"])
        assert obj.batch_size == n and not obj.is_single, f"{name}: sglang sees batch {obj.batch_size}, sent {n}"
        for i in range(n):
            item = obj[i]
            assert list(item.input_ids) == body["input_ids"][i], f"{name}[{i}]: prompt changed"
            sp = SamplingParams(**item.sampling_params)  # as TokenizerManager._create_tokenized_object
            sp.normalize(None)
            sp.verify(VOCAB)
            sent = body["sampling_params"][i]
            for k, v in sent.items():
                got = getattr(sp, k)
                if k == "temperature" and v == 0.0:  # sglang's greedy: temperature 1, top_k 1
                    got, v = (got, sp.top_k), (1.0, 1)
                elif k == "top_k" and sent.get("temperature") == 0.0:
                    continue
                elif k == "top_k" and v == -1:  # sglang's "no cut"
                    v = TOP_K_ALL
                if isinstance(got, set):  # stop_token_ids: sglang keeps a set
                    v = set(v)
                assert got == v, f"{name}[{i}]: sampling param {k}={v!r} arrived as {got!r}"
            if body.get("return_hidden_states"):
                assert item.return_hidden_states is True, f"{name}[{i}]: return_hidden_states lost"
        done.append(name)
    return ", ".join(done)


@check("admin_bodies_pass_sglang_structs")
def _admin():
    import pydantic

    from sglang.srt.managers import io_struct as io

    payload = base64.b64encode(b"\x80\x04N.").decode()
    cases = {
        "/update_weights_from_tensor": (io.UpdateWeightsFromTensorReqInput,
                                        sg_ipc.update_weights_body([payload, payload], flush_cache=False)),
        "/begin_weight_update": (io.BeginWeightUpdateReqInput, {}),
        "/end_weight_update": (io.EndWeightUpdateReqInput, {}),
        "/release_memory_occupation": (io.ReleaseMemoryOccupationReqInput, {"tags": None}),
        "/resume_memory_occupation": (io.ResumeMemoryOccupationReqInput, {"tags": None}),
    }
    for path, (cls, body) in cases.items():
        import msgspec

        names = {f.name for f in msgspec.structs.fields(cls)}
        unknown = set(body) - names
        assert not unknown, f"{path}: {cls.__name__} has no {sorted(unknown)} (ignored silently by sglang)"
        obj = pydantic.TypeAdapter(cls).validate_json(json.dumps(body))
        for k, v in body.items():
            got = getattr(obj, k)
            if k == "serialized_named_tensors":
                v = [base64.b64decode(x) for x in v]
            assert got == v, f"{path}: {k} arrived as {got!r}"
    return ", ".join(cases)


# ------------------------------------------------------------------------------ CUDA IPC payload


def cuda_reduce_args(t: torch.Tensor, device_index: int) -> tuple:
    """The 15 fields torch 2.13's ``reduce_tensor`` returns for a CUDA tensor (stand-in values
    for the handles: there is no GPU here), in its order and with its types."""
    return (type(t), t.size(), t.stride(), 0, torch.storage.TypedStorage, t.dtype, device_index, b"cudaIpcHandle",
            t.numel() * t.element_size(), 0, t.requires_grad, b"/torch_refcount_1", 0, b"cudaEventHandle", True)


def sglang_server_rebuild(record):
    """The server's rebuild path: sglang's patched reductions (UUID -> index), CUDA stood in."""
    from contextlib import ExitStack
    from unittest import mock

    from torch.multiprocessing import reductions

    from sglang.srt.utils import patch_torch

    patch_torch.monkey_patch_torch_reductions()
    props = {i: SimpleNamespace(uuid=f"GPU-uuid-{i}") for i in range(3)}
    stack = ExitStack()
    # the server process imported sglang: its patched rebuild is what the pickle's name resolves to
    stack.enter_context(mock.patch.object(reductions, "rebuild_cuda_tensor", patch_torch._rebuild_cuda_tensor_modified))
    stack.enter_context(mock.patch.object(reductions, "_rebuild_cuda_tensor_original", record))
    stack.enter_context(mock.patch.object(torch.cuda, "device_count", lambda: 3))
    stack.enter_context(mock.patch.object(torch.cuda, "get_device_properties", lambda i: props[i]))
    return stack


def fake_cuda_push(device_index: int = 0):
    """push_weights with the CUDA parts stood in (no GPU): the reducer, the device, the sync."""
    from contextlib import ExitStack
    from unittest import mock

    from torch.multiprocessing import reductions

    stack = ExitStack()
    # the trainer process never imports sglang: torch's own rebuild function is what it pickles
    stack.enter_context(mock.patch.object(reductions, "rebuild_cuda_tensor", TORCH_REBUILD_CUDA_TENSOR))
    stack.enter_context(mock.patch.object(torch.Tensor, "is_cuda", property(lambda self: True)))
    stack.enter_context(mock.patch.object(reductions, "reduce_tensor",
                                          lambda x: (TORCH_REBUILD_CUDA_TENSOR, cuda_reduce_args(x, device_index))))
    stack.enter_context(mock.patch.object(sg_ipc, "_device_uuid", lambda i: f"GPU-uuid-{i}"))
    stack.enter_context(mock.patch.object(torch.cuda, "synchronize", lambda *a: None))
    return stack


@check("ipc_payload_passes_safe_unpickler")
def _ipc():
    from sglang.srt.utils import MultiprocessingSerializer

    weights = [("model.layers.0.mlp.up_proj.weight", torch.zeros(4, 3, dtype=torch.bfloat16)),
               ("model.embed_tokens.weight", torch.zeros(5, 3, dtype=torch.bfloat16))]
    dest = (torch.zeros(2, 8, 3, dtype=torch.bfloat16), torch.zeros(2, 8, dtype=torch.int64))
    with fake_cuda_push(device_index=1):
        weight_payload = sg_ipc.cuda_ipc_payload([(n, t) for n, t in weights])
        dest_payload = sg_ipc.cuda_ipc_payload(dest)
    rebuilt = []

    def record(*args):
        rebuilt.append(args)
        return ("tensor", args[1], args[5], args[6])

    # the server side: sglang's patched reductions (UUID -> this process's index), its SafeUnpickler
    with sglang_server_rebuild(record):
        named = MultiprocessingSerializer.deserialize(weight_payload)  # what deserialize_own_rank does
        handles = MultiprocessingSerializer.deserialize(dest_payload)  # what the hook does
    assert [n for n, _ in named] == [n for n, _ in weights], named
    assert all(t[0] == "tensor" and t[3] == 1 for _, t in named), named  # UUID mapped back to index 1
    assert named[0][1][1] == torch.Size([4, 3]) and named[0][1][2] == torch.bfloat16
    assert isinstance(handles, tuple) and len(handles) == 2 and handles[1][2] == torch.int64
    # a payload naming anything outside the allow-list is refused (the check has teeth)
    import pickle

    try:
        MultiprocessingSerializer.deserialize(base64.b64encode(pickle.dumps(os.system)).decode())
    except RuntimeError as exc:
        assert "Blocked unsafe global" in str(exc)
    else:
        raise AssertionError("sglang's SafeUnpickler admitted os.system: the check is not sglang's")
    return f"{len(rebuilt)} tensors rebuilt through sglang's patched rebuild_cuda_tensor"


# ------------------------------------------------------------------------------ the hook


@check("hook_registers_and_writes_rows")
def _hook():
    import io as _io

    from sglang.srt import plugins
    from sglang.srt.layers.logits_processor import LogitsProcessorOutput
    from sglang.srt.managers.scheduler_components import batch_result_processor as brp
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode
    from sglang.srt.plugins.hook_registry import HookRegistry

    stream = _io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    os.environ[sg_config.HOOK_ENV] = "1"
    original = brp.SchedulerBatchResultProcessor._append_prefill_hidden_states
    try:
        plugins.load_plugins()  # sglang's own loader: entry point discovery, HookRegistry, apply_hooks
    finally:
        root.removeHandler(handler)
    log_text = stream.getvalue()
    wrapped = brp.SchedulerBatchResultProcessor._append_prefill_hidden_states
    assert wrapped is not original and getattr(wrapped, "__wrapped__", None) is original, (
        f"the hook was not applied; sglang's log:\n{log_text[-2000:]}")
    assert "kdflow_hidden_states" in log_text and sg_hook.ACTIVE_LINE in log_text, log_text[-2000:]
    assert "Applied 1 hook(s)" in log_text, log_text[-2000:]

    # kdflow's requests: rows gathered into the slot; the real (wrapped) method, real capture mode
    H = 6
    g = torch.Generator().manual_seed(1)
    batch = sg_teacher.build_prompts(padded_request())
    body = sg_teacher.hidden_request_body(batch, transport="hook", dest="HANDLE", slot=1)
    dest = torch.zeros(2, 32, H)
    status = torch.full((2, 8), sg_hook.ST_PENDING, dtype=torch.int64)
    sg_hook._open_destination = lambda payload: (dest, status)
    states = [torch.randn(len(p), H, generator=g) for p in batch.prompts]
    plain = SimpleNamespace(origin_input_ids=[1, 2, 3], return_hidden_states=True, hidden_states=[],
                            sampling_params=SimpleNamespace(custom_params=None))
    reqs = [SimpleNamespace(origin_input_ids=list(p), return_hidden_states=True, hidden_states=[],
                            sampling_params=SimpleNamespace(custom_params=sp["custom_params"]))
            for p, sp in zip(batch.prompts, body["sampling_params"])] + [plain]
    plain_states = torch.randn(3, H, generator=g)
    out = LogitsProcessorOutput(next_token_logits=torch.zeros(len(reqs), VOCAB),
                                hidden_states=torch.cat(states + [plain_states]))
    offset = 0
    proc = object.__new__(brp.SchedulerBatchResultProcessor)
    for r in reqs:
        offset = proc._append_prefill_hidden_states(req=r, logits_output=out, hidden_state_offset=offset,
                                                    capture_hidden_mode=CaptureHiddenMode.FULL,
                                                    extend_input_len=len(r.origin_input_ids), store=True)
    assert offset == out.hidden_states.shape[0], (offset, out.hidden_states.shape)
    expected = sg_teacher.reference_rows(states, batch)
    assert torch.equal(dest[1, :batch.rows], expected), "rows in the slot differ from the requested positions"
    assert status[1, :len(batch.prompts)].tolist() == [len(p) for p in batch.positions], status[1]
    assert all(not r.hidden_states for r in reqs[:-1]), "kdflow requests must not store states in sglang"
    assert len(plain.hidden_states) == 1 and torch.tensor(plain.hidden_states[0]).allclose(plain_states), (
        "a request without kdflow's params must go through sglang's original method")
    # only attention-TP rank 0 writes: the name kdflow reads exists in sglang's parallel context
    from sglang.srt.runtime_context import get_parallel

    with get_parallel().override(attn_tp_rank=1, attn_tp_size=2):
        assert sg_hook._writes_output() is False, "a TP rank other than 0 would write rows too"
    with get_parallel().override(attn_tp_rank=0, attn_tp_size=2):
        assert sg_hook._writes_output() is True
    HookRegistry.reset()
    return f"{batch.rows} rows of {len(batch.prompts)} prompts; log: {sg_hook.ACTIVE_LINE!r}, 'Applied 1 hook(s)'"


@check("hook_module_imports_no_kdcore")
def _hook_light():
    import subprocess

    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('kdcore', 'omegaconf', 'pluggy', 'yaml', 'transformers'):\n"
            "            raise ImportError('blocked: ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "from importlib.metadata import entry_points\n"
            "ep = [e for e in entry_points(group='sglang.srt.plugins') if e.name == 'kdflow_hidden_states'][0]\n"
            "fn = ep.load()\n"
            "print(fn.__module__, sorted(m.split('.')[0] for m in sys.modules if m.startswith('kdflow')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, f"the entry point does not load without kdcore/omegaconf/pluggy:\n{out.stderr[-2000:]}"
    return out.stdout.strip()


# ------------------------------------------------------------------------------ weight-update session


class Recorder:
    def __init__(self):
        self.calls = []


def scheduler_manager(rec: Recorder):
    """sglang's real SchedulerWeightUpdaterManager; the model runner behind it records calls."""
    from unittest import mock

    from sglang.srt.managers.scheduler_components import weight_updater as wu
    from sglang.srt.utils import MultiprocessingSerializer

    runner = SimpleNamespace(weight_updater=SimpleNamespace(
        begin_weight_update=lambda: rec.calls.append("runner.begin"),
        end_weight_update=lambda run_post_load: rec.calls.append(f"runner.end(post_load={run_post_load})"),
        update_weights_from_tensor=lambda named_tensors, load_format: (
            rec.calls.append(f"runner.load({[n for n, _ in named_tensors]})"), (True, "Success"))[1]))

    def deserialize_own_rank(payloads):  # tp_worker.deserialize_own_rank, tp rank 0
        with sglang_server_rebuild(lambda *a: ("tensor", a[1])):
            return MultiprocessingSerializer.deserialize(payloads[0])

    tp_worker = SimpleNamespace(weight_update_runners=lambda: [("target", runner)],
                                deserialize_own_rank=deserialize_own_rank)
    with mock.patch.object(wu, "get_parallel", lambda: SimpleNamespace(tp_group=SimpleNamespace(cpu_group=None))):
        mgr = wu.SchedulerWeightUpdaterManager(
            tp_worker=tp_worker, draft_worker=None, memory_saver_adapter=None,
            flush_cache=lambda empty_cache=False: rec.calls.append("scheduler.flush") or True,
            is_fully_idle=lambda **k: True,
            scheduler=SimpleNamespace(record_weight_version_change=lambda new_version: None))
    return mgr


def serve(mgr, rec: Recorder):
    """An HTTP server answering like sglang 0.5.23's http_server.py for the routes kdflow uses,
    each handled by the real manager (request JSON validated into sglang's own structs)."""
    import pydantic

    from sglang.srt.managers import io_struct as io

    routes = {"/begin_weight_update": (io.BeginWeightUpdateReqInput, mgr.begin_weight_update),
              "/end_weight_update": (io.EndWeightUpdateReqInput, mgr.end_weight_update),
              "/update_weights_from_tensor": (io.UpdateWeightsFromTensorReqInput, mgr.update_weights_from_tensor)}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            rec.calls.append(self.path)
            if self.path == "/flush_cache":  # fastapi Response(content=str): text, no JSON
                text = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or "
                        "waiting requests, the operation will not be performed.)\n").encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
                return
            cls, fn = routes[self.path]
            with __import__("unittest").mock.patch.object(torch.distributed, "barrier", lambda *a, **k: None):
                ret = fn(pydantic.TypeAdapter(cls).validate_json(raw or b"{}"))
            data = json.dumps({"success": ret.success, "message": ret.message}).encode()
            self.send_response(200 if ret.success else 400)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd, sg_server.SGLangServer(f"http://127.0.0.1:{httpd.server_port}")


@check("weight_update_order_matches_sglang")
def _weights():
    from kdcore.engines.sglang.rollout import SGLangRolloutEngine

    rec = Recorder()
    mgr = scheduler_manager(rec)
    httpd, server = serve(mgr, rec)
    try:
        sd = {"a.weight": torch.zeros(2, 2), "b.weight": torch.zeros(3)}
        # the teacher's update_weights: one push in its own session
        with fake_cuda_push():
            n = sg_ipc.push_weights(server, sd, tp_size=1, device=torch.device("cpu"), dtype=torch.float32,
                                    lock=threading.Lock())
        assert n == 2
        teacher_calls = list(rec.calls)
        assert teacher_calls == ["/begin_weight_update", "runner.begin", "/update_weights_from_tensor",
                                 "runner.load(['a.weight', 'b.weight'])", "scheduler.flush", "/end_weight_update",
                                 "runner.end(post_load=False)"], teacher_calls
        # the rollout engine's sync: one session around every bucket, then a flush (plain-text reply)
        rec.calls.clear()
        eng = object.__new__(SGLangRolloutEngine)
        eng.server, eng.leader, eng._lock, eng.scfg = server, True, threading.Lock(), SGLangConfig()
        eng.device, eng.dtype, eng.bucket_bytes = torch.device("cpu"), torch.float32, 1
        eng.expected = {k: tuple(v.shape) for k, v in sd.items()}
        with fake_cuda_push():
            eng.update_weights(sd)
        rollout_calls = list(rec.calls)
        assert rollout_calls == ["/begin_weight_update", "runner.begin", "/update_weights_from_tensor",
                                 "runner.load(['a.weight'])", "/update_weights_from_tensor", "runner.load(['b.weight'])",
                                 "/end_weight_update", "runner.end(post_load=False)", "/flush_cache"], rollout_calls
        assert mgr._session is None, "kdflow left a weight-update session open"
        # a push that fails mid-session still closes it, so the next begin works
        rec.calls.clear()
        with fake_cuda_push():
            try:
                with sg_server.weight_update_session(server):
                    raise RuntimeError("bucket failed")
            except RuntimeError:
                pass
        assert mgr._session is None and rec.calls[-1] == "runner.end(post_load=True)", rec.calls
        # without a session sglang refuses, and kdflow reports it in one line
        try:
            with fake_cuda_push():
                sg_ipc.push_weights(server, sd, tp_size=1, device=torch.device("cpu"), dtype=torch.float32,
                                    session=False)
        except sg_server.ServerError as exc:
            assert "must run between begin_weight_update() and end_weight_update()" in str(exc), exc
        else:
            raise AssertionError("sglang's manager accepted an update outside a session")
    finally:
        httpd.shutdown()
    return f"teacher: {teacher_calls}; rollout: {rollout_calls}"


@check("flush_reply_parsed")
def _flush():
    rec = Recorder()
    httpd, server = serve(scheduler_manager(rec), rec)
    try:
        text = sg_server.flush_cache(server)
    finally:
        httpd.shutdown()
    assert text.startswith("Cache flushed."), text
    return text.splitlines()[0]


@check("hidden_state_reply_fields")
def _reply():
    """The fields parse_lists and the rollout read exist in sglang's output path."""
    src = Path(sys.modules["sglang.srt.managers.scheduler_components.batch_result_processor"].__file__).read_text()
    assert "req.hidden_states.append(req_hidden_states.cpu().clone().tolist())" in src
    import sglang

    tsrc = (Path(sglang.__file__).parent / "srt" / "managers" / "tokenizer_manager.py").read_text()
    assert '"hidden_states"' in tsrc and '"output_ids"' in tsrc, "meta_info.hidden_states / output_ids moved"
    return "meta_info.hidden_states, output_ids"


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(RESULTS, indent=1))
    print(json.dumps({k: v["ok"] for k, v in RESULTS.items()}))
