"""Preference pairs generated with AI feedback: for instructions of the instruction dataset, sample K
responses from the SFT model, score them with a judge (rlhf.reward.judges), and keep (best, worst) when
the judge's margin is large enough.
"""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

from rich.console import Console

from rlhf.chat_format import ChatFormat
from rlhf.config import PipelineConfig
from rlhf.data_builders.json_files import read_conversations
from rlhf.data_builders.teacher import build_teacher
from rlhf.errors import UserError
from rlhf.generation import generate_chat
from rlhf.models import fits_context, load_causal_lm, load_tokenizer
from rlhf.reward.judges import Candidate, LLMJudge, RewardModelJudge, RubricJudge

console = Console(highlight=False, soft_wrap=True)


def generate_pairs(config: PipelineConfig, instructions: Path, model_dir: Path) -> tuple[list[dict], dict]:
    """(best, worst) pairs of the model's samples for prompts of the instruction split, by the judge that
    `preferences.judge` names; and the stats (drops by reason, mean margin)."""
    settings = config.preferences
    prompts = sample_prompts(instructions, settings.num_prompts, config.seed)
    groups, too_long = sample_responses(model_dir, prompts, config)
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
    engine = None
    if config.generation.engine == "vllm":
        from transformers import AutoConfig

        from rlhf.vllm_engine import VllmEngine

        unquantized = config.model.model_copy(update={"quantization": "none"})  # as the transformers path loads it
        engine = VllmEngine(str(model_dir), unquantized, config.generation, seed=config.seed)
        chat, model_config = engine.chat, AutoConfig.from_pretrained(str(model_dir), trust_remote_code=config.model.trust_remote_code)
    else:
        tokenizer = load_tokenizer(str(model_dir), config.model.trust_remote_code)
        model = load_causal_lm(str(model_dir), config.model, quantize=False).eval()
        chat, model_config = ChatFormat.of(tokenizer, model), model.config
    fits = fits_context(model_config, [chat.prompt_ids(prompt) for prompt, _ in prompts], settings.max_new_tokens,
                        "preferences.max_new_tokens", "preferences")
    too_long = len(prompts) - sum(fits)
    prompts = [p for p, fit in zip(prompts, fits) if fit]
    k = settings.samples_per_prompt
    console.print(f"preferences: sampling {k} responses for each of {len(prompts)} prompts from {model_dir}"
                  + (" (vLLM)" if engine is not None else ""))
    conversations = [prompt for prompt, _ in prompts for _ in range(k)]
    decoding = dict(max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
                    top_k=settings.top_k, seed=config.seed, description="sampling responses")
    if engine is not None:
        generations = engine.generate_chat(conversations, **decoding)
        engine.close()  # before a judge model loads
    else:
        generations = generate_chat(model, tokenizer, conversations, batch_size=settings.batch_size, **decoding)
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
