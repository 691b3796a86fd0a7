"""The ``remote`` teacher engine: hidden states from a ``kdcore serve-teacher`` on another machine.

``teacher.engine: remote`` with ``teacher.remote.address: HOST:PORT`` sends each micro-batch's
token ids to the server (:mod:`kdcore.engines.remote.server`) and receives the hidden states
over ZeroMQ (wire format: :mod:`kdcore.engines.remote.wire`). The trainer keeps its pipelining:
``submit`` only queues the message (ZeroMQ's I/O thread sends it while the student trains) and
``result`` polls the socket, copying replies into a buffer preallocated per slot.

Decisions, and why:

- **The teacher head is loaded here, from ``teacher.path``** (as with every engine): the loss
  rebuilds teacher logits chunk by chunk from ``[rows, H]`` hidden states, which are ``V / H``
  times smaller than logits (~30x for a 7B teacher). The student side therefore needs the
  teacher's config and head weights locally; the fingerprint checked at connect (model name,
  config hash, hidden and vocab size) makes sure both sides mean the same teacher.
- **Failures stop the run within ``timeout_s``** (default 20 s, inside the 30 s budget): a
  server that closes the connection (stopped, killed) is noticed at once through the socket's
  monitor; a server that sends nothing (hung, overloaded, unreachable host) after
  ``timeout_s`` (a live server whose engine is busy or restarting says ``busy`` every few
  seconds, so only a silent one counts as lost). With ``retries`` > 0 the engine instead
  opens a new connection (hello and fingerprint check included) and resends every unanswered
  request — safe, since hidden-state requests are idempotent.
- One socket per engine, used only from the trainer's thread (ZeroMQ sockets are not thread
  safe); each rank of a multi-rank run has its own engine and client id.
"""

from __future__ import annotations

import os
import socket as _socket
import time
import uuid
from typing import Any, Optional

import torch

from kdcore.infra.channel import ChannelError, ChannelTimeout, TeacherDiedError
from kdcore.engines.remote import wire
from kdcore.engines.protocol import HiddenRequest, TeacherEngine, TeacherError, Ticket
from kdcore.modeling import models
from kdcore.modeling.models import torch_dtype

POLL_MS = 200  # socket poll step: bounds how late a closed connection is noticed


class RemoteTeacherError(TeacherError, ChannelError):
    """The server refused the connection or a request (mismatch, wrong token, bad request).

    A :class:`ChannelError` too, so the trainer stops with this one line like any teacher failure."""


def endpoint(address: str) -> str:
    """``tcp://HOST:PORT`` for ``HOST:PORT`` (or a ``tcp://`` address as is); one-line error otherwise."""
    if address.startswith("tcp://"):
        address = address[len("tcp://"):]
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TeacherError(f"teacher.remote.address '{address}' must look like HOST:PORT (e.g. 10.0.0.5:5555)")
    return f"tcp://{host}:{port}"


class _Slots:
    """``n_slots`` preallocated ``[max_rows, H]`` buffers; each outstanding ticket owns one."""

    def __init__(self, n_slots: int, max_rows: int, hidden: int, dtype: torch.dtype):
        self.data = torch.empty(n_slots, max_rows, hidden, dtype=dtype)
        self._free = list(range(n_slots))[::-1]
        self._held: dict[int, tuple[int, int]] = {}  # seq -> (slot, rows)

    def take(self, seq: int, rows: int) -> torch.Tensor:
        slot = self._free.pop()
        self._held[seq] = (slot, rows)
        return self.data[slot, :rows]

    def view(self, seq: int) -> torch.Tensor:
        slot, rows = self._held[seq]
        return self.data[slot, :rows]

    def release(self, seq: int) -> None:
        slot, _ = self._held.pop(seq)
        self._free.append(slot)


