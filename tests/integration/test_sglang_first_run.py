"""What would have broken the first GPU run of the sglang engines (issue 27), without sglang.

Each test failed before its fix. The HTTP peers here are small local servers that answer the
way sglang 0.5.23's http_server.py does for the routes in question (a JSON ``{"success",
"message"}`` with HTTP 400 on refusal; ``/flush_cache`` plain text without a content type); they
are stand-ins, NOT SGLang: tests/integration/test_sglang_contracts.py drives the same client
code against sglang's own session manager.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from kdcore.engines import TeacherError, colocation
from kdcore.engines.sglang import config as sg_config
from kdcore.engines.sglang import ipc as sg_ipc
from kdcore.engines.sglang import server as sg_server
from kdcore.engines.sglang import teacher as sg_teacher

REPO = Path(__file__).resolve().parents[2]
FLUSH_TEXT = ("Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
              "requests, the operation will not be performed.)\n")


@contextmanager
def session_server():
    """Records the paths; refuses an update outside begin/end like sglang's manager does."""
    calls: list[str] = []
    state = {"open": False}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def reply(self, code, data: bytes, kind=None):
            self.send_response(code)
            if kind:
                self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            calls.append(self.path)
            if self.path == "/flush_cache":
                return self.reply(200, FLUSH_TEXT.encode())
            ok, msg = True, "Success"
            if self.path == "/begin_weight_update":
                ok, msg = (not state["open"], "a weight-update session is already open")
                state["open"] = True
            elif self.path == "/end_weight_update":
                ok, msg = (state["open"], "no weight-update session is open")
                state["open"] = False
            elif self.path == "/update_weights_from_tensor" and not state["open"]:
                ok, msg = False, ("update_weights_from_tensor must run between begin_weight_update() and "
                                  "end_weight_update()")
            body = json.dumps({"success": ok, "message": msg if not ok else "Success"}).encode()
            self.reply(200 if ok else 400, body, "application/json")

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield sg_server.SGLangServer(f"http://127.0.0.1:{httpd.server_port}"), calls, state
    finally:
        httpd.shutdown()


@pytest.fixture
def fake_cuda(monkeypatch):
    """No GPU: torch's CUDA reducer and the device sync are stood in; the payload is still built."""
    from torch.multiprocessing import reductions

    args = lambda t: (torch.Tensor, t.size(), t.stride(), 0, torch.storage.TypedStorage, t.dtype, 0, b"h",  # noqa: E731
                      t.numel() * t.element_size(), 0, False, b"/r", 0, b"e", True)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(reductions, "reduce_tensor", lambda t: (reductions.rebuild_cuda_tensor, args(t)))
    monkeypatch.setattr(sg_ipc, "_device_uuid", lambda i: f"GPU-{i}")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)


# ------------------------------------------------------------------ 1. weight-update sessions


def test_teacher_weight_push_opens_and_closes_a_session(fake_cuda):
    with session_server() as (server, calls, state):
        n = sg_ipc.push_weights(server, {"w": torch.zeros(2)}, tp_size=2, device=torch.device("cpu"),
                                dtype=torch.float32, lock=threading.Lock())
    assert n == 1
    assert calls == ["/begin_weight_update", "/update_weights_from_tensor", "/end_weight_update"]
    assert not state["open"]


def test_rollout_sync_is_one_session_then_a_flush(fake_cuda):
    from kdcore.engines.sglang.rollout import SGLangRolloutEngine

    sd = {"a": torch.zeros(4), "b": torch.zeros(3), "c": torch.zeros(2)}
    with session_server() as (server, calls, state):
        eng = object.__new__(SGLangRolloutEngine)  # no GPU: the engine's fields, not its server start
        eng.server, eng.leader, eng._lock, eng.scfg = server, True, threading.Lock(), sg_config.SGLangConfig()
        eng.device, eng.dtype, eng.bucket_bytes = torch.device("cpu"), torch.float32, 1
        eng.expected = {k: tuple(v.shape) for k, v in sd.items()}
        assert eng.update_weights(sd) == 3
    assert calls == ["/begin_weight_update"] + ["/update_weights_from_tensor"] * 3 + ["/end_weight_update",
                                                                                    "/flush_cache"]
    assert not state["open"]


