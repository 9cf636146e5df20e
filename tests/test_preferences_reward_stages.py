"""The preferences and reward stages through the CLI on the tiny model: import, generate with an LLM
judge, a learnable synthetic preference, the saved reward forms, an external reward model, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fake_openai_server import fake_openai_server
from safetensors.torch import load_file
from test_judges import prefers_longer
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rlhf.cli import main
from rlhf.chat_format import ChatFormat
from rlhf.reward.readout import classifier_scores
from rlhf.stages.reward import load_pairs, tokenize_pairs

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Path:
    """instructions and sft on the tiny model, run once; each test works on a copy."""
    run_dir = tmp_path_factory.mktemp("upstream") / "run"
    assert main(["run", SMOKE, f"output_dir={run_dir}", "--only", "instructions,sft"]) == 0
    return run_dir


@pytest.fixture
def run_dir(upstream, tmp_path) -> Path:
    return Path(shutil.copytree(upstream, tmp_path / "run"))


def rlhf(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rlhf.cli", "run", SMOKE, f"output_dir={run_dir}", *args], capture_output=True, text=True
    )


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def synthetic_pairs(n: int) -> list[dict]:
    """A learnable preference: chosen answers are polite and end properly, rejected ones are curt."""
    return [
        {"prompt": f"Question number {i}: what should I do?", "chosen": f"Thank you, a good plan is step {i}. Good luck!", "rejected": f"no {i} bad"}
        for i in range(n)
    ]


def test_import_hh_transcripts(run_dir, tmp_path):
    rows = [
        {"chosen": f"\n\nHuman: Hi {i}\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: An apple.", "rejected": f"\n\nHuman: Hi {i}\n\nAssistant: Hello!\n\nHuman: Name a fruit.\n\nAssistant: No."}
        for i in range(10)
    ]
    rows.append({"chosen": "\n\nHuman: Same\n\nAssistant: Same.", "rejected": "\n\nHuman: Same\n\nAssistant: Same."})
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    result = rlhf(run_dir, "--only", "preferences", "preferences.source=import", f"preferences.path={path}")
    assert result.returncode == 0, result.stderr
    stats = json.loads((run_dir / "preferences" / "stats.json").read_text())
    assert stats["shape"] == "hh" and stats["dropped"] == {"identical": 1} and stats["pairs"] == 10
    assert (stats["train"], stats["eval"]) == (6, 4)
    row = read_jsonl(run_dir / "preferences" / "train.jsonl")[0]
    assert [m["role"] for m in row["prompt"]] == ["user", "assistant", "user"]
    assert row["chosen"] == [{"role": "assistant", "content": "An apple."}]
    assert row["rejected"] == [{"role": "assistant", "content": "No."}]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n', "pairs.jsonl:2:"),
        ('{"prompt": "p", "chosen": "a", "rejected": "b"}\n', "1 pairs (dropped: {}) are too few for preferences.num_eval=4"),
        ("", "pairs.jsonl"),
    ],
)
def test_bad_preference_files_publish_nothing(run_dir, tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(content)
    result = rlhf(run_dir, "--only", "preferences", "preferences.source=import", f"preferences.path={path}")
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (run_dir / "preferences").exists()


def test_generate_with_llm_judge_over_http(run_dir):
    with fake_openai_server(lambda request: prefers_longer(request["messages"][-1]["content"])) as base_url:
        result = rlhf(
            run_dir,
            "--only",
            "preferences",
            "preferences.judge=llm",
            "preferences.judge_teacher.kind=openai",
            f"preferences.judge_teacher.base_url={base_url}",
            "preferences.judge_teacher.model=judge",
        )
    assert result.returncode == 0, result.stderr
    stats = json.loads((run_dir / "preferences" / "stats.json").read_text())
    assert stats["judge"] == "llm" and stats["pairs"] + sum(stats["dropped"].values()) == stats["prompts"]
    for row in read_jsonl(run_dir / "preferences" / "train.jsonl"):
        assert len(row["chosen"][0]["content"]) > len(row["rejected"][0]["content"])


def test_reward_model_learns_a_synthetic_preference_and_saves_every_form(run_dir, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(80))
    result = rlhf(
        run_dir,
        "--only",
        "preferences,reward",
        "preferences.source=import",
        f"preferences.path={path}",
        "preferences.num_eval=16",
        "reward.max_steps=30",
        "reward.learning_rate=3e-3",
        "reward.batch_size=8",
        "reward.logging_steps=5",
    )
    assert result.returncode == 0, result.stderr
    reward = run_dir / "reward"
    metrics = json.loads((reward / "manifest.json").read_text())["metrics"]
    assert metrics["eval_accuracy"] >= 0.9, metrics  # chance is 0.5
    assert metrics["eval_pairs"] == 16
    curve = [json.loads(line) for line in (reward / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in curve if "loss" in r] == [5, 10, 15, 20, 25, 30]

    # The standalone model reproduces the held-out accuracy with plain transformers.
    tokenizer = AutoTokenizer.from_pretrained(reward / "model")
    model = AutoModelForSequenceClassification.from_pretrained(reward / "model").eval()
    pairs = tokenize_pairs(load_pairs(run_dir / "preferences" / "eval.jsonl"), ChatFormat.of(tokenizer))
    chosen = classifier_scores(model, tokenizer.pad_token_id, pairs["chosen_ids"])
    rejected = classifier_scores(model, tokenizer.pad_token_id, pairs["rejected_ids"])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
    assert accuracy == pytest.approx(metrics["eval_accuracy"])
    head = load_file(reward / "score_head.safetensors")["weight"]
    assert head.shape == (1, model.config.hidden_size)
    assert torch.allclose(head, model.score.weight.float(), atol=1e-6)
    assert (reward / "adapter" / "adapter_config.json").exists()


def test_external_reward_model_is_used_as_is(run_dir, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24))
    external = tmp_path / "external-rm"
    AutoModelForSequenceClassification.from_pretrained(run_dir / "sft" / "merged", num_labels=1).save_pretrained(external)
    AutoTokenizer.from_pretrained(run_dir / "sft" / "merged").save_pretrained(external)
    result = rlhf(
        run_dir, "--only", "preferences,reward", "preferences.source=import", f"preferences.path={path}", f"reward.model={external}"
    )
    assert result.returncode == 0, result.stderr
    reward = run_dir / "reward"
    assert json.loads((reward / "external.json").read_text()) == {"model": str(external)}
    assert not (reward / "adapter").exists()
    metrics = json.loads((reward / "manifest.json").read_text())["metrics"]
    assert metrics["external"] is True and 0 <= metrics["eval_accuracy"] <= 1


def test_unknown_external_reward_model_is_one_line(run_dir, tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(24))
    result = rlhf(
        run_dir, "--only", "preferences,reward", "preferences.source=import", f"preferences.path={path}", "reward.model=/no/such/rm"
    )
    assert result.returncode == 2 and "'/no/such/rm' is not a model directory" in result.stderr
    assert not (run_dir / "reward").exists() and (run_dir / "preferences" / "manifest.json").exists()


def test_generate_with_reward_model_judge(run_dir, tmp_path):
    judge = tmp_path / "judge-rm"
    AutoModelForSequenceClassification.from_pretrained(run_dir / "sft" / "merged", num_labels=1).save_pretrained(judge)
    AutoTokenizer.from_pretrained(run_dir / "sft" / "merged").save_pretrained(judge)
    result = rlhf(run_dir, "--only", "preferences", "preferences.judge=reward_model", f"preferences.judge_model={judge}")
    assert result.returncode == 0, result.stderr
    stats = json.loads((run_dir / "preferences" / "stats.json").read_text())
    assert stats["judge"] == "reward_model" and stats["pairs"] > 0
    for row in read_jsonl(run_dir / "preferences" / "train.jsonl"):
        assert row["score_chosen"] >= row["score_rejected"]


def test_reward_model_judge_needs_a_model(run_dir):
    result = rlhf(run_dir, "--only", "preferences", "preferences.judge=reward_model")
    assert result.returncode == 2 and "preferences.judge_model: required" in result.stderr
