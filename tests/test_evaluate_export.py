"""The evaluate and export stages on configs/smoke.yaml, and the commands that read their outputs:
`rlhf report`, `rlhf plot`, `rlhf chat`."""

import io
import json
import math
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlhf.benchmark_report import build_report
from rlhf.cli import main
from rlhf.config import load_config
from rlhf.report import reward_hacking, verdict_scores, win_rate, win_rate_interval
from rlhf.stages.evaluate import per_prompt_means
from rlhf.stages.export import model_card

REPO = Path(__file__).resolve().parent.parent
SMOKE = str(REPO / "configs" / "smoke.yaml")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTS = ("ppo_reward_kl.png", "reward_accuracy.png", "sft_loss.png")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("evaluate") / "run"
    assert main(["run", SMOKE, f"output_dir={run_dir}"]) == 0
    return run_dir


# --- pure functions, hand-computed -------------------------------------------------------------


def test_win_rate_counts_ties_apart():
    # prompt by prompt: tie (0.5 = 0.5), win (0.7 > 0.6), loss (0.3 < 0.4), tie (0.4 = 0.4)
    result = win_rate(ppo=[0.5, 0.7, 0.3, 0.4], sft=[0.5, 0.6, 0.4, 0.4])
    assert result == {"prompts": 4, "wins": 1, "ties": 2, "losses": 1, "win_rate": 0.25, "win_rate_ties_half": 0.5}
    assert win_rate([1.0, 1.0, 1.0], [0.0, 0.0, 1.0])["win_rate"] == pytest.approx(2 / 3)
    assert win_rate([0.3 + 1e-12], [0.3])["ties"] == 1  # float noise is a tie, not a win
    with pytest.raises(ValueError):
        win_rate([1.0], [1.0, 2.0])


def test_win_rate_interval_bootstraps_over_prompts():
    # W, W, W, L: a resample's wins are Binomial(4, 3/4). P(0 wins) = 1/256 = 0.004 and P(<= 1 win) =
    # 13/256 = 0.051, so the 2.5th percentile is 1 win (0.25); P(4 wins) = 81/256 = 0.32 puts the 97.5th at 1.0.
    assert win_rate_interval([1, 1, 1, 0], [0, 0, 0, 1]) == (0.25, 1.0)
    # W, L: half the resamples are mixed (0.5), a quarter each all-win or all-loss: the interval is [0, 1].
    assert win_rate_interval([1, 0], [0, 1]) == (0.0, 1.0)
    assert win_rate_interval([1, 1, 1], [0, 0, 0]) == (1.0, 1.0)  # every resample wins everywhere
    assert win_rate_interval([0.5, 0.5], [0.5, 0.5 + 1e-12]) == (0.0, 0.0)  # ties are not wins
    scores = [0.1 * (i % 7) for i in range(24)], [0.1 * (i % 5) for i in range(24)]
    low, high = win_rate_interval(*scores)
    assert low < win_rate(*scores)["win_rate"] < high and win_rate_interval(*scores) == (low, high)  # seeded
    with pytest.raises(ValueError):
        win_rate_interval([1.0], [1.0, 2.0])


def test_reward_hacking_needs_proxy_up_and_gold_down():
    assert reward_hacking(proxy_sft=0.1, proxy_ppo=0.5, gold_sft=0.6, gold_ppo=0.4)
    assert not reward_hacking(proxy_sft=0.1, proxy_ppo=0.5, gold_sft=0.4, gold_ppo=0.6)  # both up: learning
    assert not reward_hacking(proxy_sft=0.5, proxy_ppo=0.1, gold_sft=0.6, gold_ppo=0.4)  # both down: just worse
    assert not reward_hacking(proxy_sft=0.1, proxy_ppo=0.5, gold_sft=0.6, gold_ppo=0.6)  # gold unchanged


def test_llm_verdicts_become_preference_shares():
    ppo, sft = verdict_scores([0, 1, None, 0])  # PPO better, SFT better, tie, PPO better
    assert ppo == [1.0, 0.0, 0.5, 1.0] and sft == [0.0, 1.0, 0.5, 0.0]
    assert win_rate(ppo, sft) == {"prompts": 4, "wins": 2, "ties": 1, "losses": 1, "win_rate": 0.5, "win_rate_ties_half": 0.625}


