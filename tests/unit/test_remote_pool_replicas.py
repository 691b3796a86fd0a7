"""The remote pool's answer to a lost replica, in seconds: real `serve-teacher` servers
(:class:`TeacherServer`) on threads of this process with a stand-in engine, a real
:class:`RemotePool` over loopback ZeroMQ. A replica that dies (its socket closed) or hangs
(alive, silent) is dropped with one warning line and its request resent; one coming back on
the same port is used again; none left stops with one line. The end-to-end twin with real
`kdcore serve-teacher` processes and a training run is `long` in tests/integration/test_remote_pool.py."""

from __future__ import annotations

import threading
import time

import pytest
import torch

zmq = pytest.importorskip("zmq")

from kdcore.infra.channel import TeacherDiedError  # noqa: E402
from kdcore.engines.protocol import HiddenRequest, Ticket  # noqa: E402
from kdcore.engines.remote import wire  # noqa: E402
from kdcore.engines.remote.pool import RemotePool  # noqa: E402
from kdcore.engines.remote.server import TeacherServer  # noqa: E402

TOKEN = "pool-secret"
HIDDEN, VOCAB = 4, 100


class StandIn:
    """What a server needs of an engine: rows derived from the ids (deterministic, so a resent
    request gets the same answer from any replica)."""

    n_slots, max_rows, vocab_size, hidden_size, dtype = 2, 64, VOCAB, HIDDEN, torch.float32

    def __init__(self):
        self.requests = {}

    def submit(self, request):
        ticket = Ticket(len(self.requests), request.rows)
        self.requests[ticket.seq] = request
        return ticket

    def result(self, ticket, timeout=None):
        return expected(self.requests[ticket.seq])

    def release(self, ticket):
        pass

    def close(self):
        pass


def expected(request: HiddenRequest) -> torch.Tensor:
    ids = request.input_ids.masked_fill(request.attention_mask == 0, 0)
    rows = torch.cat([ids[b, torch.as_tensor(p, dtype=torch.int64)] for b, p in enumerate(request.positions)])
    return rows.float()[:, None] + torch.arange(HIDDEN, dtype=torch.float32)


class Replica:
    """A server on a thread. ``hang()`` stops answering (the socket stays open: a silent peer);
    ``kill()`` closes the socket (the connection drops, as when the process dies)."""

    def __init__(self, fingerprint: dict, listen: str = "127.0.0.1:0"):
        self.server = TeacherServer(StandIn(), fingerprint, listen=listen, token=TOKEN, log=lambda line: None)
        self.endpoint = self.server.bind()
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()

    def hang(self) -> None:
        self.server.stop.set()
        self.thread.join(10)

    def kill(self) -> None:
        self.hang()
        self.server.close()


@pytest.fixture
def fingerprint(tmp_path):
    """A teacher folder with only a config: the pool reads the fingerprint from it, nothing else."""
    from transformers import LlamaConfig

    LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                num_key_value_heads=1).save_pretrained(tmp_path / "teacher")
    return str(tmp_path / "teacher"), wire.teacher_fingerprint(str(tmp_path / "teacher"))


def request(seed: int) -> HiddenRequest:
    ids = torch.randint(1, VOCAB, (2, 6), generator=torch.Generator().manual_seed(seed))
    return HiddenRequest(ids, torch.ones(2, 6, dtype=torch.int64), [[0, 3, 5], [1, 2]])


def two_in_flight(pool: RemotePool, seed: int, silence_s=None) -> None:
    """Two requests at once (least outstanding work: one per live replica), each answered right;
    ``silence_s``: how long a replica holding one may say nothing (None: the pool's timeout_s)."""
    reqs = [request(seed), request(seed + 1)]
    tickets = [pool.submit(r) for r in reqs]
    for r, t in zip(reqs, tickets):
        assert torch.equal(pool.result(t, timeout=silence_s), expected(r))
        pool.release(t)


def warnings(capfd) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.startswith("kdcore: warning:")]


