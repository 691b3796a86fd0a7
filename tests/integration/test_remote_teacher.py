"""The remote teacher: `kdcore serve-teacher` + the `remote` engine over ZeroMQ (loopback, netns)."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from helpers.assets import ROOT, save_tiny_llama
from helpers.train import run_train, train_steps, write_recipe

zmq = pytest.importorskip("zmq")

from kdcore.infra.channel import ChannelTimeout, TeacherDiedError  # noqa: E402
from kdcore.engines.remote import wire  # noqa: E402
from kdcore.engines.protocol import HiddenRequest  # noqa: E402
from kdcore.engines.remote.client import RemoteTeacher, RemoteTeacherError  # noqa: E402
from kdcore.engines.remote.server import FairQueue  # noqa: E402
from helpers.remote import KDCORE, TOKEN, _netns_available, address, client, make_request, start_server, stop_server


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_teacher):
    """One server for the module (small request cap, to test it): (endpoint, its log, the recipe, the process).

    Its token cap is the default: twice the recipe's micro-batch of 4 x 64 tokens."""
    tmp = tmp_path_factory.mktemp("served")
    recipe = write_recipe(tmp, tiny_teacher, teacher={"threads": 1})
    log = tmp / "server.log"
    proc, ep = start_server(recipe, log, "--max-request-mb", "2")
    try:
        yield ep, log, recipe, proc
    finally:
        stop_server(proc)


