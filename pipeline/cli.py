"""The `rlhf` command: run, status and graph of the pipeline described by a config file."""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
from pathlib import Path

from rlhf.errors import UserError

USAGE_EXAMPLES = """examples:
  rlhf run configs/quickstart.yaml
  rlhf run configs/quickstart.yaml --only sft lora.r=32
  rlhf run configs/quickstart.yaml --from sft --dry-run
  rlhf status configs/quickstart.yaml
  rlhf graph configs/quickstart.yaml
  rlhf plan configs/qwen2.5-7b-qlora-24gb.yaml --gpu-mem 24GB
  rlhf report runs/quickstart
  rlhf plot runs/quickstart
  echo "Give me one tip for sleeping well." | rlhf chat runs/quickstart
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlhf", description=__doc__, epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("config", help="YAML config file")
        sub.add_argument("overrides", nargs="*", help="key.sub=value overrides")
        sub.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
        return sub

    run = with_config("run", "run the stale stages in order")
    run.add_argument("--only", help="STAGE[,STAGE...]: rerun just these, on the existing upstream outputs")
    run.add_argument("--from", dest="from_stage", metavar="STAGE", help="rerun this stage and everything downstream")
    run.add_argument("--force", action="store_true", help="rerun every selected stage, even if up to date")
    run.add_argument("--dry-run", action="store_true", help="say what would run and why; run nothing")
    with_config("status", "each stage: up to date, stale (why) or missing")
    with_config("graph", "print the stage graph")
    plan = with_config("plan", "estimate each stage's peak GPU memory from the model's config.json (no weights)")
    plan.add_argument("--gpu-mem", default="24GB", help="GPU memory to check against (default 24GB; GB = GiB)")
    plan.add_argument("--model-config", metavar="PATH", help="the model's config.json, e.g. for a hub id offline")
    plan.add_argument("--prompt-tokens", type=int, default=512, help="prompt length to plan for (default 512)")

    def with_run_dir(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help)
        sub.add_argument("run_dir", help="a run directory (a config's output_dir)")
        sub.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
        return sub

    with_run_dir("report", "print a run's evaluation and benchmark tables (evaluate/ and benchmark/report.json)")
    plot = with_run_dir("plot", "draw a run's training curves as PNG files")
    plot.add_argument("--out", help="folder for the PNG files (default: RUN_DIR/plots)")
    chat = with_run_dir("chat", "answer prompts read from the terminal, one per line, until end of input")
    chat.add_argument("--stage", choices=("ppo", "sft"), default="ppo", help="ppo (default): the exported model; sft: the merged SFT model")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    chat.add_argument("--top-p", type=float, default=0.9)
    chat.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes warns at import that an optional CPU kernel package is absent; it falls back fine.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = build_parser()
    # Overrides may follow options (`run CONFIG --only sft lora.r=32`): argparse leaves those over.
    args, leftover = parser.parse_known_args(argv)
    unknown = [item for item in leftover if item.startswith("-") or "=" not in item]
    if unknown or (leftover and not hasattr(args, "config")):  # only config commands take overrides
        parser.error(f"unrecognized arguments: {' '.join(unknown or leftover)}")
    args.overrides = [*getattr(args, "overrides", []), *leftover]
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        from rlhf.preemption import Preempted

        print(e if isinstance(e, Preempted) else f"error: {e}", file=sys.stderr)
        return getattr(e, "exit_status", 2)  # 2 for the user's errors; a failed launched stage sets 1
    except KeyboardInterrupt:
        print("interrupted: published outputs are unchanged", file=sys.stderr)
        return 130


def cmd_run(args) -> int:
    from rlhf.config import load_config
    from rlhf.dag import STAGES
    from rlhf.runner import decide, run_pipeline

    config = load_config(args.config, args.overrides)
    only = [name.strip() for name in args.only.split(",") if name.strip()] if args.only else None
    if only and args.from_stage:
        raise UserError("--only and --from cannot be combined")
    decisions = decide(STAGES, config, only=only, from_stage=args.from_stage, force=args.force)
    if args.dry_run:
        for d in decisions:
            print(f"{'would run' if d.run else 'would skip'} {d.status.stage.name}: {d.why}")
        return 0
    if not any(d.run for d in decisions):
        print(f"nothing to do: every stage in {config.output_dir} is up to date")
        print_results(Path(config.output_dir))
        return 0
    run_pipeline(STAGES, config, decisions)
    print_results(Path(config.output_dir))
    return 0


def print_results(run_dir: Path) -> None:
    """The last lines of `rlhf run`: where the report, the plots and the exported model are, when published."""
    results = [
        *([("benchmark", run_dir / "benchmark" / "report.md", "")] if benchmark_report(run_dir) else []),
        ("report", run_dir / "evaluate" / "report.md", f"  (table: rlhf report {run_dir})"),
        ("plots", run_dir / "evaluate" / "plots", ""),
        ("model", run_dir / "export" / "model", f"  (try it: rlhf chat {run_dir})"),
    ]
    for label, path, hint in results:
        if path.exists():
            print(f"{label + ':':<11}{path}{hint}")


def benchmark_report(run_dir: Path) -> dict | None:
    """The published benchmark stage's report.json when it measured any task."""
    import json

    try:
        report = json.loads((run_dir / "benchmark" / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if report.get("tasks") and (run_dir / "benchmark" / "manifest.json").is_file() else None


def cmd_status(args) -> int:
    from rlhf.config import load_config
    from rlhf.dag import STAGES
    from rlhf.runner import plan

    config = load_config(args.config, args.overrides)
    print(f"run directory: {config.output_dir}")
    for status in plan(STAGES, config):
        why = f" ({'; '.join(status.reasons)})" if status.state == "stale" else ""
        print(f"  {status.stage.name:<14} {status.state}{why}")
    return 0


def cmd_plan(args) -> int:
    from rlhf.config import load_config
    from rlhf.plan import plan_report

    config = load_config(args.config, args.overrides)
    print(plan_report(config, args.gpu_mem, args.model_config, args.prompt_tokens))
    return 0


def cmd_graph(args) -> int:
    from rlhf.config import load_config
    from rlhf.dag import STAGES
    from rlhf.runner import topological_order

    config = load_config(args.config, args.overrides)
    for stage in topological_order(STAGES):
        after = f" <- {', '.join(stage.upstream)}" if stage.upstream else ""
        files = [str(p) for p in stage.file_inputs(config)]
        print(f"{stage.name}{after}")
        print(f"    reads:   {', '.join(stage.reads)}")
        if files:
            print(f"    files:   {', '.join(files)}")
        print(f"    outputs: {', '.join(stage.outputs)}")
    return 0


def published_stage(run_dir: Path, stage: str, needed_for: str) -> Path:
    """A stage's published folder in a run directory, or a one-line error saying what is missing."""
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    path = run_dir / stage
    if not (path / "manifest.json").is_file():
        raise UserError(f"{run_dir}: no published {stage} stage, which {needed_for} needs: run it first (rlhf run CONFIG)")
    return path


def cmd_report(args) -> int:
    import json

    from rlhf.benchmark_report import benchmark_tables
    from rlhf.report import shipped_gap_line, summary_table

    run_dir = Path(args.run_dir)
    benchmark = benchmark_report(run_dir) if run_dir.is_dir() else None
    if benchmark is None or (run_dir / "evaluate" / "manifest.json").is_file():
        report_file = published_stage(run_dir, "evaluate", "rlhf report") / "report.json"
        print(summary_table(json.loads(report_file.read_text())))
    if benchmark is not None:
        print(f"\nBenchmarks (lm-evaluation-harness; {run_dir / 'benchmark' / 'report.md'}):\n")
        print(benchmark_tables(benchmark))
    export = Path(args.run_dir) / "export" / "manifest.json"
    metrics = json.loads(export.read_text())["metrics"] if export.is_file() else {}
    if "evaluated_vs_shipped_prompts" in metrics:  # a quantized run: the shipped model is not the evaluated one
        gap = {key.removeprefix("evaluated_vs_shipped_"): value for key, value in metrics.items() if key.startswith("evaluated_vs_shipped_")}
        quantization = json.loads(export.read_text())["parts"]["config"]["model"]["quantization"]
        print(shipped_gap_line(gap, quantization))
    return 0


def cmd_plot(args) -> int:
    from rlhf.plots import draw_plots

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such run directory")
    metrics_files = {stage: run_dir / stage / "metrics.jsonl" for stage in ("sft", "reward", "ppo")}
    dest = Path(args.out) if args.out else run_dir / "plots"
    written = draw_plots(metrics_files, dest)
    if not written:
        raise UserError(f"{run_dir}: no training curves to draw (no metrics.jsonl of sft, reward or ppo)")
    for name in written:
        print(dest / name)
    return 0


def cmd_chat(args) -> int:
    model, tokenizer, what = load_chat_model(Path(args.run_dir), args.stage)
    from rlhf.generation import generate_chat

    interactive = sys.stdin.isatty()
    if interactive:
        print(f"{what}. One prompt per line (each answered on its own); Ctrl-D ends.")
    for turn in itertools.count():
        try:
            prompt = input("> " if interactive else "").strip()
        except EOFError:
            return 0
        if not prompt:
            continue
        # The pipeline's own sampling (our settings only, every EOS id): what evaluate measured.
        reply = generate_chat(
            model, tokenizer, [[{"role": "user", "content": prompt}]], max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_p=args.top_p, seed=args.seed + turn, description=None,
        )[0]
        print(reply.text, flush=True)


def load_chat_model(run_dir: Path, stage: str):
    """(model, tokenizer, description): the exported model for ppo (or, before export ran, the merged SFT
    model with the policy adapter), the merged SFT model for sft. Unquantized, on the run's device and dtype."""
    import yaml

    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm, load_tokenizer

    sft_dir = published_stage(run_dir, "sft", f"rlhf chat --stage {stage}") / "merged"
    exported = run_dir / "export" / "model"
    adapter = None
    if stage == "sft":
        path = sft_dir
    elif (run_dir / "export" / "manifest.json").is_file():
        path = exported
    else:
        path, adapter = sft_dir, published_stage(run_dir, "ppo", "rlhf chat --stage ppo") / "policy"
    try:  # the run's model settings (dtype, device, trust_remote_code), where its config.yaml has them
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
        model_config = ModelConfig.model_validate({**saved, "quantization": "none"})
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        model_config = ModelConfig()
    tokenizer = load_tokenizer(str(path), model_config.trust_remote_code)
    model = load_causal_lm(str(path), model_config, quantize=False)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    what = f"{stage}: {path}" + (f" + {adapter}" if adapter else "")
    return model.eval(), tokenizer, what


COMMANDS = {
    "run": cmd_run,
    "status": cmd_status,
    "graph": cmd_graph,
    "plan": cmd_plan,
    "report": cmd_report,
    "plot": cmd_plot,
    "chat": cmd_chat,
}

if __name__ == "__main__":
    sys.exit(main())
