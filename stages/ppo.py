"""The ppo stage: PPO with a per-token KL penalty against the SFT reference, on one resident backbone.

The policy, reference, reward and value are four views of one backbone with LoRA adapters (rlhf.roles);
with an external reward model (the reward stage's `external.json`), that model is loaded beside it with
its own tokenizer and template. The loop follows InstructGPT / Ziegler et al. (2019) and "The N+
implementation details of RLHF with PPO" (Huang et al. 2024); its math lives in rlhf.ppo_math, the
rollout in rlhf.rollout.

What the log-probs describe: tokens are sampled with our settings alone (rlhf.generation: the model's
generation_config.json is set aside) and every log-prob comes from the model's own logits (its forward,
with Gemma 2's softcapping or Cohere's logit scale), through `sampling_scores`:
- old and new log-probs are those of the distribution the tokens were drawn from: at the temperature,
  and truncated to top-k / top-p when those are set (a token the updated policy no longer keeps has
  probability 0, so its ratio is 0 and it carries no gradient);
- the reference's log-probs are of the SFT model's full distribution at the same temperature, never
  truncated: truncating it too would make the KL infinite for any token outside the reference's own
  nucleus. With top_p < 1 or top_k > 0 the KL therefore includes −log(kept probability mass) per token
  from step 1 on: that is the true KL of the sampled distribution to the SFT model.

With `generation.engine: vllm` the rollout is sampled by one vLLM engine in this process (rlhf.vllm_engine):
the policy adapter is synced into it after every update, and the old log-probs are recomputed by the
trainer's forward, since vLLM's numerics are not the trainer's (a different kernel, and with QLoRA on a
CPU an unquantized backbone). The gap between vLLM's sampling log-probs and the trainer's is logged
every step (`rollout/engine_logprob_gap_mean`, `_max`); `generation.vllm_importance_correction` weights
each token's policy loss by min(exp(trainer − vLLM), cap) (truncated importance sampling).

Advantages: GAE with the learned critic (`ppo.advantage_estimator: gae`, the default), or a critic-free
estimator over groups of `ppo.samples_per_prompt` responses to one prompt (rloo, grpo,
reinforce_baseline: rlhf.ppo_math.group_advantages), with no value adapter, head or forward at all.

Outputs: `policy/` (the policy adapter), `value/` (with gae: value adapter and `value_head.safetensors`),
`metrics.jsonl` (one line per step), `samples.jsonl` (prompts, responses and scores every N steps). Both
files are kept beside the checkpoints while the stage runs, so a resumed run publishes every step.
On SIGTERM the stage saves a checkpoint after the current step and exits (rlhf.preemption).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import set_peft_model_state_dict
from rich.console import Console
from safetensors.torch import load_file, save_file

from rlhf.chat_format import ChatFormat
from rlhf.data_builders.json_files import read_conversations
from rlhf.errors import UserError
from rlhf.generation import Sampling
from rlhf.memory import peak_memory_mb, release_freed_memory, reset_peak_memory
from rlhf.models import (
    enable_checkpointing_with_grad,
    fits_context,
    load_causal_lm,
    load_tokenizer,
    pick_device,
)
from rlhf.ppo_math import (
    clip_scores,
    gae,
    group_advantages,
    kl_controller,
    kl_k3,
    kl_loss_k3,
    kl_penalty_rewards,
    masked_mean,
    logprob_gap,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    reward_to_go,
    truncated_importance_weights,
)
from rlhf.preemption import preempted
from rlhf.reward.readout import RewardModel, read_external_reward_model
from rlhf.reward.sources import ScoringBatch, Source, build_sources, score_sources
from rlhf.roles import TRAINABLE_ADAPTERS, Roles, build_actor_critic
from rlhf.rollout import (
    Rollout,
    by_prompt_length,
    decode_responses,
    engine_rollout,
    generate_rollout,
    in_micro_batches,
    with_trainer_logprobs,
)
from rlhf.runner import StageContext
from rlhf.tracking import StageHistory, start_wandb
from rlhf.training import NonFiniteTraining
from rlhf.vllm_engine import VllmEngine, lora_rank_for

console = Console(highlight=False, soft_wrap=True)


@dataclass(frozen=True)
class Prompt:
    messages: list[dict]
    """The conversation up to the assistant's turn (what an external reward model renders itself)."""
    ids: list[int]
    """Its tokens, with the generation prompt (rlhf.chat_format.prompt_ids)."""
    reference: str | None = None
    """The split's answer to it (what the rubric source compares with)."""