class _RemoteBase(TeacherEngine):
    """What the one-server client and the pool of replicas (:mod:`kdcore.engines.remote.pool`)
    share, so the two cannot drift: settings, the ZeroMQ context, a DEALER socket with its hello
    queued, the checks of the hello's answer, a request's checks against a server's caps, the head."""

    def _setup(self, spec: str, token: Optional[str], timeout_s: float, dtype: str | torch.dtype, max_rows: int,
               n_slots: int) -> None:
        self.spec = str(spec)
        self.token = token if token is not None else os.environ.get("KDFLOW_TEACHER_TOKEN")
        self.timeout_s = float(timeout_s)
        self.dtype = torch_dtype(dtype)
        self.max_rows = int(max_rows)
        self.n_slots = int(n_slots)
        self.client_id = f"{_socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._init_tickets()
        self._ctx = None
        self._started = self._closed = False
        self._head: Optional[torch.Tensor] = None

    def _open_context(self) -> None:
        """The fingerprint this side expects and a fresh context (start's first part)."""
        if self._closed:
            raise TeacherError("this teacher engine was closed; build a new one")
        import zmq

        self.fingerprint = wire.teacher_fingerprint(self.spec)
        self.hidden_size, self.vocab_size = self.fingerprint["hidden_size"], self.fingerprint["vocab_size"]
        self._ctx = zmq.Context()
        self._ctx.setsockopt(zmq.LINGER, 0)  # every socket of it, the monitor's too: closing never waits
        self._ctx.setsockopt(zmq.BLOCKY, 0)  # and terminating it never waits (also when garbage-collected)

    def _close_context(self) -> None:
        if self._ctx is not None:
            # destroy, not term: term waits forever for any socket still open in the context
            # (one left by a failed reconnect, say), and so would the context's finaliser
            self._ctx.destroy(linger=0)
            self._ctx = None

    def _header(self, kind: str, **fields: Any) -> bytes:
        return wire.encode_header({"v": wire.PROTOCOL_VERSION, "type": kind, "client": self.client_id,
                                   "token": self.token, **fields})

    def _dealer(self, address: str) -> tuple[Any, Any]:
        """A new socket to ``address`` with the hello queued, and its monitor (closed connections)."""
        import zmq

        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)  # never block close on messages a dead server will not take
        if "[" in address:
            sock.setsockopt(zmq.IPV6, 1)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(address)
        sock.send_multipart([self._header("hello", fingerprint=self.fingerprint)])
        return sock, monitor

    @staticmethod
    def _close_dealer(sock: Any, monitor: Any) -> None:
        if sock is not None:
            try:
                sock.disable_monitor()
            except Exception:  # noqa: BLE001 - the socket may be half closed already
                pass
            sock.close(linger=0)
        if monitor is not None:
            monitor.close(linger=0)

    def _hello_problem(self, header: dict) -> Optional[str]:
        """Why a server's answer to the hello refuses it (None: it serves our teacher)."""
        # the server's own refusal first (it names both sides), then our checks of its answer
        problem = str(header.get("error")) if header.get("type") == "error" else None
        return (problem or wire.version_mismatch(header.get("v"), side="server")
                or wire.fingerprint_mismatch(self.fingerprint, header.get("fingerprint")))

    def _check_usable(self) -> None:
        if not self._started:
            raise TeacherError("the teacher engine is not started (call start() or use it as a context manager)")
        if self._closed:
            raise TeacherError("the teacher engine is closed")

    def _request(self, request: HiddenRequest, caps: Any, server: str) -> tuple[Ticket, list]:
        """A checked request's ticket and frames. ``caps(key)``: the server's cap (0: none);
        ``server``: how the errors name it. What a server would refuse is refused here, unsent."""
        tokens, cap = request.input_ids.numel(), caps("max_tokens")
        if cap and tokens > cap:
            raise RemoteTeacherError(f"the batch has {tokens} tokens but {server} takes at most {cap} in one "
                                     f"request (its --max-tokens)")
        rows_cap = caps("max_rows") or self.max_rows
        if request.rows > rows_cap:
            raise RemoteTeacherError(f"the batch asks for {request.rows} hidden-state rows but {server} takes at "
                                     f"most {rows_cap} (its --max-rows)")
        request.validate(vocab_size=self.vocab_size, max_rows=self.max_rows)
        fields, payload = wire.pack_request(request)
        ticket = self._new_ticket(request)
        frames = [self._header("hidden", rid=ticket.seq, **fields), *payload]
        size, cap = sum(len(f) for f in frames), caps("max_request_bytes")
        if cap and size > cap:
            raise RemoteTeacherError(f"a request of {size} bytes is more than {server} takes ({cap} bytes, its "
                                     f"--max-request-mb)")
        return ticket, frames

    def lm_head(self, dtype: str | torch.dtype | None = None) -> torch.Tensor:
        """``[V, H]`` head read alone from ``teacher.path`` on this machine (see the module docstring)."""
        if self._head is None:
            self._head = models.load_lm_head(self.spec, dtype=self.dtype)
        return self._head if dtype is None else self._head.to(models.torch_dtype(dtype))


