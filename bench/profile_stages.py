#!/usr/bin/env python
"""Where a pipeline run's time goes, per stage, from a py-spy profile of it.

    py-spy record -r 10 --format raw -o run.prof -- rlhf run configs/quickstart.yaml
    python bench/profile_stages.py run.prof            # the table
    python bench/profile_stages.py run.prof --top 25   # plus each stage's 25 heaviest frames

A sample belongs to the stage whose `run` (stages/<name>.py) is on its stack. Per stage: its samples, and
the share of them whose stack passes through each frame FRAMES matches (inclusive shares: they overlap).
"""

from __future__ import annotations

import argparse
import collections
import re

FRAMES = {
    "in `nn.Linear.forward`": re.compile(r"Linear\.forward \(torch/nn/modules/linear\.py"),
    "in autograd backward": re.compile("_engine_run_backward"),
    "in attention (sdpa)": re.compile("sdpa_attention_forward"),
    # the decode loop, rlhf.generation.generate (transformers' GenerationMixin.generate before 2da591e)
    "in `generate`": re.compile(r"(?:^|;)generate \((?:.*/)?(?:pipeline|rlhf)/generation\.py|GenerationMixin\.generate"),
}
STAGE = re.compile(r"\brun \((?:.*/)?stages/(\w+)\.py:\d+\)")


def read(path: str):
    """(stage, frames, samples) for each collapsed stack line of a py-spy raw profile."""
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        stage = next((m.group(1) for f in frames if (m := STAGE.search(f))), "other")
        yield stage, frames, int(count)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", help="py-spy record --format raw output")
    parser.add_argument("--top", type=int, default=0, help="also list each stage's N heaviest frames (inclusive)")
    args = parser.parse_args(argv)
    totals, hits = collections.Counter(), collections.defaultdict(collections.Counter)
    frames_by_stage = collections.defaultdict(collections.Counter)
    for stage, frames, count in read(args.profile):
        totals[stage] += count
        stack = ";".join(frames)
        for name, pattern in FRAMES.items():
            if pattern.search(stack):
                hits[stage][name] += count
        if args.top:
            for frame in {re.sub(r":\d+\)", ")", f) for f in frames}:
                frames_by_stage[stage][frame] += count
    print("| stage | samples | " + " | ".join(FRAMES) + " |")
    print("|---|---:|" + "---:|" * len(FRAMES))
    for stage, n in totals.most_common():
        print(f"| {stage} | {n} | " + " | ".join(f"{hits[stage][name] / n:.0%}" for name in FRAMES) + " |")
    for stage, n in totals.most_common() if args.top else ():
        print(f"\n{stage}:")
        for frame, count in frames_by_stage[stage].most_common(args.top):
            print(f"  {count / n:6.1%}  {frame[:160]}")


if __name__ == "__main__":
    main()