@dataclass
class Trainer:
    """What the loop works with, built once by `set_up`."""

    accelerator: Accelerator
    roles: Roles
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    kl_ctl: object
    prompts: list[Prompt]
    prompts_too_long: int
    reward_model: RewardModel | None
    external: str | None
    sources: list[Source]
    sampling: Sampling
    engine: VllmEngine | None = None
    """generation.engine vllm: the engine that samples rollouts (None: transformers' generate)."""


@dataclass(frozen=True)
class ScoredRollout:
    """What step 3 computes for a rollout of B rows and T response tokens: [B] `scores` (the weighted sum
    of the reward sources, after the EOS penalty and clipping; `by_source` each source's before weighting);
    [B, T] `ref_logprobs`, `values` (before the update), `kl` (log π − log π_ref), and the `advantages` and
    `returns` (GAE's on the per-token rewards: the score on each row's last token, and −β·kl on every
    token when ppo.kl_in is reward; or a critic-free estimator's, `values` and `returns` then None).
    `kl_loss_coef`: β when the KL is a loss term (ppo.kl_in loss), else 0."""

    scores: torch.Tensor
    by_source: dict[str, list[float]]
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor | None
    kl_loss_coef: float = 0.0


@dataclass(frozen=True)
class UpdateStats:
    """Means over the update's micro-batches; `first_ratio_max_gap` is max |π/π_old − 1| over the first
    minibatch before any optimizer step: float rounding when the old log-probs describe the sampled
    distribution (a larger gap means they do not)."""

    approxkl: float
    clipfrac: float
    policy_loss: float
    value_loss: float | None
    value_clipfrac: float | None
    """None without a critic."""
    kl_loss: float | None
    """The k3 KL term of the loss (ppo.kl_in loss); None when the KL is in the reward."""
    entropy: float
    first_ratio_max_gap: float

    @classmethod
    def mean(cls, parts: list[UpdateStats], first_ratio_max_gap: float) -> UpdateStats:
        """Each statistic averaged over micro-batches, with the first minibatch's ratio gap."""
        names = [f.name for f in fields(cls) if f.name != "first_ratio_max_gap"]
        values = {name: [getattr(part, name) for part in parts] for name in names}
        means = {name: None if None in v else sum(v) / len(v) for name, v in values.items()}
        return cls(**means, first_ratio_max_gap=first_ratio_max_gap)

    def record(self) -> dict:
        return {
            "objective/entropy": self.entropy,
            "policy/approxkl": self.approxkl,
            "policy/clipfrac": self.clipfrac,
            "loss/policy": self.policy_loss,
            **({"loss/value": self.value_loss, "val/clipfrac": self.value_clipfrac} if self.value_loss is not None else {}),
            **({"loss/kl": self.kl_loss} if self.kl_loss is not None else {}),
            "policy/first_ratio_max_gap": self.first_ratio_max_gap,
        }


