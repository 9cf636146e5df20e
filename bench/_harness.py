"""Shared helpers for the bench/ scripts: child processes with their own peak RSS, load, medians.

Standard library only, so that a child running in another virtual environment can import it too.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def loadavg() -> str:
    """The 1/5/15-minute load averages (other processes on the machine share the CPU)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run_child(cmd: list[str], result_file: Path, env: dict | None = None, log_file: Path | None = None) -> dict:
    """Run `cmd` to completion in its own process; return the JSON it wrote to `result_file`, plus
    `wall_s` and `peak_rss_mb`: the child's own peak resident set (ru_maxrss from wait4, which
    counts that child and its waited-for descendants only, not earlier runs)."""
    result_file.unlink(missing_ok=True)
    log = open(log_file, "w") if log_file else subprocess.DEVNULL
    started = time.time()
    try:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log_file:
            log.close()
    wall = time.time() - started
    if process.returncode != 0:
        tail = Path(log_file).read_text()[-3000:] if log_file else ""
        raise RuntimeError(f"child failed with status {process.returncode}: {' '.join(cmd)}\n{tail}")
    result = json.loads(result_file.read_text())
    result["wall_s"] = wall
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def vm_hwm_mb() -> float | None:
    """This process's peak resident set (VmHWM) in MiB, Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def median(values) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def write_result(path: str, payload: dict) -> None:
    Path(path).write_text(json.dumps(payload, indent=1))


def cpu_info() -> str:
    cores = os.cpu_count()
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cores} cores, {model}"


def python_has(python: str, code: str) -> bool:
    return subprocess.run([python, "-c", code], capture_output=True).returncode == 0


def log(message: str) -> None:
    print(message, flush=True, file=sys.stdout)


def code_state(*paths: str) -> str:
    """The git commit of the checkout and, per file, a short content hash and whether it differs from that commit."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--name-only", "HEAD", "--", *paths], cwd=root, capture_output=True, text=True).stdout.split()
    except OSError:
        return "code: not a git checkout"
    import hashlib

    parts = []
    for path in paths:
        digest = hashlib.sha256((root / path).read_bytes()).hexdigest()[:12] if (root / path).exists() else "missing"
        parts.append(f"{path} {digest}{' (modified vs HEAD)' if path in dirty else ''}")
    return f"code: HEAD {head or '?'}; " + "; ".join(parts)
