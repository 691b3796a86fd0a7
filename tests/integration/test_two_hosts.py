"""Two hosts, one run: torchrun --nnodes 2 (c10d rendezvous) in two Linux network namespaces
joined by a veth pair, an FSDP2 student sharded across them (gloo on CPU), each host with its own
hf teacher process. The launch is the per-host command docs/scale.md gives; kdflow adds nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from contextlib import contextmanager

import pytest

from helpers.assets import ROOT
from helpers.remote import _netns_available
from helpers.train import free_port, run_train, train_steps, write_recipe

HOST_IPS = ("198.18.9.1", "198.18.9.2")  # RFC 2544 benchmark range, on the veth pair only


@contextmanager
def two_hosts():
    """Two network namespaces joined by a veth pair: [(namespace, device, ip)] for host 0 and 1."""
    why = _netns_available()
    if why:
        pytest.skip(why)
    tag = uuid.uuid4().hex[:6]
    hosts = [(f"kdh0{tag}", f"kdv{tag}a", HOST_IPS[0]), (f"kdh1{tag}", f"kdv{tag}b", HOST_IPS[1])]
    sh = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    try:
        for ns, _, _ in hosts:
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", hosts[0][1], "type", "veth", "peer", "name", hosts[1][1])
        for ns, dev, ip in hosts:
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield hosts
    finally:
        for ns, _, _ in hosts:  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def host_command(rank_host: int, hosts, port: int, run_id: str, recipe, *overrides: str, resume=False) -> list[str]:
    """What a user types on host ``rank_host`` (docs/scale.md), run inside that host's namespace.

    ``is_host=1`` on host 0: torch elastic decides which agent hosts the rendezvous store by
    matching the endpoint against the machine's hostname, and a namespace's veth address is
    not the hostname's (on real hosts the match works and the option is harmless)."""
    ns, dev, ip = hosts[rank_host]
    return ["ip", "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={dev}",
            sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{hosts[0][2]}:{port}", "--rdzv_id", run_id,
            "--local_addr", ip, *(["--rdzv_conf", "is_host=1"] if rank_host == 0 else []), "-m", "kdcore", "train", str(recipe), *overrides, *(["--resume"] if resume else [])]


def run_two_hosts(hosts, recipe, *overrides: str, resume=False, timeout=400) -> list[subprocess.CompletedProcess]:
    port, run_id = free_port(), uuid.uuid4().hex[:8]
    procs = [subprocess.Popen(host_command(h, hosts, port, run_id, recipe, *overrides, resume=resume),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for h in (0, 1)]
    out = []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=timeout)
            out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


@pytest.mark.long  # two torchrun agents, two ranks and two teacher processes on a shared 2-core box: ~2 min
def test_two_hosts_match_one_host_and_resume_across_hosts(tmp_path, tiny_teacher):
    kw = dict(train={"max_steps": 4, "micro_batch_size": 2, "threads": 1}, teacher={"threads": 1},
              checkpoint={"every": 2, "export_hf": False})
    one = write_recipe(tmp_path / "one", tiny_teacher, **kw)
    r1 = run_train(one, nproc=2, timeout=400)
    assert r1.returncode == 0, r1.stderr[-3000:]
    a = train_steps(tmp_path / "one" / "out")
    with two_hosts() as hosts:
        two = write_recipe(tmp_path / "two", tiny_teacher, **kw)
        res = run_two_hosts(hosts, two)
        for host, r in enumerate(res):
            assert r.returncode == 0, f"host {host}: {r.stderr[-3000:]}"
        b = train_steps(tmp_path / "two" / "out")
        assert [x["step"] for x in b] == [1, 2, 3, 4]
        for x, y in zip(a, b):
            assert (x["loss"], x["kd_loss"], x["tokens"]) == (y["loss"], y["kd_loss"], y["tokens"]), (a, b)
        # resume across hosts: the run cut back to its step-2 checkpoint, redone on both hosts
        out = tmp_path / "two" / "out"
        shutil.rmtree(out / "checkpoints" / "step_4")  # as tests/integration/test_train.py's resume check
        (out / "metrics.jsonl").unlink()
        res = run_two_hosts(hosts, two, resume=True)
        for host, r in enumerate(res):
            assert r.returncode == 0, f"host {host} (resume): {r.stderr[-3000:]}"
        resumed = {x["step"]: x["loss"] for x in train_steps(out)}
        assert sorted(resumed) == [3, 4]
        assert [resumed[3], resumed[4]] == [x["loss"] for x in a[2:]], (a, resumed)