def test_a_failed_push_still_closes_the_session(fake_cuda):
    with session_server() as (server, calls, state):
        with pytest.raises(RuntimeError, match="gather failed"):
            with sg_server.weight_update_session(server):
                raise RuntimeError("gather failed")
        assert not state["open"] and calls == ["/begin_weight_update", "/end_weight_update"]
        # and a refusal is one line naming what sglang said
        with pytest.raises(sg_server.ServerError, match="must run between begin_weight_update"):
            sg_ipc.push_weights(server, {"w": torch.zeros(2)}, tp_size=1, device=torch.device("cpu"),
                                dtype=torch.float32, session=False)


# ------------------------------------------------------------------ 2. /flush_cache answers text


def test_flush_cache_plain_text_reply_is_not_json_decoded():
    with session_server() as (server, calls, _):
        assert sg_server.http_json(server.url, "/flush_cache", {}) == FLUSH_TEXT
        assert sg_server.flush_cache(server).startswith("Cache flushed.")
        assert sg_server.http_json(server.url, "/begin_weight_update", {}) == {"success": True, "message": "Success"}


# ------------------------------------------------------------------ 3. the hook without kdcore


BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('kdcore', 'omegaconf', 'pluggy', 'yaml'):
            raise ImportError('not in an SGLang environment: ' + name)
