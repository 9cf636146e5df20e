"""Prompts longer than the model's context, and examples longer than a stage's max_length: every stage that
reads prompts truncates or drops them, and counts them (manifest metrics, stats.json, and a printed line).

The seeds hold three kinds of instruction, for the tiny model (a 1024-token context) and smoke.yaml
(sft.max_length and reward.max_length 128):
- short: a short instruction and answer, kept everywhere;
- long answer: a short instruction with a ~180-token answer: sft truncates it (the prompt fits);
- long prompt: a ~1100-token instruction, longer than the model's context: sft drops it (the prompt alone
  fills max_length), preferences, ppo and evaluate drop it (no room left to answer).
"""

import json
import shutil
from pathlib import Path

import pytest

from rlhf.cli import main

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")
LONG_PROMPT = "Explain " + " ".join(["the long question"] * 360) + "."
LONG_ANSWER = " ".join(["a good simple answer"] * 40)


def seeds() -> list[dict]:
    rows = [{"instruction": f"Give tip number {i}.", "output": "Write short simple steps."} for i in range(20)]
    rows += [{"instruction": f"Give long tip number {i}.", "output": LONG_ANSWER} for i in range(5)]
    rows += [{"instruction": f"{LONG_PROMPT} Number {i}.", "output": "Yes."} for i in range(5)]
    return rows


def kinds(split: Path) -> dict[str, int]:
    """How many rows of an instruction split have a long prompt and a long answer."""
    rows = [json.loads(line)["messages"] for line in split.read_text().splitlines()]
    return {
        "long_prompt": sum(LONG_PROMPT in m[0]["content"] for m in rows),
        "long_answer": sum(m[-1]["content"] == LONG_ANSWER for m in rows),
    }


def metrics(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())["metrics"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """instructions (the seeds above, as they are), sft and preferences (generated) on the tiny model."""
    run_dir = tmp_path_factory.mktemp("long") / "run"
    seed_file = run_dir.parent / "seeds.jsonl"
    seed_file.write_text("".join(json.dumps(row) + "\n" for row in seeds()))
    overrides = [f"output_dir={run_dir}", f"instructions.seeds={seed_file}", "instructions.expand=false"]
    assert main(["run", SMOKE, *overrides, "--only", "instructions,sft,preferences"]) == 0
    train = kinds(run_dir / "instructions" / "train.jsonl")
    assert train["long_prompt"] > 0 and train["long_answer"] > 0  # the split put some of each in train
    return run_dir


def test_sft_truncates_long_examples_and_drops_prompts_that_fill_max_length(run_dir):
    got = metrics(run_dir, "sft")
    for split in ("train", "eval"):
        expected = kinds(run_dir / "instructions" / f"{split}.jsonl")
        assert got[f"{split}_truncated"] == expected["long_answer"], got
        assert got[f"{split}_dropped_too_long"] == expected["long_prompt"], got
    assert got["train_examples"] == 22  # all read; the dropped ones are counted, not hidden


def test_preferences_drop_prompts_longer_than_context_minus_max_new_tokens(run_dir):
    stats = json.loads((run_dir / "preferences" / "stats.json").read_text())
    expected = kinds(run_dir / "instructions" / "train.jsonl")["long_prompt"]
    assert stats["prompts"] == 22 and stats["dropped"]["prompt_too_long"] == expected
    assert stats["pairs"] + sum(stats["dropped"].values()) == stats["prompts"]
    for row in (json.loads(line) for line in (run_dir / "preferences" / "train.jsonl").read_text().splitlines()):
        assert LONG_PROMPT not in row["prompt"][0]["content"]


def test_reward_drops_long_pairs_and_ppo_drops_long_prompts(run_dir, tmp_path, capsys):
    run_dir = Path(shutil.copytree(run_dir, tmp_path / "run"))
    pairs = tmp_path / "pairs.jsonl"
    short = [{"prompt": f"Question {i}?", "chosen": f"Thank you, answer {i}.", "rejected": "no"} for i in range(24)]
    long = [{"prompt": f"Long question {i}?", "chosen": LONG_ANSWER, "rejected": "no"} for i in range(4)]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in short + long))
    imported = ["preferences.source=import", f"preferences.path={pairs}", "preferences.num_eval=8", "reward.max_steps=2"]
    assert main(["run", SMOKE, f"output_dir={run_dir}", "--only", "preferences,reward", *imported]) == 0
    got = metrics(run_dir, "reward")
    assert got["train_dropped_too_long"] + got["eval_dropped_too_long"] == 4, got
    assert got["eval_pairs"] == 8 - got["eval_dropped_too_long"]
    assert "held-out pairs longer than reward.max_length=128 tokens" in capsys.readouterr().out

    assert main(["run", SMOKE, f"output_dir={run_dir}", "--only", "ppo", "ppo.steps=1"]) == 0
    expected = kinds(run_dir / "instructions" / "train.jsonl")["long_prompt"]
    assert metrics(run_dir, "ppo")["prompts_too_long"] == expected
    assert f"ppo: dropped {expected} of 22 prompts longer than 1012 tokens" in capsys.readouterr().out

    # evaluate drops held-out prompts that leave no room for evaluate.max_new_tokens, as ppo does.
    held_out = kinds(run_dir / "instructions" / "eval.jsonl")["long_prompt"]
    assert held_out > 0  # the split put some in eval too
    assert main(["run", SMOKE, f"output_dir={run_dir}", "--only", "evaluate", "evaluate.num_prompts=100"]) == 0
    rows = len((run_dir / "instructions" / "eval.jsonl").read_text().splitlines())
    assert f"evaluate: dropped {held_out} of {rows} prompts longer than" in capsys.readouterr().out
    assert json.loads((run_dir / "evaluate" / "report.json").read_text())["prompts"] == rows - held_out


def test_every_pair_too_long_is_one_line(run_dir, tmp_path, capsys):
    run_dir = Path(shutil.copytree(run_dir, tmp_path / "run"))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Q{i}?", "chosen": LONG_ANSWER, "rejected": "no"}) + "\n" for i in range(8)))
    imported = ["preferences.source=import", f"preferences.path={pairs}", "preferences.num_eval=2"]
    assert main(["run", SMOKE, f"output_dir={run_dir}", "--only", "preferences,reward", *imported]) == 2
    assert "error: reward: every training pair is longer than reward.max_length=128 tokens" in capsys.readouterr().err
