"""bench/gpu_check.sh's dry run: the files it needs exist, and it prints every command of the GPU check
(both engines through every stage, DeepSpeed ZeRO-2 once) and the ratio line, without a GPU."""

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_prints_its_plan_and_the_ratio_line():
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    commands = [line for line in lines if line.startswith("+ ")]
    for engine in ("hf", "vllm"):
        assert any("plan_vs_measured.py configs/qwen2.5-0.5b.yaml" in c and "--with-evaluate" in c
                   and f"generation.engine={engine}" in c for c in commands)
    assert any("launch.accelerate_config=configs/accelerate/deepspeed_zero2.yaml" in c and "--only" in c for c in commands)
    assert any("--no-index --find-links" in c for c in commands)  # installs from carried wheels only
    assert lines[-1].startswith("vllm_speedup=") and " plan_worst_ratio=" in lines[-1]


def test_gpu_check_stops_on_a_missing_file(tmp_path):
    script = tmp_path / "bench" / "gpu_check.sh"
    script.parent.mkdir()
    script.write_text((REPO / "bench" / "gpu_check.sh").read_text())
    result = subprocess.run(["bash", str(script), "--dry-run"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "gpu_check: missing configs/qwen2.5-0.5b.yaml" in result.stderr
