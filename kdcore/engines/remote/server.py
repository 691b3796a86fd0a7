"""``kdcore serve-teacher``: a teacher engine behind a ZeroMQ ROUTER socket, shared by many students.

The server runs the recipe's own teacher engine (:func:`kdcore.engines.create_teacher_engine`:
``hf`` on CPU/CUDA, or whatever the recipe names) and answers ``hidden`` requests from any
number of client engines (:mod:`kdcore.engines.remote`: trainers, and each rank of a trainer).

- **Fair**: requests wait in one queue per connection and are taken round-robin over
  connections, so a trainer with many ranks or a deep pipeline cannot starve another. Queues
  are keyed on the ZeroMQ connection, never on the name a client gives itself (a name is only
  what the log calls it), so one socket cannot claim more than one queue's share.
- **One request at a time, pipelined**: up to the engine's ``n_slots`` requests are in the
  engine at once (it computes the next while the previous reply is sent), but requests are
  never merged into one batch: merging changes the matmul shapes, and with them the last bits
  of the hidden states, so a remote run would no longer reproduce a local one exactly. For
  the same reason a request over the token cap is refused, not split.
- **Always answering**: the engine is driven from its own thread; the socket's thread keeps
  answering (hellos, refusals, ``busy`` keepalives every :data:`KEEPALIVE_S` to connections
  with requests waiting) while the engine computes. An engine that fails on a request (no
  progress within its timeout, or its process died) fails *that* request with an error
  reply; the engine is restarted and the other requests are served after it (so is an
  engine found dead between requests). Only an engine that fails :data:`MAX_ENGINE_FAILURES`
  times in a row, or cannot be restarted, stops the server.
- **Safe**: a client must send the shared secret with every message when one is set (always
  when listening beyond localhost). What one peer can make the server do is capped: bytes per
  request (``max_request_bytes``), tokens per request (``max_tokens``), rows per request (the
  engine's ``max_rows``), requests waiting per connection and in all, connections tracked.
  Anything over a cap, malformed, with a wrong token or version is refused with a one-line
  error reply and a log line, never by crashing; every value from a peer is escaped and
  shortened before it reaches the log (:func:`kdcore.engines.remote.wire.printable`).
  Nothing on the wire is pickled (:mod:`kdcore.engines.remote.wire`).
- **Observable**: rows/s per client every ``stats_every_s`` seconds and at exit.
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from kdcore.engines.remote import wire
from kdcore.engines import TeacherError, create_teacher_engine
from kdcore.infra.channel import ChannelError
from kdcore.modeling.paths import ModelNotFoundError
from kdcore.plugin_system.manager import load_registry
from kdcore.recipe.loading import RecipeError, load_raw, load_recipe

POLL_MS = 200  # idle poll step: how late a stop request is noticed
MAX_REQUEST_MB = 64  # ~16M tokens of int32 ids: any real micro-batch fits, a memory bomb does not
# --max-tokens default: this many of the served recipe's largest micro-batches. A trainer's
# request is one micro-batch (B x L padded tokens); the slack covers a teacher tokenizer that
# cuts the same text finer and rollouts. Past it, one request would hold the one engine (every
# other client waits behind it) for many micro-batches' time: 200,000 tokens in one request
# blocked a CPU engine past its no-progress timeout.
MAX_TOKENS_FACTOR = 2
MAX_QUEUED_PER_CLIENT = 16  # per connection: a client engine keeps 2 in flight; more is a flood, not pipelining
MAX_QUEUED_TOTAL = 256  # all connections together: queued memory stays <= 256 requests of --max-tokens each
MAX_CLIENTS = 1024  # connections tracked (stats); the longest idle is forgotten for a new one
KEEPALIVE_S = 5.0  # 'busy' to waiting connections this often: well inside a client's timeout_s (20 s default)
MAX_ENGINE_FAILURES = 3  # failed requests in a row (a restart after each) before a broken engine stops the server
LOG_NAME_CHARS = 120  # a client's name in the log: host:pid:id fits, a forged essay does not
LOG_REASON_CHARS = 400  # a refusal's reason (it may quote the peer's values)
REFUSALS_LOGGED_PER_S = 20  # beyond this a flood of bad messages is counted, not logged line by line
STATS_EVERY_S = 60.0  # one throughput line per client a minute keeps the log readable
TOKEN_ENV = "KDFLOW_TEACHER_TOKEN"


def _stderr(line: str) -> None:
    print(f"[serve-teacher {time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def parse_listen(listen: str) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT`` or ``PORT`` (host 127.0.0.1); one-line error otherwise."""
    host, sep, port = listen.rpartition(":")
    host = host.strip("[]") if sep else "127.0.0.1"
    port = port if sep else listen
    if not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise ValueError(f"--listen '{listen}' must look like HOST:PORT (port 0 = any free one)")
    return host, int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond this machine


