"""The preferences stage: preference pairs for the reward model, imported or generated and judged.

- import: a user's dataset (reading and shapes in rlhf.data_builders.preference_import).
- generate (AI feedback): sampled from the SFT model and judged (rlhf.data_builders.preference_generation).
Outputs: `train.jsonl` and `eval.jsonl` with conversational prompt/chosen/rejected rows, `stats.json`.
"""

from __future__ import annotations

import json
import random

from rich.console import Console

from rlhf.data_builders.json_files import write_jsonl
from rlhf.data_builders.preference_generation import generate_pairs, length_stats
from rlhf.data_builders.preference_import import load_preference_pairs, pair_to_row
from rlhf.errors import UserError
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
        rows, stats = generate_pairs(config, ctx.inputs["instructions"] / "train.jsonl", ctx.inputs["sft"] / "merged")

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
