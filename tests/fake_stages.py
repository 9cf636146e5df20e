"""Two cheap stages for runner tests. Each run appends its name to `<run_dir>/runs.log`."""

import os

from rlhf.runner import Stage, StageContext


def run(ctx: StageContext) -> dict:
    with (ctx.run_dir / "runs.log").open("a") as log:
        log.write(ctx.stage.name + "\n")
    if os.environ.get("FAKE_FAIL") == ctx.stage.name:
        (ctx.out_dir / "partial.txt").write_text("half")
        raise RuntimeError(f"{ctx.stage.name} failed on purpose")
    if os.environ.get("FAKE_ALLOCATE_MB") and ctx.stage.name == "second":
        import torch

        block = torch.ones(int(os.environ["FAKE_ALLOCATE_MB"]) * 2**20, dtype=torch.uint8)  # every page touched
        del block
    upstream = "".join((path / "out.txt").read_text() for path in ctx.inputs.values())
    (ctx.out_dir / "out.txt").write_text(upstream + f"{ctx.stage.name}:{ctx.config.seed};")
    return {"ok": 1}


STAGES = [
    Stage("first", module="fake_stages", reads=("seed", "instructions"), outputs=("out.txt",)),
    Stage("second", module="fake_stages", reads=("sft",), upstream=("first",), outputs=("out.txt",)),
    Stage("third", module="fake_stages", reads=("lora",), upstream=("second",), outputs=("out.txt",)),
]
