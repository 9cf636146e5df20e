"""Sampling time per reply at two generation batch sizes, on a run's SFT model and its own prompts:

    python bench/generation_batch.py RUN_DIR [--sizes 24 48] [--prompts 48] [--samples 2] [--dtype auto]

Each decode step of a batch reads every weight of the model once, whatever the batch's size; on a 2-core
CPU that read is a large share of the step, so bigger batches spread it over more replies, until the
products themselves dominate. Both sizes generate the same replies' worth (the first `--prompts` training
prompts × `--samples`, 64 new tokens, temperature 1, the stages' own generate_chat), alternating, twice.
The last line is `time_ratio=` (second size / first, per reply).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from rlhf.config import ModelConfig
from rlhf.data_builders.json_files import read_conversations
from rlhf.generation import generate_chat
from rlhf.models import load_causal_lm, load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--sizes", type=int, nargs=2, default=[24, 48])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--samples", type=int, default=2, help="replies per prompt (preferences samples several)")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    merged = str(args.run_dir / "sft" / "merged")
    conversations = [m[:-1] for m in read_conversations(args.run_dir / "instructions" / "train.jsonl")][: args.prompts]
    conversations = [c for c in conversations for _ in range(args.samples)]
    tokenizer = load_tokenizer(merged)
    model = load_causal_lm(merged, ModelConfig(name_or_path=merged, dtype=args.dtype)).eval()
    print(f"{len(conversations)} replies of up to 64 tokens, {next(model.parameters()).dtype}")
    per_reply = {size: [] for size in args.sizes}
    for _ in range(2):
        for size in args.sizes:
            started = time.perf_counter()
            generate_chat(model, tokenizer, conversations, max_new_tokens=64, temperature=1.0, batch_size=size, description=None)
            per_reply[size].append((time.perf_counter() - started) / len(conversations))
    for size, times in per_reply.items():
        print(f"  batch {size:3d}: {statistics.median(times) * 1000:6.0f} ms per reply")
    first, second = (statistics.median(per_reply[size]) for size in args.sizes)
    print(f"time_ratio={second / first:.3f}")


if __name__ == "__main__":
    main()