def reference_hidden(model, req: HiddenRequest) -> torch.Tensor:
    """Last hidden states straight from transformers (no engine involved)."""
    ids = req.input_ids.masked_fill(req.attention_mask == 0, 0)
    pos = (req.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        h = model.get_decoder()(input_ids=ids, attention_mask=req.attention_mask, position_ids=pos).last_hidden_state
    return h.reshape(-1, h.shape[-1])[req.flat_index()]


# ----------------------------------------------------------------------------- units


def test_fair_queue_takes_clients_round_robin():
    q = FairQueue()
    for i in range(4):
        q.push("a", f"a{i}")
    q.push("b", "b0")
    q.push("c", "c0")
    q.push("b", "b1")
    order = [q.pop()[1] for _ in range(len(q))]
    assert order == ["a0", "b0", "c0", "a1", "b1", "a2", "a3"]


def test_wire_rejects_frames_that_disagree_with_the_header():
    req = make_request(0, 100)
    fields, frames = wire.pack_request(req)
    back = wire.unpack_request(fields, frames, max_tokens=1 << 20)
    assert torch.equal(back.flat_index(), req.flat_index()) and torch.equal(back.attention_mask, req.attention_mask)
    with pytest.raises(wire.WireError, match="frame 'mask' has 35 bytes, the header implies 36"):
        wire.unpack_request(fields, [frames[0], frames[1][:-1], *frames[2:]], max_tokens=1 << 20)
    with pytest.raises(wire.WireError, match="'batch' must be an integer"):
        wire.unpack_request({**fields, "batch": -1}, frames, max_tokens=1 << 20)


def test_recipe_checks_the_remote_section(tiny_teacher):
    from kdcore.recipe.loading import validate_raw

    raw = {"teacher": {"path": str(tiny_teacher), "engine": "remote", "remote": {"timeout_s": 0, "retries": -1}},
           "data": {"train": "x.jsonl"}}
    errors = validate_raw(raw)
    assert any(e.startswith("teacher.remote.address: required") for e in errors), errors
    assert any(e.startswith("teacher.remote.timeout_s: must be > 0") for e in errors), errors
    assert any(e.startswith("teacher.remote.retries: must be >= 0") for e in errors), errors
    raw["teacher"]["remote"] = {"address": "nohost"}
    assert any("'nohost' must look like HOST:PORT" in e for e in validate_raw(raw))
    raw["teacher"]["remote"] = {"address": "10.0.0.5:5555", "tokn": "x"}
    assert any("teacher.remote.tokn: unknown key; did you mean 'teacher.remote.token'" in e for e in validate_raw(raw))


def test_listening_beyond_localhost_needs_a_token(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher)
    env = {k: v for k, v in os.environ.items() if k != "KDFLOW_TEACHER_TOKEN"}
    res = subprocess.run([*KDCORE, "serve-teacher", str(recipe), "--listen", "0.0.0.0:0"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT, env=env)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "beyond localhost" in lines[0] and "--token" in lines[0], res.stderr


# ----------------------------------------------------------------------------- one shared server


def test_two_clients_share_a_server_and_get_the_teachers_states(served, tiny_teacher):
    from transformers import AutoModelForCausalLM

    ep, log, _, _ = served
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, torch_dtype=torch.float32).eval()
    with client(tiny_teacher, ep) as a, client(tiny_teacher, ep) as b:
        assert a.hidden_size == 64 and a.server["max_rows"] >= 64
        requests = [make_request(i, a.vocab_size) for i in range(4)]
        got = {"a": [], "b": []}
        # pipelined like the trainer: two requests in flight per client, both clients at once
        ta = [a.submit(requests[0]), a.submit(requests[1])]
        tb = [b.submit(requests[1]), b.submit(requests[0])]
        for k in range(2, 4):
            got["a"].append(a.result(ta[0]).clone()), a.release(ta.pop(0))
            got["b"].append(b.result(tb[0]).clone()), b.release(tb.pop(0))
            ta.append(a.submit(requests[k]))
            tb.append(b.submit(requests[5 - k]))
        for t in ta:
            got["a"].append(a.result(t).clone()), a.release(t)
        for t in tb:
            got["b"].append(b.result(t).clone()), b.release(t)
        ids = (a.client_id, b.client_id)
    for k, req in enumerate(requests):
        ref = reference_hidden(model, req)
        assert got["a"][k].shape == (req.rows, 64)
        torch.testing.assert_close(got["a"][k], ref, rtol=1e-5, atol=1e-5)
    # the same request gives the same bits whichever client asked
    assert [torch.equal(x, y) for x, y in zip(got["a"], [got["b"][i] for i in (1, 0, 3, 2)])] == [True] * 4
    time.sleep(0.5)  # the server logs a client's totals when its bye arrives
    text = log.read_text()
    for cid in ids:
        assert f"client {cid} connected" in text
        line = next(x for x in text.splitlines() if f"client {cid}: 4 requests" in x)
        assert "rows/s" in line, line


def test_bad_messages_are_refused_logged_and_the_server_keeps_serving(served, tiny_teacher):
    ep, log, _, _ = served
    ctx = zmq.Context()
    ctx.setsockopt(zmq.BLOCKY, 0)
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(ep)

    def ask(*frames):
        sock.send_multipart(list(frames))
        assert sock.poll(20_000), f"no answer to {frames[0][:60]!r}"
        return wire.decode_header(sock.recv_multipart()[0])

    def header(**kw):
        return wire.encode_header({"v": wire.PROTOCOL_VERSION, "client": "raw", "token": TOKEN, "rid": 7, **kw})

    fields, frames = wire.pack_request(make_request(0, 100))
    try:
        assert "not JSON" in ask(b"\xff\x00 garbage")["error"]
        assert "not an object" in ask(b"[1, 2]")["error"]
        assert "wrong or missing token" in ask(header(type="hello", token="nope"))["error"]
        assert f"protocol version mismatch: the client speaks 99, the server speaks {wire.PROTOCOL_VERSION}" in \
            ask(wire.encode_header({"v": 99, "type": "hello", "token": TOKEN}))["error"]
        assert "unknown message type 'dance'" in ask(header(type="dance"))["error"]
        assert "frame 'ids'" in ask(header(**fields), frames[0][:-4], *frames[1:])["error"]
        bad_pos = wire.encode_header({"v": wire.PROTOCOL_VERSION, "token": TOKEN, "rid": 8, **fields})
        reply = ask(bad_pos, *frames[:3], (torch.full((fields["rows"],), 500, dtype=torch.int32).numpy().tobytes()))
        assert "outside the sequence length" in reply["error"] and reply["rid"] == 8
        assert "is more than this server takes" in ask(header(type="hidden"), b"\x00" * (2100 << 10))["error"]
    finally:
        sock.close()
        ctx.destroy(linger=0)  # a context left to the garbage collector can block it (zmq's term)
        ctx.term()
    with client(tiny_teacher, ep) as ok:  # still serving
        t = ok.submit(make_request(1, ok.vocab_size))
        assert torch.isfinite(ok.result(t)).all()
        ok.release(t)
    with pytest.raises(RemoteTeacherError, match=r"refused the connection: wrong or missing token"):
        client(tiny_teacher, ep, token="guess").start()
    refused = [x for x in log.read_text().splitlines() if "refused a message" in x]
    assert len(refused) >= 9, refused


def test_a_200000_token_request_is_refused_while_another_client_is_served(served, tiny_teacher):
    """issue 24: one such request (1 MB, under the byte cap) held the engine past its no-progress
    timeout; the student sharing the server died, then the server exited."""
    from transformers import AutoModelForCausalLM

    ep, log, _, proc = served
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher, torch_dtype=torch.float32).eval()
    ctx = zmq.Context()
    ctx.setsockopt(zmq.BLOCKY, 0)
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(ep)
    try:
        with client(tiny_teacher, ep) as other:
            requests = [make_request(10 + i, other.vocab_size) for i in range(3)]
            t0 = other.submit(requests[0])
            L = 200_000
            ids = torch.randint(0, other.vocab_size, (1, L), generator=torch.Generator().manual_seed(0))
            fields, frames = wire.pack_request(HiddenRequest(ids, torch.ones(1, L, dtype=torch.int64), [[0, 1, 2]]))
            assert sum(len(f) for f in frames) < 2 << 20  # under the byte cap: only the token cap stops it
            raw.send_multipart([wire.encode_header({"v": wire.PROTOCOL_VERSION, "type": "hidden", "client": "big",
                                                    "token": TOKEN, "rid": 1, **fields}), *frames])
            t1 = other.submit(requests[1])  # pipelined, like a trainer, while the big one is answered
            got = [other.result(t0).clone()]
            other.release(t0)
            t2 = other.submit(requests[2])
            for t in (t1, t2):
                got.append(other.result(t).clone())
                other.release(t)
            assert raw.poll(60_000), "no reply to the 200,000-token request"
            reply = wire.decode_header(raw.recv_multipart()[0])
            assert reply["type"] == "error" and reply["rid"] == 1, reply
            assert "1 x 200000 = 200000 tokens is more than this server takes in one request (512 tokens, its " \
                   "--max-tokens)" in reply["error"], reply
            assert other.server["max_tokens"] == 512
            # the client itself refuses such a batch before sending it, naming the server's cap
            with pytest.raises(RemoteTeacherError, match=r"600 tokens but the teacher server .* takes at most 512 "
                                                         r"in one request \(its --max-tokens\)"):
                other.submit(make_request(0, other.vocab_size, B=3, L=200))
        for req, h in zip(requests, got):
            torch.testing.assert_close(h, reference_hidden(model, req), rtol=1e-5, atol=1e-5)
    finally:
        raw.close()
        ctx.destroy(linger=0)
    assert proc.poll() is None  # still serving
    with client(tiny_teacher, ep) as later:
        t = later.submit(make_request(20, later.vocab_size))
        assert torch.isfinite(later.result(t)).all()
        later.release(t)
    assert "200000 tokens is more than" in log.read_text()


