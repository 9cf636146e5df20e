"""Held-out pairwise accuracy of a run's `reward/model` at two readouts, with plain transformers:

- trained: where TRL's RewardTrainer reads a conversation (the chat template of prompt + response, at its
  last token: for ChatML the `\\n` after `<|im_end|>`), which is also the pipeline's one readout for a
  finished response;
- cut at EOS: the response cut right after its EOS and read there, which is what ppo and evaluate read
  up to 95d9ba1.

    python bench/readout_positions.py RUN_DIR

Any run works, old or new (each held-out pair is rendered as a finished conversation). The last line is
`accuracy_ratio=` (cut at EOS / trained).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main(run_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "reward" / "model")
    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward" / "model", dtype=torch.float32).eval()
    pairs = [json.loads(line) for line in (run_dir / "preferences" / "eval.jsonl").read_text().splitlines()]
    eos = tokenizer.eos_token_id

    def score(ids: list[int]) -> float:
        with torch.no_grad():
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()

    right = {"trained": 0, "cut at EOS": 0}
    gaps, margins = [], []
    for pair in pairs:
        scores = {}
        for side in ("chosen", "rejected"):
            trained = list(tokenizer.apply_chat_template(pair["prompt"] + pair[side], tokenize=True, return_dict=True)["input_ids"])
            last_eos = len(trained) - 1 - trained[::-1].index(eos)
            scores[side] = (score(trained), score(trained[: last_eos + 1]))
            gaps.append(abs(scores[side][0] - scores[side][1]))
        right["trained"] += scores["chosen"][0] > scores["rejected"][0]
        right["cut at EOS"] += scores["chosen"][1] > scores["rejected"][1]
        margins.append(scores["chosen"][0] - scores["rejected"][0])
    n = len(pairs)
    print(f"{run_dir}: {n} held-out pairs")
    for name, count in right.items():
        print(f"  accuracy read {name:<10} {count / n:.3f}")
    print(f"  mean |score(trained) - score(cut at EOS)| {sum(gaps) / len(gaps):.3f}; mean margin (trained) {sum(margins) / n:.3f}")
    print(f"accuracy_ratio={right['cut at EOS'] / max(right['trained'], 1):.3f}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    main(Path(sys.argv[1]))
