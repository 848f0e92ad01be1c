"""Reuse freed host memory when training on CPU.

glibc's ``malloc`` maps every large block (above a threshold it raises up to 32 MB) straight from the kernel and
unmaps it when freed, and gives the top of its heap back once a little is free. A training step frees all its
activations and allocates them again the next step, so every step faults and zeroes the same pages anew: on a
2-core CPU with SmolLM2-135M and 2 pairs of ~560 tokens, about 480k page faults and 3.5 s of system time in a
13.6 s micro-batch. With large blocks taken from the heap and the heap kept, the pages are reused: about 135k
faults, 1.5 s of system time, the micro-batch in 0.83x to 0.90x the time, for about 0.1 GB more peak RSS
(``benchmarks/bench_host_memory.py``). Generation allocates the same way. The command line applies it on machines
without CUDA, and ``DPOModule`` whenever it trains on the CPU.

A heap that is never trimmed can also grow past what a step needs: blocks of changing sizes (batches of other
lengths) no longer fit the holes that long-lived tensors (gradients, optimizer state) split it into. Full
fine-tuning of a 0.5B model on a 24 GB machine reached 17 GB in 10 steps and was killed at 24 GB, where glibc's
defaults stayed at 13.7 GB (``docs/performance.md``). So training also bounds it (:class:`ResidentBound`): past a
share of the machine's memory, the free pages are handed back after the batch, which costs the next batch the page
faults the settings above save.
"""

from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters, <malloc.h>
KEEP = 2**31 - 1  # free bytes at the top of the heap before it is trimmed: never, in practice
RESIDENT_SHARE = 0.6  # of the machine's memory, shared by the training processes on it, before freed pages go back


def keep_freed_memory() -> bool:
    """Ask glibc to serve large blocks from its heap and never trim it; True when it took the settings. Applies
    to the whole process from now on; a no-op (False) on other C libraries."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP))


def release_freed_memory() -> bool:
    """Hand the free pages of every heap back to the kernel (``malloc_trim``); False on other C libraries."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim(0)
    return True


def resident_bytes() -> int:
    """This process's resident memory in bytes (0 where ``/proc`` is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def physical_bytes() -> int:
    """The machine's memory in bytes (0 where unknown)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


class ResidentBound:
    """Hands freed memory back whenever the process's resident memory is above ``limit`` bytes.

    Args:
        limit: bytes; the default is ``RESIDENT_SHARE`` of the machine's memory over ``processes``.
        processes: training processes sharing the machine (DDP ranks on one node).
    """

    def __init__(self, limit: int | None = None, processes: int = 1) -> None:
        self.limit = limit if limit is not None else int(physical_bytes() * RESIDENT_SHARE / max(processes, 1))
        self.releases = 0

    def check(self) -> bool:
        """Release freed memory if the process holds more than the limit; True when it did."""
        if self.limit <= 0 or resident_bytes() <= self.limit:
            return False
        self.releases += release_freed_memory()
        return True