# --- the evaluate stage ------------------------------------------------------------------------


def test_report_holds_every_measure(run_dir):
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert report["prompts"] == 8  # every held-out prompt of the smoke config's eval split
    assert report["decoding"] == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 12, "seed": 0}
    for name in ("sft", "ppo"):
        model = report["models"][name]
        assert set(model) == {"proxy_reward", "gold_reward", "kl", "response_length", "eos_fraction"}
        assert all(math.isfinite(v) for v in model.values())
        assert 0 <= model["gold_reward"] <= 1 and 0 <= model["eos_fraction"] <= 1
        assert 0 < model["response_length"] <= 12
    assert report["models"]["sft"]["kl"] == 0.0
    assert report["models"]["ppo"]["kl"] != 0.0  # the policy moved off the reference, a little
    wins = report["win_rate"]
    assert wins["wins"] + wins["ties"] + wins["losses"] == 8
    models = report["models"]
    assert report["reward_hacking"] == reward_hacking(
        models["sft"]["proxy_reward"], models["ppo"]["proxy_reward"], models["sft"]["gold_reward"], models["ppo"]["gold_reward"]
    )
    assert report["kl_budget"] == 8.0 and report["kl_within_budget"] is True
    assert "lm_eval" not in report  # lm-eval runs in the benchmark stage

    samples = [json.loads(line) for line in (run_dir / "evaluate" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and {"prompt", "reference", "sft_response", "ppo_response", "ppo_gold", "ppo_proxy"} <= set(samples[0])
    assert sum(s["sft_gold"] for s in samples) / 8 == pytest.approx(models["sft"]["gold_reward"], abs=1e-3)
    markdown = (run_dir / "evaluate" / "report.md").read_text()
    assert "| model | proxy reward | gold reward | KL to SFT |" in markdown
    assert "## Samples (4 of 8" in markdown and markdown.count("**PPO**") == 4  # evaluate.num_samples: 4
    assert all(f"(plots/{name})" in markdown for name in PLOTS)


def test_per_prompt_means_average_each_prompts_responses():
    assert per_prompt_means([0.2, 0.4, 0.9, 0.5], 2) == pytest.approx([0.3, 0.7])
    assert per_prompt_means([0.2, 0.4, 0.9], 1) == [0.2, 0.4, 0.9]


def test_several_responses_per_prompt_are_judged_prompt_by_prompt(run_dir, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert main(["run", SMOKE, f"output_dir={copy}", "--only", "evaluate", "evaluate.samples_per_prompt=3"]) == 0
    report = json.loads((copy / "evaluate" / "report.json").read_text())
    assert report["prompts"] == 8 and report["samples_per_prompt"] == 3
    samples = [json.loads(line) for line in (copy / "evaluate" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 24 and [s["sample"] for s in samples[:6]] == [0, 1, 2, 0, 1, 2]
    assert all(len({s["prompt"] for s in samples[i : i + 3]}) == 1 for i in range(0, 24, 3))
    for name in ("sft", "ppo"):  # the table's means are over every response
        gold = [s[f"{name}_gold"] for s in samples]
        assert report["models"][name]["gold_reward"] == pytest.approx(sum(gold) / 24, abs=1e-3)
    # The win rate compares each prompt's mean gold score, not single responses.
    expected = win_rate(per_prompt_means([s["ppo_gold"] for s in samples], 3), per_prompt_means([s["sft_gold"] for s in samples], 3))
    assert {k: report["win_rate"][k] for k in ("wins", "ties", "losses")} == {k: expected[k] for k in ("wins", "ties", "losses")}
    assert report["win_rate"]["prompts"] == 8
    low, high = report["win_rate_interval"]
    assert low <= report["win_rate"]["win_rate"] <= high
    markdown = (copy / "evaluate" / "report.md").read_text()
    assert "8 held-out prompts × 3 responses each" in markdown
    shown = [line.split(". ", 1)[1] for line in markdown.splitlines() if line.startswith("### ")]
    assert "## Samples (4 of 24" in markdown and len(set(shown)) == 4  # one sample per prompt
    assert "8 held-out prompts × 3 responses each" in capsys.readouterr().out


def test_samples_are_measured_in_micro_batches(run_dir, tmp_path, monkeypatch):
    """The KL and proxy-reward forwards take evaluate.micro_batch_size rows at a time, not the generation
    batch (the peak holds one micro-batch's [rows, tokens, vocabulary] logits), and measure the same."""
    from rlhf.roles import Roles

    rows_seen = []
    for method in ("reference_logprobs", "scores"):
        original = getattr(Roles, method)

        def counted(self, rollout, *args, _original=original):
            rows_seen.append(rollout.input_ids.shape[0])
            return _original(self, rollout, *args)

        monkeypatch.setattr(Roles, method, counted)
    reports = {}
    for micro in (3, 8):
        copy = tmp_path / f"micro-{micro}"
        shutil.copytree(run_dir, copy)
        rows_seen.clear()
        overrides = ["evaluate.samples_per_prompt=3", "evaluate.batch_size=8", f"evaluate.micro_batch_size={micro}"]
        assert main(["run", SMOKE, f"output_dir={copy}", "--only", "evaluate", *overrides]) == 0
        assert max(rows_seen) == micro and sum(rows_seen) == 24 * 3  # ppo's KL, both models' scores
        reports[micro] = json.loads((copy / "evaluate" / "report.json").read_text())["models"]
    for name in ("sft", "ppo"):
        for measure in ("kl", "proxy_reward", "gold_reward", "response_length"):
            assert reports[3][name][measure] == pytest.approx(reports[8][name][measure], abs=1e-4)


def test_plots_are_valid_pngs(run_dir):
    from matplotlib.image import imread

    for name in PLOTS:
        path = run_dir / "evaluate" / "plots" / name
        assert path.read_bytes().startswith(PNG_SIGNATURE) and path.stat().st_size > 1000
        height, width, _ = imread(path).shape
        assert height > 100 and width > 100


# --- the export stage --------------------------------------------------------------------------


def chat_ids(tokenizer, text: str = "Give one tip."):
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def test_exported_model_loads_with_plain_transformers_and_generates(run_dir):
    model_dir = run_dir / "export" / "model"
    assert list(model_dir.glob("*.safetensors")) and not list(model_dir.glob("*.bin"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.dtype == torch.float32  # export.dtype's default: merged and kept in float32
    ids = chat_ids(tokenizer)
    output = model.generate(**ids, max_new_tokens=5)  # the generation config alone (evaluated decoding) suffices
    assert output.shape[1] > ids["input_ids"].shape[1]
    assert model.generation_config.eos_token_id == [tokenizer.eos_token_id]  # every EOS id the pipeline stops at
    assert model.generation_config.max_new_tokens == 12 and model.generation_config.do_sample
    assert model.generation_config.top_k == 0 and model.generation_config.repetition_penalty is None
    card = (model_dir / "README.md").read_text()
    assert "base_model" not in card.split("---")[1]  # tiny-random-llama is no hub model
    assert "tiny-random-llama" in card and "## Evaluation" in card and "| ppo |" in card
    for stage in ("instructions", "sft", "preferences", "reward", "ppo", "evaluate"):
        fingerprint = json.loads((run_dir / stage / "manifest.json").read_text())["fingerprint"]
        assert f"| {stage} | `{fingerprint[:12]}`" in card
    assert "8 held-out" in card and "preference pairs: 20 train / 4 held-out" in card
    assert (run_dir / "export" / "adapter" / "adapter_model.safetensors").is_file()
    # Unquantized: the evaluated and the shipped model are the same weights, nothing to compare.
    assert not any(k.startswith("evaluated_vs_shipped") for k in json.loads((run_dir / "export" / "manifest.json").read_text())["metrics"])


def test_model_card_and_report_carry_the_benchmark_when_it_ran(run_dir, tmp_path, capsys):
    """export does not wait for the benchmark stage; when its output is there, the card and `rlhf report`
    show its tables."""
    assert json.loads((run_dir / "benchmark" / "report.json").read_text())["tasks"] == {}  # smoke: no tasks
    assert "Benchmarks" not in (run_dir / "export" / "model" / "README.md").read_text()
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    result = {"metrics": {"acc,none": {"value": 0.5, "stderr": 0.1}}, "samples": 20, "higher_is_better": {"acc": True}}
    report = build_report([{"name": "toy"}], {m: {"toy": result} for m in ("base", "sft", "ppo")}, {}, {"batch_size": 1, "seed": 0})
    (copy / "benchmark" / "report.json").write_text(json.dumps(report))
    ctx = types.SimpleNamespace(config=load_config(SMOKE), run_dir=copy)
    card = model_card(ctx, json.loads((copy / "evaluate" / "report.json").read_text()))
    assert "## Benchmarks (lm-evaluation-harness)" in card and "| toy | acc | 20 | 0.5000 ± 0.1960 | 0.5000 ± 0.1960 |" in card
    assert "| benchmark | `" in card  # its manifest in the stage table
    capsys.readouterr()
    assert main(["report", str(copy)]) == 0
    out = capsys.readouterr().out
    assert "win rate" in out and "| toy | acc | base → PPO | +0.0000 | +0.00 % | +0.0000 ± 0.2772 | no |" in out


def test_merged_weights_give_the_adapters_logits(run_dir):
    from peft import PeftModel

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "export" / "model")
    ids = chat_ids(tokenizer, "Explain what a list is in Python.")
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model").eval()
    sft = AutoModelForCausalLM.from_pretrained(run_dir / "sft" / "merged").eval()
    with torch.no_grad():
        sft_logits = sft(**ids).logits
        policy_logits = PeftModel.from_pretrained(sft, run_dir / "ppo" / "policy")(**ids).logits
        exported_logits = exported(**ids).logits
    torch.testing.assert_close(exported_logits, policy_logits, atol=1e-4, rtol=1e-4)
    assert (exported_logits - sft_logits).abs().max() > 1e-5  # the policy adapter is in, not just the SFT model


# --- the commands ------------------------------------------------------------------------------


def test_run_ends_by_saying_where_the_results_are(run_dir, capsys):
    assert main(["run", SMOKE, f"output_dir={run_dir}"]) == 0  # nothing to do: the same closing lines
    last = capsys.readouterr().out.strip().splitlines()[-3:]
    assert last[0].startswith("report:") and last[0].split()[1] == str(run_dir / "evaluate" / "report.md")
    assert last[1].startswith("plots:") and last[1].split()[1] == str(run_dir / "evaluate" / "plots")
    assert last[2].startswith("model:") and last[2].split()[1] == str(run_dir / "export" / "model")


def test_report_prints_the_table(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| sft |" in out and "| ppo |" in out and "win rate" in out and "ppo.kl_budget" in out


def test_plot_redraws_the_curves(run_dir, capsys):
    assert main(["plot", str(run_dir)]) == 0
    written = capsys.readouterr().out.split()
    assert written == [str(run_dir / "plots" / name) for name in PLOTS]
    assert all(Path(p).read_bytes().startswith(PNG_SIGNATURE) for p in written)


def test_chat_answers_piped_prompts(run_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Give one tip.\n\nSay hello.\n"))
    assert main(["chat", str(run_dir), "--max-new-tokens", "6", "--temperature", "0"]) == 0
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 2 and all(replies)  # the blank line is skipped; the tiny model always says something


def test_commands_need_their_stages(tmp_path, capsys, monkeypatch, run_dir):
    assert main(["report", str(tmp_path)]) == 2
    assert main(["plot", str(tmp_path)]) == 2
    assert main(["report", str(tmp_path / "missing")]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors == [
        f"error: {tmp_path}: no published evaluate stage, which rlhf report needs: run it first (rlhf run CONFIG)",
        f"error: {tmp_path}: no training curves to draw (no metrics.jsonl of sft, reward or ppo)",
        f"error: {tmp_path / 'missing'}: no such run directory",
    ]
    shutil.copytree(run_dir / "sft", tmp_path / "sft")  # a run that stopped after sft
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi.\n"))
    assert main(["chat", str(tmp_path), "--stage", "sft", "--max-new-tokens", "3"]) == 0
    assert main(["chat", str(tmp_path)]) == 2
    assert "no published ppo stage, which rlhf chat --stage ppo needs" in capsys.readouterr().err
