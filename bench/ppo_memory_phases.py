"""Peak resident memory of the ppo stage, phase by phase, on a finished run directory.

    python bench/ppo_memory_phases.py configs/quickstart.yaml   # after `rlhf run configs/quickstart.yaml`

Prints VmHWM (peak resident set, Linux) after: loading the backbone, adding the adapters, one rollout,
scoring, and one PPO update, so that a memory regression can be traced to its phase.
"""

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from rlhf import memory
from rlhf.chat_format import ChatFormat
from rlhf.config import load_config
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.roles import Roles, build_actor_critic
from rlhf.rollout import generate_rollout, in_micro_batches
from rlhf.stages import ppo


def peak(phase: str) -> None:
    print(f"{phase:<10} peak resident {memory.peak_memory_mb() / 1024:.2f} GB", flush=True)


def main(config_path: str, *overrides: str) -> None:
    config = load_config(config_path, list(overrides))
    run = Path(config.output_dir)
    memory.reset_peak_memory()
    peak("start")
    backbone = load_causal_lm(str(run / "sft" / "merged"), config.model)
    peak("backbone")
    model, value_head, reward_head = build_actor_critic(backbone, run / "reward", config)
    trainable = [p for n, p in model.named_parameters() if ".policy." in n or ".value." in n]
    chat = ChatFormat.of(load_tokenizer(str(run / "sft" / "merged")), backbone)
    roles = Roles(model.eval(), value_head, reward_head, trainable, chat)
    peak("adapters")
    prompts = ppo.load_prompts(run / "instructions" / "train.jsonl", chat, config.ppo.rollout_batch_size, 0)[0]
    settings = config.ppo
    sampling = ppo.ppo_sampling(settings)
    rollout = generate_rollout(roles, [p.ids for p in prompts], max_new_tokens=settings.max_new_tokens, sampling=sampling)
    logprobs = rollout.logprobs
    peak("rollout")
    with torch.no_grad():
        size = settings.micro_batch_size
        in_micro_batches(lambda part: roles.reference_logprobs(part, sampling), rollout, size)
        values = in_micro_batches(roles.values, rollout, size)
        in_micro_batches(roles.scores, rollout, size)
    peak("scoring")
    optimizer = torch.optim.AdamW([*trainable, *value_head.parameters()], lr=config.ppo.learning_rate)
    advantages = torch.randn_like(logprobs) * rollout.mask
    scored = ppo.ScoredRollout(None, None, values, None, None, advantages, values)
    ppo.ppo_update(Accelerator(cpu=True), roles, optimizer, rollout, scored, config.ppo, 1)
    peak("update")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        sys.exit(__doc__)
    main(*sys.argv[1:])
