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


def bench_env(threads: int | None) -> dict:
    """The children's environment: no wandb, no tokenizer threads, and `threads` CPU threads when given."""
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def alternate(names: list[str], runs: int, command, work: Path, env: dict, describe=None) -> dict[str, list[dict]]:
    """`runs` runs of each implementation, alternating which goes first, each a child process:
    `command(name, result_file)` gives its command line. Logs each run's step times and peak resident set
    (plus `describe(result)` when given); returns every run's result by name."""
    results: dict[str, list[dict]] = {name: [] for name in names}
    for run in range(runs):
        for name in names if run % 2 == 0 else names[::-1]:
            result_file = work / f"result-{name}.json"
            result = run_child(command(name, result_file), result_file, env=env, log_file=work / f"log-{name}-{run}.txt")
            results[name].append(result)
            log(
                f"run {run + 1} {name:<4}: steps {' '.join(f'{s:.2f}' for s in result['step_s'])} s wall, "
                f"{' '.join(f'{s:.2f}' for s in result['step_cpu_s'])} s CPU; peak RSS {result['peak_rss_mb']:.0f} MB; "
                f"process {result['wall_s']:.1f} s; load {loadavg()}" + (f"; {describe(result)}" if describe else "")
            )
    return results


def summarize(results: dict[str, list[dict]], warmup_steps: int) -> dict[str, tuple[float, float, float]]:
    """Per implementation: (median wall seconds per step, median peak RSS in MB, median CPU seconds per step),
    the first `warmup_steps` steps of each run left out. Logs one line each."""
    summary = {}
    log("")
    for name, runs in results.items():
        steps = [s for r in runs for s in r["step_s"][warmup_steps:]]
        cpu = [s for r in runs for s in r["step_cpu_s"][warmup_steps:]]
        summary[name] = (median(steps), median(r["peak_rss_mb"] for r in runs), median(cpu))
        log(f"{name:<4}: {summary[name][0]:.2f} s per step (wall, median of {len(steps)}); {summary[name][2]:.2f} CPU-s per step "
            f"(user+system, all threads); peak RSS {summary[name][1]:.0f} MB (median of {len(runs)} runs)")
    return summary


def ratio_lines(summary: dict[str, tuple[float, float, float]]) -> None:
    """The last lines: CPU-time ratio, then `time_ratio=<ours/TRL> mem_ratio=<ours/TRL>`."""
    ours, trl = summary["ours"], summary["trl"]
    log(f"CPU time per step, ours/TRL: {ours[2] / trl[2]:.3f} (less sensitive than wall time to other processes on the machine)")
    log(f"time_ratio={ours[0] / trl[0]:.3f} mem_ratio={ours[1] / trl[1]:.3f}")
