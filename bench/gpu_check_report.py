#!/usr/bin/env python
"""The report of bench/gpu_check.sh, from the runs it left in WORK (hf/, vllm/, deepspeed/):

- each stage's time and peak memory, per engine (and sft and reward under DeepSpeed ZeRO-2);
- each engine's rollout tokens per second in ppo (response tokens sampled / rollout time, steps after the
  first, whose time includes the engine's warm-up);
- the planner's estimate against each measured peak (bench/plan_vs_measured.py's comparison);
- the last line: `vllm_speedup=<hf rollout time / vllm rollout time> plan_worst_ratio=<measured/estimate
  furthest from 1, on the hf run: the planner does not model the vLLM engine's share of the GPU>`.

    python bench/gpu_check_report.py runs/gpu-check [PROMPT_TOKENS]   # the --prompt-tokens of the runs (256)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ("instructions", "sft", "preferences", "reward", "ppo", "evaluate")


def stage_lines(run_dir: Path, label: str) -> list[str]:
    lines = []
    for stage in STAGES:
        manifest = run_dir / stage / "manifest.json"
        if manifest.is_file():
            data = json.loads(manifest.read_text())
            memory = data["memory"]
            lines.append(f"{label:<10} {stage:<13} {data['duration_s']:>8.1f} s {memory['peak_mb']:>9.0f} MiB ({memory['device']})")
    return lines


def rollout_rate(run_dir: Path) -> tuple[float, float]:
    """(response tokens per second of sampling, per response; seconds of sampling per step), over the steps
    after the first."""
    records = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:] or records
    tokens = sum(r["val/response_length"] for r in steady)  # per response: × the batch for the rollout
    seconds = sum(r["time/rollout"] for r in steady)
    return tokens / max(seconds, 1e-9), seconds / len(steady)


def main() -> None:
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu-check")
    prompt_tokens = int(sys.argv[2]) if len(sys.argv) > 2 else 256

    from plan_vs_measured import compare
    from rlhf.config import load_config

    print(f"{'engine':<10} {'stage':<13} {'time':>10} {'peak':>13}")
    for label in ("hf", "vllm", "deepspeed"):
        run_dir = work / label / "run" if (work / label / "run").is_dir() else work / label
        for line in stage_lines(run_dir, label):
            print(line)
    times, ratios = {}, []
    for engine in ("hf", "vllm"):
        run_dir = work / engine / "run"
        config = load_config(work / engine / "config.yaml")
        batch = config.ppo.rollout_batch_size
        rate, seconds = rollout_rate(run_dir)
        times[engine] = seconds
        print(f"rollout {engine}: {rate * batch:.0f} tokens/s ({seconds:.2f} s per rollout of {batch} responses)")
        table = compare(config, work / engine / "model", prompt_tokens, run_dir)
        if engine == "hf":
            ratios.append(float(table.rsplit("worst_ratio=", 1)[1]))
            print(f"plan vs measured ({engine}):\n{table}")
        else:  # the planner does not model the engine's share of the GPU (generation.gpu_memory_utilization)
            print(f"plan vs measured ({engine}; the estimate leaves out the vLLM engine's share):\n{table}")
    worst = max(ratios, key=lambda r: abs(r - 1))
    print(f"vllm_speedup={times['hf'] / times['vllm']:.2f} plan_worst_ratio={worst:.3f}")


if __name__ == "__main__":
    main()