def run(ctx: StageContext) -> dict:
    config, settings = ctx.config, ctx.config.ppo
    # 1. Setup: one backbone with policy / value / reward adapters and their heads (or an external reward
    #    model beside it), the optimizer, the KL controller, the prompts; resume from a checkpoint if any.
    trainer = set_up(ctx)
    checkpoints = ctx.work_dir / "checkpoints"
    start_step = load_checkpoint(checkpoints, trainer)
    if start_step:
        console.print(f"ppo: resuming after step {start_step} from {checkpoints}")
    if trainer.engine is not None:
        trainer.engine.sync_adapter(trainer.roles.model, "policy")  # the (resumed) policy, before step 1
    wandb_run = start_wandb(config, "ppo", ctx.run_dir) if trainer.accelerator.is_main_process else None
    history = StageHistory(ctx.work_dir, start_step, ("metrics.jsonl", "samples.jsonl"))
    rank = trainer.accelerator.process_index  # under `accelerate launch`, each process samples its own prompts
    rng = random.Random(config.seed + 7919 * rank)

    for step in range(1, settings.steps + 1):
        prompts = sample_prompts(rng, trainer.prompts, settings.rollout_batch_size, settings.samples_per_prompt)
        if step <= start_step:
            continue  # replay the prompt sampler so a resumed run sees the same prompts
        torch.manual_seed(config.seed * 100_003 + step + 7919 * rank)

        # 2. Rollout: sample responses with the policy, cut after EOS; the old log-probs come with them
        #    (with vLLM: recomputed by the trainer's forward, the engine's kept to weigh and log the gap).
        started = time.time()
        rollout, engine = sample_rollout(trainer, prompts, settings, config.seed * 100_003 + step * 10_007 + 7919 * rank)
        rollout_time = time.time() - started

        # 3. Score: reference log-probs, values and reward scores (one forward each, in micro-batches),
        #    then KL-penalised rewards and advantages.
        started = time.time()
        scored = score(trainer, prompts, rollout, settings)

        # 4. Update: several epochs over shuffled minibatches, gradient accumulation over micro-batches.
        stats = ppo_update(
            trainer.accelerator, trainer.roles, trainer.optimizer, rollout, scored, settings, step, weights=engine.weights
        )
        trainer.scheduler.step()
        if trainer.engine is not None:  # the next rollout samples from the updated adapter
            trainer.engine.sync_adapter(trainer.roles.model, "policy")
        update_time = time.time() - started

        # 5. Log: every process steers β with the KL averaged over all of them, so β stays the same everywhere.
        record = log_step(trainer, step, settings, rollout, scored, stats, rollout_time, update_time) | engine.record()
        if trainer.accelerator.is_main_process:
            history.write(record)
            if wandb_run:
                wandb_run.log(record, step=step)
            if step % settings.sample_every == 0 or step == settings.steps:
                log_samples(history, wandb_run, step, prompts, rollout, trainer.roles.chat, scored.scores)

        # 6. Checkpoint: everything needed to resume exactly here, marked complete last; on SIGTERM,
        #    this step's checkpoint and a clean exit.
        stop = ctx.sigterm.requested()
        if (stop or step % settings.save_every == 0 and step < settings.steps) and trainer.accelerator.is_main_process:
            save_checkpoint(checkpoints, step, trainer)
        if stop:
            trainer.accelerator.wait_for_everyone()
            if wandb_run:
                wandb_run.finish()
            raise preempted("ppo", step, checkpoints / f"step-{step:06d}")

    # 7. Save: the policy adapter is the stage's product; the value adapter and head let PPO continue.
    return save(ctx, trainer, history, wandb_run)