def test_a_lost_replica_is_dropped_resent_used_again_and_none_left_stops(fingerprint, capfd):
    spec, fp = fingerprint
    a, b = Replica(fp), Replica(fp)
    # a long timeout_s: on a loaded machine a live server may be slow to answer; the hang below is timed alone
    pool = RemotePool(spec, addresses=[a.endpoint, b.endpoint], token=TOKEN, timeout_s=60, max_rows=64, n_slots=4)
    ra, rb = pool.replicas
    try:
        pool.start()
        two_in_flight(pool, 0)
        assert (ra.served, rb.served) == (1, 1) and not warnings(capfd)

        # dies while holding a request: noticed at once (the socket's monitor), resent to a
        b.hang()
        reqs = [request(10), request(11)]
        tickets = [pool.submit(r) for r in reqs]
        assert len(rb.held) == 1
        b.kill()
        for r, t in zip(reqs, tickets):
            assert torch.equal(pool.result(t), expected(r))
            pool.release(t)
        assert warnings(capfd) == [f"kdcore: warning: teacher server at {b.endpoint} closed the connection (the "
                                   f"server stopped or was killed); dropped from the pool, 1 requests resent to the "
                                   f"1 left (it is used again once it answers)"]
        assert (ra.served, rb.served, rb.state) == (3, 1, "down")

        # comes back on the same port: rejoined in the background, then given work again
        b = Replica(fp, listen=b.endpoint.removeprefix("tcp://"))
        deadline = time.monotonic() + 30
        while rb.state != "live" and time.monotonic() < deadline:
            two_in_flight(pool, 20)
            time.sleep(0.1)
        assert rb.state == "live", rb.why
        assert warnings(capfd) == [f"kdcore: warning: teacher server at {b.endpoint} answers again; back in the pool"]
        served = rb.served
        two_in_flight(pool, 30)
        assert rb.served == served + 1

        # hangs while holding a request (alive, silent: not even the server's busy keepalive):
        # dropped after the silence allowed, its request answered by a
        b.hang()
        two_in_flight(pool, 40, silence_s=3)
        assert warnings(capfd) == [f"kdcore: warning: teacher server at {b.endpoint} sent nothing for 3 s (slow or "
                                   f"hung server); dropped from the pool, 1 requests resent to the 1 left (it is "
                                   f"used again once it answers)"]
        assert rb.state != "live"

        # none left: one line naming each replica and why
        a.kill()
        with pytest.raises(TeacherDiedError) as info:
            two_in_flight(pool, 50)
        line = str(info.value)
        assert "\n" not in line and line.startswith("no teacher server left of the 2 in teacher.remote.address (")
        assert f"{a.endpoint} closed the connection" in line and f"{b.endpoint} " in line, line
    finally:
        pool.close()
        for r in (a, b):
            r.kill()


def test_the_one_address_client_shares_the_pools_start_up(fingerprint, capfd):
    """RemoteTeacher (one address) on the start-up code it shares with the pool: rows right, a
    wrong token refused at connect with one line naming the server, a closed engine refused."""
    from kdcore.engines.protocol import TeacherError
    from kdcore.engines.remote.client import RemoteTeacher, RemoteTeacherError

    spec, fp = fingerprint
    a = Replica(fp)
    try:
        with RemoteTeacher(spec, address=a.endpoint.removeprefix("tcp://"), token=TOKEN, timeout_s=60,
                           max_rows=64) as one:
            r = request(0)
            t = one.submit(r)
            assert torch.equal(one.result(t), expected(r))
            one.release(t)
        with pytest.raises(TeacherError, match="the teacher engine is closed"):
            one.submit(r)
        with pytest.raises(RemoteTeacherError) as info:
            RemoteTeacher(spec, address=a.endpoint, token="wrong", timeout_s=60, max_rows=64).start()
        assert str(info.value).startswith(f"teacher server at {a.endpoint} refused the connection: ")
        assert "\n" not in str(info.value)
    finally:
        a.kill()
