"""bench/gpu_check.sh's dry run: the files it needs exist, and it prints every command of the GPU check
(both engines through every stage, DeepSpeed ZeRO-2 once) and the ratio line, without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


@pytest.mark.slow
def test_gpu_check_rehearsed_on_the_cpu_with_a_tiny_shape(tmp_path):
    """The whole check, not dry, on a tiny Llama shape (heads of 32, as vLLM's CPU attention needs) and the
    smoke config, without the GPU assertion and the DeepSpeed step: both engines through every stage, the
    report, the last line. Needs vllm (the `.[vllm]` extra)."""
    pytest.importorskip("vllm", reason='vllm is not installed: pip install -e ".[test,vllm]"')
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 1024,
        "vocab_size": 512, "tie_word_embeddings": True,
    }))
    env = {**os.environ, "CONFIG": "configs/smoke.yaml", "SHAPE": str(shape), "PROMPT_TOKENS": "32", "PPO_STEPS": "2",
           "DEEPSPEED": "0", "REQUIRE_CUDA": "0", "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
           "SIZES": "evaluate.num_prompts=2 evaluate.samples_per_prompt=1"}
    result = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    for engine in ("hf", "vllm"):
        for stage in ("instructions", "sft", "reward", "ppo", "evaluate"):
            assert any(line.split()[:2] == [engine, stage] for line in lines if line.split())
        assert any(line.startswith(f"rollout {engine}: ") and "tokens/s" in line for line in lines)
    speedup, worst = (float(part.split("=")[1]) for part in lines[-1].split())
    assert lines[-1].startswith("vllm_speedup=") and speedup > 0 and worst > 0
