"""The pipeline's stages, declared as data: what each reads, consumes and publishes."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from rlhf.config import PipelineConfig
from rlhf.runner import Stage

SHIPPED_SEEDS = Path(str(importlib.resources.files("rlhf.data_builders") / "default_seeds.jsonl"))


def seeds_path(config: PipelineConfig) -> Path:
    return Path(config.instructions.seeds) if config.instructions.seeds else SHIPPED_SEEDS


STAGES: list[Stage] = [
    Stage(
        name="instructions",
        module="rlhf.data_builders.instructions",
        reads=("seed", "instructions", "model.name_or_path", "model.trust_remote_code"),
        file_inputs=lambda config: [seeds_path(config)],
        outputs=("train.jsonl", "eval.jsonl", "stats.json"),
    ),
    Stage(
        name="sft",
        module="rlhf.stages.sft",
        reads=("seed", "model", "lora", "sft"),
        upstream=("instructions",),
        outputs=("adapter", "merged", "metrics.jsonl"),
    ),
]
