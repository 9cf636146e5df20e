#!/usr/bin/env python
"""How much of a group estimator's signal is noise? Read from an evaluate stage's samples.

    python bench/group_signal.py runs/quickstart
    python bench/group_signal.py runs/quickstart --model ppo --group 4

grpo and its kin compare the K responses a prompt gets in one rollout. This script forms every group of K
from each held-out prompt's evaluate samples (all C(n, K) of a prompt's n samples of `--model`) and
reports, with the gold judge as the referee:
- the share of groups whose responses all finish or all stop at max_new_tokens ("same outcome"), and
  the median std of the proxy (reward model) score inside those groups and inside mixed ones;
- how often the proxy orders two responses to one prompt as gold does, for pairs of the same outcome
  and pairs of different outcomes (pairs that gold scores equally are left out).
A group estimator that divides by the group's std (grpo, `ppo.grpo_scale_by_std: true`) gives a group of
same-outcome responses advantages as large as a mixed group's; if the proxy orders same-outcome pairs no
better than chance, that half of the update follows noise. docs/measured-history.md has the figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    proxy: float
    gold: float
    finished: bool


@dataclass(frozen=True)
class GroupSignal:
    groups: int
    same_outcome_share: float
    median_std_same: float | None
    median_std_mixed: float | None
    agreement_same: float | None
    pairs_same: int
    agreement_mixed: float | None
    pairs_mixed: int


def read_samples(path: Path, model: str) -> dict[str, list[Sample]]:
    """evaluate/samples.jsonl -> {prompt: its samples of `model` ("sft" or "ppo")}, in file order."""
    by_prompt: dict[str, list[Sample]] = defaultdict(list)
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        try:
            sample = Sample(float(row[f"{model}_proxy"]), float(row[f"{model}_gold"]), bool(row[f"{model}_finished"]))
        except (KeyError, TypeError) as error:
            raise SystemExit(f"{path}:{number}: expected {model}_proxy, {model}_gold and {model}_finished ({error})")
        by_prompt[row["prompt"]].append(sample)
    if not by_prompt:
        raise SystemExit(f"{path}: no samples")
    return by_prompt


def group_signal(by_prompt: dict[str, list[Sample]], k: int) -> GroupSignal:
    same_std, mixed_std = [], []
    agree = {True: 0, False: 0}
    pairs = {True: 0, False: 0}
    for samples in by_prompt.values():
        for group in itertools.combinations(samples, k):
            std = statistics.stdev(s.proxy for s in group)
            (same_std if len({s.finished for s in group}) == 1 else mixed_std).append(std)
        for a, b in itertools.combinations(samples, 2):
            if a.gold == b.gold or a.proxy == b.proxy:
                continue
            same = a.finished == b.finished
            pairs[same] += 1
            agree[same] += (a.proxy > b.proxy) == (a.gold > b.gold)
    groups = len(same_std) + len(mixed_std)
    if not groups:
        raise SystemExit(f"no prompt has {k} samples: lower --group")
    return GroupSignal(
        groups=groups,
        same_outcome_share=len(same_std) / groups,
        median_std_same=statistics.median(same_std) if same_std else None,
        median_std_mixed=statistics.median(mixed_std) if mixed_std else None,
        agreement_same=agree[True] / pairs[True] if pairs[True] else None,
        pairs_same=pairs[True],
        agreement_mixed=agree[False] / pairs[False] if pairs[False] else None,
        pairs_mixed=pairs[False],
    )


def fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a run whose evaluate stage finished")
    parser.add_argument("--model", choices=("sft", "ppo"), default="sft", help="whose samples (default sft: what ppo starts from)")
    parser.add_argument("--group", type=int, default=4, help="K, responses per prompt in a group (default 4)")
    args = parser.parse_args(argv)
    if args.group < 2:
        parser.error("--group must be at least 2")
    path = args.run_dir / "evaluate" / "samples.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: not found (run the evaluate stage first)")
    by_prompt = read_samples(path, args.model)
    signal = group_signal(by_prompt, args.group)
    print(f"{path}: {len(by_prompt)} prompts, {args.model} samples, every group of {args.group} ({signal.groups} groups)")
    print(f"same_outcome_share={signal.same_outcome_share:.3f} (all finish or all stop at max_new_tokens)")
    print(f"median_proxy_std same_outcome={fmt(signal.median_std_same)} mixed={fmt(signal.median_std_mixed)}")
    print(
        f"proxy_orders_as_gold same_outcome={fmt(signal.agreement_same)} ({signal.pairs_same} pairs) "
        f"mixed={fmt(signal.agreement_mixed)} ({signal.pairs_mixed} pairs)"
    )


if __name__ == "__main__":
    main()