class FairQueue:
    """Queued items per client key, popped round-robin over the keys that have any."""

    def __init__(self):
        self._items: dict[Any, collections.deque] = {}
        self._turns: collections.deque = collections.deque()  # keys with items, next first

    def push(self, client: Any, item: Any, *, front: bool = False) -> None:
        queue = self._items.setdefault(client, collections.deque())
        if not queue:
            self._turns.append(client)
        queue.appendleft(item) if front else queue.append(item)

    def pop(self) -> tuple[Any, Any]:
        client = self._turns.popleft()
        item = self._items[client].popleft()
        if self._items[client]:
            self._turns.append(client)
        else:
            del self._items[client]  # keys come and go with connections: keep none that is empty
        return client, item

    def queued(self, client: Any) -> int:
        return len(self._items.get(client, ()))

    def __len__(self) -> int:
        return sum(len(q) for q in self._items.values())


@dataclass
class ClientStats:
    requests: int = 0
    rows: int = 0
    refused: int = 0
    first: float = field(default_factory=time.monotonic)
    window_rows: int = 0
    window_start: float = field(default_factory=time.monotonic)

    def line(self, client: str, *, final: bool = False) -> str:
        now = time.monotonic()
        total_rate = self.rows / max(now - self.first, 1e-9)
        window_rate = self.window_rows / max(now - self.window_start, 1e-9)
        self.window_rows, self.window_start = 0, now
        what = "total" if final else f"{window_rate:.1f} rows/s lately"
        return (f"client {client}: {self.requests} requests, {self.rows} rows, {total_rate:.1f} rows/s overall "
                f"({what}), {self.refused} refused")


@dataclass
class _Conn:
    """One connection (a ZeroMQ routing id): what the server knows and counts about it."""

    name: str  # what the log calls it: the client's own name, escaped, or the routing id
    stats: ClientStats = field(default_factory=ClientStats)
    waiting: int = 0  # requests queued or in the engine, not answered yet
    last_seen: float = field(default_factory=time.monotonic)


@dataclass
class _Job:
    identity: bytes
    rid: Any
    request: Any
    ticket: Any = None


