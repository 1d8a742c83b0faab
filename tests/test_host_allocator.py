"""qalign/host_allocator.py: once applied, glibc keeps a large freed block in the heap, so allocating it again
costs no page faults (measured in a subprocess, so this test process keeps glibc's defaults)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import ctypes, resource
from qalign.host_allocator import keep_freed_buffers

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)

def faults_of_a_reused_block(size=64 << 20):
    counts = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        libc.memset(block, 1, size)
        libc.free(block)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return min(counts[1:])  # the first use of a block faults its pages in either way

default = faults_of_a_reused_block()
applied = keep_freed_buffers()
tuned = faults_of_a_reused_block()
print(default, applied, tuned, keep_freed_buffers())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_large_block_is_reused_instead_of_faulted_in_again():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout
    default, applied, tuned, again = out.split()
    assert applied == "True" and again == "True"
    # 64 MiB is 16384 pages of 4 KiB: by default the block is a fresh mmap every time and faults all of them
    # in again; with the thresholds raised the heap hands back the same, already mapped pages.
    assert int(default) > 8000
    assert int(tuned) < 100