def _engine_pid(log: Path) -> int:
    import re

    found = re.findall(r"engine pid (\d+)", log.read_text())
    assert found, log.read_text()[-2000:]
    return int(found[-1])


@pytest.mark.long  # ~30 s (a server start and an engine restart); tests/unit/test_remote_server.py covers it fast
def test_a_hung_engine_fails_only_its_request_and_the_server_goes_on(tmp_path, tiny_teacher):
    """A request the engine makes no progress on (here: its process stopped) fails with a reply;
    the engine is restarted, the other client's request is served, the server stays up."""
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path, tiny_teacher, teacher={"threads": 1})
    log = tmp_path / "server.log"
    proc, ep = start_server(recipe, log, "--progress-timeout", "2")
    first = _engine_pid(log)
    try:
        model = AutoModelForCausalLM.from_pretrained(tiny_teacher, torch_dtype=torch.float32).eval()
        with client(tiny_teacher, ep) as victim, client(tiny_teacher, ep, timeout_s=60) as other:
            os.kill(first, signal.SIGSTOP)  # alive, silent: what a hung (or very slow) forward looks like
            doomed = victim.submit(make_request(1, victim.vocab_size))
            req = make_request(2, other.vocab_size)
            t = other.submit(req)
            with pytest.raises(RemoteTeacherError, match=r"refused request 0: the teacher engine failed on this "
                                                         r"request \(no progress .*\); it is restarted"):
                victim.result(doomed)
            torch.testing.assert_close(other.result(t), reference_hidden(model, req), rtol=1e-5, atol=1e-5)
            other.release(t)
        assert proc.poll() is None
        second = _engine_pid(log)
        assert second != first and "restarting it" in log.read_text()
    finally:
        try:
            os.kill(first, signal.SIGKILL)  # the server killed it already; never leave it stopped
        except ProcessLookupError:
            pass
        stop_server(proc)
    assert proc.returncode == 0