def sample_prompts(rng: random.Random, prompts: list[Prompt], rows: int, samples_per_prompt: int) -> list[Prompt]:
    """`rows` / K distinct prompts (fewer when there are fewer), each K = `samples_per_prompt` times in a row."""
    count = min(rows // samples_per_prompt, len(prompts))
    return [prompts[i] for i in rng.sample(range(len(prompts)), count) for _ in range(samples_per_prompt)]


def ppo_sampling(settings) -> Sampling:
    return Sampling(settings.temperature, settings.top_p, settings.top_k)


def set_up(ctx: StageContext) -> Trainer:
    config, settings = ctx.config, ctx.config.ppo
    accelerator = Accelerator(cpu=pick_device(config.model) == "cpu")
    if config.generation.engine == "vllm" and accelerator.num_processes > 1:
        raise UserError(
            f"generation.engine vllm: one engine per training process is supported, not {accelerator.num_processes} "
            "data-parallel processes (set launch.num_processes: 1 or generation.engine: hf)"
        )
    set_seed(config.seed)
    release_freed_memory()  # earlier stages in this process may have left freed pages resident
    reset_peak_memory()
    backbone_dir = str(ctx.inputs["sft"] / "merged")
    tokenizer = load_tokenizer(backbone_dir, config.model.trust_remote_code)
    tokenizer.padding_side = "left"
    backbone = load_causal_lm(backbone_dir, config.model)
    if settings.gradient_checkpointing:  # the update keeps one layer's activations, not all of them
        enable_checkpointing_with_grad(backbone)
    external = read_external_reward_model(ctx.inputs["reward"])
    critic = settings.advantage_estimator == "gae"  # the others need no value adapter, head or forward
    model, value_head, reward_head = build_actor_critic(
        backbone, ctx.inputs["reward"], config, external=external is not None, critic=critic
    )
    reward_model = RewardModel.load(external, config.model, "reward.model", settings.micro_batch_size) if external else None
    sources = build_sources(settings.rewards, config.model, settings.max_new_tokens, settings.micro_batch_size)
    model.eval()  # no dropout: the log-probs of the update must match those of the rollout
    trainable = [p for n, p in model.named_parameters() if any(f".{a}." in n for a in TRAINABLE_ADAPTERS)]
    trainable += list(value_head.parameters()) if value_head is not None else []
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate, weight_decay=settings.weight_decay, eps=settings.adam_epsilon)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / settings.steps)
    chat = ChatFormat.of(tokenizer, backbone)
    prompts, too_long = load_prompts(
        ctx.inputs["instructions"] / "train.jsonl", chat, settings.num_prompts, config.seed, backbone, settings.max_new_tokens
    )
    engine = None
    if config.generation.engine == "vllm":  # beside the trainer's backbone, serving the same merged weights
        engine = VllmEngine(backbone_dir, config.model, config.generation, seed=config.seed,
                            lora_rank=lora_rank_for(config.lora, config.generation))
    return Trainer(
        accelerator=accelerator,
        roles=Roles(model, value_head, reward_head, trainable, chat),
        optimizer=optimizer,
        scheduler=scheduler,
        kl_ctl=kl_controller(settings.kl_coef, settings.target_kl, settings.kl_horizon),
        prompts=prompts,
        prompts_too_long=too_long,
        reward_model=reward_model,
        external=external,
        sources=sources,
        sampling=ppo_sampling(settings),
        engine=engine,
    )


def load_prompts(
    path: Path, chat: ChatFormat, count: int, seed: int, model=None, max_new_tokens: int = 0
) -> tuple[list[Prompt], int]:
    """Up to `count` chat prompts, tokenized once, and how many were dropped: with the `model`, prompts
    that leave no room for `max_new_tokens` in its context are dropped first."""
    prompts = [Prompt(m[:-1], chat.prompt_ids(m[:-1]), m[-1]["content"]) for m in read_conversations(path)]
    fits = fits_context(model, [p.ids for p in prompts], max_new_tokens, "ppo.max_new_tokens", "ppo") if model is not None else None
    fit = prompts if fits is None else [p for p, ok in zip(prompts, fits) if ok]
    if not fit:
        raise UserError(f"{path}: no prompts for PPO" + (" that fit the model's context" if prompts else ""))
    return random.Random(seed).sample(fit, min(count, len(fit))), len(prompts) - len(fit)


@dataclass(frozen=True)
class EngineGap:
    """How a vLLM rollout's sampling log-probs compare with the trainer's on the same tokens, and the
    truncated importance weights ([B, T], None without the correction) that the update applies."""

    gap_mean: float | None = None
    gap_max: float | None = None
    dropped_rows: int = 0
    """Rows holding a token outside the trainer's top-k / top-p (kept out of the update)."""
    weights: torch.Tensor | None = None
    recompute_time: float = 0.0

    def record(self) -> dict:
        if self.gap_mean is None:
            return {}
        return {
            "rollout/engine_logprob_gap_mean": self.gap_mean,
            "rollout/engine_logprob_gap_max": self.gap_max,
            "rollout/engine_rows_dropped": self.dropped_rows,
            "time/old_logprobs": self.recompute_time,
            **({"rollout/is_weight_mean": float(self.weights.sum() / self.weights.ne(0).sum().clamp(min=1))}
               if self.weights is not None else {}),
        }