def _rid(value: Any) -> Optional[int]:
    """The request id echoed in replies: a client's ticket number, nothing else (no echoed blobs)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63 else None


class TeacherServer:
    """Serves a started :class:`~kdcore.engines.protocol.TeacherEngine` on a ROUTER socket.

    ``fingerprint``: :func:`kdcore.engines.remote.wire.teacher_fingerprint` of the served model.
    ``token``: the shared secret every message must carry (None: no check, loopback only).
    ``max_tokens``: tokens (``batch x length``) one request may carry (None: the engine's
    ``max_rows`` x :data:`MAX_TOKENS_FACTOR`). ``restart``: builds and starts a fresh engine
    after one failed (None: an engine failure stops the server).
    """

    def __init__(self, engine: Any, fingerprint: dict, *, listen: str = "127.0.0.1:0", token: Optional[str] = None,
                 max_request_bytes: int = MAX_REQUEST_MB << 20, max_tokens: Optional[int] = None,
                 stats_every_s: float = STATS_EVERY_S, log: Callable[[str], None] = _stderr,
                 restart: Optional[Callable[[], Any]] = None):
        host, port = parse_listen(listen)
        if token is None and not is_loopback(host):
            raise ValueError(f"listening on {host}:{port} (beyond localhost) needs a shared secret: "
                             f"pass --token or set {TOKEN_ENV}")
        self.engine, self.fingerprint, self.token = engine, fingerprint, token
        self.host, self.port = host, port
        self.max_request_bytes = int(max_request_bytes)
        self.max_rows, self.vocab_size = int(engine.max_rows), int(engine.vocab_size)
        self.max_tokens = int(max_tokens or self.max_rows * MAX_TOKENS_FACTOR)
        self.dtype = str(getattr(engine, "dtype", "")).removeprefix("torch.")
        self.stats_every_s = float(stats_every_s)
        self._log, self.restart = log, restart
        self.queue = FairQueue()  # shared with the engine thread: only under self._cond
        self._cond = threading.Condition()
        self.in_engine: collections.deque[_Job] = collections.deque()  # the engine thread's
        self.conns: dict[bytes, _Conn] = {}  # the socket thread's, like every count below
        self.waiting = 0
        self.refused_unknown = 0  # refusals before a connection proved it knows the token
        self._log_second, self._logged, self._unlogged = 0, 0, 0  # the refusal lines' rate limit
        self.stop = threading.Event()
        self.failures = 0  # requests the engine failed in a row
        self._fatal: Optional[BaseException] = None
        self._sock = self._ctx = self._pipe = self._worker = None

    def log(self, line: str) -> None:
        self._log(wire.printable(line, limit=2000))  # the last guard: one log line stays one line

    def bind(self) -> str:
        """Bind the socket; returns the endpoint (with the real port when 0 was asked for)."""
        import zmq

        self._ctx = zmq.Context()
        self._ctx.setsockopt(zmq.LINGER, 0)  # closing never waits for clients that are gone
        self._ctx.setsockopt(zmq.BLOCKY, 0)  # and terminating the context never waits either
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # ZeroMQ drops a peer whose message part exceeds this: a guard for memory far above the
        # polite cap below, which is answered with an error instead
        sock.setsockopt(zmq.MAXMSGSIZE, 2 * self.max_request_bytes + wire.MAX_HEADER_BYTES)
        # messages read ahead per peer before ZeroMQ stops reading its connection (the default,
        # 1000, lets one flooding peer park ~1000 requests' bytes in memory before any is refused)
        sock.setsockopt(zmq.RCVHWM, 4 * MAX_QUEUED_PER_CLIENT)
        if ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)
        host = f"[{self.host}]" if ":" in self.host else self.host
        sock.bind(f"tcp://{host}:{self.port}" if self.port else f"tcp://{host}:*")
        self._sock = sock
        # the engine thread hands replies to this thread (the only one using the ROUTER socket)
        self._pipe = self._ctx.socket(zmq.PAIR)
        self._pipe_address = f"inproc://kdflow-replies-{id(self)}"
        self._pipe.bind(self._pipe_address)
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # ------------------------------------------------------------------ messages

    def _reply(self, identity: bytes, header: dict, *payload: Any) -> None:
        import zmq

        try:
            self._sock.send_multipart([identity, wire.encode_header({"v": wire.PROTOCOL_VERSION, **header}),
                                       *payload], copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a client that vanished or stopped reading: its loss only
            self.log(f"could not answer client {self._name(identity)}: {exc}")

    def _name(self, identity: bytes) -> str:
        conn = self.conns.get(identity)
        return conn.name if conn else f"[{identity.hex()}]"

    def _refuse(self, identity: bytes, rid: Any, why: str) -> None:
        why = wire.printable(why, limit=LOG_REASON_CHARS)
        self._log_refusal(f"refused a message from client {self._name(identity)}: {why}")
        conn = self.conns.get(identity)
        if conn is not None:
            conn.stats.refused += 1
        else:
            self.refused_unknown += 1
        self._reply(identity, {"type": "error", "rid": _rid(rid), "error": why})

    def _log_refusal(self, line: Optional[str]) -> None:
        """Log ``line`` unless :data:`REFUSALS_LOGGED_PER_S` were logged this second already (None:
        only say how many were not)."""
        second = int(time.monotonic())
        if second != self._log_second or line is None:
            if self._unlogged:
                self.log(f"{self._unlogged} more refusals not logged (at most {REFUSALS_LOGGED_PER_S} a second)")
            self._log_second, self._logged, self._unlogged = second, 0, 0
        if line is None:
            return
        if self._logged < REFUSALS_LOGGED_PER_S:
            self._logged += 1
            self.log(line)
        else:
            self._unlogged += 1

    def _conn(self, identity: bytes, name: Any) -> _Conn:
        """The connection's record, made at its first authenticated message (named then, once)."""
        conn = self.conns.get(identity)
        if conn is None:
            if len(self.conns) >= MAX_CLIENTS:
                idle = [i for i, c in self.conns.items() if not c.waiting]
                if not idle:
                    raise wire.WireError(f"{MAX_CLIENTS} connections have requests waiting already")
                gone = min(idle, key=lambda i: self.conns[i].last_seen)
                self.log(self.conns[gone].stats.line(self.conns[gone].name, final=True) + " (forgotten: idle)")
                del self.conns[gone]
            label = wire.printable(name, limit=LOG_NAME_CHARS) if isinstance(name, str) and name else ""
            conn = self.conns[identity] = _Conn(name=label or f"[{identity.hex()}]")
        conn.last_seen = time.monotonic()
        return conn

    def handle(self, frames: list) -> None:
        """One incoming message; every problem is refused with a reply, never raised."""
        identity, parts = bytes(frames[0]), frames[1:]
        try:
            size = sum(len(p) for p in parts)
            if size > self.max_request_bytes:
                raise wire.WireError(f"a request of {size} bytes is more than this server takes "
                                     f"({self.max_request_bytes} bytes, --max-request-mb)")
            if not parts:
                raise wire.WireError("empty message")
            header = wire.decode_header(parts[0])
        except wire.WireError as exc:
            return self._refuse(identity, None, f"malformed message: {exc}")
        rid = _rid(header.get("rid"))
        problem = wire.version_mismatch(header.get("v"), side="client")
        if problem is None and self.token is not None:
            given = header.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.token.encode()):
                problem = "wrong or missing token (the server's --token / KDFLOW_TEACHER_TOKEN)"
        if problem:
            return self._refuse(identity, rid, problem)
        kind = header.get("type")
        try:
            conn = self._conn(identity, header.get("client"))
            if kind == "hello":
                self._hello(identity, conn, header)
            elif kind == "hidden":
                self._queue_request(identity, conn, rid, header, parts[1:])
            elif kind == "bye":
                self.log(conn.stats.line(conn.name, final=True) + " (client closed)")
                if not conn.waiting:
                    del self.conns[identity]
            else:
                raise wire.WireError(f"unknown message type '{wire.printable(kind, limit=40)}'")
        except Exception as exc:  # noqa: BLE001 - a bad request must never take the server down
            self._refuse(identity, rid, f"bad {wire.printable(kind, limit=40)} request: {exc}")

    def _queue_request(self, identity: bytes, conn: _Conn, rid: Any, header: dict, frames: list) -> None:
        if conn.waiting >= MAX_QUEUED_PER_CLIENT:
            raise wire.WireError(f"{MAX_QUEUED_PER_CLIENT} requests of this connection are waiting already "
                                 f"(the most one connection may have)")
        if self.waiting >= MAX_QUEUED_TOTAL:
            raise wire.WireError(f"the server has {MAX_QUEUED_TOTAL} requests waiting (its most); try later")
        request = wire.unpack_request(header, frames, max_tokens=self.max_tokens, max_rows=self.max_rows)
        request.validate(vocab_size=self.vocab_size, max_rows=self.max_rows)
        with self._cond:
            self.queue.push(identity, _Job(identity, rid, request))
            self._cond.notify()
        conn.waiting += 1
        self.waiting += 1

    def _hello(self, identity: bytes, conn: _Conn, header: dict) -> None:
        problem = wire.fingerprint_mismatch(header.get("fingerprint"), self.fingerprint)
        if problem:
            return self._refuse(identity, None, problem)
        self.log(f"client {conn.name} connected")
        self._reply(identity, {"type": "hello", "fingerprint": self.fingerprint, "dtype": self.dtype,
                               "max_rows": self.max_rows, "max_tokens": self.max_tokens,
                               "max_request_bytes": self.max_request_bytes})

    def _answered(self, frames: list) -> None:
        """A reply from the engine thread: count it, log a failure, send it on."""
        identity = bytes(frames[0])
        if not identity:  # the engine thread's wake-up: it stopped (self._fatal says why)
            return
        header = wire.decode_header(frames[1])
        conn = self.conns.get(identity)
        if conn is not None:
            conn.waiting -= 1
            if header.get("type") == "hidden":
                rows = int(header["shape"][0])
                conn.stats.requests += 1
                conn.stats.rows += rows
                conn.stats.window_rows += rows
            else:
                conn.stats.refused += 1
        self.waiting -= 1
        if header.get("type") == "error":
            self.log(f"failed a request of client {self._name(identity)}: {header.get('error')}")
        try:
            import zmq

            self._sock.send_multipart([identity, *frames[1:]], copy=False, flags=zmq.NOBLOCK)
        except Exception as exc:  # noqa: BLE001 - a client that vanished: its loss only
            self.log(f"could not answer client {self._name(identity)}: {exc}")

    def _keepalive(self) -> None:
        for identity, conn in self.conns.items():
            if conn.waiting:
                self._reply(identity, {"type": "busy", "waiting": conn.waiting})

    # ------------------------------------------------------------------ the engine thread

    def _engine_loop(self) -> None:
        """Feed the engine round-robin and hand each result to the socket thread (via the pipe)."""
        import zmq

        pipe = self._ctx.socket(zmq.PAIR)
        pipe.connect(self._pipe_address)
        try:
            while not self.stop.is_set():
                self._feed_engine(pipe)
                if self.in_engine:
                    self._finish_oldest(pipe)
        except BaseException as exc:  # noqa: BLE001 - handed to the socket thread, which stops the server
            self._fatal = exc
        finally:
            try:
                pipe.send_multipart([b"", b"{}"])  # wake the socket thread
                pipe.close(linger=0)
            except Exception:  # noqa: BLE001 - the context is gone already (the server closed)
                pass

    def _feed_engine(self, pipe: Any) -> None:
        from kdcore.engines.protocol import TeacherError

        while len(self.in_engine) < self.engine.n_slots and not self.stop.is_set():
            with self._cond:
                if not len(self.queue):
                    if self.in_engine:
                        return
                    self._cond.wait(POLL_MS / 1000)
                    continue
                _, job = self.queue.pop()
            try:
                job.ticket = self.engine.submit(job.request)
            except ChannelError as exc:  # the engine died between requests: not this request's fault
                with self._cond:
                    self.queue.push(job.identity, job, front=True)
                return self._engine_failed(pipe, None, exc)
            except TeacherError as exc:  # the engine refused this request: its fault alone
                self._send_error(pipe, job, str(exc))
                continue
            self.in_engine.append(job)

    def _send_error(self, pipe: Any, job: _Job, why: str) -> None:
        header = {"v": wire.PROTOCOL_VERSION, "type": "error", "rid": job.rid, "error": why}
        pipe.send_multipart([job.identity, wire.encode_header(header)])

    def _finish_oldest(self, pipe: Any) -> None:
        job = self.in_engine[0]
        try:
            hidden = self.engine.result(job.ticket)
        except Exception as exc:  # noqa: BLE001 - hung or dead engine: this request fails, not the server
            return self._engine_failed(pipe, job, exc)
        self.in_engine.popleft()
        try:
            fields, payload = wire.pack_hidden(hidden)
        finally:
            self.engine.release(job.ticket)
        pipe.send_multipart([job.identity, wire.encode_header({"v": wire.PROTOCOL_VERSION, **fields,
                                                                "rid": job.rid}), payload], copy=False)
        self.failures = 0

    def _engine_failed(self, pipe: Any, job: Optional[_Job], exc: BaseException) -> None:
        """The engine failed on ``job`` (None: between requests): fail it, put the others back
        in front, restart the engine."""
        if self.stop.is_set():
            raise exc  # the engine was closed under us on the way out
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if job is not None:
            self.in_engine.popleft()
        with self._cond:  # the other requests in the engine were not at fault: served after the restart
            for other in reversed(self.in_engine):
                self.queue.push(other.identity, other, front=True)
        self.in_engine.clear()
        self.failures += 1
        stopping = self.restart is None or self.failures >= MAX_ENGINE_FAILURES
        if job is not None:
            self._send_error(pipe, job, f"the teacher engine failed on this request ({reason}); "
                             + ("the server is stopping" if stopping else "it is restarted, other requests go on"))
        if stopping:
            from kdcore.engines.protocol import TeacherError

            raise TeacherError(f"the teacher engine failed {self.failures} time(s) in a row, last: {reason}") from exc
        self.log(f"the teacher engine failed {'on a request' if job else 'between requests'} ({reason}); "
                 f"restarting it")
        try:
            self.engine.close()
        except Exception as close_exc:  # noqa: BLE001 - a hung engine may not close cleanly; the new one matters
            self.log(f"closing the failed engine: {close_exc}")
        self.engine = self.restart()
        self.log(f"the teacher engine is back{_pid_note(self.engine)}")

    # ------------------------------------------------------------------ serving

    def serve(self) -> None:
        """Answer requests until :attr:`stop` is set; an engine that cannot go on raises here."""
        import zmq

        self._worker = threading.Thread(target=self._engine_loop, name="teacher-engine", daemon=True)
        self._worker.start()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._pipe, zmq.POLLIN)
        next_stats = time.monotonic() + self.stats_every_s
        last_keepalive = time.monotonic()
        while not self.stop.is_set():
            ready = dict(poller.poll(POLL_MS))
            if self._pipe in ready:  # replies first: they free a client's queue places
                while self._pipe.poll(0):
                    self._answered(self._pipe.recv_multipart(copy=False))
            if self._sock in ready:
                for _ in range(64):  # then a bounded batch, so a flood cannot delay replies
                    if not self._sock.poll(0):
                        break
                    self.handle(self._sock.recv_multipart(copy=False))
            if self._fatal is not None:
                while self._pipe.poll(0):  # its last replies (the failed request's error) go out first
                    self._answered(self._pipe.recv_multipart(copy=False))
                raise self._fatal
            now = time.monotonic()
            if now - last_keepalive >= KEEPALIVE_S:
                self._keepalive()
                last_keepalive = now
            if now >= next_stats:
                for conn in self.conns.values():
                    if conn.stats.window_rows:
                        self.log(conn.stats.line(conn.name))
                next_stats = now + self.stats_every_s

    def close(self) -> None:
        self.stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._worker is not None:
            self._worker.join(timeout=5)  # it may be inside a long request; the engine's close ends that
        self._log_refusal(None)
        for conn in self.conns.values():
            self.log(conn.stats.line(conn.name, final=True))
        if self.refused_unknown:
            self.log(f"{self.refused_unknown} messages refused before their sender showed the token")
        if self._sock is not None:
            self._sock.close(linger=500)  # replies already sent (a last error) get half a second to leave
            self._pipe.close(linger=0)
            self._ctx.destroy(linger=0)  # term would wait for any socket still open
            self._sock = self._ctx = self._pipe = None


