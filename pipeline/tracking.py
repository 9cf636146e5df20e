"""Where training curves go: wandb (online when logged in, offline otherwise, never asking) and a
local `metrics.jsonl` beside the stage's outputs."""

from __future__ import annotations

import json
import math
import os
import shutil
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


class StageHistory:
    """A training stage's per-step JSONL files (metrics.jsonl, ...), kept in its work folder, which outlives
    a failed or stopped attempt, and published with the stage: a resumed run publishes every step, not
    only those after the resume. Records of steps after the checkpoint a run resumes from are dropped
    when it starts: those steps run again."""

    def __init__(self, work_dir: Path, resumed_after: int, files: tuple[str, ...] = ("metrics.jsonl",)):
        self.dir, self.files = work_dir / "history", files
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in files:
            path = self.dir / name
            lines = path.read_text().splitlines() if path.exists() else []
            path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= resumed_after))
        self.metrics = MetricsFile(self.dir / files[0])

    def write(self, record: dict) -> None:
        """One record of the first file (metrics.jsonl)."""
        self.metrics.write(record)

    def append(self, name: str, rows: list[dict]) -> None:
        with (self.dir / name).open("a", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def records(self, name: str | None = None) -> list[dict]:
        return [json.loads(line) for line in (self.dir / (name or self.files[0])).read_text().splitlines()]

    def publish(self, out_dir: Path) -> None:
        for name in self.files:
            shutil.copyfile(self.dir / name, out_dir / name)