@torch.no_grad()
def sample_rollout(trainer: Trainer, prompts: list[Prompt], settings, seed: int) -> tuple[Rollout, EngineGap]:
    """The step's rollout from the configured engine. With vLLM, the old log-probs are the trainer's forward
    on the sampled tokens (the engine sleeps meanwhile, on a GPU), compared with the engine's own."""
    batch = [p.ids for p in prompts]
    if trainer.engine is None:
        return generate_rollout(trainer.roles, batch, max_new_tokens=settings.max_new_tokens, sampling=trainer.sampling), EngineGap()
    device = next(trainer.roles.model.parameters()).device
    rollout = engine_rollout(trainer.engine, batch, max_new_tokens=settings.max_new_tokens, sampling=trainer.sampling,
                             seed=seed, device=device)
    trainer.engine.sleep()
    started = time.time()
    trainer_logprobs = in_micro_batches(lambda part: trainer.roles.policy_logprobs(part, trainer.sampling)[0],
                                        rollout, settings.micro_batch_size)
    rollout, engine_logprobs = with_trainer_logprobs(rollout, trainer_logprobs)
    gap_mean, gap_max = logprob_gap(rollout.logprobs, engine_logprobs, rollout.mask)
    cap = trainer.engine.generation.vllm_importance_correction
    weights = truncated_importance_weights(rollout.logprobs, engine_logprobs, rollout.mask, cap) if cap else None
    dropped = rollout.repaired
    return rollout, EngineGap(gap_mean, gap_max, dropped, weights, time.time() - started)


@torch.no_grad()
def score(trainer: Trainer, prompts: list[Prompt], rollout: Rollout, settings) -> ScoredRollout:
    roles, size, mask, beta = trainer.roles, settings.micro_batch_size, rollout.mask, trainer.kl_ctl.value
    ref_logprobs = in_micro_batches(lambda part: roles.reference_logprobs(part, trainer.sampling), rollout, size)
    values = in_micro_batches(roles.values, rollout, size) if roles.value_head is not None else None
    sourced = score_sources(trainer.sources, scoring_batch(trainer, prompts, rollout, size), mask.device)
    scores = sourced.total
    if settings.missing_eos_penalty is not None:
        scores = scores - settings.missing_eos_penalty * (~rollout.finished).float()
    scores = clip_scores(scores, settings.score_clip)
    reward_beta, loss_beta = (beta, 0.0) if settings.kl_in == "reward" else (0.0, beta)
    rewards, kl = kl_penalty_rewards(scores, rollout.logprobs, ref_logprobs, mask, reward_beta)
    scored = dict(scores=scores, by_source=sourced.by_source, ref_logprobs=ref_logprobs, kl=kl, kl_loss_coef=loss_beta)
    if values is None:  # critic-free: the group baseline on the last token, −β·kl on each (kl_in reward), summed to go
        baselined = group_advantages(scores, settings.samples_per_prompt, settings.advantage_estimator, settings.grpo_scale_by_std)
        advantages = reward_to_go(kl_penalty_rewards(baselined, rollout.logprobs, ref_logprobs, mask, reward_beta)[0], mask)
        return ScoredRollout(**scored, values=None, advantages=advantages, returns=None)
    if settings.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, settings.gamma, settings.lam)
    return ScoredRollout(**scored, values=values, advantages=masked_whiten(advantages, mask), returns=returns)


def scoring_batch(trainer: Trainer, prompts: list[Prompt], rollout: Rollout, size: int) -> ScoringBatch:
    """What the reward sources see; the reward stage's model scores only if a source asks for them."""
    return ScoringBatch(
        prompts=[p.messages for p in prompts],
        references=[p.reference for p in prompts],
        responses=decode_responses(trainer.roles.chat, rollout),
        finished=rollout.finished.tolist(),
        lengths=rollout.mask.sum(1).long().tolist(),
        model_scores=lambda: score_rollout(trainer.roles, trainer.reward_model, prompts, rollout, size).tolist(),
    )


def score_rollout(roles: Roles, reward_model: RewardModel | None, prompts: list[Prompt], rollout: Rollout, size: int) -> torch.Tensor:
    """[B] reward scores: the reward adapter's on the shared backbone, or the external reward model's on
    the prompts and decoded responses, rendered with its own tokenizer and template."""
    if reward_model is None:
        return in_micro_batches(roles.scores, rollout, size)
    texts = decode_responses(roles.chat, rollout)
    scores = reward_model.scores([p.messages for p in prompts], texts, rollout.finished.tolist())
    return torch.tensor(scores, device=rollout.mask.device)


# --- update -------------------------------------------------------------------------------------


