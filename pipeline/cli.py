"""The `rlhf` command: run, status and graph of the pipeline described by a config file."""

from __future__ import annotations

import argparse
import logging
import sys

from rlhf.errors import UserError

USAGE_EXAMPLES = """examples:
  rlhf run configs/quickstart.yaml
  rlhf run configs/quickstart.yaml --only sft lora.r=32
  rlhf run configs/quickstart.yaml --from sft --dry-run
  rlhf status configs/quickstart.yaml
  rlhf graph configs/quickstart.yaml
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
    return parser


def main(argv: list[str] | None = None) -> int:
    # bitsandbytes warns at import that an optional CPU kernel package is absent; it falls back fine.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    parser = build_parser()
    # Overrides may follow options (`run CONFIG --only sft lora.r=32`): argparse leaves those over.
    args, leftover = parser.parse_known_args(argv)
    unknown = [item for item in leftover if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *leftover]
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
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
        return 0
    run_pipeline(STAGES, config, decisions)
    return 0


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


COMMANDS = {"run": cmd_run, "status": cmd_status, "graph": cmd_graph}

if __name__ == "__main__":
    sys.exit(main())