def test_mismatches_are_refused_at_connect_naming_both_sides(served, tiny_teacher, tmp_path, smollm2_tokenizer,
                                                             monkeypatch):
    ep, _, _, _ = served
    other = save_tiny_llama(tmp_path / "other", smollm2_tokenizer, hidden=32, layers=1)
    with pytest.raises(RemoteTeacherError) as err:
        client(other, ep).start()
    msg = str(err.value)
    assert "teacher mismatch on hidden_size: the client expects 32" in msg and "the server has 64" in msg, msg
    same_shape = save_tiny_llama(tmp_path / "same_shape", smollm2_tokenizer, hidden=64, layers=1)
    with pytest.raises(RemoteTeacherError, match="mismatch on config_sha256"):
        client(same_shape, ep).start()
    server_version = wire.PROTOCOL_VERSION
    monkeypatch.setattr(wire, "PROTOCOL_VERSION", server_version + 1)
    with pytest.raises(RemoteTeacherError, match=f"the client speaks {server_version + 1}, the server speaks "
                                                 f"{server_version}"):
        client(tiny_teacher, ep).start()


def test_a_remote_run_matches_the_local_run(served, tiny_teacher, tmp_path):
    ep, _, _, _ = served
    kw = dict(train={"max_steps": 3, "threads": 1}, teacher={"threads": 1}, checkpoint={"export_hf": False})
    local = write_recipe(tmp_path / "local", tiny_teacher, **kw)
    remote = write_recipe(tmp_path / "remote", tiny_teacher, **kw)
    r1 = run_train(local)
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = subprocess.run([*KDCORE, "train", str(remote), "teacher.engine=remote",
                         f"teacher.remote.address={address(ep)}"], capture_output=True, text=True, timeout=300,
                        cwd=ROOT, env={**os.environ, "KDFLOW_TEACHER_TOKEN": TOKEN})
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = train_steps(tmp_path / "local" / "out"), train_steps(tmp_path / "remote" / "out")
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert (x["loss"], x["kd_loss"], x["tokens"]) == (y["loss"], y["kd_loss"], y["tokens"]), (a, b)


# ----------------------------------------------------------------------------- faults


