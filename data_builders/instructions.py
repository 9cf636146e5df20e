"""The instructions stage: seed instructions → (self-instruct expansion) → train/eval chat datasets.

Self-instruct (Wang et al. 2022), adapted to chat teachers: each round shows the teacher a few
instructions sampled from the pool and asks for a new one, answers the candidates that pass the
instruction filters, filters again on the answers, and adds the survivors to the pool, until the pool
holds `num_instructions` or `max_rounds` have run.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

from rich.console import Console

from rlhf.config import ModelConfig, PipelineConfig
from rlhf.dag import seeds_path
from rlhf.data_builders.filters import InstructionFilter
from rlhf.data_builders.seeds import Seed, load_seeds
from rlhf.errors import UserError
from rlhf.runner import StageContext

console = Console(highlight=False, soft_wrap=True)

NEW_TASK_PROMPT = (
    "Here are some example instructions that a user might give an AI assistant:\n\n{examples}\n\n"
    "Write one new instruction that is different from all of these: a self-contained task that can be "
    "answered in text. Reply with the instruction only."
)
_NUMBERING = re.compile(r"^\s*(?:\d+[.)]|[-*•]|instruction\s*\d*\s*:|task\s*\d*\s*:|new instruction\s*:)\s*", re.I)


def run(ctx: StageContext) -> dict:
    config = ctx.config
    settings = config.instructions

    # 1. Seeds, and the teacher that answers and expands them.
    seeds = load_seeds(seeds_path(config))
    console.print(f"instructions: {len(seeds)} seeds from {seeds_path(config)}")
    rng = random.Random(config.seed)
    if len(seeds) > settings.num_instructions:
        seeds = rng.sample(seeds, settings.num_instructions)
    needs_teacher = settings.expand and len(seeds) < settings.num_instructions
    needs_teacher = needs_teacher or any(s.output is None for s in seeds)
    teacher = make_teacher(config) if needs_teacher else None

    # 2. Seeds without a reference output get the teacher's answer.
    examples = _answer_missing_outputs(seeds, teacher, config)

    # 3. Expand self-instruct style until the pool is large enough.
    stats: dict = {"seeds": len(seeds), "candidates": 0, "kept": 0, "dropped": Counter(), "rounds": 0}
    if settings.expand and teacher is not None:
        examples += expand(examples, teacher, config, rng, stats)

    # 4. Split, held-out eval first so it never depends on how many were generated.
    if len(examples) <= settings.num_eval:
        raise UserError(
            f"instructions: only {len(examples)} instructions, need more than instructions.num_eval={settings.num_eval}"
        )
    order = list(range(len(examples)))
    random.Random(config.seed).shuffle(order)
    eval_rows = [examples[i] for i in order[: settings.num_eval]]
    train_rows = [examples[i] for i in order[settings.num_eval :]]
    write_jsonl(ctx.out_dir / "train.jsonl", train_rows)
    write_jsonl(ctx.out_dir / "eval.jsonl", eval_rows)
    stats.update(train=len(train_rows), eval=len(eval_rows), target=settings.num_instructions)
    stats["dropped"] = dict(stats["dropped"])
    (ctx.out_dir / "stats.json").write_text(json.dumps(stats, indent=2))
    console.print(
        f"instructions: {stats['kept']} kept of {stats['candidates']} generated, dropped {stats['dropped']}; "
        f"train {len(train_rows)}, eval {len(eval_rows)}"
    )
    return {k: stats[k] for k in ("seeds", "candidates", "kept", "train", "eval")}


def make_teacher(config: PipelineConfig):
    from rlhf.data_builders.teacher import LocalTeacher, OpenAITeacher

    teacher = config.instructions.teacher
    if teacher.kind == "openai":
        for key in ("base_url", "model"):
            if not getattr(teacher, key):
                raise UserError(f"instructions.teacher.{key}: required when instructions.teacher.kind is openai")
        return OpenAITeacher(
            base_url=teacher.base_url,
            model=teacher.model,
            api_key_env=teacher.api_key_env,
            timeout_s=teacher.timeout_s,
            max_retries=teacher.max_retries,
        )
    name = teacher.model or config.model.name_or_path
    # The teacher only generates: full precision, no adapters, whatever the pipeline's quantization.
    model_config = ModelConfig(
        name_or_path=name,
        dtype=config.model.dtype,
        device=config.model.device,
        trust_remote_code=config.model.trust_remote_code,
    )
    return LocalTeacher.load(model_config, batch_size=teacher.batch_size)


def _answer_missing_outputs(seeds: list[Seed], teacher, config: PipelineConfig) -> list[dict]:
    missing = [s for s in seeds if s.output is None]
    answers = {}
    if missing:
        console.print(f"instructions: answering {len(missing)} seeds that have no reference output")
        replies = _ask(teacher, [user_prompt(s) for s in missing], config, seed_offset=0)
        answers = {id(s): r for s, r in zip(missing, replies)}
    return [
        example(user_prompt(s), s.output if s.output is not None else answers[id(s)], "seed") for s in seeds
    ]


def expand(examples: list[dict], teacher, config: PipelineConfig, rng: random.Random, stats: dict) -> list[dict]:
    """New examples generated by the teacher; `stats` counts candidates, kept and dropped by reason."""
    settings = config.instructions
    keep = InstructionFilter(min_words=settings.min_words, max_words=settings.max_words, max_rouge=settings.max_rouge)
    pool = [e["messages"][0]["content"] for e in examples]
    generated: list[dict] = []
    for round_index in range(settings.max_rounds):
        remaining = settings.num_instructions - len(pool)
        if remaining <= 0:
            break
        stats["rounds"] += 1
        asked = min(remaining + remaining // 2 + 1, 4 * settings.teacher.batch_size)
        k = min(settings.examples_per_prompt, len(pool))
        prompts = [NEW_TASK_PROMPT.format(examples=_numbered(rng.sample(pool, k))) for _ in range(asked)]
        seed_offset = 1_000_000 * (round_index + 1)
        candidates = [parse_instruction(r) for r in _ask(teacher, prompts, config, seed_offset, max_new_tokens=64)]
        stats["candidates"] += len(candidates)

        # Cheap instruction checks before paying for answers; the answer checks after.
        viable = []
        for candidate in candidates:
            reason = keep.instruction_drop_reason(candidate, pool + viable)
            if reason:
                stats["dropped"][reason] += 1
            else:
                viable.append(candidate)
        answers = _ask(teacher, viable, config, seed_offset + 500_000) if viable else []
        for instruction, answer in zip(viable, answers):
            reason = keep.output_drop_reason(answer)
            if reason or len(pool) >= settings.num_instructions:
                stats["dropped"][reason or "over_target"] += 1
                continue
            pool.append(instruction)
            generated.append(example(instruction, answer, "generated"))
            stats["kept"] += 1
        console.print(
            f"instructions: round {round_index + 1}: asked {asked}, kept {stats['kept']} so far, "
            f"pool {len(pool)}/{settings.num_instructions}"
        )
    return generated


def _ask(teacher, prompts: list[str], config: PipelineConfig, seed_offset: int, max_new_tokens: int | None = None):
    settings = config.instructions.teacher
    return teacher.complete(
        [[{"role": "user", "content": p}] for p in prompts],
        temperature=settings.temperature,
        top_p=settings.top_p,
        max_new_tokens=max_new_tokens or settings.max_new_tokens,
        seed=config.seed + seed_offset,
    )


def parse_instruction(reply: str) -> str:
    """The first non-empty line of a reply, without list numbering, labels or quotes."""
    for line in reply.strip().splitlines():
        line = _NUMBERING.sub("", line).strip().strip('"').strip()
        if line:
            return line
    return ""


def user_prompt(seed: Seed) -> str:
    return f"{seed.instruction}\n\n{seed.input}" if seed.input else seed.instruction


def example(prompt: str, answer: str, source: str) -> dict:
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    return {"messages": messages, "source": source}


def _numbered(items: list[str]) -> str:
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, 1))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
