"""The shared-memory channel against real spawned peer processes (no mocks)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch
import torch.multiprocessing as tmp

from kdcore.infra.channel import (Channel, ChannelClosed, ChannelError, ChannelTimeout, PeerDiedError,
                            TeacherDiedError, pid_alive)

CTX = tmp.get_context("spawn")
HIDDEN = 8


def expected(seq: int, rows: int, dtype=torch.float32) -> torch.Tensor:
    """What the test producer writes for request ``seq``: distinct per request, row and column."""
    base = torch.arange(rows * HIDDEN, dtype=torch.float64).reshape(rows, HIDDEN)
    return (base + 1000.0 * seq).to(dtype)


def _produce(channel: Channel, seqs, rows, stall_at=None, beat_while_stalled=False):
    """Writes ``expected(seq)`` for each seq; at ``stall_at`` it stops (optionally still beating)."""
    channel.attach_producer()
    for seq in seqs:
        buf = channel.acquire_write(seq)
        if seq == stall_at:
            while True:  # a hung teacher (or a slow but live one, when it beats)
                time.sleep(0.05)
                if beat_while_stalled:
                    channel.beat()
        buf[:rows].copy_(expected(seq, rows, channel.dtype))
        channel.commit(seq, rows)


def _producer(*plans):
    """A producer process serving one channel per plan, each from its own thread (one spawn
    costs ~2 s of torch import, so scenarios share a process)."""
    for plan in plans:
        threading.Thread(target=_produce, args=plan, daemon=True).start()
    time.sleep(120)  # stay alive: the test decides when this ends


def _consumer_that_exits(channel: Channel):
    channel.attach_consumer()


def start(target, *args) -> tmp.Process:
    p = CTX.Process(target=target, args=args, daemon=True)
    p.start()
    return p


def wait_attached(ch: Channel, p: tmp.Process) -> None:
    """Spawned peers need a second or two to import torch; timeouts count from here."""
    deadline = time.monotonic() + 60
    while ch.producer_pid != p.pid and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ch.producer_pid == p.pid


def stop(p: tmp.Process) -> None:
    if p.is_alive():
        p.kill()
    p.join(5)
    assert not pid_alive(p.pid)


def test_views_share_the_slot_storage_and_carry_the_producers_values():
    ch = Channel(max_rows=16, hidden=HIDDEN, n_slots=2)
    ch.attach_consumer()
    p = start(_producer, (ch, [0, 1, 2, 3], 5))
    try:
        ptrs = {}
        for seq in range(4):
            view = ch.wait_full(seq, peer_alive=p.is_alive)
            assert view.shape == (5, HIDDEN)
            assert torch.equal(view, expected(seq, 5))
            slot = seq % 2
            # no copy: the view is the slot's own memory, and every read of the slot is the same memory
            assert view.data_ptr() == ch.slot_tensor(slot).data_ptr()
            assert view.untyped_storage().data_ptr() == ch.data.untyped_storage().data_ptr()
            ptrs.setdefault(slot, set()).add(view.data_ptr())
            ch.release(seq)
        assert all(len(v) == 1 for v in ptrs.values()) and len(ptrs) == 2
    finally:
        stop(p)


def test_two_requests_in_flight_and_the_third_waits_for_a_release():
    ch = Channel(max_rows=4, hidden=HIDDEN, n_slots=2, dtype=torch.bfloat16)
    ch.attach_consumer()
    p = start(_producer, (ch, [0, 1, 2], 3))
    try:
        a = ch.wait_full(0, peer_alive=p.is_alive)
        b = ch.wait_full(1, peer_alive=p.is_alive)  # both slots full at once: double buffering
        assert torch.equal(a, expected(0, 3, torch.bfloat16)) and torch.equal(b, expected(1, 3, torch.bfloat16))
        # request 2 reuses slot 0, which we still hold: the producer must not overwrite it
        time.sleep(0.5)
        assert torch.equal(a, expected(0, 3, torch.bfloat16))
        with pytest.raises(ChannelError, match="still held by request 0"):
            ch.wait_full(2, peer_alive=p.is_alive)
        ch.release(0)
        c = ch.wait_full(2, peer_alive=p.is_alive)
        assert torch.equal(c, expected(2, 3, torch.bfloat16))
        assert torch.equal(b, expected(1, 3, torch.bfloat16))  # slot 1 untouched meanwhile
    finally:
        stop(p)


def test_killed_producer_raises_teacher_died_quickly():
    ch = Channel(max_rows=4, hidden=HIDDEN)
    ch2 = Channel(max_rows=4, hidden=HIDDEN)  # watched through the default pid check only
    for c in (ch, ch2):
        c.attach_consumer()
    p = start(_producer, (ch, [0, 1], 2, 1), (ch2, [0], 2, 0))  # ch: serves 0, then hangs in 1
    try:
        ch.wait_full(0, peer_alive=p.is_alive)
        ch.release(0)
        wait_attached(ch2, p)
        os.kill(p.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(TeacherDiedError, match="died"):
            ch.wait_full(1, peer_alive=p.is_alive, progress_timeout=None)
        assert time.monotonic() - t0 < 5
        p.join(5)  # reaped: the pid no longer exists
        with pytest.raises(TeacherDiedError, match=f"pid {p.pid}"):
            ch2.wait_full(0, progress_timeout=None)
    finally:
        stop(p)


def test_hung_producer_times_out_but_a_slow_beating_one_does_not():
    hung = Channel(max_rows=4, hidden=HIDDEN)
    slow = Channel(max_rows=4, hidden=HIDDEN)
    for c in (hung, slow):
        c.attach_consumer()
    p = start(_producer, (hung, [0], 2, 0), (slow, [0], 2, 0, True))
    try:
        wait_attached(hung, p)
        wait_attached(slow, p)
        t0 = time.monotonic()
        with pytest.raises(ChannelTimeout, match="no progress"):
            hung.wait_full(0, peer_alive=p.is_alive, progress_timeout=0.5)
        assert 0.5 <= time.monotonic() - t0 < 3
        # alive and beating: waiting well past progress_timeout is not a hang; it ends by closing
        t0 = time.monotonic()
        threading.Timer(2.0, slow.close).start()
        with pytest.raises(ChannelClosed):
            slow.wait_full(0, peer_alive=p.is_alive, progress_timeout=0.5)
        assert time.monotonic() - t0 >= 1.9
    finally:
        stop(p)


def test_producer_notices_a_dead_consumer():
    ch = Channel(max_rows=4, hidden=HIDDEN)
    c = start(_consumer_that_exits, ch)
    c.join(30)
    assert ch.consumer_pid == c.pid and not pid_alive(c.pid)
    ch.attach_producer()
    for seq in (0, 1):  # fills both slots; nobody will release them
        ch.acquire_write(seq)[:1] = 1.0
        ch.commit(seq, 1)
    t0 = time.monotonic()
    with pytest.raises(PeerDiedError, match=f"consumer process \\(pid {c.pid}\\) died"):
        ch.acquire_write(2)
    assert time.monotonic() - t0 < 2


def test_misuse_is_reported_clearly():
    with pytest.raises(ValueError, match="at least 2 slots"):
        Channel(max_rows=4, hidden=HIDDEN, n_slots=1)
    ch = Channel(max_rows=4, hidden=HIDDEN)
    ch.attach_producer()
    ch.attach_consumer()
    buf = ch.acquire_write(0)
    with pytest.raises(ChannelError, match="not committed"):
        ch.acquire_write(1)
    with pytest.raises(ChannelError, match="5 rows do not fit a slot of 4"):
        ch.commit(0, 5)
    buf[:2] = 7.0
    ch.commit(0, 2)
    view = ch.wait_full(0, progress_timeout=None)  # same process: producer is "alive" (our pid)
    assert torch.equal(view, torch.full((2, HIDDEN), 7.0))
    with pytest.raises(ChannelError, match="already read"):
        ch.wait_full(0)
    ch.release(0)
    with pytest.raises(ChannelError, match="not held"):
        ch.release(0)
    with pytest.raises(ChannelError, match="needs CUDA"):
        if torch.cuda.is_available():
            raise ChannelError("needs CUDA (skipped check: a GPU is present)")
        Channel(max_rows=4, hidden=HIDDEN, device="cuda")
