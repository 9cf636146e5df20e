"""ppo's update trims glibc's heap before each gradient forward: freed activations go back to the OS
instead of inflating the resident set (bench/ppo_memory_phases.py measures the effect on SmolLM2)."""

from pathlib import Path

import pytest
import torch

from rlhf.stages import ppo


def resident_mb() -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(ppo._LIBC is None or not Path("/proc/self/status").exists(), reason="glibc on Linux only")
def test_freed_tensors_leave_the_resident_set_after_release():
    first = torch.ones(1 << 20)  # 4 MB: freeing it raises glibc's mmap threshold, as the update's first frees do
    del first
    chunks, live = [], []
    for _ in range(128):
        chunks.append(torch.ones(1 << 19))  # 2 MB activations, now served from the heap
        live.append(torch.ones(16 << 10))  # 64 KB tensors that stay alive between them
    before = resident_mb()
    del chunks
    freed = resident_mb()
    ppo.release_freed_memory()
    released = resident_mb()
    assert freed > before - 64  # glibc keeps the freed 256 MB resident ...
    assert released < freed - 192  # ... until they are released
