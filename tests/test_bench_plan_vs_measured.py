"""bench/plan_vs_measured.py stays runnable: a tiny Llama shape through every stage on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

TINY_SHAPE = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "vocab_size": 512,
    "tie_word_embeddings": True,
}


@pytest.mark.slow  # 55 s: five stages, each in a process of its own
def test_plan_vs_measured_runs_each_stage_at_the_planned_lengths(tmp_path):
    shape = tmp_path / "shape.json"
    shape.write_text(json.dumps(TINY_SHAPE))
    work = tmp_path / "work"
    command = [
        sys.executable, str(REPO / "bench" / "plan_vs_measured.py"), str(REPO / "configs" / "smoke.yaml"),
        "--model-config", str(shape), "--prompt-tokens", "32", "--steps", "1", "--work", str(work),
        "sft.grad_accum=2",
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=os.environ, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[-1].startswith("worst_ratio=") and float(lines[-1].split("=")[1]) > 0
    table = {line.split()[0]: line.split() for line in lines if line.split() and line.split()[0] in
             ("instructions", "sft", "preferences", "reward", "ppo")}
    assert set(table) >= {"instructions", "sft", "reward", "ppo"} and "preferences" not in table  # imported: no model
    for stage in ("instructions", "sft", "reward", "ppo"):
        estimate, measured, ratio = map(float, table[stage][1:4])
        assert estimate > 0 and measured > 0 and ratio == pytest.approx(measured / estimate, rel=0.1)  # rounded MiB

    # The data is at the lengths the plan assumes: prompts of 32 tokens, sft examples of sft.max_length.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    assert len(tokenizer) == TINY_SHAPE["vocab_size"]
    seeds = [json.loads(line) for line in (work / "seeds.jsonl").read_text().splitlines()]
    assert len(seeds) == 16 + 1 * 4 * 2 + 2  # one teacher batch, one sft step of batch 4 × grad_accum 2, eval
    for seed in seeds:
        prompt = [{"role": "user", "content": seed["instruction"]}]
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert len(ids["input_ids"]) == 32
        if "output" in seed:
            turn = [*prompt, {"role": "assistant", "content": seed["output"]}]
            assert len(tokenizer.apply_chat_template(turn, tokenize=True, return_dict=True)["input_ids"]) == 128
    reward = json.loads((work / "run" / "reward" / "manifest.json").read_text())
    assert reward["metrics"]["train_dropped_too_long"] == 0 and reward["memory"]["device"] == "cpu"
    # `auto` is named as this machine resolves it (float32: the tests pin RLHF_CPU_BF16=0), so that the plan
    # is not given bfloat16 for a run in float32
    assert "  dtype: float32\n" in (work / "config.yaml").read_text()


def test_plan_vs_measured_names_a_missing_shape_file(tmp_path):
    command = [sys.executable, str(REPO / "bench" / "plan_vs_measured.py"), str(REPO / "configs" / "smoke.yaml"),
               "--model-config", str(tmp_path / "missing.json"), "--work", str(tmp_path / "work")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=os.environ, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == f"plan_vs_measured: --model-config {tmp_path / 'missing.json'}: file not found"
