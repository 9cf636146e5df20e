"""`rlhf` on configs/smoke.yaml: the tiny model through every stage, as a user runs it."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.cli import main

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    assert main(["run", SMOKE, f"output_dir={run_dir}"]) == 0
    return run_dir


def generate(model_dir: Path) -> str:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Give one tip."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > ids["input_ids"].shape[1]
    return tokenizer.decode(output[0])


def test_smoke_run_publishes_every_stage(smoke_run):
    expected = {
        "instructions": ["train.jsonl", "eval.jsonl", "stats.json"],
        "sft": ["adapter", "merged", "metrics.jsonl"],
        "preferences": ["train.jsonl", "eval.jsonl", "stats.json"],
        "reward": ["adapter", "score_head.safetensors", "model", "metrics.jsonl"],
        "ppo": ["policy/adapter_model.safetensors", "value/value_head.safetensors", "metrics.jsonl", "samples.jsonl"],
        "benchmark": ["report.json", "report.md", "plots"],  # no tasks in the smoke config: an empty report
    }
    for stage, files in expected.items():
        manifest = json.loads((smoke_run / stage / "manifest.json").read_text())
        assert manifest["stage"] == stage and (manifest["duration_s"] > 0 or stage == "benchmark")  # no tasks: ~0 s
        assert all((smoke_run / stage / f).exists() for f in files)
    assert (smoke_run / "config.yaml").exists() and (smoke_run / "sft" / "config.yaml").exists()
    sft = json.loads((smoke_run / "sft" / "manifest.json").read_text())
    assert set(sft["metrics"]) >= {"eval_loss_before", "eval_loss"}
    assert sft["parts"]["config"]["lora"]["r"] == 8
    curve = [json.loads(line) for line in (smoke_run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if "loss" in r] == [1, 2, 3, 4]
    assert not list(smoke_run.glob(".work/*")) and not list(smoke_run.glob(".tmp/*"))


def test_merged_sft_model_loads_with_plain_transformers_and_generates(smoke_run):
    assert "<|im_start|>assistant" in generate(smoke_run / "sft" / "merged")
    assert list((smoke_run / "sft" / "merged").glob("*.safetensors"))


def test_weights_written_are_safetensors_only(smoke_run):
    """No pickled weights in a finished run: every model, adapter and head is safetensors. (While a training
    stage runs, its checkpoints in .work/ also hold optimizer, scheduler and RNG state as torch pickles, which
    only this pipeline writes and reads; they are removed once the stage is published.)"""
    pickles = [p for p in smoke_run.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}]
    assert not pickles, pickles
    weights = {p.relative_to(smoke_run).parts[0] for p in smoke_run.rglob("*.safetensors")}
    assert weights >= {"sft", "reward", "ppo"}


def test_rerun_does_nothing_quickly(smoke_run, capsys):
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "run", SMOKE, f"output_dir={smoke_run}"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "nothing to do" in result.stdout
    assert time.time() - started < 5  # a fresh interpreter included; the runner itself imports no torch
    main(["status", SMOKE, f"output_dir={smoke_run}"])
    assert capsys.readouterr().out.count("up to date") == 8


def test_changed_sft_key_reruns_only_sft(smoke_run, capsys):
    main(["run", SMOKE, f"output_dir={smoke_run}", "--dry-run", "sft.learning_rate=1e-3"])
    out = capsys.readouterr().out
    assert "would skip instructions: up to date" in out
    assert "would run sft: config sft.learning_rate: 0.0002 -> 0.001" in out
    before = (smoke_run / "instructions" / "manifest.json").read_text()
    assert main(["run", SMOKE, f"output_dir={smoke_run}", "--only", "sft", "lora.r=4"]) == 0
    assert (smoke_run / "instructions" / "manifest.json").read_text() == before
    assert json.loads((smoke_run / "sft" / "manifest.json").read_text())["parts"]["config"]["lora"]["r"] == 4
    main(["status", SMOKE, f"output_dir={smoke_run}"])
    assert "sft            stale (config lora.r: 4 -> 8)" in capsys.readouterr().out


def test_graph(capsys):
    assert main(["graph", SMOKE]) == 0
    assert "sft <- instructions" in capsys.readouterr().out


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["sft.learnin_rate=1"], "unknown key 'sft.learnin_rate' (did you mean 'sft.learning_rate'?)"),
        (["model.name_or_path=/nonexistent/model"], "model.name_or_path: '/nonexistent/model' is not a model directory"),
        (["model.name_or_path=no-such-org/no-such-model"], "model.name_or_path: 'no-such-org/no-such-model' is neither a local directory nor in the Hugging Face cache"),
        (["instructions.seeds=/nonexistent/seeds.jsonl"], "/nonexistent/seeds.jsonl"),
    ],
)
def test_bad_input_is_one_line_and_publishes_nothing(tmp_path, overrides, message):
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "run", SMOKE, f"output_dir={tmp_path / 'run'}", *overrides],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "instructions").exists() and not (tmp_path / "run" / "sft").exists()


def test_malformed_seed_line_names_file_and_line(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"instruction": "Say hi.", "output": "Hi."}\n{"instruction": \n')
    result = subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "run", SMOKE, f"output_dir={tmp_path / 'run'}", f"instructions.seeds={seeds}"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and f"{seeds}:2:" in result.stderr and "Traceback" not in result.stderr


def test_qlora_sft_with_wandb_offline(tmp_path, capsys):
    """4-bit NF4 backbone on the CPU; the merged model is full precision, not 4-bit. evaluate judged the NF4
    backbone + adapter, export ships the full-precision merge: the report and model card say how far apart."""
    run_dir = tmp_path / "run"
    assert main(["run", SMOKE, f"output_dir={run_dir}", "model.quantization=4bit", "wandb.mode=offline"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "merged")
    assert merged.dtype == torch.float32 and "quantization_config" not in merged.config.to_dict()
    generate(run_dir / "sft" / "merged")
    assert list((run_dir / "wandb").rglob("offline-run-*"))

    gap = json.loads((run_dir / "export" / "manifest.json").read_text())["metrics"]
    assert gap["evaluated_vs_shipped_prompts"] == 8  # the held-out prompts (instructions.num_eval)
    assert 0 < gap["evaluated_vs_shipped_mean_abs_logit_diff"] <= gap["evaluated_vs_shipped_max_abs_logit_diff"] < 100
    assert gap["evaluated_vs_shipped_mean_kl_per_token"] >= 0
    card = (run_dir / "export" / "model" / "README.md").read_text()
    assert "These figures are of the 4bit backbone + adapter that was evaluated" in card
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    assert f"their logits differ by at most {gap['evaluated_vs_shipped_max_abs_logit_diff']:.3g}" in capsys.readouterr().out


def test_8bit_sft(tmp_path):
    """LLM.int8 backbone on the CPU; the merged model is full precision."""
    run_dir = tmp_path / "run"
    assert main(["run", SMOKE, f"output_dir={run_dir}", "model.quantization=8bit", "--only", "instructions,sft"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "merged")
    assert merged.dtype == torch.float32 and "quantization_config" not in merged.config.to_dict()


def test_debug_flag_shows_the_traceback(tmp_path):
    args = [sys.executable, "-m", "rlhf.cli", "run", SMOKE, f"output_dir={tmp_path / 'run'}", "sft.learnin_rate=1"]
    quiet = subprocess.run(args, capture_output=True, text=True)
    loud = subprocess.run([*args, "--debug"], capture_output=True, text=True)
    assert quiet.returncode == 2 and "Traceback" not in quiet.stderr
    assert loud.returncode != 0 and "Traceback" in loud.stderr and "UserError" in loud.stderr
