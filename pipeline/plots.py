"""Training curves as PNG files, drawn from the stages' metrics.jsonl: used by the evaluate stage and `rlhf plot`.

- `ppo_reward_kl.png`: PPO's objective/scores and objective/rlhf_reward (left), objective/kl (right) against step;
- `reward_accuracy.png`: the reward model's pairwise accuracy, on training batches and held out;
- `sft_loss.png`: the SFT training loss and the held-out loss.
A figure whose metrics file is missing or holds none of its keys is not drawn.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PLOTS = {
    # file: (stage, title, panels); a panel: ([(metrics key, legend label)], y label)
    "ppo_reward_kl.png": (
        "ppo",
        "PPO: reward and KL to the SFT reference",
        [
            ([("objective/scores", "objective/scores (reward model)"), ("objective/rlhf_reward", "objective/rlhf_reward (score − β·KL)")], "per sequence"),
            ([("objective/kl", "objective/kl")], "KL to SFT, per sequence"),
        ],
    ),
    "reward_accuracy.png": (
        "reward",
        "Reward model: pairwise accuracy",
        [([("accuracy", "training batches"), ("eval_accuracy", "held-out pairs")], "accuracy")],
    ),
    "sft_loss.png": ("sft", "SFT: loss", [([("loss", "training"), ("eval_loss", "held out")], "loss")]),
}


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file; none when it is missing."""
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one key, in step order, skipping records without it (or with null).

    A step logged twice (the reward stage writes its step-0 evaluation from two places) keeps its last value."""
    points: dict[float, float] = {}
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in record:
            points[record["step"]] = value
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def draw_plots(metrics_files: dict[str, Path], dest: Path) -> list[str]:
    """Draw every figure whose stage has a metrics file with data into `dest`; return the file names written.

    `metrics_files` maps a stage name (sft, reward, ppo) to its metrics.jsonl."""
    # Imported here: matplotlib takes a second to import.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for name, (stage, title, panels) in PLOTS.items():
        records = read_metrics(metrics_files[stage]) if stage in metrics_files else []
        curves = [[(label, *series(records, key)) for key, label in keys] for keys, _ in panels]
        if not any(steps for panel in curves for _, steps, _ in panel):
            continue
        # Figure without pyplot: no global state and no GUI backend, safe in any process.
        figure = Figure(figsize=(5.5 * len(panels), 4), layout="constrained")
        for i, ((_, ylabel), panel) in enumerate(zip(panels, curves)):
            axes = figure.add_subplot(1, len(panels), i + 1)
            for label, steps, values in panel:
                if steps:
                    # A curve with one or two points (a held-out evaluation before and after) gets markers.
                    axes.plot(steps, values, marker="o" if len(steps) <= 2 else None, label=label)
            axes.set_xlabel("step")
            axes.xaxis.set_major_locator(MaxNLocator(integer=True))
            axes.set_ylabel(ylabel)
            axes.grid(alpha=0.3)
            axes.legend()
        figure.suptitle(title)
        tmp = dest / f".{name}.{os.getpid()}.tmp.png"
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, dest / name)  # a reader never sees half a PNG
        written.append(name)
    return written
