"""A pool of ``kdcore serve-teacher`` replicas behind one ``remote`` teacher engine.

``teacher.remote.address: "10.0.0.5:5555,10.0.0.6:5555"`` (comma-separated HOST:PORT entries)
makes the ``remote`` engine a :class:`RemotePool`: one ZeroMQ connection per replica, the same
wire format and fingerprint check as :class:`kdcore.engines.remote.RemoteTeacher` (one address
keeps using that class, unchanged).

Decisions, and why:

- **Least outstanding work**: a request goes to the live replica with the fewest unanswered
  rows, so a slow or busy replica gets less; ties rotate (each job sees only its own load).
  Requests are idempotent and the teacher is
  deterministic, so *where* a request was computed never changes the hidden states (and so the
  losses): the test compares a run against two replicas with a run against one.
- **A replica that dies or hangs is dropped, not fatal**: closed connections are noticed at
  once through the socket's monitor, a replica that holds requests and sends nothing (not even
  the server's ``busy`` keepalive) for ``timeout_s`` counts as hung. One warning line names it,
  its socket is closed (so a late reply can never arrive twice) and its requests are resent to
  the others. Only when no replica is left does the run stop, with one line naming each.
- **A replica coming back is used again**: a dropped replica gets a fresh socket with a queued
  hello right away; ZeroMQ keeps trying to connect in the background and the hello is answered
  once the server is back (a new process on the same address, or a stopped one continued).
  Nothing blocks the trainer meanwhile.
- One thread only, like :class:`RemoteTeacher` (ZeroMQ sockets are not thread safe).
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional

import torch

from kdcore.infra.channel import ChannelTimeout, TeacherDiedError
from kdcore.engines.remote import wire
from kdcore.engines.protocol import HiddenRequest, Ticket
# the client's start-up, sockets, hello checks, request checks and slot ring: shared, not copied
from kdcore.engines.remote.client import RemoteTeacherError, _RemoteBase, _Slots
from kdcore.engines.remote.config import parse_addresses  # noqa: F401  (the pool's address list)

POLL_MS = 200  # poll step: bounds how late a closed connection is noticed
REJOIN_S = 1.0  # a replica whose hello socket lost its connection gets a new one after this


def _warn(line: str) -> None:
    print(f"kdcore: warning: {line}", file=sys.stderr, flush=True)


class _Replica:
    """One server of the pool: its socket and what it holds."""

    def __init__(self, address: str):
        self.address = address
        self.sock = self.monitor = None
        self.state = "down"  # down -> joining (hello queued) -> live -> down ...
        self.server: dict[str, Any] = {}
        self.held: set[int] = set()  # request seqs sent here and not answered
        self.rows = 0  # rows of those requests: the load measure
        self.heard = 0.0  # monotonic time of its last message
        self.next_try = 0.0
        self.why = "not connected yet"
        self.served = 0  # requests answered (for tests and the bench)


class RemotePool(_RemoteBase):
    """Client of several ``kdcore serve-teacher`` replicas of one teacher. Use it from one thread.

    Args are those of :class:`kdcore.engines.remote.RemoteTeacher`, with ``addresses`` a list
    (or the comma-separated text) of HOST:PORT entries. ``retries`` is accepted and unused: the
    pool's answer to a lost server is the other replicas and the lost one's return.
    """

    def __init__(self, spec: str, *, addresses: Any, token: Optional[str] = None, timeout_s: float = 20.0,
                 retries: int = 0, dtype: str | torch.dtype = "float32", max_rows: int = 8192, n_slots: int = 2):
        self._setup(spec, token, timeout_s, dtype, max_rows, n_slots)
        given = addresses if isinstance(addresses, (list, tuple)) else [addresses]
        self.replicas = [_Replica(ep) for ep in parse_addresses(",".join(str(a) for a in given))]
        self.address = ",".join(r.address for r in self.replicas)
        self._requests: dict[int, list] = {}  # seq -> frames, until answered (resent on a loss)
        self._rows: dict[int, int] = {}
        self.drops = self.rejoins = 0
        self._turn = 0  # where the next tie starts

    # ------------------------------------------------------------------ connections

    def start(self) -> "RemotePool":
        if self._started:
            return self
        self._open_context()
        try:
            for r in self.replicas:
                self._join(r)
            deadline = time.monotonic() + self.timeout_s
            while any(r.state == "joining" for r in self.replicas) and time.monotonic() < deadline:
                self._pump(POLL_MS)
            if not self._live():
                raise ChannelTimeout(f"no teacher server of {self.address} answered within {self.timeout_s:.0f} s "
                                     f"(is `kdcore serve-teacher` running there and reachable?)")
            for r in self.replicas:
                if r.state != "live":
                    _warn(f"teacher server at {r.address} did not answer at start; used once it does")
        except BaseException:
            self.close()
            raise
        self.channel = _Slots(self.n_slots, self.max_rows, self.hidden_size, self.dtype)
        self._started = True
        return self

    def _join(self, r: _Replica) -> None:
        """A fresh socket with the hello queued; the replica is live once the hello is answered."""
        self._close_socket(r)
        r.sock, r.monitor = self._dealer(r.address)
        r.state = "joining"

    def _close_socket(self, r: _Replica) -> None:
        self._close_dealer(r.sock, r.monitor)
        r.sock = r.monitor = None

    def _live(self) -> list[_Replica]:
        return [r for r in self.replicas if r.state == "live"]

    def _drop(self, r: _Replica, why: str) -> None:
        """One warning line, the socket closed, its requests resent to the least loaded others."""
        was_live, held = r.state == "live", sorted(r.held)
        r.state, r.why, r.held, r.rows = "down", why, set(), 0
        self._close_socket(r)
        r.next_try = time.monotonic() + REJOIN_S
        if not was_live:
            return  # a hello that lost its connection: tried again later, nothing to say
        self.drops += 1
        others = self._live()
        if others:
            _warn(f"teacher server at {r.address} {why}; dropped from the pool, {len(held)} requests resent to "
                  f"the {len(others)} left (it is used again once it answers)")
        for seq in held:
            self._send(seq)

    def _no_server_left(self) -> TeacherDiedError:
        causes = "; ".join(f"{r.address} {r.why}" for r in self.replicas)
        return TeacherDiedError(f"no teacher server left of the {len(self.replicas)} in teacher.remote.address "
                                f"({causes}; {len(self._requests)} requests unanswered)")

    def close(self) -> None:
        """Say goodbye to each live replica and close every socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        import zmq

        said = False
        for r in self.replicas:
            if r.sock is not None and r.state == "live":
                try:
                    r.sock.send_multipart([self._header("bye")], flags=zmq.NOBLOCK)
                    said = True
                except zmq.ZMQError:
                    pass
        if said:
            time.sleep(0.05)  # linger 0 would drop the byes unsent
        for r in self.replicas:
            self._close_socket(r)
        self._close_context()

    # ------------------------------------------------------------------ the event loop

    def _pump(self, wait_ms: int, limit: Optional[float] = None) -> None:
        """Poll every socket once: replies, hellos, closed connections, silence, rejoins."""
        import zmq

        now = time.monotonic()
        for r in self.replicas:
            if r.state == "down" and r.why != "refused" and now >= r.next_try and self._ctx is not None:
                self._join(r)
        poller = zmq.Poller()
        for r in self.replicas:
            if r.sock is not None:
                poller.register(r.sock, zmq.POLLIN)
                poller.register(r.monitor, zmq.POLLIN)
        ready = dict(poller.poll(wait_ms))
        for r in self.replicas:
            if r.monitor is not None and r.monitor in ready:
                r.monitor.recv_multipart()  # EVENT_DISCONNECTED
                self._drop(r, "closed the connection (the server stopped or was killed)")
            elif r.sock is not None and r.sock in ready:
                while r.sock is not None and r.sock.poll(0):
                    self._take(r, r.sock.recv_multipart(copy=False))
        now, limit = time.monotonic(), self.timeout_s if limit is None else limit
        for r in self._live():
            if r.held and now - r.heard > limit:
                self._drop(r, f"sent nothing for {limit:.0f} s (slow or hung server)")

    def _take(self, r: _Replica, frames: list) -> None:
        header = wire.decode_header(frames[0].buffer)
        r.heard = time.monotonic()
        kind, rid = header.get("type"), header.get("rid")
        if r.state == "joining":
            problem = self._hello_problem(header)
            if problem:
                if not self._started:  # a misconfigured replica at start: the run should not begin
                    raise RemoteTeacherError(f"teacher server at {r.address} refused the connection: {problem}")
                _warn(f"teacher server at {r.address} refused the connection: {problem}; left out of the pool")
                self._close_socket(r)
                r.state, r.why = "down", "refused"
                return
            if self._started:
                self.rejoins += 1
                _warn(f"teacher server at {r.address} answers again; back in the pool")
            r.server, r.state = header, "live"
            return
        if kind == "busy":
            return
        if kind == "error":
            raise RemoteTeacherError(f"teacher server at {r.address} refused request {rid}: {header.get('error')}")
        if rid not in r.held:
            return
        if len(frames) != 2:
            raise RemoteTeacherError(f"teacher server at {r.address}: malformed reply to request {rid}")
        try:
            wire.unpack_hidden_into(header, frames[1].buffer, self.channel.view(rid))
        except wire.WireError as exc:
            raise RemoteTeacherError(f"teacher server at {r.address}: reply to request {rid}: {exc}") from None
        r.held.discard(rid)
        r.rows -= self._rows[rid]
        r.served += 1
        del self._requests[rid]

    def _send(self, seq: int) -> None:
        """Send request ``seq`` to the live replica with the fewest unanswered rows."""
        live = self._live()
        if not live:
            raise self._no_server_left()
        # ties (an idle pool: every job's usual case) rotate, so jobs that cannot see each other's
        # load still spread over the replicas instead of all picking the first
        n = len(self.replicas)
        r = min(live, key=lambda x: (x.rows, len(x.held), (self.replicas.index(x) - self._turn) % n))
        self._turn += 1
        if not r.held:
            r.heard = time.monotonic()  # silence counts from the first request it holds
        r.held.add(seq)
        r.rows += self._rows[seq]
        r.sock.send_multipart(self._requests[seq])

    # ------------------------------------------------------------------ hidden states

    def _cap(self, key: str) -> int:
        values = [int(r.server.get(key, 0)) for r in self.replicas if r.server.get(key)]
        return min(values) if values else 0

    def submit(self, request: HiddenRequest) -> Ticket:
        self._check_usable()
        self._check_capacity()
        self._pump(0)  # take in replies, rejoins and losses before choosing a replica
        ticket, frames = self._request(request, self._cap, f"a teacher server of {self.address}")
        self.channel.take(ticket.seq, ticket.rows)
        self._requests[ticket.seq], self._rows[ticket.seq] = frames, ticket.rows
        try:
            self._send(ticket.seq)
        except BaseException:
            self.channel.release(ticket.seq)
            del self._requests[ticket.seq]
            raise
        return self._track(ticket)

    def result(self, ticket: Ticket, timeout: Optional[float] = None) -> torch.Tensor:
        self._check_usable()
        return self._ticket_view(ticket, lambda: self._wait_for(ticket.seq, timeout))

    def release(self, ticket: Ticket) -> None:
        self._check_usable()
        self._release_ticket(ticket)
        self._rows.pop(ticket.seq, None)

    def _wait_for(self, seq: int, timeout: Optional[float]) -> torch.Tensor:
        while seq in self._requests:
            if not self._live():
                raise self._no_server_left()
            self._pump(POLL_MS, limit=timeout)
        return self.channel.view(seq)


__all__ = ["RemotePool", "parse_addresses"]