def _pid_note(engine: Any) -> str:
    pid = getattr(engine, "pid", None)
    return f" (engine pid {pid})" if pid else ""


# The engine a server runs when the recipe names none: the teacher in a process of its own,
# so that a request that makes no progress is timed out and the engine restarted (see the
# module docstring), which the training default (inline, in the caller's process) cannot do.
SERVER_DEFAULT_ENGINE = "hf"


def server_overrides(recipe: str, overrides: list[str]) -> list[str]:
    """``overrides``, plus ``teacher.engine=`` :data:`SERVER_DEFAULT_ENGINE` where neither they
    nor the recipe name a teacher engine."""
    _, raw = load_raw(recipe, list(overrides))
    teacher = raw.get("teacher")
    named = isinstance(teacher, dict) and teacher.get("engine")
    return list(overrides) if named else [*overrides, f"teacher.engine={SERVER_DEFAULT_ENGINE}"]


def serve_recipe(recipe: str, overrides: list[str], *, listen: str, token: Optional[str] = None,
                 max_rows: Optional[int] = None, max_request_mb: float = MAX_REQUEST_MB,
                 max_tokens: Optional[int] = None, progress_timeout: Optional[float] = None,
                 stats_every_s: float = STATS_EVERY_S) -> int:
    """``kdcore serve-teacher``: the recipe's teacher engine served until SIGINT/SIGTERM; exit code."""
    import os

    import zmq

    token = token or os.environ.get(TOKEN_ENV) or None
    try:
        host, _ = parse_listen(listen)
    except ValueError as exc:
        print(f"kdcore serve-teacher: {exc}", file=sys.stderr)
        return 2
    if token is None and not is_loopback(host):  # refuse before loading anything
        print(f"kdcore serve-teacher: listening on {listen} (beyond localhost) needs a shared secret: "
              f"pass --token or set {TOKEN_ENV}", file=sys.stderr)
        return 2
    for flag, value in (("--max-tokens", max_tokens), ("--max-rows", max_rows),
                        ("--progress-timeout", progress_timeout)):
        if value is not None and not value > 0:
            print(f"kdcore serve-teacher: {flag} must be > 0, got {value}", file=sys.stderr)
            return 2
    registry = load_registry()
    try:
        cfg = load_recipe(recipe, server_overrides(recipe, overrides), registry=registry)
    except RecipeError as exc:
        print(f"kdcore serve-teacher: {exc}", file=sys.stderr)
        return 2
    # the most rows one micro-batch of this recipe can ask for (responses are capped by max_length too)
    rows = max_rows or cfg.train.max_tokens_per_micro_batch or cfg.train.micro_batch_size * cfg.data.max_length
    extra = {"progress_timeout": float(progress_timeout)} if progress_timeout else {}

    def new_engine() -> Any:
        return create_teacher_engine(cfg.teacher, registry=registry, max_rows=int(rows),
                                     threads=cfg.teacher.threads or None, **extra)

    def restart() -> Any:
        fresh = new_engine()
        try:
            return fresh.start()
        except BaseException:
            fresh.close()
            raise

    try:
        engine = new_engine()
    except TypeError as exc:  # an engine without a progress timeout to set (its constructor says so)
        if not extra:
            raise
        print(f"kdcore serve-teacher: --progress-timeout: teacher.engine '{cfg.teacher.engine}' does not take "
              f"one ({exc})", file=sys.stderr)
        return 2
    server = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        engine.start()
        fingerprint = wire.teacher_fingerprint(cfg.teacher.path)
        server = TeacherServer(engine, fingerprint, listen=listen, token=token,
                               max_request_bytes=int(max_request_mb * (1 << 20)), max_tokens=max_tokens,
                               stats_every_s=stats_every_s, restart=restart)
        server.stop = stop
        try:
            where = server.bind()
        except zmq.ZMQError as exc:  # address in use, or not an address of this machine
            print(f"kdcore serve-teacher: cannot listen on {listen}: {exc}", file=sys.stderr)
            return 2
        _stderr(f"serving teacher '{cfg.teacher.path}' (H={engine.hidden_size}, V={engine.vocab_size}, "
                f"up to {rows} rows and {server.max_tokens} tokens a request{_pid_note(engine)}) on {where}")
        print(where, flush=True)  # stdout: the endpoint alone, for scripts
        server.serve()
        return 0
    except (ChannelError, TeacherError, ModelNotFoundError) as exc:  # clients see the connection close
        _stderr(f"the teacher engine failed, stopping: {str(exc).splitlines()[0]}")
        return 1
    finally:
        if server is not None:
            server.close()
            engine = server.engine  # the one running now (restarted after a failure)
        engine.close()


__all__ = ["TeacherServer", "FairQueue", "serve_recipe", "parse_listen", "is_loopback"]
