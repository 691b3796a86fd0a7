"""A pool of `kdcore serve-teacher` replicas (teacher.remote.address with several entries), on loopback."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from helpers.assets import ROOT
from helpers.remote import KDCORE, TOKEN, address, client, make_request, start_server, stop_server
from helpers.train import train_steps, write_recipe

zmq = pytest.importorskip("zmq")

from kdcore.infra.channel import TeacherDiedError  # noqa: E402
from kdcore.engines.protocol import TeacherError  # noqa: E402
from kdcore.engines.remote.pool import RemotePool, parse_addresses  # noqa: E402


def test_several_addresses_are_validated_one_by_one(tiny_teacher):
    from kdcore.recipe.loading import validate_raw

    assert parse_addresses("127.0.0.1:5001, 127.0.0.1:5002") == ["tcp://127.0.0.1:5001", "tcp://127.0.0.1:5002"]
    raw = {"teacher": {"path": str(tiny_teacher), "engine": "remote"}, "data": {"train": "x.jsonl"}}
    raw["teacher"]["remote"] = {"address": "127.0.0.1:5001,127.0.0.1:5002"}
    assert not [e for e in validate_raw(raw) if "remote.address" in e], validate_raw(raw)
    for bad, culprit in (("127.0.0.1:5001,127.0.0.1", "'127.0.0.1' must look like HOST:PORT"),
                         ("127.0.0.1:5001,", "'' must look like HOST:PORT"),
                         ("127.0.0.1:5001,127.0.0.1:5001", "'127.0.0.1:5001' is given twice"),
                         ("a:1,b:70000", "'b:70000' must look like HOST:PORT")):
        raw["teacher"]["remote"] = {"address": bad}
        errors = [e for e in validate_raw(raw) if e.startswith("teacher.remote.address:")]
        assert len(errors) == 1 and culprit in errors[0], (bad, errors)
    with pytest.raises(TeacherError, match="'x' must look like HOST:PORT"):
        parse_addresses("x")


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, tiny_teacher):
    """Two servers of the same teacher: [(process, endpoint)], and the recipe and log they use."""
    tmp = tmp_path_factory.mktemp("pool")
    recipe = write_recipe(tmp, tiny_teacher, teacher={"threads": 1})
    log = tmp / "servers.log"
    started = []
    try:
        for _ in range(2):
            started.append(start_server(recipe, log))
        yield started, recipe, log
    finally:
        for proc, _ in started:
            stop_server(proc)


def pool(teacher, eps, **kw) -> RemotePool:
    kw.setdefault("token", TOKEN)
    kw.setdefault("timeout_s", 30)
    return RemotePool(str(teacher), addresses=[address(ep) for ep in eps], max_rows=64, n_slots=4, **kw)


@pytest.mark.long  # ~16 s (two server processes); fast twin: tests/unit/test_remote_pool_replicas.py spreads
# requests one per replica over real servers, and tests/integration/test_remote_teacher.py checks a real teacher's
# states over the wire
def test_requests_spread_and_states_equal_one_server(replicas, tiny_teacher):
    (p1, ep1), (p2, ep2) = replicas[0]
    with pool(tiny_teacher, [ep1, ep2]) as both, client(tiny_teacher, ep2) as alone:
        reqs = [make_request(s, both.vocab_size) for s in range(8)]
        got, want = [], []
        for i in range(0, 8, 2):  # two in flight: least outstanding work puts one on each replica
            tickets = [both.submit(r) for r in reqs[i:i + 2]]
            got += [both.result(t).clone() for t in tickets]
            for t in tickets:
                both.release(t)
        for r in reqs:
            t = alone.submit(r)
            want.append(alone.result(t).clone())
            alone.release(t)
        assert [r.served for r in both.replicas] == [4, 4]
        for a, b in zip(got, want):
            assert torch.equal(a, b)


@pytest.mark.long  # ~13 s; test_requests_spread_and_states_equal_one_server checks the states fast
def test_a_run_against_two_replicas_equals_a_run_against_one(replicas, tiny_teacher, tmp_path):
    (_, ep1), (_, ep2) = replicas[0]
    kw = dict(train={"max_steps": 3, "threads": 1}, teacher={"threads": 1}, checkpoint={"export_hf": False})
    runs = {}
    for name, addr in (("one", address(ep1)), ("two", f"{address(ep1)},{address(ep2)}")):
        recipe = write_recipe(tmp_path / name, tiny_teacher, **kw)
        res = subprocess.run([*KDCORE, "train", str(recipe), "teacher.engine=remote", f"teacher.remote.address={addr}"],
                             capture_output=True, text=True, timeout=300, cwd=ROOT,
                             env={**os.environ, "KDFLOW_TEACHER_TOKEN": TOKEN})
        assert res.returncode == 0, res.stderr[-3000:]
        runs[name] = [(r["loss"], r["kd_loss"], r["tokens"]) for r in train_steps(tmp_path / name / "out")]
    assert len(runs["one"]) == 3 and runs["one"] == runs["two"], runs


@pytest.mark.long  # ~1 min; fast twin: tests/unit/test_remote_pool_replicas.py (drop, resend, return, none left)
def test_a_killed_replica_is_dropped_resent_and_used_again_and_none_left_stops(tmp_path, tiny_teacher, capfd):
    recipe = write_recipe(tmp_path, tiny_teacher, teacher={"threads": 1})
    log = tmp_path / "servers.log"
    (p1, ep1), (p2, ep2) = start_server(recipe, log), start_server(recipe, log)
    trainer = p3 = None
    try:
        # a real run against both; one replica killed mid-run: the run goes on and finishes
        trainer = subprocess.Popen([*KDCORE, "train", str(recipe), "teacher.engine=remote", "train.max_steps=12",
                                    f"teacher.remote.address={address(ep1)},{address(ep2)}",
                                    "checkpoint.export_hf=false", "train.threads=1"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                   env={**os.environ, "KDFLOW_TEACHER_TOKEN": TOKEN})
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 240
        while not (metrics.exists() and '"loss"' in metrics.read_text()) and time.monotonic() < deadline:
            assert trainer.poll() is None, trainer.stderr.read()[-3000:]
            time.sleep(0.2)
        p2.kill()
        p2.wait()
        assert trainer.wait(240) == 0, trainer.stderr.read()[-3000:]
        err = trainer.stderr.read()
        assert f"kdcore: warning: teacher server at {ep2} closed the connection" in err, err[-3000:]
        assert err.count("dropped from the pool") == 1, err[-3000:]
        assert [r["step"] for r in train_steps(tmp_path / "out")] == list(range(1, 13))

        # in-process: a replica that comes back is used again; a stopped one is dropped; none left stops
        p = pool(tiny_teacher, [ep1, ep2], timeout_s=3).start()
        assert [r.state for r in p.replicas] == ["live", "down"] or [r.state for r in p.replicas] == \
            ["live", "joining"]
        p3, ep3 = start_server(recipe, log, listen=address(ep2))
        req = make_request(1, p.vocab_size)
        deadline = time.monotonic() + 30
        while p.replicas[1].state != "live" and time.monotonic() < deadline:
            t = p.submit(req)
            p.result(t)
            p.release(t)
            time.sleep(0.2)
        assert p.replicas[1].state == "live"
        tickets = [p.submit(req) for _ in range(2)]
        for t in tickets:
            p.result(t)
            p.release(t)
        assert p.replicas[1].served >= 1
        p3.send_signal(signal.SIGSTOP)  # hung: silent while holding a request
        tickets = [p.submit(req) for _ in range(2)]
        for t in tickets:
            p.result(t)
            p.release(t)
        assert p.replicas[1].state != "live" and "sent nothing for 3 s" in p.replicas[1].why
        p1.kill()
        p1.wait()
        with pytest.raises(TeacherDiedError, match="no teacher server left of the 2 in teacher.remote.address"):
            for _ in range(20):
                t = p.submit(req)
                p.result(t)
                p.release(t)
                time.sleep(0.2)
        p.close()
    finally:
        for proc in (p1, p2, p3, trainer):
            if proc is not None:
                stop_server(proc)
