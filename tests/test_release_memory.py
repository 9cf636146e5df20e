"""ppo's update trims glibc's heap before each gradient forward: freed activations go back to the OS
instead of inflating the resident set (README, "Benchmarks", has the effect on SmolLM2)."""

import subprocess
import sys
from pathlib import Path

import pytest

from rlhf import memory

# In a fresh process: glibc's heap and its adaptive mmap threshold depend on what the process did before.
PROBE = """
from pathlib import Path
import torch
from rlhf import memory

def resident_mb():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

first = torch.ones(1 << 20)  # 4 MB: freeing it raises glibc's mmap threshold, as the update's first frees do
del first
chunks, live = [], []
for _ in range(128):
    chunks.append(torch.ones(1 << 19))  # 2 MB activations, now served from the heap
    live.append(torch.ones(16 << 10))  # 64 KB tensors that stay alive between them
before = resident_mb()
del chunks
freed = resident_mb()
memory.release_freed_memory()
print(before, freed, resident_mb())
"""


@pytest.mark.skipif(memory._LIBC is None or not Path("/proc/self/status").exists(), reason="glibc on Linux only")
def test_freed_tensors_leave_the_resident_set_after_release():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    before, freed, released = map(float, result.stdout.split())
    assert freed > before - 64  # glibc keeps the freed 256 MB resident ...
    assert released < freed - 192  # ... until they are released
