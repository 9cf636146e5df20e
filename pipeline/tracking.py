"""Where training curves go: wandb (online when logged in, offline otherwise, never asking) and a
local `metrics.jsonl` beside the stage's outputs."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from rlhf.config import PipelineConfig


def wandb_mode(config: PipelineConfig) -> str:
    mode = config.wandb.mode
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if logged_in else "offline"


def start_wandb(config: PipelineConfig, stage: str, run_dir: Path):
    """A wandb run for one stage (group = run name, job_type = stage), or None when disabled and in
    every process but rank 0 of a launched stage (it logs for all of them)."""
    mode = wandb_mode(config)
    if mode == "disabled" or int(os.environ.get("RANK", "0")) != 0:
        return None
    import wandb

    wandb_dir = run_dir / "wandb"
    wandb_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=config.wandb.project,
        entity=config.wandb.entity,
        group=config.run_name,
        job_type=stage,
        name=f"{config.run_name}-{stage}",
        config=config.model_dump(mode="json"),
        dir=str(wandb_dir),
        mode=mode,
        reinit="finish_previous",
        settings=wandb.Settings(silent=True, console="off"),
    )


class MetricsFile:
    """Appends one JSON object per logged step; non-finite numbers are written as null."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        with self.path.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **clean}) + "\n")


class MetricsFileCallback(TrainerCallback):
    """Mirrors every Trainer log (train and eval) into metrics.jsonl."""

    def __init__(self, metrics: MetricsFile):
        self.metrics = metrics

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and state.is_world_process_zero:
            self.metrics.write({"step": state.global_step, "epoch": state.epoch, **logs})