def ppo_update(accelerator, roles: Roles, optimizer, rollout: Rollout, scored: ScoredRollout, settings, step: int,
               weights: torch.Tensor | None = None) -> UpdateStats:
    """`ppo_epochs` passes of shuffled minibatches, one optimizer step per minibatch; `weights` [B, T]: the
    truncated importance weights of a vLLM rollout (None: none)."""
    batch_size = rollout.input_ids.shape[0]
    sampling = ppo_sampling(settings)
    measured: list[UpdateStats] = []
    first_ratio_gap = 0.0
    for epoch in range(settings.ppo_epochs):
        order = torch.randperm(batch_size)
        for start in range(0, batch_size, settings.mini_batch_size):
            minibatch = by_prompt_length(rollout, order[start : start + settings.mini_batch_size])
            for rows in minibatch.split(settings.micro_batch_size):
                stats = micro_step(accelerator, roles, rollout, scored, rows, len(rows) / len(minibatch), sampling, settings, step,
                                   None if weights is None else weights[rows])
                measured.append(stats)
                if epoch == 0 and start == 0:  # before any optimizer step
                    first_ratio_gap = max(first_ratio_gap, stats.first_ratio_max_gap)
            average_gradients(accelerator, roles.trainable)
            grad_norm = accelerator.clip_grad_norm_(roles.trainable, settings.max_grad_norm)
            _check_finite(grad_norm, "gradient norm", step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return UpdateStats.mean(measured, first_ratio_gap)


def micro_step(
    accelerator, roles: Roles, rollout: Rollout, scored: ScoredRollout, rows, weight: float, sampling, settings, step: int,
    is_weights: torch.Tensor | None = None,
) -> UpdateStats:
    """Both losses' gradients on `rows`, weighted by their share of the minibatch; this micro-batch's
    statistics, with its max |ratio − 1| as `first_ratio_max_gap`.

    Policy and value use different adapters on the same backbone and train disjoint parameters: each loss
    goes backward before the other forward, so only one forward's activations are alive at a time (the
    same gradients as one backward of the sum)."""
    part = rollout.rows(rows)
    old_logprobs = rollout.logprobs[rows]
    release_freed_memory()
    logprobs, entropy = roles.policy_logprobs(part, sampling)
    gap = torch.where(part.mask.bool(), (logprobs.detach() - old_logprobs).exp() - 1, 0.0).abs().max()
    policy_loss, clipfrac, approxkl = ppo_policy_loss(
        logprobs, old_logprobs, scored.advantages[rows], part.mask, settings.clip_range, is_weights
    )
    kl_loss = kl_loss_k3(logprobs, scored.ref_logprobs[rows], part.mask) if settings.kl_in == "loss" else None
    loss = policy_loss if kl_loss is None else policy_loss + scored.kl_loss_coef * kl_loss
    _check_finite(loss, "policy loss", step)
    accelerator.backward(loss * weight)
    value_loss = value_clipfrac = None
    if scored.values is not None:
        release_freed_memory()
        values = roles.values(part)
        value_loss, value_clipfrac = ppo_value_loss(values, scored.values[rows], scored.returns[rows], part.mask, settings.clip_range_value)
        _check_finite(value_loss, "value loss", step)
        accelerator.backward(settings.vf_coef * value_loss * weight)
    return UpdateStats(
        approxkl=float(approxkl), clipfrac=float(clipfrac), policy_loss=float(policy_loss.detach()),
        value_loss=None if value_loss is None else float(value_loss.detach()),
        value_clipfrac=None if value_clipfrac is None else float(value_clipfrac),
        kl_loss=None if kl_loss is None else float(kl_loss.detach()),
        entropy=float(masked_mean(entropy, part.mask)), first_ratio_max_gap=float(gap),
    )


def average_gradients(accelerator, parameters) -> None:
    """Data parallelism over processes: each rank sampled its own prompts; average their gradients so
    every rank takes the same step. (DDP's wrapper cannot do it here: the roles call the backbone with
    different adapters switched on, not through one wrapped forward.)"""
    if accelerator.num_processes == 1:
        return
    for parameter in parameters:
        if parameter.grad is not None:
            parameter.grad = accelerator.reduce(parameter.grad, reduction="mean")


def _check_finite(value: torch.Tensor, what: str, step: int) -> None:
    if not torch.isfinite(value).all():
        raise NonFiniteTraining(
            f"ppo step {step}: non-finite {what} ({float(value)}); stopping. The last good checkpoint is kept "
            "and nothing is published: lower ppo.learning_rate or check the reward scale."
        )


# --- logging ------------------------------------------------------------------------------------


def log_step(trainer: Trainer, step: int, settings, rollout: Rollout, scored: ScoredRollout, stats: UpdateStats,
             rollout_time: float, update_time: float) -> dict:
    """The step's metrics line (objective, KL per sequence and per token, losses, lengths, timing, memory);
    updates β from the KL averaged over all processes and prints one line."""
    accelerator, mask, kl = trainer.accelerator, rollout.mask, scored.kl
    kl_per_sequence = (kl * mask).sum(1)
    kl_all_ranks = accelerator.reduce(kl_per_sequence.mean().detach(), reduction="mean").item()
    beta = trainer.kl_ctl.value  # this step's β, before the controller moves it
    trainer.kl_ctl.update(kl_all_ranks, settings.rollout_batch_size * accelerator.num_processes)
    record = {
        "step": step,
        "objective/scores": scored.scores.mean().item(),
        "objective/kl": kl_per_sequence.mean().item(),
        "objective/kl_all_ranks": kl_all_ranks,
        "objective/kl_per_token": masked_mean(kl, mask).item(),
        "objective/kl_k3": (kl_k3(rollout.logprobs, scored.ref_logprobs, mask)).sum(1).mean().item(),
        "objective/rlhf_reward": (scored.scores - beta * kl_per_sequence).mean().item(),
        **{f"reward/{name}": sum(values) / len(values) for name, values in scored.by_source.items()},
        **stats.record(),
        "val/response_length": mask.sum(1).mean().item(),
        "val/eos_fraction": rollout.finished.float().mean().item(),
        "val/nonfinite_samples": rollout.repaired,
        "kl_coef": trainer.kl_ctl.value,
        "learning_rate": trainer.scheduler.get_last_lr()[0],
        "time/rollout": rollout_time,
        "time/update": update_time,
        "tokens_per_second": (mask.sum().item() + rollout.prompt_tokens) / max(rollout_time + update_time, 1e-9),
        "memory/peak_mb": peak_memory_mb(),
    }
    if accelerator.is_main_process:
        console.print(
            f"ppo step {step}/{settings.steps}: score {record['objective/scores']:.3f} "
            f"kl {record['objective/kl']:.3f} entropy {record['objective/entropy']:.2f} "
            f"len {record['val/response_length']:.0f} ({rollout_time:.1f}s + {update_time:.1f}s)"
        )
    return record


def log_samples(history: StageHistory, wandb_run, step: int, prompts: list[Prompt], rollout: Rollout, chat: ChatFormat, scores) -> None:
    texts = decode_responses(chat, rollout)
    rows = [
        {
            "step": step,
            "prompt": chat.tokenizer.decode(prompts[i].ids, skip_special_tokens=True),
            "response": texts[i],
            "score": round(float(scores[i]), 4),
        }
        for i in range(min(4, len(prompts)))
    ]
    history.append("samples.jsonl", rows)
    if wandb_run:
        import wandb

        table = wandb.Table(columns=["step", "prompt", "response", "score"], data=[list(r.values()) for r in rows])
        wandb_run.log({"samples": table}, step=step)


# --- checkpoints and outputs --------------------------------------------------------------------


def save_checkpoint(checkpoints: Path, step: int, trainer: Trainer) -> None:
    """Adapters, heads, optimizer, scheduler, KL controller, RNG and step; `COMPLETE` written last."""
    directory = checkpoints / f"step-{step:06d}"
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    trainer.roles.model.save_pretrained(tmp / "adapters", selected_adapters=trainer.roles.trained_adapters)
    if trainer.roles.value_head is not None:
        save_file({"weight": trainer.roles.value_head_weight()}, tmp / "value_head.safetensors")
    torch.save(
        {
            "step": step,
            "optimizer": trainer.optimizer.state_dict(),
            "scheduler": trainer.scheduler.state_dict(),
            "kl_controller": trainer.kl_ctl.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        },
        tmp / "state.pt",
    )
    (tmp / "COMPLETE").write_text(str(step))
    tmp.rename(directory)


def load_checkpoint(checkpoints: Path, trainer: Trainer) -> int:
    """Restore the newest complete checkpoint; return its step (0 when there is none)."""
    complete = sorted(p for p in checkpoints.glob("step-*") if (p / "COMPLETE").exists() and not p.name.endswith(".tmp"))
    if not complete:
        return 0
    directory = complete[-1]
    for name in trainer.roles.trained_adapters:
        weights = load_file(directory / "adapters" / name / "adapter_model.safetensors")
        set_peft_model_state_dict(trainer.roles.model, weights, adapter_name=name)
    if trainer.roles.value_head is not None:
        with torch.no_grad():
            trainer.roles.value_head.weight.copy_(load_file(directory / "value_head.safetensors")["weight"])
    state = torch.load(directory / "state.pt", weights_only=True)
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.kl_ctl.load_state_dict(state["kl_controller"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])


def save(ctx: StageContext, trainer: Trainer, history: StageHistory, wandb_run) -> dict:
    """Publish the adapters, the value head and the whole history; the manifest's metrics."""
    accelerator, roles = trainer.accelerator, trainer.roles
    checksums = accelerator.gather(torch.tensor([roles.weights_checksum()], device=accelerator.device))
    kl_coefs = accelerator.gather(torch.tensor([trainer.kl_ctl.value], device=accelerator.device))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        roles.model.save_pretrained(ctx.out_dir / "policy", selected_adapters=["policy"])
        roles.chat.tokenizer.save_pretrained(ctx.out_dir / "policy")
        if roles.value_head is not None:  # the critic, to continue PPO from here
            roles.model.save_pretrained(ctx.out_dir / "value", selected_adapters=["value"])
            save_file({"weight": roles.value_head_weight()}, ctx.out_dir / "value" / "value_head.safetensors")
        _flatten_adapter_dirs(ctx.out_dir)
        history.publish(ctx.out_dir)
    if wandb_run:
        wandb_run.finish()
    if trainer.engine is not None:
        trainer.engine.close()
    records = history.records()
    first, last = records[0] if records else {}, records[-1] if records else {}
    return {
        "steps": ctx.config.ppo.steps,
        "score_first": first.get("objective/scores"),
        "score_last": last.get("objective/scores"),
        "kl_last": last.get("objective/kl"),
        "resident_backbones": count_resident_models(),
        "advantage_estimator": ctx.config.ppo.advantage_estimator,
        "resident_adapters": list(roles.model.peft_config),
        "value_head": roles.value_head is not None,
        "reward_model": f"external: {trainer.external}" if trainer.external else "reward stage adapter",
        "reward_sources": [{"name": c.metric, "kind": c.kind, "weight": c.weight} for c in ctx.config.ppo.rewards],
        "kl_in": ctx.config.ppo.kl_in,
        "prompts_too_long": trainer.prompts_too_long,
        "processes": accelerator.num_processes,
        "generation_engine": ctx.config.generation.engine,
        "ranks_agree": bool((checksums == checksums[0]).all()),
        "kl_coef_ranks_agree": bool((kl_coefs == kl_coefs[0]).all()),
        "peak_memory_mb": max((h["memory/peak_mb"] or 0 for h in records), default=None),
    }


def count_resident_models() -> int:
    """Live transformers models in this process: the one backbone that all four roles share."""
    import gc

    from transformers import PreTrainedModel

    gc.collect()
    models = [obj for obj in gc.get_objects() if isinstance(obj, PreTrainedModel)]
    # A causal LM holds its body (LlamaModel inside LlamaForCausalLM): count only the outermost.
    inner = {id(sub) for model in models for sub in model.modules() if sub is not model}
    return sum(1 for model in models if id(model) not in inner)


def _flatten_adapter_dirs(out_dir: Path) -> None:
    """PEFT saves a non-default adapter in a subfolder named after it: lift it to the top, so that
    `PeftModel.from_pretrained(base, out_dir / "policy")` works."""
    for name in ("policy", "value"):
        nested = out_dir / name / name
        if nested.is_dir():
            for item in nested.iterdir():
                item.rename(out_dir / name / item.name)
            nested.rmdir()
