"""An external reward model with its own tokenizer and chat template (`reward.model`): the preferences
judge, ppo and evaluate score with it, each response rendered in its template, and every stage publishes."""

import json
from pathlib import Path

import pytest
import torch
from families import build_family_model
from transformers import AutoModelForSequenceClassification

from rlhf.cli import main
from rlhf.config import ModelConfig
from rlhf.reward.readout import RewardModel

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


@pytest.fixture(scope="module")
def external_run(tmp_path_factory) -> tuple[Path, Path]:
    """A Llama-3-style classifier (other tokenizer, other template, other pad) as the reward model of a
    pipeline on the tiny ChatML model."""
    root = tmp_path_factory.mktemp("external")
    llama = build_family_model("llama3", root / "llama3")
    rm = root / "rm"
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(llama, num_labels=1).save_pretrained(rm)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (rm / name).write_bytes((llama / name).read_bytes())
    run_dir = root / "run"
    overrides = [f"output_dir={run_dir}", f"reward.model={rm}", "preferences.judge=reward_model", f"preferences.judge_model={rm}"]
    assert main(["run", SMOKE, *overrides]) == 0
    return rm, run_dir


def test_every_stage_publishes_with_an_external_reward_model(external_run):
    rm, run_dir = external_run
    for stage in ("instructions", "sft", "preferences", "reward", "ppo", "evaluate", "export"):
        assert (run_dir / stage / "manifest.json").is_file(), stage
    assert json.loads((run_dir / "reward" / "external.json").read_text()) == {"model": str(rm)}
    ppo = json.loads((run_dir / "ppo" / "manifest.json").read_text())["metrics"]
    assert ppo["reward_model"] == f"external: {rm}" and ppo["resident_backbones"] == 2  # the policy's and the RM's
    assert json.loads((run_dir / "preferences" / "stats.json").read_text())["judge"] == "reward_model"


def test_evaluate_scores_each_response_in_the_reward_models_own_template(external_run):
    rm, run_dir = external_run
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert report["proxy_reward_model"] == f"external reward model {rm}"
    rows = [json.loads(line) for line in (run_dir / "evaluate" / "samples.jsonl").read_text().splitlines()]
    reward_model = RewardModel.load(str(rm), ModelConfig(dtype="float32"), "reward.model")
    for name in ("sft", "ppo"):
        expected = reward_model.scores(
            [[{"role": "user", "content": r["prompt"]}] for r in rows], [r[f"{name}_response"] for r in rows],
            [r[f"{name}_finished"] for r in rows],
        )
        assert [r[f"{name}_proxy"] for r in rows] == pytest.approx(expected, abs=1e-3)
    # The Llama 3 template's date header and its <|eot_id|> end of turn: the RM's own rendering.
    ids = reward_model.chat.reward_ids([{"role": "user", "content": "hi"}], "yes", True)
    text = reward_model.chat.tokenizer.decode(ids)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system") and text.endswith("yes<|eot_id|>")


def test_an_external_model_source_scores_as_the_reward_stages_external_model(external_run, tmp_path):
    """ppo.rewards kind external_model loads a classifier by path and reads it as every reward model is
    read: here the same model the reward stage names, so both sources give the same scores each step."""
    import shutil

    rm, run_dir = external_run
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    sources = f"ppo.rewards=[{{kind: reward_model}}, {{kind: external_model, path: '{rm}', weight: 0.5}}]"
    assert main(["run", SMOKE, f"output_dir={copy}", "--only", "ppo", sources]) == 0
    records = [json.loads(line) for line in (copy / "ppo" / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert record["reward/external_model"] == pytest.approx(record["reward/reward_model"], abs=1e-4)
        assert record["objective/scores"] == pytest.approx(1.5 * record["reward/reward_model"], abs=1e-4)
