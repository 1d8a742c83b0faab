"""qalign/allocator.py: on glibc, memory a step frees and allocates again stops costing page faults. Measured in
a fresh process, since the settings are process-wide and would outlive this test."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

# A "step" allocates six 8 MiB tensors and frees them all. By default glibc trims the freed top of its heap
# each time, so every step faults all 6 x 2,048 pages in again (98,000 faults in 8 steps where this was
# written); kept, only the first step grows the heap.
PROBE = """
import resource
import torch
from qalign.allocator import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(8):
        blocks = [torch.empty(2 << 20).fill_(1.0) for _ in range(6)]
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
kept = keep_freed_memory()
print(default, kept, faults())
"""
STEP_PAGES = 6 * (8 << 20) // 4096


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_a_repeated_step_faults_its_memory_in_once():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    default, kept, after = out.split()
    assert kept == "True"
    assert int(after) <= 1.1 * STEP_PAGES, f"page faults by default, then kept: {default}, {after}"
