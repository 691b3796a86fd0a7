"""The SGLang server seen from kdflow: its launch arguments, its process, and HTTP to it.

One server per node, in its own process session, started by local rank 0 (or reached at
``server_url``); SGLang never enters the trainer process (importing it patches transformers,
forces the ``spawn`` start method and installs uvloop, none of which the student should
inherit). Shared by the teacher and the rollout engine.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping, Optional, Sequence

from kdcore.infra.channel import ChannelTimeout, TeacherDiedError
from kdcore.engines.protocol import TeacherError
from kdcore.engines.sglang.config import (HOOK_ENV, MIN_PREFILL_TOKENS, SGLANG_NEGATABLE_FLAGS, TEACHER_DEFAULT_ARGS,
                                          TEACHER_FIXED_ARGS)

START_TIMEOUT_S = 1800.0  # first start downloads/compiles kernels and loads a large model
REQUEST_TIMEOUT_S = 600.0  # one micro-batch, including first-request JIT compilation
CLOSE_GRACE_S = 30.0  # for the server to release its GPUs after SIGTERM before SIGKILL


# ============================================================================ server arguments


def server_kwargs(scfg: Any, *, model_path: str, dtype: str, max_rows: int, port: int, host: str = "127.0.0.1",
                  seed: int = 0, role: str = "teacher") -> dict[str, Any]:
    """sglang ``ServerArgs`` keywords for a recipe's ``sglang`` section.

    ``role`` ``teacher``: prefill with full hidden-state capture (:data:`TEACHER_FIXED_ARGS`);
    ``rollout``: sampling, random (``dummy``) weights until the first sync from the student.
    The recipe's ``server_args`` come last (checked by :func:`check_recipe_section`).
    """
    if role not in ("teacher", "rollout"):
        raise ValueError(f"role must be 'teacher' or 'rollout', got '{role}'")
    kw: dict[str, Any] = {
        "model_path": str(model_path), "host": host, "port": int(port), "dtype": dtype,
        "tp_size": int(scfg.tp_size), "dp_size": int(scfg.dp_size),
        "mem_fraction_static": float(scfg.mem_fraction_static), "base_gpu_id": int(getattr(scfg, "base_gpu_id", 0)),
        "random_seed": int(seed), "skip_tokenizer_init": True,
        "log_level": "warning",  # the server log file keeps warnings and errors, not per-request lines
    }
    if getattr(scfg, "quantization", None):
        kw["quantization"] = scfg.quantization
    if getattr(scfg, "colocate", False):
        kw["enable_memory_saver"] = True
        # the teacher's weights must survive sleep; the rollout copy is re-synced after wake anyway
        kw["enable_weights_cpu_backup"] = role == "teacher"
    if role == "teacher":
        kw.update(TEACHER_DEFAULT_ARGS)
        kw["max_prefill_tokens"] = max(MIN_PREFILL_TOKENS, int(max_rows))  # a whole micro-batch in one forward
        kw.update(TEACHER_FIXED_ARGS)
    else:
        kw["load_format"] = "dummy"  # no checkpoint needed: the student's weights arrive by update
    extra = dict(getattr(scfg, "server_args", None) or {})
    if role == "teacher":
        bad = [k for k in extra if k in TEACHER_FIXED_ARGS and extra[k] != TEACHER_FIXED_ARGS[k]]
        if bad:
            raise TeacherError(f"sglang server_args {', '.join(bad)} cannot change: the hidden-state path needs "
                               + ", ".join(f"{k}={TEACHER_FIXED_ARGS[k]!r}" for k in bad))
    kw.update(extra)
    return kw


def launch_command(kwargs: Mapping[str, Any], python: str = sys.executable) -> list[str]:
    """``python -m sglang.launch_server`` argv for ``ServerArgs`` keywords (bools as flags:
    True ``--flag``; False ``--no-flag`` for sglang's negatable flags, else left out, which is
    False for its store_true flags; None left out)."""
    argv = [python, "-m", "sglang.launch_server"]
    for k, v in kwargs.items():
        flag = "--" + k.replace("_", "-")
        if v is None:
            continue
        if v is False:
            if k in SGLANG_NEGATABLE_FLAGS:
                argv.append("--no-" + k.replace("_", "-"))
            continue
        if v is True:
            argv.append(flag)
        elif isinstance(v, (dict, list)) and not (isinstance(v, list) and all(isinstance(x, (str, int, float)) for x in v)):
            argv += [flag, json.dumps(v)]
        elif isinstance(v, list):
            argv += [flag, *map(str, v)]
        else:
            argv += [flag, str(v)]
    return argv


def read_config(folder_or_id: str) -> dict:
    path = os.path.join(folder_or_id, "config.json")
    if os.path.isfile(path):
        with open(path) as f:
            return json.load(f)
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder_or_id).to_dict()


# ============================================================================ HTTP and the server


class ServerError(TeacherError):
    """The SGLang server failed or refused a request."""


def http_json(url: str, path: str, body: Optional[dict] = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
    """POST ``body`` as JSON (GET when None) and return the reply: decoded when the server
    says it is JSON, else its text (sglang 0.5.23's ``/flush_cache`` answers plain text), None
    when empty."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url.rstrip("/") + path, data=data, method="GET" if body is None else "POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
            kind = resp.headers.get_content_type()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:2000]
        raise ServerError(f"sglang server {url}{path}: HTTP {exc.code}: {detail}") from exc
    if not raw:
        return None
    if kind == "application/json" or kind.endswith("+json"):
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ServerError(f"sglang server {url}{path}: a reply labelled JSON does not parse: {exc}") from exc
    return raw.decode(errors="replace")


