"""The preferences stage: preference pairs for the reward model, imported or generated and judged.

- import: a user's dataset (reading and shapes in preference_import.py).
- generate (AI feedback): for instructions from the instruction dataset, sample K responses from the
  SFT model, score them with a judge, and keep (best, worst) when the judge's margin is large enough.
Outputs: `train.jsonl` and `eval.jsonl` with conversational prompt/chosen/rejected rows, `stats.json`.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

from rich.console import Console

from rlhf.config import PipelineConfig
from rlhf.data_builders.instructions import read_conversations, write_jsonl
from rlhf.data_builders.preference_import import load_preference_pairs, pair_to_row
from rlhf.data_builders.teacher import build_teacher
from rlhf.errors import UserError
from rlhf.generation import generate_chat, prompt_lengths
from rlhf.models import load_causal_lm, load_tokenizer, prompt_budget
from rlhf.reward.judges import Candidate, LLMJudge, RewardModelJudge, RubricJudge
from rlhf.runner import StageContext

console = Console(highlight=False, soft_wrap=True)


def run(ctx: StageContext) -> dict:
    config, settings = ctx.config, ctx.config.preferences

    # 1. Pairs: the user's, or generated from the SFT model and judged.
    if settings.source == "import":
        if not settings.path:
            raise UserError("preferences.path: required when preferences.source is import")
        imported = load_preference_pairs(settings.path)
        rows = [pair_to_row(pair) for pair in imported.pairs]
        stats = {"source": imported.source, "shape": imported.shape, "dropped": dict(imported.dropped)}
    else:
        rows, stats = generate_pairs(ctx)

    # 2. Split: a held-out eval set for the reward model's pairwise accuracy.
    if len(rows) <= settings.num_eval:
        raise UserError(
            f"preferences: {len(rows)} pairs (dropped: {stats['dropped']}) are too few for "
            f"preferences.num_eval={settings.num_eval} held-out pairs plus a training set"
        )
    random.Random(config.seed).shuffle(rows)
    eval_rows, train_rows = rows[: settings.num_eval], rows[settings.num_eval :]
    write_jsonl(ctx.out_dir / "train.jsonl", train_rows)
    write_jsonl(ctx.out_dir / "eval.jsonl", eval_rows)

    # 3. Stats.
    stats.update(pairs=len(rows), train=len(train_rows), eval=len(eval_rows), **length_stats(rows))
    (ctx.out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    console.print(f"preferences: {len(rows)} pairs (train {len(train_rows)}, eval {len(eval_rows)}), dropped {stats['dropped']}")
    return {k: stats[k] for k in ("pairs", "train", "eval", "mean_margin") if k in stats}


def generate_pairs(ctx: StageContext) -> tuple[list[dict], dict]:
    config, settings = ctx.config, ctx.config.preferences
    prompts = sample_prompts(ctx.inputs["instructions"] / "train.jsonl", settings.num_prompts, config.seed)
    groups, too_long = sample_responses(ctx.inputs["sft"] / "merged", prompts, config)
    dropped: Counter = Counter({"prompt_too_long": too_long} if too_long else {})
    rows: list[dict] = []
    margins: list[float] = []

    if settings.judge == "llm":
        judge = LLMJudge(build_teacher(settings.judge_teacher, config.model), seed=config.seed)
        distinct = []
        for group in groups:
            others = [c for c in group[1:] if c.response.strip() != group[0].response.strip()]
            if others:
                distinct.append((group[0], others[0]))
            else:
                dropped["identical"] += 1
        for (a, b), verdict in zip(distinct, judge.verdicts(distinct)):
            if verdict is None:
                dropped["tie"] += 1
                continue
            best, worst = (a, b) if verdict == 0 else (b, a)
            rows.append(pair_row(best, worst, 1.0, 0.0))
            margins.append(1.0)
    else:
        judge = RubricJudge() if settings.judge == "rubric" else _reward_model_judge(config)
        flat = [c for group in groups for c in group]
        scores = iter(judge.scores(flat))
        for group in groups:
            ranked = sorted(zip([next(scores) for _ in group], range(len(group))), reverse=True)
            (best_score, best), (worst_score, worst) = ranked[0], ranked[-1]
            if group[best].response.strip() == group[worst].response.strip():
                dropped["identical"] += 1
            elif best_score - worst_score < settings.min_margin:
                dropped["small_margin"] += 1
            else:
                rows.append(pair_row(group[best], group[worst], best_score, worst_score))
                margins.append(best_score - worst_score)

    stats = {
        "source": "generate",
        "judge": settings.judge,
        "prompts": len(prompts),
        "samples_per_prompt": settings.samples_per_prompt,
        "dropped": dict(dropped),
        "mean_margin": round(sum(margins) / len(margins), 4) if margins else 0.0,
    }
    return rows, stats


def _reward_model_judge(config: PipelineConfig) -> RewardModelJudge:
    if not config.preferences.judge_model:
        raise UserError("preferences.judge_model: required when preferences.judge is reward_model")
    return RewardModelJudge.load(config.preferences.judge_model, config.model, config.preferences.batch_size)


def sample_prompts(path: Path, count: int, seed: int) -> list[tuple[list[dict], str]]:
    """(prompt conversation, reference answer) for up to `count` instructions of the SFT train split."""
    examples = [(messages[:-1], messages[-1]["content"]) for messages in read_conversations(path)]
    return random.Random(seed).sample(examples, min(count, len(examples)))


def sample_responses(
    model_dir: Path, prompts: list[tuple[list[dict], str]], config: PipelineConfig
) -> tuple[list[list[Candidate]], int]:
    """K sampled responses of the SFT model for each prompt, grouped by prompt; and how many prompts were
    dropped for leaving no room for preferences.max_new_tokens in the model's context."""
    settings = config.preferences
    tokenizer = load_tokenizer(str(model_dir), config.model.trust_remote_code)
    model = load_causal_lm(str(model_dir), config.model, quantize=False).eval()
    budget = prompt_budget(model, settings.max_new_tokens, "preferences.max_new_tokens")
    if budget is not None:
        fits = [length <= budget for length in prompt_lengths(tokenizer, [prompt for prompt, _ in prompts])]
        too_long = len(prompts) - sum(fits)
        if too_long:
            console.print(
                f"preferences: dropped {too_long} of {len(prompts)} prompts longer than {budget} tokens "
                f"(the model's context minus preferences.max_new_tokens={settings.max_new_tokens})"
            )
        prompts = [p for p, fit in zip(prompts, fits) if fit]
    else:
        too_long = 0
    k = settings.samples_per_prompt
    console.print(f"preferences: sampling {k} responses for each of {len(prompts)} prompts from {model_dir}")
    generations = generate_chat(
        model,
        tokenizer,
        [prompt for prompt, _ in prompts for _ in range(k)],
        max_new_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        top_k=settings.top_k,
        batch_size=settings.batch_size,
        seed=config.seed,
        description="sampling responses",
    )
    candidates = [
        Candidate(prompt, g.text, g.finished, reference)
        for (prompt, reference), g in zip([p for p in prompts for _ in range(k)], generations)
    ]
    return [candidates[i : i + k] for i in range(0, len(candidates), k)], too_long


def pair_row(best: Candidate, worst: Candidate, best_score: float, worst_score: float) -> dict:
    return {
        "prompt": best.prompt,
        "chosen": [{"role": "assistant", "content": best.response}],
        "rejected": [{"role": "assistant", "content": worst.response}],
        "score_chosen": round(best_score, 4),
        "score_rejected": round(worst_score, 4),
        # A response cut at max_new_tokens is an unfinished turn: the reward model sees it without an end of turn.
        "chosen_finished": best.finished,
        "rejected_finished": worst.finished,
    }


def length_stats(rows: list[dict]) -> dict:
    def words(side: str) -> float:
        return round(sum(len(r[side][-1]["content"].split()) for r in rows) / max(len(rows), 1), 1)

    return {"chosen_words": words("chosen"), "rejected_words": words("rejected")}
