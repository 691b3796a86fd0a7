"""`kdcore serve-teacher`'s caps on what one peer can make it do, without a model (issue 24).

The server is driven message by message (``handle``) with a stand-in engine that is never
called: what is tested is what the server queues, refuses, counts and logs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

zmq = pytest.importorskip("zmq")

from kdcore.engines.remote import server as rs  # noqa: E402
from kdcore.engines.remote import wire  # noqa: E402
from kdcore.engines.protocol import HiddenRequest  # noqa: E402

TOKEN = "unit-secret"


@pytest.fixture
def server():
    """A bound server (its replies go nowhere) that records its log lines in ``server.lines``."""
    lines: list[str] = []
    srv = rs.TeacherServer(SimpleNamespace(vocab_size=100, max_rows=64, n_slots=2), {}, token=TOKEN,
                           log=lines.append)
    srv.lines = lines
    srv.bind()
    yield srv
    srv.close()


def hidden_message(client="x", rid=0, B=3, L=12, **extra) -> list[bytes]:
    ids = torch.randint(0, 100, (B, L), generator=torch.Generator().manual_seed(0))
    fields, frames = wire.pack_request(HiddenRequest(ids, torch.ones(B, L, dtype=torch.int64), [[0, 1]] * B))
    head = {"v": wire.PROTOCOL_VERSION, "client": client, "token": TOKEN, "rid": rid, **fields, **extra}
    return [wire.encode_header(head), *frames]


def test_the_queue_cap_is_per_connection_whatever_name_the_client_gives(server):
    # issue 24: 300 requests queued from one socket by giving each another client name
    for i in range(300):
        server.handle([b"one-socket", *hidden_message(client=f"name-{i}", rid=i)])
    assert len(server.queue) == rs.MAX_QUEUED_PER_CLIENT  # was 300
    assert server.queue.queued(b"one-socket") == rs.MAX_QUEUED_PER_CLIENT
    conn = server.conns[b"one-socket"]
    assert conn.name == "name-0"  # named once, at its first message: later names change nothing
    assert (conn.waiting, conn.stats.refused) == (rs.MAX_QUEUED_PER_CLIENT, 300 - rs.MAX_QUEUED_PER_CLIENT)
    assert f"{rs.MAX_QUEUED_PER_CLIENT} requests of this connection are waiting already" in server.lines[-1]
    server.handle([b"another", *hidden_message(client="name-0")])  # the same name, another connection
    assert server.queue.queued(b"another") == 1


def test_the_server_caps_the_requests_waiting_from_all_connections(server):
    n = rs.MAX_QUEUED_TOTAL // rs.MAX_QUEUED_PER_CLIENT + 2
    for c in range(n):
        for i in range(rs.MAX_QUEUED_PER_CLIENT):
            server.handle([f"conn-{c}".encode(), *hidden_message(client=f"c{c}", rid=i)])
    assert len(server.queue) == server.waiting == rs.MAX_QUEUED_TOTAL
    assert f"the server has {rs.MAX_QUEUED_TOTAL} requests waiting" in server.lines[-1]


def test_peers_without_the_token_leave_no_state_behind(server):
    for i in range(500):
        head = wire.encode_header({"v": wire.PROTOCOL_VERSION, "type": "hello", "client": f"n{i}", "token": "x"})
        server.handle([f"id-{i}".encode(), head])
    server.handle([b"id-x"])  # no header at all
    assert server.conns == {} and server.refused_unknown == 501
    # and a flood of them is counted, not logged line by line (20 lines a second at most)
    refusals = [x for x in server.lines if x.startswith("refused a message")]
    assert len(refusals) < 200, len(refusals)
    server.close()
    assert any("more refusals not logged (at most 20 a second)" in x for x in server.lines)
    assert server.lines[-1] == "501 messages refused before their sender showed the token"


def test_a_deeply_nested_header_is_refused_not_fatal(server):
    # 60 KB of '[' (under the header cap) overflowed json's parser: a RecursionError, not a
    # ValueError, escaped the server's handler and stopped it, without any token
    server.handle([b"p", b"[" * 60_000])
    assert "header nests too deeply" in server.lines[-1] and server.refused_unknown == 1


def test_a_request_over_the_token_cap_is_refused_naming_the_cap(server):
    assert server.max_tokens == 64 * rs.MAX_TOKENS_FACTOR  # the default: from the engine's rows
    server.handle([b"big", *hidden_message(B=1, L=200_000)])
    assert len(server.queue) == 0
    assert ("1 x 200000 = 200000 tokens is more than this server takes in one request (128 tokens, its "
            "--max-tokens)") in server.lines[-1]
    server.handle([b"big", *hidden_message(B=2, L=64)])  # 128: at the cap, taken
    assert server.queue.queued(b"big") == 1


@pytest.mark.parametrize("fields, why", [
    ({"batch": 10_000_000, "length": 0, "rows": 0}, "10000000 x 0 tokens is empty"),
    ({"rows": 100_000}, "100000 hidden-state rows is more than this server takes (64, its --max-rows)"),
])
def test_requests_that_pass_the_token_cap_but_would_still_cost_are_refused_early(server, fields, why):
    head, *frames = hidden_message()
    server.handle([b"p", wire.encode_header({**wire.decode_header(head), **fields}), *frames])
    assert why in server.lines[-1] and len(server.queue) == 0


FORGED = "x\n[serve-teacher 12:00:00] client admin connected\r\x1b[2K"


@pytest.mark.parametrize("field", ["client", "type"])
def test_values_from_a_peer_cannot_forge_or_flood_log_lines(server, field):
    # issue 24: a client name holding a newline wrote a line of its own into the server's log
    header = {"v": wire.PROTOCOL_VERSION, "type": "dance", "client": "ok", "token": TOKEN, "rid": 0}
    header[field] = FORGED + "y" * 50_000
    server.handle([b"peer", wire.encode_header(header)])
    assert server.lines, "nothing logged"
    for line in server.lines:
        assert "\n" not in line and "\r" not in line and "\x1b" not in line, line
        assert len(line) < 700, len(line)
    text = " ".join(server.lines)
    assert "x\\n[serve-teacher 12:00:00] client" in text  # escaped, still readable
    assert f"({len(FORGED) + 50_000} characters)" in text  # shortened, and says so


def test_printable_escapes_and_shortens():
    assert wire.printable("a\nb\tc\x00") == "a\\nb\\tc\\x00"
    assert wire.printable("plain name") == "plain name"
    assert wire.printable("é ü 中") == "é ü 中"  # printable non-ASCII stays as it is
    assert wire.printable("z" * 10, limit=4) == "zzzz... (10 characters)"
    assert wire.printable("\n" * 10, limit=2) == "\\n\\n... (10 characters)"  # cut first: escapes cannot flood
    assert wire.printable({"a": "\n"}) == "{'a': '\\n'}"


def test_request_ids_echoed_back_are_small_integers_only(server):
    blob = hidden_message(rid="r" * 10_000, B=1, L=1000)  # over the cap: refused, its rid echoed
    server.handle([b"p", *blob])
    assert rs._rid("r" * 10_000) is None and rs._rid(True) is None and rs._rid(-1) is None and rs._rid(7) == 7


# ----------------------------------------------------------------------------- the engine thread

HANG, BLOCK = 7, 8  # first token ids that make the stand-in engine hang (time out) or block


class StandInEngine:
    """What the server needs of an engine, in-process: "hidden states" derived from the ids.

    A request whose first id is HANG fails as a real engine's no-progress timeout does; one
    whose first id is BLOCK sets ``blocking`` and blocks until ``release_blocked`` is set."""

    n_slots, max_rows, vocab_size, hidden_size, dtype = 2, 64, 100, 4, torch.float32

    def __init__(self):
        import threading

        self.requests, self.closed = {}, False
        self.blocking, self.release_blocked = threading.Event(), threading.Event()

    dead = False  # True: its process is gone, as a real engine's submit finds out

    def submit(self, request):
        from kdcore.infra.channel import TeacherDiedError
        from kdcore.engines.protocol import Ticket

        if self.dead:
            raise TeacherDiedError("teacher process (pid 1234, 'stand-in') was killed by SIGKILL")
        ticket = Ticket(len(self.requests), request.rows)
        self.requests[ticket.seq] = request
        return ticket

    def result(self, ticket, timeout=None):
        from kdcore.infra.channel import ChannelTimeout

        first = int(self.requests[ticket.seq].input_ids[0, 0])
        if first == HANG:
            raise ChannelTimeout("no progress from the peer for 2 s while waiting for request 0 (it is alive but hung)")
        if first == BLOCK:
            self.blocking.set()
            self.release_blocked.wait(30)
        return expected_rows(self.requests[ticket.seq])

    def release(self, ticket):
        pass

    def close(self):
        self.closed = True


def expected_rows(request) -> torch.Tensor:
    return request.input_ids.sum().float().expand(request.rows, 4).clone()


def request_with_first_id(first: int, seed: int = 0) -> HiddenRequest:
    ids = torch.randint(10, 100, (2, 5), generator=torch.Generator().manual_seed(seed))
    ids[0, 0] = first
    return HiddenRequest(ids, torch.ones(2, 5, dtype=torch.int64), [[0, 4], [1]])


@pytest.fixture
def running():
    """A server on a thread with a stand-in engine that restarts into a fresh one; a socket factory."""
    import threading

    made = []

    def restart():
        made.append(StandInEngine())
        return made[-1]

    srv = rs.TeacherServer(StandInEngine(), {}, token=TOKEN, restart=restart, log=lambda line: None)
    endpoint = srv.bind()
    errors = []

    def serve():
        try:
            srv.serve()
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    ctx = zmq.Context()
    ctx.setsockopt(zmq.BLOCKY, 0)

    def socket():
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        return sock

    yield SimpleNamespace(server=srv, socket=socket, made=made, errors=errors, thread=thread)
    srv.stop.set()
    thread.join(10)
    srv.close()
    ctx.destroy(linger=0)


def send(sock, request: HiddenRequest, rid: int) -> None:
    fields, frames = wire.pack_request(request)
    sock.send_multipart([wire.encode_header({"v": wire.PROTOCOL_VERSION, "type": "hidden", "client": "t",
                                             "token": TOKEN, "rid": rid, **fields}), *frames])


def receive(sock, *, skip_busy: bool = True):
    while True:
        assert sock.poll(20_000), "no reply"
        frames = sock.recv_multipart()
        header = wire.decode_header(frames[0])
        if not (skip_busy and header["type"] == "busy"):
            return header, frames[1:]


def test_a_request_the_engine_fails_on_fails_alone_and_the_engine_is_restarted(running):
    a, b = running.socket(), running.socket()
    send(a, request_with_first_id(HANG), rid=0)
    good = request_with_first_id(20, seed=1)
    send(b, good, rid=5)
    header, _ = receive(a)
    assert header["type"] == "error" and header["rid"] == 0, header
    assert "the teacher engine failed on this request (no progress from the peer for 2 s" in header["error"]
    assert header["error"].endswith("it is restarted, other requests go on")
    header, frames = receive(b)
    assert header["type"] == "hidden" and header["rid"] == 5, header
    assert torch.equal(torch.frombuffer(bytearray(frames[0]), dtype=torch.float32).view(3, 4), expected_rows(good))
    assert len(running.made) == 1 and running.server.engine is running.made[0]
    assert running.thread.is_alive() and not running.errors
    send(a, request_with_first_id(30), rid=1)  # the failed client goes on too
    assert receive(a)[0]["type"] == "hidden"


def test_an_engine_that_died_between_requests_is_restarted_and_the_request_served(running):
    running.server.engine.dead = True
    a = running.socket()
    req = request_with_first_id(40)
    send(a, req, rid=3)
    header, frames = receive(a)
    assert header["type"] == "hidden" and header["rid"] == 3, header
    assert torch.equal(torch.frombuffer(bytearray(frames[0]), dtype=torch.float32).view(3, 4), expected_rows(req))
    assert len(running.made) == 1 and not running.errors


def test_an_engine_that_fails_every_request_stops_the_server(running):
    from kdcore.engines.protocol import TeacherError

    a = running.socket()
    for rid in range(rs.MAX_ENGINE_FAILURES):
        send(a, request_with_first_id(HANG, seed=rid), rid=rid)
    last = [receive(a)[0] for _ in range(rs.MAX_ENGINE_FAILURES)][-1]
    assert last["error"].endswith("the server is stopping"), last
    running.thread.join(20)
    assert not running.thread.is_alive()
    assert isinstance(running.errors[0], TeacherError)
    assert f"failed {rs.MAX_ENGINE_FAILURES} time(s) in a row" in str(running.errors[0])


def test_the_server_answers_and_keeps_waiting_clients_informed_while_the_engine_computes(running, monkeypatch):
    monkeypatch.setattr(rs, "KEEPALIVE_S", 0.05)
    a, b = running.socket(), running.socket()
    send(a, request_with_first_id(BLOCK), rid=0)  # holds the engine
    # two sockets' messages may reach the server in either order: b sends once a's request holds it
    assert running.server.engine.blocking.wait(10)
    send(b, request_with_first_id(20), rid=1)  # waits for it
    for sock in (a, b):  # both hear the server is alive while their requests wait
        assert receive(sock, skip_busy=False)[0] == {"v": wire.PROTOCOL_VERSION, "type": "busy", "waiting": 1}
    late = running.socket()  # a newcomer is answered at once, engine busy or not
    late.send_multipart([wire.encode_header({"v": wire.PROTOCOL_VERSION, "type": "hello", "token": TOKEN,
                                             "client": "late", "fingerprint": {}})])
    assert receive(late)[0]["type"] == "hello"
    running.server.engine.release_blocked.set()
    assert receive(a)[0]["type"] == receive(b)[0]["type"] == "hidden"


def test_a_server_runs_the_teacher_in_its_own_process_unless_the_recipe_names_an_engine(tmp_path):
    from kdcore.engines.factory import DEFAULT_TEACHER_ENGINE
    from kdcore.recipe.loading import load_recipe

    assert DEFAULT_TEACHER_ENGINE != rs.SERVER_DEFAULT_ENGINE == "hf"  # a hung request can be timed out
    assert rs.server_overrides("quickstart", ["train.lr=0.1"]) == ["train.lr=0.1", "teacher.engine=hf"]
    assert load_recipe("quickstart", rs.server_overrides("quickstart", [])).teacher.engine == "hf"
    assert rs.server_overrides("quickstart", ["teacher.engine=inline"]) == ["teacher.engine=inline"]
    named = tmp_path / "named.yaml"
    named.write_text("teacher: {path: t, engine: inline}\nstudent: {path: s}\ndata: {train: d.jsonl}\n"
                     "train: {output_dir: o}\n")
    assert rs.server_overrides(str(named), []) == []