def check_reply(reply: Any, what: str) -> Any:
    """``reply`` unless it is sglang's ``{"success": false, "message": ...}`` (then ServerError)."""
    if isinstance(reply, dict) and reply.get("success") is False:
        raise ServerError(f"sglang refused {what}: {reply.get('message')}")
    return reply


@contextmanager
def weight_update_session(server: "SGLangServer", lock: Optional[threading.Lock] = None) -> Iterator[None]:
    """sglang 0.5.23's weight-update session: ``/update_weights_from_tensor`` is refused (HTTP
    400) outside ``POST /begin_weight_update`` ... ``POST /end_weight_update``
    (``SchedulerWeightUpdaterManager``). Holds ``lock`` throughout (no other request of this
    process reaches the server mid-update) and always closes the session: a session left
    open makes the next ``begin`` fail."""
    with (lock if lock is not None else nullcontext()):
        check_reply(server.call("/begin_weight_update", {}), "to open a weight-update session")
        try:
            yield
        except BaseException:
            try:
                server.call("/end_weight_update", {})
            except Exception:  # noqa: BLE001 - the update's own error is the one to report
                pass
            raise
        check_reply(server.call("/end_weight_update", {}), "to close the weight-update session")


def flush_cache(server: "SGLangServer", lock: Optional[threading.Lock] = None) -> str:
    """``/flush_cache`` (plain text reply; HTTP 400 while requests are running)."""
    with (lock if lock is not None else nullcontext()):
        return str(server.call("/flush_cache", {}) or "")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the forked child before exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


_SERVERS: "weakref.WeakSet[SGLangServer]" = weakref.WeakSet()


@atexit.register
def _close_servers() -> None:
    for s in list(_SERVERS):
        if s.owner == os.getpid():
            s.close()


