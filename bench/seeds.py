#!/usr/bin/env python
"""Does the result hold over seeds? Rerun ppo and evaluate (or, with --full, the whole pipeline) per seed.

    python bench/seeds.py configs/quickstart.yaml --seeds 1 2 3
    python bench/seeds.py configs/quickstart.yaml --seeds 1 2 3 --upstream runs/quickstart ppo.advantage_estimator=grpo
    python bench/seeds.py configs/quickstart.yaml --seeds 1 2 --full

Without --full, every seed starts from the same finished upstream run (the config's output_dir, or
--upstream): its instructions, sft, preferences and reward stages are linked into `<workdir>/seed-<N>/` and
`rlhf run CONFIG output_dir=<that> seed=<N> --only ppo,evaluate` runs there, so the seeds differ only in what
ppo and evaluate draw (rollout sampling, minibatch order, evaluation samples). With --full each seed runs
every stage in its own directory. Extra `key=value` arguments are passed to every run.

Per seed it prints the win rate with its 95% interval (bootstrapped over prompts, evaluate's
`win_rate_interval`), gold Δ and proxy Δ (PPO minus SFT), KL to SFT, the PPO EOS fraction, ppo's median
seconds per step, its peak memory, and a collapse flag: the interval's upper end below 0.5, i.e. PPO loses to
SFT under the gold judge beyond what another draw of prompts explains (the collapse "The N+ implementation
details of RLHF with PPO" reports is win rate about 0.2 against 0.54-0.62). The last line reads
`seeds_won=K/N worst_win=<lowest win rate>`, a seed winning when its win rate is above 0.5 with gold Δ > 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

UPSTREAM = ("instructions", "sft", "preferences", "reward")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="pipeline config (YAML)")
    parser.add_argument("--seeds", type=int, nargs="+", required=True, help="seeds to run, e.g. 1 2 3")
    parser.add_argument("--full", action="store_true", help="run every stage per seed, not just ppo and evaluate")
    parser.add_argument("--upstream", help="finished run whose upstream stages every seed shares (default: the config's output_dir)")
    parser.add_argument("--workdir", help="where the seeds' runs go (default: runs/seeds-<config name>)")
    args, overrides = parser.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o or o.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides are key=value)")
    args.overrides = overrides
    args.workdir = Path(args.workdir or f"runs/seeds-{Path(args.config).stem}")
    return args


def link_upstream(upstream: Path, run_dir: Path) -> None:
    """The shared stages' published folders, hard-linked (no copy of the merged model); ppo and evaluate
    never write into their inputs."""
    for stage in UPSTREAM:
        source = upstream / stage
        if not (source / "manifest.json").exists():
            raise SystemExit(f"{upstream}: stage {stage} has no published output; run the pipeline there first (or pass --full)")
        if not (run_dir / stage).exists():
            shutil.copytree(source, run_dir / stage, copy_function=_link_or_copy)


def _link_or_copy(source: str, dest: str) -> None:
    try:
        os.link(source, dest)
    except OSError:  # another file system
        shutil.copy2(source, dest)


def run_seed(args: argparse.Namespace, seed: int, upstream: Path | None) -> dict:
    run_dir = args.workdir / f"seed-{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "rlhf.cli", "run", args.config, f"output_dir={run_dir}", f"seed={seed}", *args.overrides]
    if upstream is not None:
        link_upstream(upstream, run_dir)
        command += ["--only", "ppo,evaluate"]
    h.log(f"seed {seed}: {' '.join(command)} (load {h.loadavg()})")
    started = time.time()
    with open(run_dir / "seeds.log", "w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise SystemExit(f"seed {seed} failed (status {status}); see {run_dir / 'seeds.log'}")
    return summarize(run_dir, seed, time.time() - started)


def summarize(run_dir: Path, seed: int, wall_s: float) -> dict:
    """One seed's row, read from its published evaluate report and ppo outputs."""
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    models, wins = report["models"], report["win_rate"]
    low, high = report["win_rate_interval"]
    steps = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    step_s = [s["time/rollout"] + s["time/update"] for s in steps if "time/rollout" in s]
    ppo_manifest = json.loads((run_dir / "ppo" / "manifest.json").read_text())
    return {
        "seed": seed,
        "win_rate": wins["win_rate"],
        "interval": (low, high),
        "record": f"{wins['wins']}/{wins['ties']}/{wins['losses']}",
        "gold_delta": models["ppo"]["gold_reward"] - models["sft"]["gold_reward"],
        "proxy_delta": models["ppo"]["proxy_reward"] - models["sft"]["proxy_reward"],
        "kl": models["ppo"]["kl"],
        "kl_within_budget": report["kl_within_budget"],
        "eos_fraction": models["ppo"]["eos_fraction"],
        "step_s": statistics.median(step_s) if step_s else float("nan"),
        "ppo_peak_gib": ppo_manifest["memory"]["peak_mb"] / 1024,
        "collapsed": high < 0.5,
        "wall_s": wall_s,
    }


def won(row: dict) -> bool:
    return row["win_rate"] > 0.5 and row["gold_delta"] > 0


def table(rows: list[dict]) -> str:
    lines = [
        "| seed | win rate (W/T/L) | 95% interval | gold Δ | proxy Δ | KL | EOS (PPO) | s/step | ppo peak | collapsed | wall |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        kl = f"{r['kl']:.2f}" + ("" if r["kl_within_budget"] else " (over budget)")
        lines.append(
            f"| {r['seed']} | {r['win_rate']:.3f} ({r['record']}) | {r['interval'][0]:.3f}–{r['interval'][1]:.3f} | "
            f"{r['gold_delta']:+.3f} | {r['proxy_delta']:+.3f} | {kl} | {r['eos_fraction']:.2f} | {r['step_s']:.1f} | "
            f"{r['ppo_peak_gib']:.2f} GiB | {'YES' if r['collapsed'] else 'no'} | {r['wall_s']:.0f} s |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    upstream = None
    if not args.full:
        upstream = Path(args.upstream) if args.upstream else output_dir_of(args.config)
    h.log(f"{h.cpu_info()}; {h.code_state('stages/ppo.py', 'stages/evaluate.py', args.config)}")
    rows = [run_seed(args, seed, upstream) for seed in args.seeds]
    print(table(rows))
    print(f"seeds_won={sum(won(r) for r in rows)}/{len(rows)} worst_win={min(r['win_rate'] for r in rows):.3f}")
    return 0


def output_dir_of(config: str) -> Path:
    from rlhf.config import load_config

    return Path(load_config(config).output_dir)


if __name__ == "__main__":
    sys.exit(main())
