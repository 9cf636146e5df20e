"""The benchmark stage: what alignment cost, measured with lm-evaluation-harness on the base, SFT and PPO models.

Three models, the same tasks and settings each (rlhf.lm_harness):
- base: `model.name_or_path`, quantized as configured;
- sft: `sft/merged`;
- ppo: `sft/merged` with the ppo policy adapter, loaded as the evaluate stage loads it.
Each model's result on each task is cached in `<output_dir>/cache/benchmark/`, keyed by that model's
identity (the base model's name and local files; the sft or ppo stage's fingerprint) and the settings that
change results: rerunning ppo reruns the PPO model's tasks only. Then per task and metric: the 95 %
intervals, and ΔA, FR and ΔK with the intervals-separate flag for base → SFT, base → PPO and SFT → PPO
(rlhf.benchmark_math).

With `benchmark.tasks` empty the stage publishes an empty report and loads no model. export does not depend
on this stage; it puts the table in the model card when this stage's output is there.

Outputs: `report.json` (shape: rlhf.benchmark_report), `report.md`, `plots/benchmark.png`; the summary and
chart to wandb.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console

from rlhf.benchmark_report import (
    MODELS,
    benchmark_tables,
    build_report,
    draw_benchmark_plot,
    flat_summary,
    markdown_report,
    metric_label,
)
from rlhf.config import fingerprint_value
from rlhf.fingerprint import code_hash
from rlhf.lm_harness import (
    APPLY_CHAT_TEMPLATE,
    PreparedTask,
    TaskResult,
    evaluate_task,
    harness_model,
    prepare_tasks,
)
from rlhf.memory import release_freed_memory
from rlhf.models import load_causal_lm, load_tokenizer, resolve_model
from rlhf.runner import StageContext, process_rank, read_manifest
from rlhf.tracking import start_wandb

console = Console(highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class BenchmarkModel:
    name: str
    """base, sft or ppo."""
    path: str
    """What it is, for people: a name or folder (ppo: the backbone + the adapter)."""
    identity: dict
    """What it is, for the cache: changes exactly when its weights do."""
    load: Callable[[], tuple]
    """() -> (model, tokenizer), on the configured device, dtype and quantization."""


def run(ctx: StageContext) -> dict:
    config, settings = ctx.config, ctx.config.benchmark

    # 1. Setup. No tasks: an empty report, no model loaded. Otherwise every task is checked (names, data files
    #    and their rows, hub access) before any model loads.
    if not settings.tasks:
        console.print("benchmark: no tasks (benchmark.tasks is empty): nothing to measure")
        return save(ctx, build_report([], {}, {}, report_settings(ctx, None)))
    manager, tasks = prepare_tasks(settings)
    cache = ResultCache(ctx.run_dir / "cache" / "benchmark")
    shared = cache_settings(ctx)

    # 2. Run per model: its cached results, and lm-eval on the tasks it has none for; each model is loaded only
    #    when it has a task to run, and freed before the next one loads.
    results, runs = {}, {}
    for model in benchmark_models(ctx):
        keys = {task.name: cache.key(model.identity, task.identity, shared) for task in tasks}
        results[model.name], runs[model.name] = run_model(model, tasks, keys, manager, cache, config.seed, settings.batch_size)

    # 3. Compare: the intervals and ΔA, FR, ΔK for base → SFT, base → PPO and SFT → PPO, per task and metric.
    task_rows = [
        {"name": t.name, "limit": t.limit, "num_fewshot": t.num_fewshot, "data_file": str(t.data_file) if t.data_file else None}
        for t in tasks
    ]
    report = build_report(task_rows, results, runs, report_settings(ctx, manager))

    # 4. Save: report.json, plots/benchmark.png, report.md; the same to wandb.
    return save(ctx, report)


def benchmark_models(ctx: StageContext) -> list[BenchmarkModel]:
    config = ctx.config
    base = config.model.name_or_path
    sft_dir, policy_dir = ctx.inputs["sft"] / "merged", ctx.inputs["ppo"] / "policy"

    def load_base():
        path = resolve_model(base)
        return load_causal_lm(path, config.model), load_tokenizer(path, config.model.trust_remote_code)

    def load_sft():
        return load_causal_lm(str(sft_dir), config.model), load_tokenizer(str(sft_dir), config.model.trust_remote_code)

    def load_ppo():  # as the evaluate stage loads it: the policy adapter on the (quantized) merged SFT model
        model = PeftModel.from_pretrained(load_causal_lm(str(sft_dir), config.model), policy_dir)
        return model, load_tokenizer(str(sft_dir), config.model.trust_remote_code)

    return [
        BenchmarkModel("base", base, {"base": base, "files": local_files(base)}, load_base),
        BenchmarkModel("sft", str(sft_dir), {"sft": upstream_fingerprint(ctx, "sft")}, load_sft),
        BenchmarkModel("ppo", f"{sft_dir} + {policy_dir}", {"ppo": upstream_fingerprint(ctx, "ppo")}, load_ppo),
    ]


def upstream_fingerprint(ctx: StageContext, stage: str) -> str:
    """The published stage's fingerprint: it changes whenever what the stage computed can have."""
    manifest = read_manifest(ctx.inputs[stage])
    if manifest is None:
        raise RuntimeError(f"benchmark: {ctx.inputs[stage]} has no manifest")
    return manifest["fingerprint"]