sys.meta_path.insert(0, Block())
from importlib.metadata import entry_points
ep = [e for e in entry_points(group='sglang.srt.plugins') if e.name == 'kdflow_hidden_states'][0]
fn = ep.load()
fn()  # KDFLOW_SGLANG_HOOK unset: inert, but it ran
print(ep.value)
"""


def test_hook_entry_point_loads_with_only_stdlib_and_torch():
    out = subprocess.run([sys.executable, "-c", BLOCKER], capture_output=True, text=True, timeout=120, cwd="/")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "kdflow_sglang_plugin:sglang_plugin"


def test_hook_module_and_kdcore_name_are_one_module_with_the_same_constants():
    import kdflow_sglang_plugin

    from kdcore.engines.sglang import hook

    assert hook is kdflow_sglang_plugin
    assert (hook.HOOK_ENV, hook.SGLANG_VERSION) == (sg_config.HOOK_ENV, sg_config.SGLANG_VERSION)


def test_hook_diagnosis_quotes_sglangs_loader_errors():
    log = ("[2026-12-06 10:00:00] Failed to load plugin kdflow_hidden_states from group sglang.srt.plugins\n"
           "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
           "ModuleNotFoundError: No module named 'omegaconf'\n[2026-12-06 10:00:01] server ready\n")
    why = sg_teacher.hook_diagnosis(log, "/tmp/s.log")
    assert "Failed to load plugin kdflow_hidden_states" in why and "No module named 'omegaconf'" in why
    assert "/tmp/s.log" in why
    assert "no 'kdflow: hidden-state hook registered' line" in sg_teacher.hook_diagnosis("ready\n")
    assert "registered kdflow's hidden-state hook but did not run it" in sg_teacher.hook_diagnosis(
        "kdflow: hidden-state hook registered on SchedulerBatchResultProcessor (pid 1)\n")


# ------------------------------------------------------------------ the smaller ones


def test_false_reaches_sglang_for_negatable_flags():
    argv = sg_server.launch_command({"dllm_fdfo": False, "disable_radix_cache": False, "enable_tf32_matmul": True,
                                     "x": None})
    assert argv[3:] == ["--no-dllm-fdfo", "--enable-tf32-matmul"]


def test_served_config_names_its_architecture(tmp_path):
    from transformers import LlamaConfig

    from kdcore.engines.sglang.rollout import served_config

    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      vocab_size=50)
    assert cfg.architectures is None  # what a student built from_config carries
    served_config(cfg).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_hf_child_gets_the_parents_gpu_index(monkeypatch):
    from kdcore.engines.hf import model as hf

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # LOCAL_RANK 1, as init_distributed sets
    assert hf.resolve_device("cuda") == "cuda:1"
    assert hf.resolve_device("auto") == "cuda:1"
    assert hf.resolve_device("cuda:0") == "cuda:0"  # an explicit index stays
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert hf.resolve_device("auto") == "cpu"
    with pytest.raises(TeacherError, match="CUDA is not available"):
        hf.resolve_device("cuda")


def test_colocation_returns_cached_blocks_before_the_teacher_wakes(monkeypatch):
    calls = []

    class Engine:
        def wake(self):
            calls.append("wake")

        def sleep(self):
            calls.append("sleep")

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with colocation.Colocation(Engine()).teacher_phase():
        calls.append("work")
    assert calls == ["empty_cache", "wake", "work", "sleep"]
    calls.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPU: nothing to release
    with colocation.Colocation(Engine()).teacher_phase():
        pass
    assert calls == ["wake", "sleep"]


# ------------------------------------------------------------------ the GPU check's dry run


def test_gpu_check_sglang_dry_run_builds_every_input_and_names_what_it_cannot_run(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "checks" / "gpu" / "gpu_check_sglang.py"), "--dry-run", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("gpu_check_sglang: ran env;") and "not run: teacher, weights, sleep_wake, rollout (dry run" in last
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in last
    plan = json.loads((tmp_path / "gpu_check_sglang_dry_run.json").read_text())
    assert set(plan["dry_run"]["launch"]) == {"teacher", "teacher_colocated", "rollout"}
    assert "--enable-return-hidden-states" in plan["dry_run"]["launch"]["teacher"]
    assert set(plan["not_run"]) == {"teacher, weights, sleep_wake, rollout", "hf_cuda, device_index"} or \
        torch.cuda.is_available()


def _probing_teacher(monkeypatch, transport, log_text):
    """An SGLangTeacher whose server is a stand-in (NOT SGLang) that never runs the hook and
    answers the lists transport; the probe itself is kdflow's."""
    from types import SimpleNamespace

    from kdcore.engines.sglang.hook import ST_PENDING

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    eng = object.__new__(sg_teacher.SGLangTeacher)
    eng.transport, eng.vocab_size, eng.max_rows, eng.folder, eng.owns_server = transport, 61, 64, None, True
    eng.info = {}
    eng.channel = SimpleNamespace(slot_of=lambda seq: 0)
    eng._status = torch.full((2, 64), ST_PENDING, dtype=torch.int64)
    eng._dest = torch.zeros(2, 64, 4)
    eng.server = SimpleNamespace(url="http://stand-in", log_path="/tmp/sglang-stand-in.log",
                                 log_tail=lambda n=40: log_text)

    def post(batch, how, slot):
        if how == "hook":
            return [{} for _ in batch.prompts]  # the hook did not run: status words stay pending
        return [{"meta_info": {"hidden_states": [[[0.5] * 4 for _ in p]]}} for p in batch.prompts]

    eng._post_hidden = post
    return eng


def test_teacher_says_loudly_why_the_hook_did_not_run(monkeypatch, caplog):
    log = ("Failed to load plugin kdflow_hidden_states from group sglang.srt.plugins\nTraceback (most recent call "
           "last):\n  File \"x\", line 1\nModuleNotFoundError: No module named 'omegaconf'\n")
    eng = _probing_teacher(monkeypatch, "auto", log)
    with caplog.at_level("WARNING"):
        eng._probe("LlamaForCausalLM")
    assert eng.transport == "lists" and "No module named 'omegaconf'" in eng.info["hook_error"]
    assert any("KDFLOW HOOK NOT LOADED" in r.getMessage() and "Failed to load plugin" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(TeacherError, match=r"transport=hook, but .*No module named 'omegaconf'"):
        _probing_teacher(monkeypatch, "hook", log)._probe("LlamaForCausalLM")
