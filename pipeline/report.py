"""The evaluation report's arithmetic and text: win rate, the reward-hacking flag, the table, report.md.

Pure functions on plain data (no torch), so that `rlhf report` prints a finished run's table instantly.
"""

from __future__ import annotations

from collections.abc import Sequence

MODELS = ("sft", "ppo")
COLUMNS = (
    ("proxy_reward", "proxy reward"),
    ("gold_reward", "gold reward"),
    ("kl", "KL to SFT"),
    ("response_length", "length (tokens)"),
    ("eos_fraction", "EOS fraction"),
)


JUDGES = {"rubric": "rubric judge with reference answers", "llm": "LLM judge, pairwise in both orders"}


def win_rate(ppo: Sequence[float], sft: Sequence[float], tolerance: float = 1e-9) -> dict:
    """PPO against SFT, prompt by prompt, under the gold judge's scores.

    A prompt is a win when PPO's score beats SFT's by more than `tolerance`, a loss the other way
    round, a tie otherwise; ties are counted apart rather than guessed. `win_rate` is wins / prompts;
    `win_rate_ties_half` counts a tie as half a win (the usual head-to-head convention)."""
    if len(ppo) != len(sft):
        raise ValueError(f"win_rate: {len(ppo)} PPO scores but {len(sft)} SFT scores")
    wins = sum(p > s + tolerance for p, s in zip(ppo, sft))
    losses = sum(s > p + tolerance for p, s in zip(ppo, sft))
    n = len(ppo)
    ties = n - wins - losses
    return {
        "prompts": n,
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "win_rate": wins / n if n else 0.0,
        "win_rate_ties_half": (wins + ties / 2) / n if n else 0.0,
    }


