"""On a CPU, freed tensor memory stays in the process for the next step instead of going back to the kernel.

A training step allocates and frees the same activation-sized tensors over and over. glibc's malloc serves a
block above its mmap threshold (128 KiB, rising as such blocks are freed, to 32 MiB at most) with a fresh
mapping and unmaps it on free, and it trims the top of its heap whenever more than twice that threshold is free
there. Either way the next step writes to pages the kernel has to fault in and zero again, 4 KiB at a time.
On the 2-core Intel AMX Xeon of benchmarks/RESULTS.md the bench's DPO run (checkpointing on) took 4,000-22,000
minor faults per step, and SFT 4,000-21,000, at about 1.3 us each (measured by forcing 290,000 a step, which
halved the speed). With blocks up to 1 GiB served from the heap and the heap never trimmed below 2 GiB free,
the same runs took at most 110 faults a step and 2-5 ms of kernel time instead of 11-51; an SFT step with
Qwen2.5-0.5B's shapes, 33-245 ms instead of 247-615. What it costs is memory the process keeps: peak RSS rose
about 1% (median) on the bench's model and 3.5% on the 0.5B one (benchmarks/RESULTS_NOTES.md). PyTorch's
tuning guide gets the same by preloading jemalloc or tcmalloc; this needs neither an install nor an
environment variable.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30
# For a glibc that refuses thresholds above half its 64 MiB heap size (older releases did): that half.
MMAP_THRESHOLD_FALLBACK = 32 << 20
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse (process-wide, for the rest of the process). True
    when it took both settings; elsewhere (musl, macOS, Windows) nothing changes and this returns False."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    mapped = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) or mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_FALLBACK)
    trimmed = mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mapped and trimmed)
