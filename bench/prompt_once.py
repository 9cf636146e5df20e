"""Forward + backward on a run's own batches with every row whole, against each shared prompt run once:

- reward: the reward stage's training batches (a pair's chosen and rejected rows share their prompt), the
  trainer's training_step with TRL's RewardTrainer.compute_loss (every row whole) against the stage's own
  (rlhf.stages.reward.PromptOnce);
- ppo: the update's micro-batches of a grpo rollout (K responses per prompt), the policy log-probs' forward
  and backward with the prompt per row against each distinct prompt once (rlhf.generation.shared_prefix_cache).

    python bench/prompt_once.py RUN_DIR [--batches N] [--rounds R]

RUN_DIR: a finished quickstart run (its resolved config.yaml, preferences, sft/merged, reward). Both sides run
in one process on the same batches, alternating, R rounds; per side the median seconds per batch and the
tokens through the model. The last line is `reward_time_ratio=... ppo_time_ratio=...` (shared / whole).
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial
from pathlib import Path
from unittest import mock

import torch
from trl import RewardTrainer

from rlhf import roles as roles_module
from rlhf.chat_format import ChatFormat
from rlhf.config import load_config
from rlhf.generation import Sampling
from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer, pick_dtype
from rlhf.preemption import StopOnSigterm
from rlhf.roles import Roles, build_actor_critic
from rlhf.rollout import by_prompt_length, generate_rollout
from rlhf.stages import ppo, reward
from rlhf.tracking import StageHistory
from rlhf.training import SaveAndStopOnSigterm


def timed(step) -> float:
    started = time.perf_counter()
    step()
    return time.perf_counter() - started


def tokens_seen(model, step) -> int:
    """Token positions through the model's embedding in one call of `step` (rows x columns of each forward)."""
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].numel()))
    step()
    hook.remove()
    return sum(seen)


def compare(name: str, model, whole, shared, rounds: int) -> float:
    """Median seconds of each side over `rounds` alternating runs; prints both and returns shared / whole."""
    times = {"whole": [], "shared": []}
    for _ in range(rounds):
        times["whole"].append(timed(whole))
        times["shared"].append(timed(shared))
    tokens = {"whole": tokens_seen(model, whole), "shared": tokens_seen(model, shared)}
    for side in ("whole", "shared"):
        print(f"  {name} {side:<6} {statistics.median(times[side]):7.2f} s  {tokens[side]:6d} tokens")
    return statistics.median(times["shared"]) / statistics.median(times["whole"])


def reward_batches(run_dir: Path, config, count: int):
    """The reward stage's trainer on the run's training pairs, and its first `count` training batches."""
    backbone = str(run_dir / "sft" / "merged")
    tokenizer = load_tokenizer(backbone)
    data = reward.tokenize_pairs(reward.load_pairs(run_dir / "preferences" / "train.jsonl"), ChatFormat.of(tokenizer))
    trainer = reward.build_trainer(config, load_reward_model(backbone, config.model, tokenizer), tokenizer, (data, data),
                                   run_dir / ".bench-prompt-once", StageHistory(run_dir / ".bench-prompt-once", 0),
                                   SaveAndStopOnSigterm(StopOnSigterm()), False)
    batches = []
    for batch in trainer.get_train_dataloader():
        batches.append(batch)
        if len(batches) == count:
            break
    return trainer, batches


def bench_reward(run_dir: Path, config, count: int, rounds: int) -> float:
    """The trainer's own training_step (its autocast, loss, backward) on each batch, without the optimizer."""
    trainer, batches = reward_batches(run_dir, config, count)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, which this skips
    model = trainer.model.train()

    def shared():
        for batch in batches:
            trainer.training_step(model, dict(batch))
        model.zero_grad(set_to_none=True)

    def whole():  # TRL's compute_loss: chosen and rejected rows whole
        with mock.patch.object(trainer, "compute_loss", partial(RewardTrainer.compute_loss, trainer)):
            shared()

    print(f"reward: {len(batches)} batches of {config.reward.batch_size} pairs, autocast {trainer.args.bf16 and 'bf16' or 'off'}")
    return compare("reward", model, whole, shared, rounds)


def bench_ppo(run_dir: Path, config, rounds: int) -> float:
    settings = config.ppo
    backbone = load_causal_lm(str(run_dir / "sft" / "merged"), config.model)
    tokenizer = load_tokenizer(str(run_dir / "sft" / "merged"))
    tokenizer.padding_side = "left"
    model, _, reward_head = build_actor_critic(backbone, run_dir / "reward", config, critic=False)
    trainable = [p for n, p in model.named_parameters() if ".policy." in n]
    roles = Roles(model.eval(), None, reward_head, trainable, ChatFormat.of(tokenizer, backbone))
    k = settings.samples_per_prompt
    prompts = ppo.load_prompts(run_dir / "instructions" / "train.jsonl", roles.chat, settings.rollout_batch_size // k, config.seed)[0]
    torch.manual_seed(config.seed)
    sampling = ppo.ppo_sampling(settings)
    rollout = generate_rollout(roles, [p.ids for p in prompts for _ in range(k)], max_new_tokens=settings.max_new_tokens, sampling=sampling)
    order = torch.randperm(rollout.input_ids.shape[0])
    micro = [rows for start in range(0, len(order), settings.mini_batch_size)
             for rows in by_prompt_length(rollout, order[start : start + settings.mini_batch_size]).split(settings.micro_batch_size)]

    def shared():
        for rows in micro:
            part = rollout.rows(rows)
            (roles.policy_logprobs(part, Sampling(settings.temperature))[0] * part.mask).sum().backward()
        model.zero_grad(set_to_none=True)

    def whole():
        with mock.patch.object(roles_module, "shared_prefix_cache", return_value=None):  # the prompt per row
            shared()

    print(f"ppo: {len(micro)} micro-batches of {settings.micro_batch_size} rows, {k} responses per prompt, "
          f"{rollout.input_ids.shape[1]} columns")
    return compare("ppo", model, whole, shared, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--batches", type=int, default=4, help="reward training batches per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    config = load_config(args.run_dir / "config.yaml", [f"output_dir={args.run_dir}"])
    print(f"{args.run_dir}: model.dtype {config.model.dtype} ({pick_dtype(config.model)}), torch threads {torch.get_num_threads()}")
    reward_ratio = bench_reward(args.run_dir, config, args.batches, args.rounds)
    ppo_ratio = bench_ppo(args.run_dir, config, args.rounds)
    print(f"reward_time_ratio={reward_ratio:.3f} ppo_time_ratio={ppo_ratio:.3f}")


if __name__ == "__main__":
    main()