def win_rate_interval(ppo: Sequence[float], sft: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A 95% interval for `win_rate`, bootstrapped over prompts: `resamples` times, draw as many prompts as
    there are with replacement and take the resample's win rate; the interval is the 2.5th and 97.5th
    percentiles of those. The prompts are the unit that varies (each already averages its samples), so
    the interval says how far another draw of held-out prompts could move the win rate. Seeded: the same
    scores give the same interval."""
    import random

    outcomes = [p > s + 1e-9 for p, s in zip(ppo, sft, strict=True)]
    if not outcomes:
        return 0.0, 0.0
    rng, n = random.Random(seed), len(outcomes)
    rates = sorted(sum(rng.choices(outcomes, k=n)) / n for _ in range(resamples))
    return rates[int(0.025 * resamples)], rates[-int(0.025 * resamples) - 1]


def verdict_scores(verdicts: Sequence[int | None]) -> tuple[list[float], list[float]]:
    """Pairwise verdicts on (PPO, SFT) pairs (0: PPO better, 1: SFT better, None: tie) as per-prompt
    gold scores: 1 for the preferred response, 0 for the other, 0.5 each on a tie. The mean of a
    model's scores is then its share of the judge's preferences."""
    ppo = [0.5 if v is None else 1.0 - v for v in verdicts]
    return ppo, [1.0 - p for p in ppo]


def reward_hacking(proxy_sft: float, proxy_ppo: float, gold_sft: float, gold_ppo: float) -> bool:
    """True when PPO raised the learned (proxy) reward over SFT while lowering the gold reward: the
    policy found what the reward model likes, not what the judge (standing in for people) likes."""
    return proxy_ppo > proxy_sft and gold_ppo < gold_sft


def summary_table(report: dict) -> str:
    """The evaluation as a Markdown table plus one line each for the win rate, reward hacking and KL."""
    models = report["models"]
    lines = [
        "| model | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for name in MODELS:
        lines.append(f"| {name} | " + " | ".join(_number(models[name][key]) for key, _ in COLUMNS) + " |")
    wins = report["win_rate"]
    delta_proxy = models["ppo"]["proxy_reward"] - models["sft"]["proxy_reward"]
    delta_gold = models["ppo"]["gold_reward"] - models["sft"]["gold_reward"]
    budget = "within" if report["kl_within_budget"] else "OVER"
    lines += [
        "",
        f"{report['prompts']} held-out prompts{_responses_each(report)}; proxy: {report['proxy_reward_model']}; gold: {JUDGES[report['judge']]}.",
        f"PPO vs SFT (gold judge, prompt by prompt): {wins['wins']} wins, {wins['ties']} ties, {wins['losses']} losses "
        f"(win rate {wins['win_rate']:.3f}{_interval(report)}; ties as half {wins['win_rate_ties_half']:.3f}).",
        f"Reward hacking: {'YES' if report['reward_hacking'] else 'no'} "
        f"(proxy {delta_proxy:+.4f}, gold {delta_gold:+.4f}, PPO minus SFT).",
        f"KL of PPO to SFT: {models['ppo']['kl']:.4f} per sequence, {budget} ppo.kl_budget = {report['kl_budget']:g}.",
    ]
    return "\n".join(lines)


def _interval(report: dict) -> str:
    low, high = report.get("win_rate_interval") or (None, None)  # reports written before the interval have none
    return "" if low is None else f", 95% interval {low:.3f}–{high:.3f} over prompts"


def shipped_gap_line(gap: dict, quantization: str) -> str:
    """QLoRA runs: how far the shipped (merged, full-precision) model is from the evaluated one (export's manifest)."""
    return (
        f"These figures are of the {quantization} backbone + adapter that was evaluated; this model is the adapter "
        f"merged into full-precision weights. On {gap['prompts']} held-out prompts their logits differ by at most "
        f"{gap['max_abs_logit_diff']:.3g} (mean {gap['mean_abs_logit_diff']:.3g}); mean KL(shipped ‖ evaluated) "
        f"{gap['mean_kl_per_token']:.3g} per token."
    )


def markdown_report(report: dict, samples: list[dict], plots: list[str], num_samples: int) -> str:
    """report.md: the table, how it was measured, the plots and side-by-side samples."""
    decoding = report["decoding"]
    parts = [
        "# Evaluation: SFT vs PPO",
        "",
        summary_table(report),
        "",
        "## How this was measured",
        "",
        f"Both models answered the same {report['prompts']} held-out prompts{_responses_each(report)} (the instruction "
        "dataset's eval split) "
        f"with the same decoding (temperature {decoding['temperature']:g}, top_p {decoding['top_p']:g}, "
        f"max_new_tokens {decoding['max_new_tokens']}) and seed {decoding['seed']}.",
        "- proxy reward: the learned reward model's score of the whole conversation (no missing-EOS penalty);",
        "- gold reward: " + _gold_description(report["judge"]),
        "- KL to SFT: per response, the sum over its tokens of log π_ppo − log π_sft at the sampling "
        "temperature, on each model's own samples (0 for SFT by definition), averaged;",
        "- length: response tokens, the end-of-sequence token included; EOS fraction: responses that ended "
        "before max_new_tokens.",
        "- win rate: prompt by prompt, PPO's mean gold score over its responses to the prompt against SFT's; "
        "the other columns average every response.",
        "",
    ]
    if plots:
        parts += ["## Training curves", ""] + [f"![{name}](plots/{name})" for name in plots] + [""]
    shown = [row for row in samples if row.get("sample", 0) == 0][:num_samples]  # one per prompt
    if shown:
        parts += [f"## Samples ({len(shown)} of {len(samples)}; all in samples.jsonl)", ""]
        for i, row in enumerate(shown, 1):
            parts += [
                f"### {i}. {_one_line(row['prompt'], 200)}",
                "",
                f"**SFT** (proxy {_number(row['sft_proxy'])}, gold {_number(row['sft_gold'])}):",
                "",
                _quote(row["sft_response"]),
                "",
                f"**PPO** (proxy {_number(row['ppo_proxy'])}, gold {_number(row['ppo_gold'])}, KL {_number(row['ppo_kl'])}):",
                "",
                _quote(row["ppo_response"]),
                "",
            ]
    return "\n".join(parts)


def _responses_each(report: dict) -> str:
    k = report.get("samples_per_prompt", 1)  # reports written before samples_per_prompt existed had one
    return f" × {k} responses each" if k > 1 else ""


def _gold_description(judge: str) -> str:
    if judge == "rubric":
        return "the rubric judge (reward/rubric.py, in [0, 1]) with the eval split's reference answer;"
    return "a teacher's pairwise verdict, asked in both orders (1 preferred, 0 not, 0.5 each when the orders disagree);"


def _number(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def _quote(text: str) -> str:
    return "\n".join(f"> {line}" for line in (text or "(empty)").splitlines()) or "> (empty)"
