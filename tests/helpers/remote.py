"""A `kdcore serve-teacher` process and a client for it: start, stop, requests, the token."""

from __future__ import annotations

from pathlib import Path
import os
import select
import shutil
import signal
import subprocess
import sys
import time
import uuid

import torch

from helpers.assets import ROOT
from kdcore.engines.protocol import HiddenRequest
from kdcore.engines.remote.client import RemoteTeacher


TOKEN = "test-secret"


KDCORE = [sys.executable, "-m", "kdcore"]


def start_server(recipe: Path, log: Path, *extra: str, listen="127.0.0.1:0", token=TOKEN, prefix=(), env=None,
                 wait_s=240.0):
    """A `kdcore serve-teacher` subprocess and its endpoint (read from its stdout once it serves)."""
    cmd = [*prefix, *KDCORE, "serve-teacher", str(recipe), "--listen", listen, "--stats-every", "1", *extra]
    if token:
        cmd += ["--token", token]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "a"), text=True, cwd=ROOT,
                            env={**os.environ, **(env or {})})
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 0.5)[0]:
            line = proc.stdout.readline().strip()
            if line.startswith("tcp://"):
                return proc, line
        if proc.poll() is not None:
            break
    stop_server(proc)
    raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}")


def stop_server(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a stopped one cannot handle SIGTERM
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def address(ep: str) -> str:
    return ep.removeprefix("tcp://")


def make_request(seed: int, vocab: int, B=3, L=12) -> HiddenRequest:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.int64)
    mask[1, :4] = 0  # left padding
    mask[2, -3:] = 0  # right padding
    ids[1, :4] = 999_999  # any pad id: the wire zeroes padding
    positions = [list(range(L)), [4, 7, 11], list(range(0, L - 3, 2))]
    return HiddenRequest(ids, mask, positions)


def client(teacher: Path, ep: str, **kw) -> RemoteTeacher:
    kw.setdefault("token", TOKEN)
    kw.setdefault("timeout_s", 30)
    return RemoteTeacher(str(teacher), address=address(ep), max_rows=64, **kw)


def _netns_available() -> str:
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 on Linux"
    name = f"kdp{uuid.uuid4().hex[:8]}"
    probe = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    subprocess.run(["ip", "netns", "delete", name], capture_output=True)
    return "" if probe.returncode == 0 else f"cannot create network namespaces: {probe.stderr.strip()}"
