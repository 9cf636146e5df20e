"""The benchmark stage's report: report.json's shape, its tables (report.md, `rlhf report`, the model card),
its figure and its flat summary (manifest metrics, wandb).

report.json:
    {"settings": {...}, "models": {"base": {"path", "reused", "computed", "seconds"}, "sft": ..., "ppo": ...},
     "tasks": {TASK: {"samples", "limit", "num_fewshot", "data_file", "higher_is_better",
                      "base": {"metrics": {METRIC: {"value", "stderr", "ci95": [low, high]}}}, "sft": ..., "ppo": ...,
                      "comparisons": {"base_to_sft": {METRIC: {"delta_a", "forgetting_rate", "forgetting_rate_note",
                                                               "knowledge_loss", "knowledge_loss_pm",
                                                               "intervals_separate"}},
                                      "base_to_ppo": ..., "sft_to_ppo": ...}}}}
METRIC is lm-eval's "metric,filter" key ("acc,none", "exact_match,strict-match"). Scores are lm-eval's
(fractions for accuracies); delta_a and knowledge_loss are in the same units, forgetting_rate in percent
(rlhf.benchmark_math has the formulas). Pure functions on plain data, matplotlib imported only to draw.
"""

from __future__ import annotations

import os
from pathlib import Path

from rlhf.benchmark_math import COMPARISONS, Score, compare

MODELS = ("base", "sft", "ppo")
TITLES = {"base": "base", "sft": "SFT", "ppo": "PPO"}
PLOT = "benchmark.png"


def comparison_key(before: str, after: str) -> str:
    return f"{before}_to_{after}"


def build_report(tasks: list[dict], results: dict[str, dict[str, dict]], models: dict[str, dict], settings: dict) -> dict:
    """`tasks`: per configured task {"name", "limit", "num_fewshot", "data_file"}; `results[model][task]`:
    {"metrics": {METRIC: {"value", "stderr"}}, "samples", "higher_is_better"}; `models[model]`: how it was
    loaded and run (path, which tasks came from the cache)."""
    report = {"settings": settings, "models": models, "tasks": {}}
    for task in tasks:
        name = task["name"]
        per_model = {model: results[model][name] for model in MODELS}
        metrics = [m for m in per_model["base"]["metrics"] if all(m in per_model[other]["metrics"] for other in MODELS)]
        entry = {
            "samples": per_model["base"].get("samples"),
            "limit": task.get("limit"),
            "num_fewshot": task.get("num_fewshot"),
            "data_file": task.get("data_file"),
            "higher_is_better": per_model["base"].get("higher_is_better", {}),
        }
        scores = {model: {m: _score(per_model[model]["metrics"][m]) for m in metrics} for model in MODELS}
        for model in MODELS:
            entry[model] = {"metrics": {m: _with_interval(score) for m, score in scores[model].items()}}
        entry["comparisons"] = {
            comparison_key(before, after): {m: compare(scores[before][m], scores[after][m]).to_dict() for m in metrics}
            for before, after in COMPARISONS
        }
        report["tasks"][name] = entry
    return report


def _score(metric: dict) -> Score:
    return Score(metric["value"], metric.get("stderr"))


def _with_interval(score: Score) -> dict:
    return {"value": score.value, "stderr": score.stderr, "ci95": list(score.interval) if score.interval else None}


# --- tables -------------------------------------------------------------------------------------


def metric_label(metric: str) -> str:
    """"acc,none" -> "acc"; "exact_match,strict-match" -> "exact_match (strict-match)"."""
    name, _, filter_name = metric.partition(",")
    return name if filter_name in ("", "none") else f"{name} ({filter_name})"