class RemoteTeacher(_RemoteBase):
    """Client of a ``kdcore serve-teacher`` server. Use it from one thread.

    Args:
        spec: the teacher's path here (head, config and fingerprint are read from it).
        address: ``HOST:PORT`` of the server.
        token: the server's shared secret (None: ``KDFLOW_TEACHER_TOKEN``, else none).
        timeout_s: seconds without any reply before the server counts as lost.
        retries: new connections tried after a loss before the run stops.
        dtype: dtype of the hidden states handed to the trainer (replies are converted to it).
        max_rows: rows per slot = the most hidden states one request may ask for.
        n_slots: requests in flight; 2 lets the server compute batch k+1 while the student uses k.
    """

    def __init__(self, spec: str, *, address: str, token: Optional[str] = None, timeout_s: float = 20.0,
                 retries: int = 0, dtype: str | torch.dtype = "float32", max_rows: int = 8192, n_slots: int = 2):
        self._setup(spec, token, timeout_s, dtype, max_rows, n_slots)
        self.address = endpoint(address)
        self.retries = int(retries)
        self._unanswered: dict[int, list] = {}  # seq -> the request's frames (resent after a reconnect)
        self._sock = self._monitor = None
        self.server: dict[str, Any] = {}
        self.reconnects = 0

    # ------------------------------------------------------------------ connection

    def start(self) -> "RemoteTeacher":
        if self._started:
            return self
        self._open_context()
        try:
            self._connect()
        except BaseException:
            self.close()
            raise
        self.channel = _Slots(self.n_slots, self.max_rows, self.hidden_size, self.dtype)
        self._started = True
        return self

    def _connect(self) -> None:
        """A new socket, the hello exchange and the fingerprint check (raises on refusal/silence)."""
        self._drop_socket()
        self._sock, self._monitor = self._dealer(self.address)
        if not self._sock.poll(self.timeout_s * 1000):
            raise ChannelTimeout(f"teacher server at {self.address} did not answer within {self.timeout_s:.0f} s "
                                 f"(is `kdcore serve-teacher` running there and reachable?)")
        header = wire.decode_header(self._sock.recv_multipart()[0])
        problem = self._hello_problem(header)
        if problem:
            raise RemoteTeacherError(f"teacher server at {self.address} refused the connection: {problem}")
        self.server = header

    def _drop_socket(self) -> None:
        self._close_dealer(self._sock, self._monitor)
        self._sock = self._monitor = None

    def close(self) -> None:
        """Say goodbye (so the server logs this client's totals) and close the socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._sock is not None and self.server:
            import zmq

            try:
                self._sock.send_multipart([self._header("bye")], flags=zmq.NOBLOCK)
                time.sleep(0.05)  # linger 0 would drop it unsent; a dead server costs only this
            except zmq.ZMQError:
                pass
        self._drop_socket()
        self._close_context()

    def _lost(self, why: str) -> None:
        """The connection is gone: reconnect and resend when retries allow, else raise."""
        unanswered = sorted(self._unanswered)
        while self.retries > 0:
            self.retries -= 1
            try:
                self._connect()
            except (ChannelTimeout, RemoteTeacherError, wire.WireError) as exc:
                why = f"{why}; reconnecting failed: {exc}"
                continue
            self.reconnects += 1
            for seq in unanswered:
                self._sock.send_multipart(self._unanswered[seq])
            return
        raise TeacherDiedError(f"teacher server at {self.address} {why} ({len(unanswered)} requests unanswered)")

    # ------------------------------------------------------------------ hidden states

    def submit(self, request: HiddenRequest) -> Ticket:
        """Validate and send a request; returns at once. See :class:`HiddenRequest`."""
        self._check_usable()
        self._check_capacity()
        ticket, frames = self._request(request, lambda key: int(self.server.get(key, 0)),
                                       f"the teacher server at {self.address}")
        self.channel.take(ticket.seq, ticket.rows)
        self._unanswered[ticket.seq] = frames
        self._sock.send_multipart(frames)
        return self._track(ticket)

    def result(self, ticket: Ticket, timeout: Optional[float] = None) -> torch.Tensor:
        """The ``[rows, hidden]`` view of a ticket's slot, valid until ``release``."""
        self._check_usable()
        return self._ticket_view(ticket, lambda: self._wait_for(ticket.seq, timeout))

    def release(self, ticket: Ticket) -> None:
        self._check_usable()
        self._release_ticket(ticket)

    def _wait_for(self, seq: int, timeout: Optional[float]) -> torch.Tensor:
        import zmq

        limit = self.timeout_s if timeout is None else float(timeout)
        deadline = time.monotonic() + limit
        while seq in self._unanswered:
            poller = zmq.Poller()
            poller.register(self._sock, zmq.POLLIN)
            poller.register(self._monitor, zmq.POLLIN)
            ready = dict(poller.poll(POLL_MS))
            if self._monitor in ready:
                self._monitor.recv_multipart()  # EVENT_DISCONNECTED: the server closed the connection
                self._lost("closed the connection (the server stopped or was killed)")
                deadline = time.monotonic() + limit
            elif self._sock in ready:
                while self._sock.poll(0):
                    self._take_reply(self._sock.recv_multipart(copy=False))
                deadline = time.monotonic() + limit  # any reply is progress
            elif time.monotonic() > deadline:
                if self.retries <= 0:
                    raise ChannelTimeout(f"teacher server at {self.address} sent nothing for {limit:.0f} s while "
                                         f"request {seq} was waiting (slow or hung server; raise "
                                         f"teacher.remote.timeout_s if it is only busy)")
                self._lost(f"sent nothing for {limit:.0f} s")
                deadline = time.monotonic() + limit
        return self.channel.view(seq)

    def _take_reply(self, frames: list) -> None:
        header = wire.decode_header(frames[0].buffer)
        rid = header.get("rid")
        if header.get("type") == "busy":
            return  # the server is alive and our requests are waiting there: progress enough
        if header.get("type") == "error":
            raise RemoteTeacherError(f"teacher server at {self.address} refused request {rid}: {header.get('error')}")
        if rid not in self._unanswered:
            return  # answered already (a reply to a request resent after a reconnect)
        if len(frames) != 2:
            raise RemoteTeacherError(f"teacher server at {self.address}: malformed reply to request {rid}")
        try:
            wire.unpack_hidden_into(header, frames[1].buffer, self.channel.view(rid))
        except wire.WireError as exc:
            raise RemoteTeacherError(f"teacher server at {self.address}: reply to request {rid}: {exc}") from None
        del self._unanswered[rid]


__all__ = ["RemoteTeacher", "RemoteTeacherError", "endpoint"]
