"""The pipeline's stages, declared as data: what each reads, consumes and publishes."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from rlhf.config import PipelineConfig
from rlhf.runner import Stage

SHIPPED_SEEDS = Path(str(importlib.resources.files("rlhf.data_builders") / "default_seeds.jsonl"))


def seeds_path(config: PipelineConfig) -> Path:
    return Path(config.instructions.seeds) if config.instructions.seeds else SHIPPED_SEEDS


def preference_files(config: PipelineConfig) -> list[Path]:
    """An imported local dataset's files (hashed, so an edit makes the stage stale); none for a hub id."""
    if config.preferences.source != "import" or not config.preferences.path:
        return []
    path = Path(config.preferences.path)
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path] if path.is_file() else []


def reward_function_files(config: PipelineConfig) -> list[Path]:
    """The modules of ppo's `function` reward sources: editing a reward function reruns ppo."""
    from rlhf.reward.sources import function_files  # imports torch: only when fingerprinting

    return function_files(config.ppo.rewards)


def benchmark_files(config: PipelineConfig) -> list[Path]:
    """The benchmark's local data files and task folders (hashed: editing one reruns the stage). A missing
    data file is left to the stage, which names the task it belongs to."""
    from rlhf.lm_harness import SHIPPED_TASKS  # imports no lm_eval

    settings = config.benchmark
    if not settings.tasks:
        return []
    files = [Path(task.data_files) for task in settings.tasks if task.data_files and Path(task.data_files).is_file()]
    folders = [SHIPPED_TASKS, *([Path(settings.include_path)] if settings.include_path else [])]
    for folder in folders:
        if folder.is_dir():
            files += sorted(p for p in folder.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return files


# Every stage that samples reads generation.engine (vLLM's numerics are not transformers'); ppo reads the
# whole section for the importance-sampling correction, less its bookkeeping keys (memory share, eager mode).
# The training stages read launch.num_processes: every process takes its own batches (or rollouts), so
# the process count changes what they compute. The accelerate config file (DDP or ZeRO) does not.
STAGES: list[Stage] = [
    Stage(
        name="instructions",
        module="rlhf.stages.instructions",
        reads=("seed", "instructions", "model.name_or_path", "model.trust_remote_code", "generation.engine"),
        file_inputs=lambda config: [seeds_path(config)],
        outputs=("train.jsonl", "eval.jsonl", "stats.json"),
    ),
    Stage(
        name="sft",
        module="rlhf.stages.sft",
        reads=("seed", "model", "lora", "sft", "launch.num_processes"),
        upstream=("instructions",),
        outputs=("adapter", "merged", "metrics.jsonl"),
        checkpoints=True,
        launch="trainer",
    ),
    Stage(
        name="preferences",
        module="rlhf.stages.preferences",
        reads=("seed", "preferences", "model.dtype", "model.device", "model.trust_remote_code", "generation.engine"),
        upstream=("instructions", "sft"),
        file_inputs=preference_files,
        outputs=("train.jsonl", "eval.jsonl", "stats.json"),
    ),
    Stage(
        name="reward",
        module="rlhf.stages.reward",
        reads=("seed", "model", "lora", "reward", "launch.num_processes"),
        upstream=("preferences", "sft"),
        outputs=("metrics.jsonl",),  # plus adapter/, score_head.safetensors, model/ (or external.json)
        checkpoints=True,
        launch="trainer",
    ),
    Stage(
        name="ppo",
        module="rlhf.stages.ppo",
        reads=("seed", "model", "lora", "ppo", "launch.num_processes", "generation"),
        upstream=("instructions", "sft", "reward"),
        file_inputs=reward_function_files,
        outputs=("policy", "metrics.jsonl", "samples.jsonl"),  # plus value/ with a critic (advantage_estimator gae)
        checkpoints=True,
        launch="data-parallel",
    ),
    Stage(
        name="evaluate",
        module="rlhf.stages.evaluate",
        reads=("seed", "model", "evaluate", "ppo.kl_budget", "generation.engine"),
        upstream=("instructions", "sft", "reward", "ppo"),
        outputs=("report.json", "report.md", "samples.jsonl", "plots"),
    ),
    Stage(
        name="benchmark",
        module="rlhf.stages.benchmark",
        reads=("seed", "model", "benchmark"),
        upstream=("sft", "ppo"),
        file_inputs=benchmark_files,
        outputs=("report.json", "report.md", "plots"),
    ),
    Stage(
        name="export",
        module="rlhf.stages.export",
        reads=("seed", "model", "lora", "export", "evaluate.num_prompts"),
        # instructions: held-out prompts for the QLoRA gap. Not benchmark: its table goes in the model card when
        # it is there (it runs first in a full run), and export never waits for it.
        upstream=("instructions", "sft", "ppo", "evaluate"),
        outputs=("model", "adapter"),
    ),
]