class SGLangServer:
    """An SGLang HTTP server: started here (``start``) or already running (``connect``)."""

    def __init__(self, url: str, proc: Optional[subprocess.Popen] = None, log_path: Optional[str] = None):
        self.url, self.proc, self.log_path = url, proc, log_path
        self.owner = os.getpid()

    @classmethod
    def start(cls, kwargs: Mapping[str, Any], *, timeout: float = START_TIMEOUT_S,
              env: Optional[Mapping[str, str]] = None) -> "SGLangServer":
        """Launch ``python -m sglang.launch_server`` in its own session with the hook enabled,
        wait until ``/ready`` answers, and return the handle (its log: ``log_path``)."""
        host, port = kwargs["host"], int(kwargs["port"])
        fd, log_path = tempfile.mkstemp(prefix=f"kdflow-sglang-{port}-", suffix=".log")
        full_env = dict(os.environ, **{HOOK_ENV: "1", "PYTHONUNBUFFERED": "1"}, **(env or {}))
        with os.fdopen(fd, "w") as logf:
            # cwd outside the repository: `python -m` puts the cwd first on sys.path, and a stale
            # kdflow.egg-info in a source checkout would hide the installed plugin entry point
            proc = subprocess.Popen(launch_command(kwargs), stdout=logf, stderr=subprocess.STDOUT, env=full_env,
                                    cwd=tempfile.gettempdir(), start_new_session=True, preexec_fn=_die_with_parent)
        server = cls(f"http://{host}:{port}", proc, log_path)
        _SERVERS.add(server)
        try:
            server.wait_ready(timeout)
        except BaseException:
            server.close()
            raise
        return server

    @classmethod
    def connect(cls, url: str, *, timeout: float = START_TIMEOUT_S) -> "SGLangServer":
        server = cls(url.rstrip("/"))
        server.wait_ready(timeout)
        return server

    def log_tail(self, n: int = 40) -> str:
        if not self.log_path or not os.path.isfile(self.log_path):
            return ""
        with open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-n:])

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def death_error(self, what: str = "") -> TeacherDiedError:
        code = None if self.proc is None else self.proc.poll()
        how = "is unreachable" if code is None else f"exited with code {code}"
        tail = self.log_tail()
        return TeacherDiedError(f"sglang server {self.url} {how}{what}" + (f"; log {self.log_path}:\n{tail}" if tail else ""))

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise self.death_error(" while starting")
            try:
                urllib.request.urlopen(self.url + "/ready", timeout=5).close()
                return
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ChannelTimeout(f"sglang server {self.url} not ready within {timeout:.0f} s"
                                     + (f"; log {self.log_path}:\n{self.log_tail()}" if self.log_path else ""))
            time.sleep(1.0)

    def call(self, path: str, body: Optional[dict] = None, timeout: float = REQUEST_TIMEOUT_S) -> Any:
        try:
            return http_json(self.url, path, body, timeout)
        except ServerError:
            raise
        except (urllib.error.URLError, OSError, ConnectionError) as exc:
            if not self.alive() or isinstance(getattr(exc, "reason", exc), ConnectionRefusedError):
                raise self.death_error(f" ({exc})") from exc
            raise ChannelTimeout(f"sglang server {self.url}{path}: {exc}") from exc

    def close(self) -> None:
        """Stop a server this process started (SIGTERM to its session, SIGKILL after a grace)."""
        _SERVERS.discard(self)
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(CLOSE_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(CLOSE_GRACE_S)
        except ProcessLookupError:
            pass


def local_rank_and_world() -> tuple[int, int]:
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


# ============================================================================ generation requests


def sampling_params(*, max_new_tokens: int, temperature: float, top_p: float = 1.0, top_k: int = 0,
                    eos_ids: Sequence[int] = (), seed: Optional[int] = None) -> dict:
    """SGLang sampling parameters (temperature 0 = greedy; top_k 0 = no cut)."""
    p: dict[str, Any] = {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
                         "top_p": float(top_p), "top_k": int(top_k) if top_k and top_k > 0 else -1,
                         "skip_special_tokens": False, "no_stop_trim": True}
    if eos_ids:
        p["stop_token_ids"] = sorted({int(e) for e in eos_ids})
    else:
        p["ignore_eos"] = True  # no stop ids given: only the length limit ends a sample
    if seed is not None:
        p["sampling_seed"] = int(seed) % (2 ** 63)
    return p


def cut_at_eos(ids: Sequence[int], eos: Sequence[int]) -> list[int]:
    ids = [int(t) for t in ids]
    stop = set(int(e) for e in eos)
    cut = next((i + 1 for i, t in enumerate(ids) if t in stop), len(ids))
    return ids[:cut]
