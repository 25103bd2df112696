"""Freed memory kept in the process for the training step's large temporaries.

A PIM-QAT step makes tensors of 16-32 MB per chunk (partial sums, ADC values, their float64
recombination, the backward's gradients), allocated and freed many times a step.  glibc's
malloc serves allocations of that size with fresh ``mmap`` pages (its dynamic threshold stops
at 32 MB) and returns them at ``free``, so every one is faulted in and zeroed again by the
kernel: on the shared ResNet-20 (differential, batch 128) 120,000-240,000 page faults a step
and 35-45 % of its CPU time.  :func:`keep_freed_memory` tells glibc to serve them from the
heap and keep what is freed (``mallopt(M_MMAP_MAX, 0)``, ``mallopt(M_TRIM_THRESHOLD, 2 GiB)``):
the process keeps its peak memory instead of returning it between steps.
``pimc.train.prepare`` calls it; ``PIMC_KEEP_FREED_MEMORY=0`` leaves malloc as it is.  Other C
libraries (no ``mallopt``, or one that refuses) are left as they are.
"""
from __future__ import annotations

import ctypes
import os

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_state: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory (once per process); whether it is set."""
    global _state
    if _state is None:
        _state = False
        if os.environ.get("PIMC_KEEP_FREED_MEMORY", "1") != "0":
            try:
                mallopt = ctypes.CDLL(None).mallopt
            except (OSError, AttributeError):
                return _state
            mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
            _state = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    return _state
