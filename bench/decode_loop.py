"""transformers' generate against our decode loop (rlhf.generation.generate), on a run's own models and prompts:

    python bench/decode_loop.py RUN_DIR [--model sft|ppo|both] [--batch 48] [--samples 8] [--repeats 2]

transformers' generate runs every row of a batch until its last row ends; ours drops a row, and its KV
cache, at the row's EOS. Both sample with the same sampler (rlhf.generation.SampleFrom) and the same seed,
but their batches differ in shape (ours shrinks, and prefills a repeated prompt once), so float rounding
differs and a near-tie can go the other way, more often in bf16 (tests/test_generation.py shows equal
tokens where rounding agrees). So that both loops do the same work, transformers' generate samples each
batch once untimed, and the timed runs of both loops replay those tokens (`Replay`, before the sampler,
which still runs in full); each timed run must return exactly them. Workload:
evaluate's, from the run's config (each held-out prompt × `--samples`, its max_new_tokens and temperature,
`--batch` rows per call) on the SFT model (sft/merged) and the PPO one (export/model), alternating the
two loops `--repeats` times. The last line is `time_ratio=` (ours / transformers', summed over models).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import GenerationConfig, LogitsProcessorList

from rlhf.chat_format import ChatFormat
from rlhf.config import ModelConfig, load_config
from rlhf.data_builders.json_files import read_conversations
from rlhf.generation import SampleFrom, Sampling, generate, left_pad
from rlhf.models import load_causal_lm, load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402


def transformers_loop(model, chat: ChatFormat, ids, mask, sampling: Sampling, max_new_tokens: int, first=()) -> torch.Tensor:
    """model.generate with our sampler as its only processor and the model's generation_config.json set aside."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=list(chat.eos_ids),
                              pad_token_id=chat.tokenizer.pad_token_id)
    saved, model.generation_config = model.generation_config, GenerationConfig()
    try:
        return model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                              logits_processor=LogitsProcessorList([*first, SampleFrom(sampling)]))
    finally:
        model.generation_config = saved


def our_loop(model, chat: ChatFormat, ids, mask, sampling: Sampling, max_new_tokens: int, first=()) -> torch.Tensor:
    return generate(model, chat, ids, mask, sampling, max_new_tokens, first=first).sequences


class Replay:
    """A logits processor that leaves only the token a reference run sampled at this step (pad after the row ended)."""

    def __init__(self, reference: torch.Tensor, width: int, pad_id: int):
        self.reference, self.width, self.pad_id = reference, width, pad_id

    def __call__(self, input_ids, scores):
        column = input_ids.shape[1]
        token = self.reference[:, column] if column < self.reference.shape[1] else torch.full_like(input_ids[:, 0], self.pad_id)
        return torch.full_like(scores, float("-inf")).scatter_(1, token.unsqueeze(1), 0.0)


def sample_all(loop, model, chat, batches, sampling: Sampling, max_new_tokens: int, references=None):
    """Each batch through `loop`, reseeded per batch; replaying `references` when given. -> (outputs, seconds)."""
    started = time.perf_counter()
    outputs = []
    for index, (ids, mask) in enumerate(batches):
        torch.manual_seed(index)
        replay = () if references is None else (Replay(references[index], ids.shape[1], chat.tokenizer.pad_token_id),)
        with torch.no_grad():
            outputs.append(loop(model, chat, ids, mask, sampling, max_new_tokens, replay))
    return outputs, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--model", choices=["sft", "ppo", "both"], default="both")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    config = load_config(args.run_dir / "config.yaml")
    settings = config.evaluate
    sampling = Sampling(settings.temperature, settings.top_p)
    prompts = [m[:-1] for m in read_conversations(args.run_dir / "instructions" / "eval.jsonl")][: settings.num_prompts]
    dirs = {"sft": args.run_dir / "sft" / "merged", "ppo": args.run_dir / "export" / "model"}
    names = ["sft", "ppo"] if args.model == "both" else [args.model]
    print(f"{h.cpu_info()}; {torch.get_num_threads()} threads; load {h.loadavg()}", flush=True)
    print(h.code_state("pipeline/generation.py", "bench/decode_loop.py"), flush=True)
    totals = {"transformers": 0.0, "ours": 0.0}
    for name in names:
        tokenizer = load_tokenizer(str(dirs[name]))
        model = load_causal_lm(str(dirs[name]), ModelConfig(name_or_path=str(dirs[name]), dtype=config.model.dtype)).eval()
        chat = ChatFormat.of(tokenizer, model)
        rows = [chat.prompt_ids(c) for c in prompts for _ in range(args.samples)]
        rows.sort(key=len)  # as generate_chat batches them
        batches = [left_pad(rows[i : i + args.batch], tokenizer.pad_token_id, "cpu") for i in range(0, len(rows), args.batch)]
        sampled, _ = sample_all(transformers_loop, model, chat, batches, sampling, settings.max_new_tokens)
        untimed, _ = sample_all(our_loop, model, chat, batches, sampling, settings.max_new_tokens)
        same = sum(int(torch.equal(a, b)) for a, b in zip(sampled, untimed))
        eos = torch.tensor(chat.eos_ids)
        lengths = [int(l) for out, (ids, _) in zip(sampled, batches)
                   for l in (~torch.isin(out[:, ids.shape[1]:], eos)).cumprod(1).sum(1)]
        print(f"{name}: {len(rows)} replies in {len(batches)} batches of {args.batch}, "
              f"{next(model.parameters()).dtype}, mean length {statistics.mean(lengths):.1f} of "
              f"{settings.max_new_tokens}; batches sampled alike without replay: {same}/{len(batches)}", flush=True)
        times = {"transformers": [], "ours": []}
        for _ in range(args.repeats):
            for loop, function in (("transformers", transformers_loop), ("ours", our_loop)):
                outputs, seconds = sample_all(function, model, chat, batches, sampling, settings.max_new_tokens, sampled)
                if not all(torch.equal(a, b) for a, b in zip(outputs, sampled)):
                    raise SystemExit(f"{loop}: the replayed run did not return the replayed tokens")
                times[loop].append(seconds)
        for loop, seconds in times.items():
            median = statistics.median(seconds)
            totals[loop] += median
            print(f"  {loop:12s} {median:7.1f} s  ({', '.join(f'{s:.1f}' for s in seconds)})", flush=True)
    print(f"load after: {h.loadavg()}")
    print(f"time_ratio={totals['ours'] / totals['transformers']:.3f}")


if __name__ == "__main__":
    main()