def local_files(name_or_path: str) -> list | None:
    """A local model folder's files (name, size, modification time): cheap, and it changes when a file
    does. None for a reserved name or a hub id (the same name is the same weights)."""
    folder = Path(name_or_path)
    if not folder.is_dir():
        return None
    return [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()]


def cache_settings(ctx: StageContext) -> dict:
    """What changes every model's results besides the model and the task: how models load and are prompted."""
    config = ctx.config
    return {
        "model": fingerprint_value(config, "model"),
        "seed": config.seed,
        "batch_size": config.benchmark.batch_size,
        "apply_chat_template": APPLY_CHAT_TEMPLATE,
        "code": [code_hash("rlhf.lm_harness"), code_hash("rlhf.models")],
    }


def report_settings(ctx: StageContext, manager) -> dict:
    settings = {"batch_size": ctx.config.benchmark.batch_size, "seed": ctx.config.seed, "apply_chat_template": APPLY_CHAT_TEMPLATE}
    if manager is not None:
        import lm_eval

        settings["lm_eval_version"] = lm_eval.__version__
    return settings


def run_model(model: BenchmarkModel, tasks: list[PreparedTask], keys: dict[str, str], manager, cache, seed: int, batch_size: int):
    """({task: result as plain data}, how it ran): cached results where there are some, lm-eval on the rest."""
    results = {task.name: cache.get(keys[task.name]) for task in tasks}
    reused = [name for name, result in results.items() if result is not None]
    missing = [task for task in tasks if results[task.name] is None]
    console.print(
        f"benchmark: {model.name} ({model.path}): "
        + (f"{', '.join(reused)} from the cache" if reused else "nothing cached")
        + (f"; running {', '.join(t.name for t in missing)}" if missing else "")
    )
    started = time.time()
    if missing:
        loaded, tokenizer = model.load()
        lm = harness_model(loaded, tokenizer, batch_size)
        for task in missing:
            limit = f", first {task.limit}" if task.limit else ""
            shots = f", {task.num_fewshot}-shot" if task.num_fewshot is not None else ""
            console.print(f"benchmark: {model.name}: {task.name}{limit}{shots}")
            task_started = time.time()
            result = evaluate_task(lm, manager, task, seed)
            results[task.name] = as_data(result)
            cache.put(keys[task.name], results[task.name], time.time() - task_started)
            first = next(iter(result.metrics))
            console.print(
                f"benchmark: {model.name}: {task.name} {metric_label(first)} {result.metrics[first]['value']:.4f} "
                f"({time.time() - task_started:.1f} s)"
            )
        del lm, loaded
        free_memory()
    run = {"path": model.path, "reused": reused, "computed": [t.name for t in missing], "seconds": round(time.time() - started, 2)}
    return results, run


def as_data(result: TaskResult) -> dict:
    return {"metrics": result.metrics, "samples": result.samples, "higher_is_better": result.higher_is_better}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    release_freed_memory()


class ResultCache:
    """One model's result on one task, as a JSON file named by its key; written atomically, so a killed run
    leaves whole entries only. A file that does not parse is a miss."""

    def __init__(self, folder: Path):
        self.folder = folder

    @staticmethod
    def key(model: dict, task: dict, shared: dict) -> str:
        text = json.dumps({"model": model, "task": task, "settings": shared}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def get(self, key: str) -> dict | None:
        try:
            return json.loads((self.folder / f"{key}.json").read_text())["result"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def put(self, key: str, result: dict, seconds: float) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{key}.json"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"result": result, "seconds": round(seconds, 2), "written_at": time.time()}))
        os.replace(tmp, path)


def save(ctx: StageContext, report: dict) -> dict:
    """report.json, plots/benchmark.png, report.md, wandb; the manifest's metrics."""
    (ctx.out_dir / "report.json").write_text(json.dumps(report, indent=2))
    plots = ctx.out_dir / "plots"
    plots.mkdir(exist_ok=True)
    plot = draw_benchmark_plot(report, plots)
    (ctx.out_dir / "report.md").write_text(markdown_report(report, plot), encoding="utf-8")
    summary = flat_summary(report)
    if report["tasks"]:
        if process_rank() == 0:
            log_to_wandb(ctx, report, summary, plot)
        console.print(benchmark_tables(report), markup=False)
    return summary


def log_to_wandb(ctx: StageContext, report: dict, summary: dict, plot: str | None) -> None:
    wandb_run = start_wandb(ctx.config, "benchmark", ctx.run_dir)
    if wandb_run is None:
        return
    import wandb

    scores, bars = [], []
    for task, entry in report["tasks"].items():
        for index, metric in enumerate(entry["base"]["metrics"]):
            for model in MODELS:
                score = entry[model]["metrics"][metric]
                low, high = score["ci95"] or (None, None)
                scores.append([task, metric_label(metric), model, score["value"], score["stderr"], low, high])
                if index == 0:
                    bars.append([f"{task} / {model}", score["value"]])
    columns = ["task", "metric", "model", "value", "stderr", "ci95_low", "ci95_high"]
    log = {
        "benchmark/scores": wandb.Table(columns=columns, data=scores),
        "benchmark/chart": wandb.plot.bar(wandb.Table(columns=["task / model", "score"], data=bars), "task / model", "score",
                                          title="Benchmarks: base, SFT and PPO"),
    }
    if plot:
        log["benchmark/plot"] = wandb.Image(str(ctx.out_dir / "plots" / plot))
    wandb_run.log(log)
    wandb_run.summary.update({key: value for key, value in summary.items() if value is not None})
    wandb_run.finish()
