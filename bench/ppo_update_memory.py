#!/usr/bin/env python
"""Peak resident memory and time of ONE `ppo_update` (our ppo stage's update), as the stage runs it and
in variants that a fix to stages/ppo.py could adopt.

    python bench/ppo_vs_trl.py --only ours --runs 1 --steps 1     # once: prepares the run directory
    OMP_NUM_THREADS=1 python bench/ppo_update_memory.py current
    OMP_NUM_THREADS=1 python bench/ppo_update_memory.py two-backwards
    OMP_NUM_THREADS=1 python bench/ppo_update_memory.py mmap
    OMP_NUM_THREADS=1 python bench/ppo_update_memory.py two-backwards+mmap

Variants (run each in a fresh process; the peak is the process's VmHWM):
- current: `rlhf.stages.ppo.ppo_update` as it is (policy and value forwards, one backward);
- two-backwards: the same losses, the policy loss backpropagated before the value forward, so one
  forward's activations are alive at a time (same arithmetic, same gradients);
- mmap: glibc's mmap threshold fixed at 64 KiB (mallopt), so large freed tensors go back to the
  OS at once instead of staying in (fragmented) heap arenas.
The rollout is synthetic (the prepared prompts + random response tokens): the update's cost does not
depend on what the tokens are.
"""

import argparse
import ctypes
import json
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from rlhf.config import load_config
from rlhf.models import load_causal_lm
from rlhf.stages import ppo
from rlhf.stages.ppo_math import ppo_policy_loss, ppo_value_loss


def status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def update_two_backwards(accelerator, roles, optimizer, rollout, old_logprobs, old_values, advantages, returns, settings, step):
    """ppo_update's loop with one backward per loss (the proposed change), one minibatch."""
    rows_all = torch.arange(rollout["input_ids"].shape[0])
    for rows in rows_all.split(settings.micro_batch_size):
        mask, weight = rollout["mask"][rows], len(rows) / len(rows_all)
        logprobs, _ = roles.policy_logprobs(rollout, settings.temperature, rows)
        policy_loss, _, _ = ppo_policy_loss(logprobs, old_logprobs[rows], advantages[rows], mask, settings.clip_range)
        accelerator.backward(policy_loss * weight)
        del logprobs, policy_loss
        values = roles.values(rollout, rows)
        value_loss, _ = ppo_value_loss(values, old_values[rows], returns[rows], mask, settings.clip_range_value)
        accelerator.backward(settings.vf_coef * value_loss * weight)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variant", choices=["current", "two-backwards", "mmap", "two-backwards+mmap"])
    parser.add_argument("--workdir", default="/tmp/rlhf-bench-ppo-smollm2-135m-instruct", help="prepared by bench/ppo_vs_trl.py")
    parser.add_argument("--rows", type=int, default=8, help="rollout rows = minibatch (default 8)")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=48)
    args = parser.parse_args()
    work = Path(args.workdir)
    overrides = [f"ppo.rollout_batch_size={args.rows}", f"ppo.mini_batch_size={args.rows}", f"ppo.micro_batch_size={args.micro_batch_size}"]
    config = load_config(work / "ours.yaml", overrides)
    if "mmap" in args.variant:
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
    backbone = load_causal_lm(str(work / "backbone"), config.model)
    model, value_head, reward_head = ppo.build_actor_critic(backbone, work / "reward", config)
    trainable = [p for n, p in model.named_parameters() if ".policy." in n or ".value." in n] + list(value_head.parameters())
    roles = ppo.Roles(model.eval(), value_head, reward_head, trainable)

    prompts = json.loads((work / "prompts.json").read_text())[: args.rows]
    torch.manual_seed(0)
    pad, width = 0, max(map(len, prompts))
    prompt_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    mask = torch.ones(len(prompts), args.new_tokens)
    attention_mask = torch.cat([prompt_mask, mask.long()], 1)
    rollout = {
        "input_ids": torch.cat([prompt_ids, torch.randint(3, backbone.config.vocab_size, (len(prompts), args.new_tokens))], 1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        "context_length": width,
        "mask": mask,
    }
    with torch.no_grad():
        logprobs, _ = roles.policy_logprobs(rollout, 1.0)
        values = roles.values(rollout)
    advantages = torch.randn_like(logprobs)
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    update = update_two_backwards if "two-backwards" in args.variant else ppo.ppo_update
    before = status_mb("VmHWM")
    started = time.time()
    update(Accelerator(cpu=True), roles, optimizer, rollout, logprobs, values, advantages, values, config.ppo, 1)
    print(f"{args.variant}: {len(prompts)} rows x {rollout['input_ids'].shape[1]} tokens, micro-batch {args.micro_batch_size}: "
          f"update {time.time() - started:.1f} s; peak RSS {before:.0f} MB before the update, {status_mb('VmHWM'):.0f} MB after; "
          f"RSS after {status_mb('VmRSS'):.0f} MB")


if __name__ == "__main__":
    main()