@pytest.mark.long  # kept out of the default command (README, Tests)
def test_a_dead_server_stops_the_run_or_is_reconnected_to(tmp_path, tiny_teacher):
    recipe = write_recipe(tmp_path, tiny_teacher, teacher={"threads": 1})
    log = tmp_path / "server.log"
    proc, ep = start_server(recipe, log)
    second = trainer = None
    try:
        trainer = subprocess.Popen([*KDCORE, "train", str(recipe), "teacher.engine=remote", "train.max_steps=100000",
                                    f"teacher.remote.address={address(ep)}", "checkpoint.export_hf=false"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                   env={**os.environ, "KDFLOW_TEACHER_TOKEN": TOKEN})
        fails, retries = client(tiny_teacher, ep), client(tiny_teacher, ep, retries=3, timeout_s=60)
        fails.start(), retries.start()
        req = make_request(3, fails.vocab_size)
        t = retries.submit(req)
        expected = retries.result(t).clone()
        retries.release(t)
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and '"loss"' in metrics.read_text()) and time.monotonic() < deadline:
            assert trainer.poll() is None, trainer.stderr.read()[-3000:]
            time.sleep(0.5)
        proc.kill()  # mid-run
        proc.wait()
        t0 = time.monotonic()
        with pytest.raises(TeacherDiedError, match=f"teacher server at {ep} closed the connection"):
            fails.result(fails.submit(req))
        assert time.monotonic() - t0 < 30
        assert trainer.wait(30) == 1
        last = trainer.stderr.read().strip().splitlines()[-1]
        assert last.startswith("kdcore: error: teacher engine failed at step") and \
            f"teacher server at {ep} closed the connection" in last, last
        assert time.monotonic() - t0 < 30
        t = retries.submit(req)  # sent to nobody; resent once the new server is up
        second, ep2 = start_server(recipe, log, listen=address(ep))
        assert ep2 == ep
        assert torch.equal(retries.result(t), expected)
        assert retries.reconnects == 1
        retries.release(t)
        # a stopped (SIGSTOP) server looks slow: the timeout names the address
        slow = client(tiny_teacher, ep, timeout_s=2).start()
        second.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(ChannelTimeout, match=f"teacher server at {ep} sent nothing for 2 s"):
            slow.result(slow.submit(req))
        assert time.monotonic() - t0 < 10
        for engine in (fails, retries, slow):
            engine.close()
        assert "rows/s lately" in log.read_text()  # the periodic per-client lines (--stats-every 1)
        stop_server(second)  # SIGTERM: the server logs every client's totals on its way out
        assert second.returncode == 0
        totals = log.read_text().split("serving teacher")[-1]
        assert f"client {retries.client_id}: 1 requests" in totals and "(total)" in totals, totals[-2000:]
    finally:
        stop_server(proc)
        for other in (second, trainer):
            if other is not None:
                stop_server(other)


# ----------------------------------------------------------------------------- two hosts, one machine


@pytest.mark.long  # kept out of the default command (README, Tests)
def test_a_trainer_in_another_network_namespace(tmp_path, tiny_teacher):
    why = _netns_available()
    if why:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:6]
    srv_ns, cli_ns, veth = f"kds{tag}", f"kdc{tag}", f"kdv{tag}"
    srv_ip, cli_ip = "198.18.7.1", "198.18.7.2"  # RFC 2544 benchmark range, on the veth pair only
    sh = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    proc = None
    try:
        sh("ip", "netns", "add", srv_ns)
        sh("ip", "netns", "add", cli_ns)
        sh("ip", "link", "add", f"{veth}s", "type", "veth", "peer", "name", f"{veth}c")
        for ns, dev, ip in ((srv_ns, f"{veth}s", srv_ip), (cli_ns, f"{veth}c", cli_ip)):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        recipe = write_recipe(tmp_path, tiny_teacher, train={"max_steps": 2, "threads": 1}, teacher={"threads": 1},
                              checkpoint={"export_hf": False})
        proc, ep = start_server(recipe, tmp_path / "server.log", listen=f"{srv_ip}:0",
                                prefix=("ip", "netns", "exec", srv_ns))
        res = subprocess.run(["ip", "netns", "exec", cli_ns, *KDCORE, "train", str(recipe), "teacher.engine=remote",
                              f"teacher.remote.address={address(ep)}"], capture_output=True, text=True,
                             timeout=300, cwd=ROOT, env={**os.environ, "KDFLOW_TEACHER_TOKEN": TOKEN})
        assert res.returncode == 0, res.stderr[-3000:]
        assert [r["step"] for r in train_steps(tmp_path / "out")] == [1, 2]
        assert "connected" in (tmp_path / "server.log").read_text()
    finally:
        if proc is not None:
            stop_server(proc)
        for ns in (srv_ns, cli_ns):  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)
