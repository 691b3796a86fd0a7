"""bench/memory_breakdown.py counts the pages two processes both hold (what a sum of their RSS
counts twice) by matching physical frames, so the split by kind must find a shared-memory
block that both processes touched, and not a private one."""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap

from bench.memory_breakdown import resident_frames, shared_between

MB = 1 << 20


def test_a_block_both_processes_touch_is_counted_once_as_shared_memory():
    path = f"/dev/shm/kdflow-test-shared-{os.getpid()}"
    with open(path, "w+b") as f:
        f.truncate(16 * MB)
        block = mmap.mmap(f.fileno(), 16 * MB)
    private = bytearray(b"x" * (32 * MB))  # resident here only
    try:
        block[:] = b"y" * (16 * MB)
        child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import mmap, time
            with open({path!r}, "r+b") as f:
                block = mmap.mmap(f.fileno(), 0)
            total = sum(block[i] for i in range(0, len(block), 4096))  # touch every page
            print("ready", flush=True)
            time.sleep(60)
            """)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            shared = shared_between("self", child.pid)
            if not resident_frames("self"):  # frame numbers are root's only: nothing to match
                assert shared == {}
                return
            assert 16 * MB <= shared["shared memory"] <= 17 * MB
            assert shared["private"] < 8 * MB  # the 32 MB bytearray stays ours alone
        finally:
            child.kill()
            child.wait()
    finally:
        del private
        block.close()
        os.unlink(path)
