"""bench/seeds.py: ppo and evaluate per seed on one shared upstream run, and the table it prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SEEDS = [sys.executable, str(REPO / "bench" / "seeds.py"), str(REPO / "configs" / "smoke.yaml")]


def test_seeds_share_the_upstream_and_print_a_row_per_seed(upstream, tmp_path):
    before = {stage: (upstream / stage / "manifest.json").read_text() for stage in ("instructions", "sft", "preferences", "reward")}
    work = tmp_path / "seeds"
    result = subprocess.run(
        [*SEEDS, "--seeds", "1", "2", "--upstream", str(upstream), "--workdir", str(work), "ppo.steps=2"],
        capture_output=True, text=True, cwd=REPO, env=os.environ, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    rows = [line for line in lines if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert len(rows) == 2
    reports = [json.loads((work / f"seed-{seed}" / "evaluate" / "report.json").read_text()) for seed in (1, 2)]
    assert [r["decoding"]["seed"] for r in reports] == [1, 2]
    # The upstream was linked, not rerun: the same manifests, and the very same merged weights on disk.
    for stage, manifest in before.items():
        assert (work / "seed-1" / stage / "manifest.json").read_text() == manifest
    weights = next((upstream / "sft" / "merged").glob("*.safetensors"))
    assert (work / "seed-2" / "sft" / "merged" / weights.name).stat().st_ino == weights.stat().st_ino
    # Each seed's ppo ran with its own seed (the policies differ).
    policies = [(work / f"seed-{seed}" / "ppo" / "policy" / "adapter_model.safetensors").read_bytes() for seed in (1, 2)]
    assert policies[0] != policies[1]
    won = sum(r["win_rate"]["win_rate"] > 0.5 and r["models"]["ppo"]["gold_reward"] > r["models"]["sft"]["gold_reward"] for r in reports)
    worst = min(r["win_rate"]["win_rate"] for r in reports)
    assert lines[-1] == f"seeds_won={won}/2 worst_win={worst:.3f}"


def test_seeds_needs_a_finished_upstream(tmp_path):
    result = subprocess.run([*SEEDS, "--seeds", "1", "--upstream", str(tmp_path / "none"), "--workdir", str(tmp_path / "w")],
                            capture_output=True, text=True, cwd=REPO, env=os.environ, timeout=120)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == (
        f"{tmp_path / 'none'}: stage instructions has no published output; run the pipeline there first (or pass --full)"
    )
