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


def current_memory_mb() -> float:
    """Accelerator memory allocated now, or on the CPU the resident set size (VmRSS)."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    return _proc_status_mb("VmRSS:") or 0.0


def stage_memory(start_mb: float) -> dict:
    """What a stage's manifest records: where it ran, the memory in use when it started, and its peak
    (MiB). On a GPU, allocated tensors (`max_memory_allocated`) and what the caching allocator reserved;
    on the CPU, resident sets, which also hold the Python runtime and the libraries."""
    if torch.cuda.is_available():
        return {
            "device": torch.cuda.get_device_name(),
            "start_mb": round(start_mb, 1),
            "peak_mb": round(peak_memory_mb(), 1),
            "peak_reserved_mb": round(torch.cuda.max_memory_reserved() / 2**20, 1),
        }
    return {"device": "cpu", "start_mb": round(start_mb, 1), "peak_mb": round(peak_memory_mb(), 1)}


def _proc_status_mb(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_memory_mb() -> float:
    """Peak accelerator memory allocated, or on the CPU the peak resident set size (VmHWM)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = _proc_status_mb("VmHWM:")
    if peak is not None:
        return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
