"""``kdcore serve-teacher``: a teacher engine behind a ZeroMQ ROUTER socket, shared by many students.

The server runs the recipe's own teacher engine (:func:`kdcore.engines.create_teacher_engine`:
``hf`` on CPU/CUDA, or whatever the recipe names) and answers ``hidden`` requests from any
number of client engines (:mod:`kdcore.engines.remote`: trainers, and each rank of a trainer).

- **Fair**: requests wait in one queue per client and are taken round-robin over clients, so a
  trainer with many ranks or a deep pipeline cannot starve another.
- **One request at a time, pipelined**: up to the engine's ``n_slots`` requests are in the
  engine at once (it computes the next while the previous reply is sent), but requests are
  never merged into one batch: merging changes the matmul shapes, and with them the last bits
  of the hidden states, so a remote run would no longer reproduce a local one exactly.
- **Safe**: a client must send the shared secret with every message when one is set (always
  when listening beyond localhost); requests larger than ``max_request_bytes``, malformed
  ones, wrong tokens and mismatched versions are refused with a one-line error reply and a
  log line, never by crashing. Nothing on the wire is pickled (:mod:`kdcore.engines.remote_wire`).
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

from kdcore.engines import remote_wire as wire

POLL_MS = 200  # idle poll step: how late a stop request is noticed
MAX_REQUEST_MB = 64  # ~16M tokens of int32 ids: any real micro-batch fits, a memory bomb does not
MAX_QUEUED_PER_CLIENT = 16  # a client engine keeps 2 in flight; more is a flood (or a bug), not pipelining
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
    """Queued items per client, popped round-robin over the clients that have any."""

    def __init__(self):
        self._items: dict[str, collections.deque] = {}
        self._turns: collections.deque = collections.deque()  # clients with items, next first

    def push(self, client: str, item: Any) -> None:
        queue = self._items.setdefault(client, collections.deque())
        if not queue:
            self._turns.append(client)
        queue.append(item)

    def pop(self) -> tuple[str, Any]:
        client = self._turns.popleft()
        item = self._items[client].popleft()
        if self._items[client]:
            self._turns.append(client)
        return client, item

    def queued(self, client: str) -> int:
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
class _Job:
    identity: bytes
    client: str
    rid: Any
    request: Any
    ticket: Any = None


class TeacherServer:
    """Serves a started :class:`~kdcore.engines.protocol.TeacherEngine` on a ROUTER socket.

    ``fingerprint``: :func:`kdcore.engines.remote_wire.teacher_fingerprint` of the served model.
    ``token``: the shared secret every message must carry (None: no check, loopback only).
    """

    def __init__(self, engine: Any, fingerprint: dict, *, listen: str = "127.0.0.1:0", token: Optional[str] = None,
                 max_request_bytes: int = MAX_REQUEST_MB << 20, stats_every_s: float = STATS_EVERY_S,
                 log: Callable[[str], None] = _stderr):
        host, port = parse_listen(listen)
        if token is None and not is_loopback(host):
            raise ValueError(f"listening on {host}:{port} (beyond localhost) needs a shared secret: "
                             f"pass --token or set {TOKEN_ENV}")
        self.engine, self.fingerprint, self.token = engine, fingerprint, token
        self.host, self.port = host, port
        self.max_request_bytes = int(max_request_bytes)
        self.stats_every_s = float(stats_every_s)
        self.log = log
        self.queue = FairQueue()
        self.in_engine: collections.deque[_Job] = collections.deque()
        self.stats: dict[str, ClientStats] = {}
        self.stop = threading.Event()
        self._sock = self._ctx = None

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
        if ":" in self.host:
            sock.setsockopt(zmq.IPV6, 1)
        host = f"[{self.host}]" if ":" in self.host else self.host
        sock.bind(f"tcp://{host}:{self.port}" if self.port else f"tcp://{host}:*")
        self._sock = sock
        return sock.getsockopt_string(zmq.LAST_ENDPOINT)

    # ------------------------------------------------------------------ messages

    def _reply(self, identity: bytes, header: dict, *payload: Any) -> None:
        import zmq

        try:
            self._sock.send_multipart([identity, wire.encode_header({"v": wire.PROTOCOL_VERSION, **header}),
                                       *payload], copy=False, flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # a client that vanished or stopped reading: its loss only
            self.log(f"could not answer client {identity.hex()}: {exc}")

    def _refuse(self, identity: bytes, client: str, rid: Any, why: str) -> None:
        self.log(f"refused a message from client {client}: {why}")
        self.stats.setdefault(client, ClientStats()).refused += 1
        self._reply(identity, {"type": "error", "rid": rid, "error": why})

    def handle(self, frames: list) -> None:
        """One incoming message; every problem is refused with a reply, never raised."""
        identity, parts = bytes(frames[0]), frames[1:]
        client = identity.hex()
        try:
            size = sum(len(p) for p in parts)
            if size > self.max_request_bytes:
                raise wire.WireError(f"a request of {size} bytes is more than this server takes "
                                     f"({self.max_request_bytes} bytes, --max-request-mb)")
            if not parts:
                raise wire.WireError("empty message")
            header = wire.decode_header(parts[0])
            client = str(header.get("client") or client)[:200]
            rid = header.get("rid")
        except wire.WireError as exc:
            return self._refuse(identity, client, None, f"malformed message: {exc}")
        problem = wire.version_mismatch(header.get("v"), side="client")
        if problem is None and self.token is not None:
            given = header.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.token.encode()):
                problem = "wrong or missing token (the server's --token / KDFLOW_TEACHER_TOKEN)"
        if problem:
            return self._refuse(identity, client, rid, problem)
        kind = header.get("type")
        try:
            if kind == "hello":
                self._hello(identity, client, header)
            elif kind == "hidden":
                if self.queue.queued(client) >= MAX_QUEUED_PER_CLIENT:
                    raise wire.WireError(f"{MAX_QUEUED_PER_CLIENT} requests of this client are queued already")
                request = wire.unpack_request(header, parts[1:], max_tokens=self.max_request_bytes)
                request.validate(vocab_size=self.engine.vocab_size, max_rows=self.engine.max_rows)
                self.queue.push(client, _Job(identity, client, rid, request))
            elif kind == "bye":
                if client in self.stats:
                    self.log(self.stats[client].line(client, final=True) + " (client closed)")
            else:
                raise wire.WireError(f"unknown message type {kind!r}")
        except Exception as exc:  # noqa: BLE001 - a bad request must never take the server down
            self._refuse(identity, client, rid, f"bad {kind} request: {exc}")

    def _hello(self, identity: bytes, client: str, header: dict) -> None:
        problem = wire.fingerprint_mismatch(header.get("fingerprint"), self.fingerprint)
        if problem:
            return self._refuse(identity, client, None, problem)
        self.stats.setdefault(client, ClientStats())
        self.log(f"client {client} connected")
        self._reply(identity, {"type": "hello", "fingerprint": self.fingerprint,
                               "dtype": str(getattr(self.engine, "dtype", "")).removeprefix("torch."),
                               "max_rows": int(self.engine.max_rows), "max_request_bytes": self.max_request_bytes})

    # ------------------------------------------------------------------ serving

    def _drain(self, timeout_ms: int) -> None:
        if self._sock.poll(timeout_ms):
            while self._sock.poll(0):
                self.handle(self._sock.recv_multipart(copy=False))

    def _feed_engine(self) -> None:
        from kdcore.engines.protocol import TeacherError

        while len(self.in_engine) < self.engine.n_slots and len(self.queue):
            _, job = self.queue.pop()
            try:
                job.ticket = self.engine.submit(job.request)
            except TeacherError as exc:
                self._refuse(job.identity, job.client, job.rid, str(exc))
                continue
            self.in_engine.append(job)

    def _finish_oldest(self) -> None:
        job = self.in_engine.popleft()
        hidden = self.engine.result(job.ticket)
        try:
            fields, payload = wire.pack_hidden(hidden)
        finally:
            self.engine.release(job.ticket)
        self._reply(job.identity, {**fields, "rid": job.rid}, payload)
        stats = self.stats.setdefault(job.client, ClientStats())
        stats.requests += 1
        stats.rows += job.ticket.rows
        stats.window_rows += job.ticket.rows

    def serve(self) -> None:
        """Answer requests until :attr:`stop` is set; engine failures propagate (the server exits)."""
        next_stats = time.monotonic() + self.stats_every_s
        while not self.stop.is_set():
            self._drain(0 if (self.in_engine or len(self.queue)) else POLL_MS)
            self._feed_engine()
            if self.in_engine:
                self._finish_oldest()
            if time.monotonic() >= next_stats:
                for client, stats in self.stats.items():
                    if stats.window_rows:
                        self.log(stats.line(client))
                next_stats = time.monotonic() + self.stats_every_s

    def close(self) -> None:
        for client, stats in self.stats.items():
            self.log(stats.line(client, final=True))
        if self._sock is not None:
            self._sock.close(linger=0)
            self._ctx.destroy(linger=0)  # term would wait for any socket still open
            self._sock = self._ctx = None


def serve_recipe(recipe: str, overrides: list[str], *, listen: str, token: Optional[str] = None,
                 max_rows: Optional[int] = None, max_request_mb: float = MAX_REQUEST_MB,
                 stats_every_s: float = STATS_EVERY_S) -> int:
    """``kdcore serve-teacher``: the recipe's teacher engine served until SIGINT/SIGTERM; exit code."""
    import os

    import zmq

    from kdcore.channel import ChannelError
    from kdcore.config import RecipeError, load_recipe
    from kdcore.engines import TeacherError, create_teacher_engine
    from kdcore.paths import ModelNotFoundError
    from kdcore.plugins import load_registry

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
    registry = load_registry()
    try:
        cfg = load_recipe(recipe, overrides, registry=registry)
    except RecipeError as exc:
        print(f"kdcore serve-teacher: {exc}", file=sys.stderr)
        return 2
    # the most rows one micro-batch of this recipe can ask for (responses are capped by max_length too)
    rows = max_rows or cfg.train.max_tokens_per_micro_batch or cfg.train.micro_batch_size * cfg.data.max_length
    engine = create_teacher_engine(cfg.teacher, registry=registry, max_rows=int(rows),
                                   threads=cfg.teacher.threads or None)
    server = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        engine.start()
        fingerprint = wire.teacher_fingerprint(cfg.teacher.path)
        server = TeacherServer(engine, fingerprint, listen=listen, token=token,
                               max_request_bytes=int(max_request_mb * (1 << 20)), stats_every_s=stats_every_s)
        server.stop = stop
        try:
            where = server.bind()
        except zmq.ZMQError as exc:  # address in use, or not an address of this machine
            print(f"kdcore serve-teacher: cannot listen on {listen}: {exc}", file=sys.stderr)
            return 2
        _stderr(f"serving teacher '{cfg.teacher.path}' (H={engine.hidden_size}, V={engine.vocab_size}, "
                f"up to {rows} rows a request) on {where}")
        print(where, flush=True)  # stdout: the endpoint alone, for scripts
        server.serve()
        return 0
    except (ChannelError, TeacherError, ModelNotFoundError) as exc:  # clients see the connection close
        _stderr(f"the teacher engine failed, stopping: {str(exc).splitlines()[0]}")
        return 1
    finally:
        if server is not None:
            server.close()
        engine.close()


__all__ = ["TeacherServer", "FairQueue", "serve_recipe", "parse_listen", "is_loopback"]
