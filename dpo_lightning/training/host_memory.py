"""Reuse freed host memory when training on CPU.

glibc's ``malloc`` maps every large block (above a threshold it raises up to 32 MB) straight from the kernel and
unmaps it when freed, and gives the top of its heap back once a little is free. A training step frees all its
activations and allocates them again the next step, so every step faults and zeroes the same pages anew: on a
2-core CPU with SmolLM2-135M and 2 pairs of ~560 tokens, about 480k page faults and 3.5 s of system time in a
13.6 s micro-batch. With large blocks taken from the heap and the heap kept, the pages are reused: about 135k
faults, 1.5 s of system time, the micro-batch in 0.83x to 0.90x the time, for about 0.1 GB more peak RSS
(``benchmarks/bench_host_memory.py``). Generation allocates the same way. The command line applies it on machines
without CUDA, and ``DPOModule`` whenever it trains on the CPU.
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>
KEEP = 2**31 - 1  # free bytes at the top of the heap before it is trimmed: never, in practice


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from its heap and never trim it; True when it took the settings. Applies
    to the whole process from now on; a no-op (False) on other C libraries."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP))
