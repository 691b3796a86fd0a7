"""bench.common.TreeMemory: a process tree's peak from the kernel's high-water marks."""

import subprocess
import sys
import time

import psutil

from bench.common import TreeMemory

MB = 2**20
# a parent that holds 300 MB and starts a child holding 200 MB; both free most of it and wait
CODE = """
import subprocess, sys, time
big = bytearray(300 * 2**20)
kid = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(200 * 2**20); time.sleep(0.6); del b; time.sleep(1.5)"])
time.sleep(0.8)
del big
kid.wait()
"""


def test_tree_peak_counts_every_process_even_after_they_free_memory():
    proc = subprocess.Popen([sys.executable, "-c", CODE])
    meter = TreeMemory(psutil.Process(proc.pid))
    while proc.poll() is None:
        meter.sample()
        time.sleep(0.05)
    assert proc.returncode == 0
    assert meter.max_procs == 2
    # both bytearrays were resident at once at some point; the high-water marks remember it
    # even for samples taken after the memory was freed
    assert meter.peak >= 500 * MB
    assert meter.peak < 700 * MB  # two small interpreters on top, nothing counted twice over time
    assert sum(meter.peak_parts.values()) == meter.peak
