"""Process memory: the peak a stage reports, and giving freed CPU memory back to the OS."""

from __future__ import annotations

from pathlib import Path

import torch


def release_freed_memory() -> None:
    """Give the pages of freed CPU tensors back to the OS (glibc's malloc_trim; nothing elsewhere).

    The update's forward/backward pairs free and allocate thousands of activation tensors of a few MB.
    glibc serves those from its heap (its mmap threshold rises to 32 MB after the first frees) and
    keeps freed chunks mapped, so the resident set grows far past the live tensors: on SmolLM2 with
    16 rollouts of 150 tokens in micro-batches of 8, one update took 7.8 GB resident for ~2.7 GB live.
    Trimming before each gradient forward held it at 4.1 GB with no measurable cost in time (README,
    "Benchmarks"; tests/test_release_memory.py shows the mechanism)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


_LIBC = _glibc()


def reset_peak_memory() -> None:
    """Start peak-memory accounting at this stage, not at the process's start (earlier stages may
    have run in the same process)."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM, the peak resident set
    except OSError:
        pass


def peak_memory_mb() -> float:
    """Peak accelerator memory allocated, or on the CPU the peak resident set size (VmHWM)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
