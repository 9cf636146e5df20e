#!/usr/bin/env python
"""How long `rlhf run` takes when there is nothing to do, and `rlhf status`, on a finished run
directory; and the quickstart's per-stage wall times, read from its manifests.

    python bench/noop_run.py                                  # configs/quickstart.yaml if finished, else a smoke run
    python bench/noop_run.py --config configs/quickstart.yaml --repeat 10

The finished run directory:
- if every stage of CONFIG's run directory is up to date (`rlhf status`), a hard-linked copy of it
  (`cp -al`, so that nothing here can write into the original), with `output_dir` pointed at it;
- otherwise a run of configs/smoke.yaml built in a temporary directory first (a few seconds to a
  minute; its wall time is printed too).
Each command runs REPEAT times as a fresh process (`rlhf` from this environment); min and median wall
time are printed, and the median CPU time (user + system, from wait4), which other processes on a
shared machine inflate less than the wall time. A `rlhf run` that does anything but "nothing to do" is reported as an error.
Per-stage times: `duration_s`, `started_at`, `finished_at` of each `<run_dir>/<stage>/manifest.json`
of CONFIG's run directory (they are what the runner measured when each stage last ran).
Targets: no-op run and status at most 1 s each.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

STAGE_ORDER = ("instructions", "sft", "preferences", "reward", "ppo", "evaluate", "export")


def rlhf_command() -> str:
    here = Path(sys.executable).parent / "rlhf"
    return str(here) if here.exists() else (shutil.which("rlhf") or "rlhf")


def timed(cmd: list[str], cpu: list | None = None) -> tuple[float, str, int]:
    """Wall seconds, output and exit code of `cmd`; its CPU seconds (user + system) appended to `cpu`."""
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
        out.seek(0)
        output = out.read().decode(errors="replace")
    if cpu is not None:
        cpu.append(usage.ru_utime + usage.ru_stime)
    return seconds, output, os.waitstatus_to_exitcode(status)


def all_up_to_date(status_output: str) -> bool:
    lines = [line for line in status_output.splitlines() if line.startswith("  ")]
    return bool(lines) and all("up to date" in line for line in lines)


def stage_times(run_dir: Path) -> list[tuple[str, dict]]:
    found = []
    for manifest in sorted(run_dir.glob("*/manifest.json")):
        data = json.loads(manifest.read_text())
        found.append((data.get("stage", manifest.parent.name), data))
    return sorted(found, key=lambda item: STAGE_ORDER.index(item[0]) if item[0] in STAGE_ORDER else 99)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/quickstart.yaml", help="config whose run directory to use (default configs/quickstart.yaml)")
    parser.add_argument("--smoke-config", default="configs/smoke.yaml", help="config to build a finished run from when CONFIG's is not finished")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each command (default 5)")
    parser.add_argument("--workdir", help="scratch directory (default: a new temporary directory)")
    args = parser.parse_args(argv)

    from rlhf.config import load_config

    rlhf = rlhf_command()
    h.log(f"machine: {h.cpu_info()}; load average before: {h.loadavg()}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rlhf-bench-noop-"))
    work.mkdir(parents=True, exist_ok=True)
    source_dir = Path(load_config(args.config).output_dir)
    _, status_output, _ = timed([rlhf, "status", args.config])
    if source_dir.is_dir() and all_up_to_date(status_output):
        config, run_dir = args.config, work / "finished"
        shutil.rmtree(run_dir, ignore_errors=True)
        subprocess.run(["cp", "-al", str(source_dir), str(run_dir)], check=True)
        h.log(f"finished run: a hard-linked copy of {source_dir} (every stage of {args.config} up to date)")
    else:
        config, run_dir = args.smoke_config, work / "smoke"
        shutil.rmtree(run_dir, ignore_errors=True)
        stale = [line.strip() for line in status_output.splitlines() if line.startswith("  ") and "up to date" not in line]
        h.log(f"{source_dir} is not a finished, up-to-date run ({len(stale)} stage(s) stale or missing), so: "
              f"building a finished run of {config} in {run_dir}")
        seconds, output, code = timed([rlhf, "run", config, f"output_dir={run_dir}"])
        if code != 0:
            raise SystemExit(f"building the smoke run failed ({code}):\n{output[-3000:]}")
        h.log(f"  `rlhf run {config}` (fresh, all stages): {seconds:.1f} s")
    override = f"output_dir={run_dir}"

    results = {}
    for label, cmd in (("no-op rlhf run", [rlhf, "run", config, override]), ("rlhf status", [rlhf, "status", config, override])):
        times, cpu = [], []
        for _ in range(args.repeat):
            seconds, output, code = timed(cmd, cpu)
            if code != 0 or (label.startswith("no-op") and "nothing to do" not in output):
                raise SystemExit(f"`{' '.join(cmd)}` was not a no-op (exit {code}):\n{output[-3000:]}")
            if label == "rlhf status" and not all_up_to_date(output):
                raise SystemExit(f"`{' '.join(cmd)}`: not every stage is up to date:\n{output}")
            times.append(seconds)
        results[label] = times
        h.log(f"{label:<15}: min {min(times):.2f} s, median {h.median(times):.2f} s over {len(times)} runs "
              f"({' '.join(f'{t:.2f}' for t in times)}); CPU time (user+sys) median {h.median(cpu):.2f} s  [`{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}`]")

    h.log("")
    stages = stage_times(source_dir)
    if stages:
        h.log(f"per-stage wall times from {source_dir}/*/manifest.json (manifest fields: {', '.join(stages[0][1])}):")
        total = 0.0
        for name, data in stages:
            total += data.get("duration_s") or 0
            h.log(f"  {name:<13} {data.get('duration_s', float('nan')):8.1f} s   {data.get('started_at')} -> {data.get('finished_at')}")
        starts = [datetime.fromisoformat(d["started_at"]) for _, d in stages if d.get("started_at")]
        ends = [datetime.fromisoformat(d["finished_at"]) for _, d in stages if d.get("finished_at")]
        span = (max(ends) - min(starts)).total_seconds() if starts and ends else float("nan")
        h.log(f"  {'sum':<13} {total:8.1f} s   (first start to last finish: {span:.0f} s; stages run at different times "
              f"when some were rerun alone)")
        h.log(f"  current status of {source_dir}:")
        for line in status_output.splitlines()[1:]:
            h.log(f"  {line}")
    else:
        h.log(f"no manifests under {source_dir}: no per-stage times")
    h.log(f"load average after: {h.loadavg()}")
    h.log(f"noop_run_s={h.median(results['no-op rlhf run']):.2f} status_s={h.median(results['rlhf status']):.2f}")


if __name__ == "__main__":
    main()
