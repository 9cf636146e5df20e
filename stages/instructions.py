"""The instructions stage: seed instructions → (self-instruct expansion by a teacher) → train/eval chat
datasets. The expansion itself is rlhf.data_builders.self_instruct.
"""

from __future__ import annotations

import json
import random
from collections import Counter

from rich.console import Console

from rlhf.dag import seeds_path
from rlhf.data_builders.json_files import write_jsonl
from rlhf.data_builders.seeds import load_seeds
from rlhf.data_builders.self_instruct import answer_missing_outputs, expand
from rlhf.data_builders.teacher import VllmTeacher, build_teacher
from rlhf.errors import UserError
from rlhf.runner import StageContext

console = Console(highlight=False, soft_wrap=True)


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
    teacher = build_teacher(settings.teacher, config.model, config.generation, config.seed) if needs_teacher else None

    # 2. Seeds without a reference output get the teacher's answer.
    examples = answer_missing_outputs(seeds, teacher, config)

    # 3. Expand self-instruct style until the pool is large enough.
    stats: dict = {"seeds": len(seeds), "candidates": 0, "kept": 0, "dropped": Counter(), "rounds": 0}
    if settings.expand and teacher is not None:
        examples += expand(examples, teacher, config, rng, stats)
    if isinstance(teacher, VllmTeacher):
        teacher.engine.close()  # its share of the GPU goes back before sft loads (same process under `rlhf run`)

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