def score_table(report: dict) -> str:
    """Markdown: one row per task and metric, each model's score ± the half-width of its 95 % interval."""
    lines = ["| task | metric | items | base | SFT | PPO |", "|---|---|---:|---:|---:|---:|"]
    for task, entry in report["tasks"].items():
        for metric in entry["base"]["metrics"]:
            cells = [_score_cell(entry[model]["metrics"][metric]) for model in MODELS]
            lines.append(f"| {task} | {metric_label(metric)} | {entry.get('samples') or '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(report: dict) -> str:
    """Markdown: per task, metric and comparison, ΔA, FR, ΔK ± and whether the intervals separate."""
    lines = [
        "| task | metric | comparison | ΔA | FR | ΔK | intervals separate |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for task, entry in report["tasks"].items():
        for metric in entry["base"]["metrics"]:
            for before, after in COMPARISONS:
                c = entry["comparisons"][comparison_key(before, after)][metric]
                rate = "undefined (A_base = 0)" if c["forgetting_rate"] is None else f"{c['forgetting_rate']:+.2f} %"
                loss = f"{c['knowledge_loss']:+.4f}" + (f" ± {c['knowledge_loss_pm']:.4f}" if c["knowledge_loss_pm"] is not None else "")
                separate = {True: "**yes**", False: "no", None: "-"}[c["intervals_separate"]]
                lines.append(
                    f"| {task} | {metric_label(metric)} | {TITLES[before]} → {TITLES[after]} | {c['delta_a']:+.4f} | {rate} | "
                    f"{loss} | {separate} |"
                )
    return "\n".join(lines)


def benchmark_tables(report: dict) -> str:
    """Both tables and what they mean: for report.md, `rlhf report` and the model card. Empty without tasks."""
    if not report.get("tasks"):
        return ""
    return "\n".join(
        [
            score_table(report),
            "",
            "Scores ± the half-width of their 95 % interval (1.96 × lm-eval's standard error).",
            "",
            comparison_table(report),
            "",
            "ΔA = A_FT − A_base; FR = (1 − A_FT / A_base) × 100 %; ΔK = A_base − A_FT ± sqrt(CI_base² + CI_FT²); "
            "base and FT are the earlier and later model of each comparison. Intervals separate: the two 95 % "
            "intervals do not overlap.",
        ]
    )


def markdown_report(report: dict, plot: str | None) -> str:
    settings = report["settings"]
    parts = ["# Benchmarks: base, SFT and PPO (lm-evaluation-harness)", ""]
    if not report["tasks"]:
        return "\n".join([*parts, "No tasks configured (benchmark.tasks is empty): no model was benchmarked.", ""])
    parts += [benchmark_tables(report), ""]
    if plot:
        parts += [f"![benchmarks](plots/{plot})", ""]
    template = "through each model's chat template" if settings.get("apply_chat_template") else "without a chat template"
    parts += [
        "## How this was measured",
        "",
        f"lm-evaluation-harness {settings.get('lm_eval_version', '?')} on each model with the same settings: "
        f"batch size {settings['batch_size']}, seed {settings['seed']} (few-shot draws), {template}, "
        "each task's own prompt, decoding, filters and metric.",
        "",
    ]
    for model in MODELS:
        info = report["models"].get(model, {})
        reused = info.get("reused", [])
        source = "all from the cache" if reused and not info.get("computed") else (
            f"{len(reused)} of {len(reused) + len(info.get('computed', []))} tasks from the cache" if reused else "run now"
        )
        parts.append(f"- {TITLES[model]}: `{info.get('path', '?')}` ({source}; {info.get('seconds', 0):.1f} s)")
    parts.append("")
    return "\n".join(parts)


def _score_cell(metric: dict) -> str:
    if metric["ci95"] is None:
        return f"{metric['value']:.4f}"
    return f"{metric['value']:.4f} ± {(metric['ci95'][1] - metric['ci95'][0]) / 2:.4f}"


# --- summary and figure -------------------------------------------------------------------------


def flat_summary(report: dict) -> dict:
    """The manifest's metrics and wandb's summary: each task's first metric per model and per comparison."""
    summary = {}
    for task, entry in report["tasks"].items():
        metrics = list(entry["base"]["metrics"])
        if not metrics:
            continue
        metric = metrics[0]
        for model in MODELS:
            summary[f"{task}/{model}"] = entry[model]["metrics"][metric]["value"]
        for before, after in COMPARISONS:
            key = comparison_key(before, after)
            c = entry["comparisons"][key][metric]
            summary[f"{task}/{key}/delta_a"] = c["delta_a"]
            summary[f"{task}/{key}/forgetting_rate"] = c["forgetting_rate"]
            summary[f"{task}/{key}/intervals_separate"] = c["intervals_separate"]
    for model, info in report["models"].items():
        summary[f"seconds/{model}"] = info.get("seconds", 0.0)
        summary[f"cached_tasks/{model}"] = len(info.get("reused", []))
    return summary


def draw_benchmark_plot(report: dict, dest: Path) -> str | None:
    """plots/benchmark.png: each task's first metric, one bar per model, error bars the 95 % interval. None
    without tasks."""
    rows = [(task, next(iter(entry["base"]["metrics"]), None), entry) for task, entry in report["tasks"].items()]
    rows = [(task, metric, entry) for task, metric, entry in rows if metric]
    if not rows:
        return None
    from matplotlib.figure import Figure

    dest.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(max(5.5, 1.9 * len(rows) + 2), 4), layout="constrained")
    axes = figure.add_subplot(1, 1, 1)
    width = 0.8 / len(MODELS)
    values, tops = [], []
    for i, model in enumerate(MODELS):
        heights, errors = [], []
        for _, metric, entry in rows:
            score = entry[model]["metrics"][metric]
            heights.append(score["value"])
            errors.append(0.0 if score["ci95"] is None else (score["ci95"][1] - score["ci95"][0]) / 2)
        values += heights
        tops += [h + e for h, e in zip(heights, errors)]
        positions = [j + (i - (len(MODELS) - 1) / 2) * width for j in range(len(rows))]
        axes.bar(positions, heights, width, yerr=errors, capsize=4, label=TITLES[model])
    axes.set_xticks(range(len(rows)), [f"{task}\n{metric_label(metric)}" for task, metric, _ in rows])
    if all(0 <= v <= 1 for v in values):  # scores in [0, 1]: the whole range, and every error bar's cap
        axes.set_ylim(0, max(1.0, *tops) * 1.02)
    axes.set_ylabel("score (95 % interval)")
    axes.grid(axis="y", alpha=0.3)
    axes.legend()
    figure.suptitle("Benchmarks: base, SFT and PPO")
    tmp = dest / f".{PLOT}.{os.getpid()}.tmp.png"
    figure.savefig(tmp, dpi=100)
    os.replace(tmp, dest / PLOT)  # a reader never sees half a PNG
    return PLOT
