"""The ppo stage: PPO with a per-token KL penalty against the SFT reference, on one resident backbone.

Model layout (what lets a 7B pipeline fit on one GPU): one copy of the merged SFT backbone carries
LoRA adapters, and the four roles of RLHF are views of it:
- policy: the trainable `policy` adapter (zero-initialised, so at step 0 it equals the reference);
- reference: the backbone with adapters disabled, which is the SFT model (merged, never the pre-SFT base);
- reward: the frozen `reward` adapter and score head from the reward stage;
- value: the trainable `value` adapter and value head, initialised from the reward model.
The loop follows InstructGPT / Ziegler et al. (2019) and "The N+ implementation details of RLHF with
PPO" (Huang et al. 2024). Its math lives in ppo_math.py.

Outputs: `policy/` (the policy adapter), `value/` (value adapter and `value_head.safetensors`),
`metrics.jsonl` (one line per step), `samples.jsonl` (prompts, responses and scores every N steps).
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model, set_peft_model_state_dict
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import LogitsProcessor

from rlhf.data_builders.instructions import read_conversations
from rlhf.errors import UserError
from rlhf.generation import decoding
from rlhf.memory import peak_memory_mb, release_freed_memory, reset_peak_memory
from rlhf.models import enable_checkpointing_with_grad, load_causal_lm, load_tokenizer, peft_lora_config, pick_device
from rlhf.runner import StageContext
from rlhf.stages.ppo_math import (
    clip_scores,
    entropy_from_logits,
    gae,
    kl_controller,
    kl_k3,
    kl_penalty_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    truncate_after_eos,
)
from rlhf.tracking import MetricsFile, start_wandb
from rlhf.training import NonFiniteTraining

console = Console(highlight=False, soft_wrap=True)
TRAINABLE_ADAPTERS = ("policy", "value")


def run(ctx: StageContext) -> dict:
    config, settings = ctx.config, ctx.config.ppo
    accelerator = Accelerator(cpu=pick_device(config.model) == "cpu")
    set_seed(config.seed)
    release_freed_memory()  # earlier stages in this process may have left freed pages resident
    reset_peak_memory()

    # 1. Setup: one backbone with policy / value / reward adapters and their heads.
    backbone_dir = str(ctx.inputs["sft"] / "merged")
    tokenizer = load_tokenizer(backbone_dir, config.model.trust_remote_code)
    tokenizer.padding_side = "left"
    backbone = load_causal_lm(backbone_dir, config.model)
    if settings.gradient_checkpointing:  # the update keeps one layer's activations, not all of them
        enable_checkpointing_with_grad(backbone)
    model, value_head, reward_head = build_actor_critic(backbone, ctx.inputs["reward"], config)
    model.eval()  # no dropout: the log-probs of the update must match those of the rollout
    trainable = [p for n, p in model.named_parameters() if any(f".{a}." in n for a in TRAINABLE_ADAPTERS)]
    trainable += list(value_head.parameters())
    optimizer = torch.optim.AdamW(trainable, lr=settings.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / settings.steps)
    kl_ctl = kl_controller(settings.kl_coef, settings.target_kl, settings.kl_horizon)
    prompt_counts: dict = {}  # prompts dropped for leaving no room for ppo.max_new_tokens in the context
    prompts = load_prompts(
        ctx.inputs["instructions"] / "train.jsonl", tokenizer, settings.num_prompts, config.seed,
        backbone, settings.max_new_tokens, prompt_counts,
    )
    roles = Roles(model, value_head, reward_head, trainable)
    rank = accelerator.process_index  # under `accelerate launch`, each process samples its own prompts

    checkpoints = ctx.work_dir / "checkpoints"
    start_step = load_checkpoint(checkpoints, roles, optimizer, scheduler, kl_ctl)
    if start_step:
        console.print(f"ppo: resuming after step {start_step} from {checkpoints}")
    wandb_run = start_wandb(config, "ppo", ctx.run_dir) if accelerator.is_main_process else None
    metrics = MetricsFile(ctx.out_dir / "metrics.jsonl")
    samples_file = ctx.out_dir / "samples.jsonl"
    rng = random.Random(config.seed + 7919 * rank)
    history: list[dict] = []

    for step in range(1, settings.steps + 1):
        batch = [prompts[i] for i in rng.sample(range(len(prompts)), min(settings.rollout_batch_size, len(prompts)))]
        if step <= start_step:
            continue  # replay the prompt sampler so a resumed run sees the same prompts
        torch.manual_seed(config.seed * 100_003 + step + 7919 * rank)

        # 2. Rollout: sample responses with the policy, cut after EOS, count repaired samples.
        started = time.time()
        rollout = generate_rollout(
            roles, tokenizer, batch, max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
            top_p=settings.top_p, top_k=settings.top_k,
        )
        rollout_time = time.time() - started

        # 3. Score: reference log-probs, values and reward scores, one forward each, in micro-batches.
        # The old log-probs came with the rollout, from the logits it sampled from.
        started = time.time()
        logprobs = rollout["logprobs"]
        with torch.no_grad():
            size = settings.micro_batch_size
            ref_logprobs = in_micro_batches(lambda part: roles.reference_logprobs(part, settings.temperature), rollout, size)
            values = in_micro_batches(roles.values, rollout, size)
            scores = in_micro_batches(roles.scores, rollout, size)
        if settings.missing_eos_penalty is not None:
            scores = scores - settings.missing_eos_penalty * (~rollout["finished"]).float()
        scores = clip_scores(scores, settings.score_clip)
        mask = rollout["mask"]
        rewards, kl = kl_penalty_rewards(scores, logprobs, ref_logprobs, mask, kl_ctl.value)
        if settings.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False)
        advantages, returns = gae(rewards, values, mask, settings.gamma, settings.lam)
        advantages = masked_whiten(advantages, mask)

        # 4. Update: several epochs over shuffled minibatches, gradient accumulation over micro-batches.
        stats = ppo_update(accelerator, roles, optimizer, rollout, logprobs, values, advantages, returns, settings, step)
        scheduler.step()
        update_time = time.time() - started

        # 5. Log: objective, KL (per sequence and per token), losses, lengths, timing, memory.
        kl_per_sequence = (kl * mask).sum(1)
        kl_ctl.update(kl_per_sequence.mean().item(), settings.rollout_batch_size)
        record = {
            "step": step,
            "objective/scores": scores.mean().item(),
            "objective/kl": kl_per_sequence.mean().item(),
            "objective/kl_per_token": masked_mean(kl, mask).item(),
            "objective/kl_k3": (kl_k3(logprobs, ref_logprobs, mask)).sum(1).mean().item(),
            "objective/rlhf_reward": (rewards * mask).sum(1).mean().item(),  # score − β·KL per sequence
            "objective/entropy": stats.pop("entropy"),
            **stats,
            "val/response_length": mask.sum(1).mean().item(),
            "val/eos_fraction": rollout["finished"].float().mean().item(),
            "val/nonfinite_samples": rollout["repaired"],
            "kl_coef": kl_ctl.value,
            "learning_rate": scheduler.get_last_lr()[0],
            "time/rollout": rollout_time,
            "time/update": update_time,
            "tokens_per_second": (mask.sum().item() + rollout["prompt_tokens"]) / max(rollout_time + update_time, 1e-9),
            "memory/peak_mb": peak_memory_mb(),
        }
        history.append(record)
        if accelerator.is_main_process:
            metrics.write(record)
            if wandb_run:
                wandb_run.log(record, step=step)
            console.print(
                f"ppo step {step}/{settings.steps}: score {record['objective/scores']:.3f} "
                f"kl {record['objective/kl']:.3f} entropy {record['objective/entropy']:.2f} "
                f"len {record['val/response_length']:.0f} ({rollout_time:.1f}s + {update_time:.1f}s)"
            )
            if step % settings.sample_every == 0 or step == settings.steps:
                log_samples(samples_file, wandb_run, step, batch, rollout, tokenizer, scores)

        # 6. Checkpoint: everything needed to resume exactly here, marked complete last.
        if step % settings.save_every == 0 and step < settings.steps and accelerator.is_main_process:
            save_checkpoint(checkpoints, step, roles, optimizer, scheduler, kl_ctl)

    # Save: the policy adapter is the stage's product; the value adapter and head let PPO continue.
    checksums = accelerator.gather(torch.tensor([weights_checksum(roles)], device=accelerator.device))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        roles.model.save_pretrained(ctx.out_dir / "policy", selected_adapters=["policy"])
        tokenizer.save_pretrained(ctx.out_dir / "policy")
        roles.model.save_pretrained(ctx.out_dir / "value", selected_adapters=["value"])
        save_file({"weight": value_head_weight(roles)}, ctx.out_dir / "value" / "value_head.safetensors")
        _flatten_adapter_dirs(ctx.out_dir)
    if wandb_run:
        wandb_run.finish()
    first, last = history[0] if history else {}, history[-1] if history else {}
    return {
        "steps": settings.steps,
        "score_first": first.get("objective/scores"),
        "score_last": last.get("objective/scores"),
        "kl_last": last.get("objective/kl"),
        "resident_backbones": count_resident_models(),
        "prompts_too_long": prompt_counts["too_long"],
        "processes": accelerator.num_processes,
        "ranks_agree": bool((checksums == checksums[0]).all()),
        "peak_memory_mb": max((h["memory/peak_mb"] for h in history), default=None),
    }


# --- the four roles on one backbone -------------------------------------------------------------


def build_actor_critic(backbone, reward_dir: Path, config):
    """Wrap the backbone with the policy, value and reward adapters; return it with the value and reward heads."""
    reward_lora = PeftLoraConfig.from_pretrained(reward_dir / "adapter")
    reward_lora = PeftLoraConfig(
        r=reward_lora.r,
        lora_alpha=reward_lora.lora_alpha,
        lora_dropout=0.0,
        target_modules=reward_lora.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(backbone, peft_lora_config(config.lora), adapter_name="policy")
    reward_weights = load_file(reward_dir / "adapter" / "adapter_model.safetensors")
    score_weight = reward_weights.pop("base_model.model.score.weight")
    for name in ("reward", "value"):
        model.add_adapter(name, reward_lora)
        result = set_peft_model_state_dict(model, reward_weights, adapter_name=name)
        if result.unexpected_keys:
            raise RuntimeError(f"reward adapter does not fit the backbone: {result.unexpected_keys[:3]}")
    hidden = backbone.config.hidden_size
    device = next(backbone.parameters()).device
    reward_head = torch.nn.Linear(hidden, 1, bias=False).to(device)
    value_head = torch.nn.Linear(hidden, 1, bias=False).to(device)
    with torch.no_grad():
        reward_head.weight.copy_(score_weight)
        value_head.weight.copy_(score_weight)
    reward_head.requires_grad_(False)
    return model, value_head, reward_head


class Roles:
    """Forward passes for each role: the same backbone with a different adapter switched on."""

    def __init__(self, model, value_head, reward_head, trainable):
        self.model, self.value_head, self.reward_head, self.trainable = model, value_head, reward_head, trainable

    def use(self, adapter: str) -> None:
        # PEFT's set_adapter also flips requires_grad: freeze everything, then re-enable what we train.
        self.model.base_model.set_adapter(adapter, inference_mode=True)
        for parameter in self.trainable:
            parameter.requires_grad_(True)

    def _hidden(self, rollout: dict) -> torch.Tensor:
        inner = self.model.base_model.model.model  # the transformer body, without the LM head
        output = inner(
            input_ids=rollout["input_ids"], attention_mask=rollout["attention_mask"], position_ids=rollout["position_ids"]
        )
        return output.last_hidden_state

    def _response_logits(self, rollout: dict, temperature: float) -> torch.Tensor:
        context = rollout["context_length"]
        # Hidden state t predicts token t+1. Only the response's positions go through the LM head:
        # with a 49k vocabulary, the prompt's logits would cost more than the backbone. (The LM head
        # makes the strided slice contiguous first: rlhf.models._contiguous_input says why.)
        hidden = self._hidden(rollout)[:, context - 1 : -1]
        return self.model.base_model.model.lm_head(hidden).float() / temperature

    def policy_logprobs(self, rollout: dict, temperature: float):
        """([B, T] log-probs of the response tokens, [B, T] entropy): the update's forward."""
        self.use("policy")
        logits = self._response_logits(rollout, temperature)
        with torch.no_grad():  # logged, not trained on: no [B, T, V] softmax kept for the backward
            entropy = entropy_from_logits(logits.detach())
        return logprobs_from_logits(logits, rollout["input_ids"][:, rollout["context_length"] :]), entropy

    def reference_logprobs(self, rollout: dict, temperature: float) -> torch.Tensor:
        """[B, T] log-probs of the response tokens under the reference."""
        with self.model.disable_adapter():  # the merged SFT model itself
            logits = self._response_logits(rollout, temperature)
        return logprobs_from_logits(logits, rollout["input_ids"][:, rollout["context_length"] :])

    def values(self, rollout: dict) -> torch.Tensor:
        """[B, T]: the value of the state before each response token."""
        self.use("value")
        hidden = self._hidden(rollout)[:, rollout["context_length"] - 1 : -1]
        return self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()

    def scores(self, rollout: dict) -> torch.Tensor:
        """[B]: the reward model's score at each sequence's last real token, as in reward training."""
        self.use("reward")
        hidden = self._hidden(rollout)
        last = rollout["context_length"] + rollout["mask"].sum(1).long() - 1
        at_last = hidden[torch.arange(hidden.shape[0]), last]
        return self.reward_head(at_last.to(self.reward_head.weight.dtype)).squeeze(-1).float()


def micro_batch(rollout: dict, rows: torch.Tensor) -> dict:
    """The rollout's `rows`, without the left-padding columns they all share: a micro-batch of short
    prompts runs on short sequences. Position ids count real tokens, so nothing else changes."""
    context = rollout["context_length"]
    shared = int((context - rollout["attention_mask"][rows, :context].sum(1)).min())
    return {
        "input_ids": rollout["input_ids"][rows, shared:],
        "attention_mask": rollout["attention_mask"][rows, shared:],
        "position_ids": rollout["position_ids"][rows, shared:],
        "context_length": context - shared,
        "mask": rollout["mask"][rows],
    }


def by_prompt_length(rollout: dict, rows: torch.Tensor) -> torch.Tensor:
    """`rows` ordered by prompt length, so that micro-batches cut from them share most of their padding
    (on the bench's 16 prompts of 37-102 tokens, 19% fewer tokens than in arrival order)."""
    lengths = rollout["attention_mask"][rows, : rollout["context_length"]].sum(1).cpu()
    return rows[torch.argsort(lengths, stable=True)]


def in_micro_batches(forward, rollout: dict, size: int) -> torch.Tensor:
    """forward(micro-batch) over the whole rollout, `size` rows of similar prompt length at a time,
    in the rollout's row order: scoring peaks at one micro-batch's activations and logits."""
    order = by_prompt_length(rollout, torch.arange(rollout["input_ids"].shape[0]))
    outputs = torch.cat([forward(micro_batch(rollout, rows)) for rows in order.split(size)])
    return torch.empty_like(outputs).index_copy_(0, order.to(outputs.device), outputs)


def weights_checksum(roles: Roles) -> float:
    """A fingerprint of the trained weights, to check that every process ended with the same ones."""
    return float(sum(p.detach().double().sum() + p.detach().double().abs().sum() * 1e-3 for p in roles.trainable))


def value_head_weight(roles: Roles) -> torch.Tensor:
    return roles.value_head.weight.detach().float().cpu().contiguous()


# --- rollout ------------------------------------------------------------------------------------


class RepairNonFinite(LogitsProcessor):
    """Sampling fails on inf/nan/negative probabilities ("probability tensor contains either inf, nan
    or element < 0"). Rows with non-finite scores are repaired (nan → -inf; a row with nothing finite
    left allows every token) and counted, and their samples are left out of the update."""

    def __init__(self):
        self.bad_rows: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
        if bad.any():
            scores = torch.nan_to_num(scores, nan=float("-inf"), posinf=torch.finfo(scores.dtype).max)
            empty = torch.isneginf(scores).all(dim=-1)
            scores[empty] = 0.0
            self.bad_rows = bad if self.bad_rows is None else self.bad_rows | bad
        return scores


@torch.no_grad()
def generate_rollout(
    roles: Roles, tokenizer, batch: list[list[int]], *, max_new_tokens: int, temperature: float,
    top_p: float = 1.0, top_k: int = 0, adapter: str | None = "policy",
) -> dict:
    """Left-padded prompts + responses sampled with `adapter` on (None: adapters off, the SFT model;
    temperature 0: greedy), cut after EOS, with masks, position ids, EOS bookkeeping and the log-probs
    of the response tokens (at `temperature`, or 1 when greedy) from the logits they were drawn from."""
    width = max(len(p) for p in batch)
    pad = tokenizer.pad_token_id
    device = next(roles.model.parameters()).device
    prompt_ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
    guard = RepairNonFinite()
    roles.use(adapter or "policy")
    with roles.model.disable_adapter() if adapter is None else contextlib.nullcontext():
        output = roles.model.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=max_new_tokens,
            **decoding(temperature, top_p, top_k, first=(guard,)),
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
            output_logits=True,  # raw logits, before temperature and top-p: the model's own distribution
            return_dict_in_generate=True,
        )
    responses, mask, finished = truncate_after_eos(output.sequences[:, width:], tokenizer.eos_token_id, pad)
    if guard.bad_rows is not None:  # a repaired sample is not the policy's: keep it out of the update
        mask = mask * (~guard.bad_rows).float().unsqueeze(1)
    # PPO's old log-probs come from the logits the tokens were sampled from (as TRL's do), which saves
    # one forward per rollout; one step at a time, so no [B, T, V] tensor is built.
    logprobs = torch.stack(
        [logprobs_from_logits(step_logits.float() / (temperature or 1.0), responses[:, t])
         for t, step_logits in enumerate(output.logits)], dim=1,
    )
    logprobs = torch.where(mask.bool(), logprobs, torch.zeros_like(logprobs))  # repaired rows may hold nan
    attention_mask = torch.cat([prompt_mask, mask.long()], dim=1)
    return {
        "logprobs": logprobs,
        "input_ids": torch.cat([prompt_ids, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(1) - 1).clamp(min=0),
        "context_length": width,
        "mask": mask,
        "finished": finished,
        "repaired": int(guard.bad_rows.sum().item()) if guard.bad_rows is not None else 0,
        "prompt_tokens": int(prompt_mask.sum().item()),
    }


# --- update -------------------------------------------------------------------------------------


def ppo_update(accelerator, roles, optimizer, rollout, old_logprobs, old_values, advantages, returns, settings, step) -> dict:
    batch_size = rollout["input_ids"].shape[0]
    keys = ("policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac", "entropy")
    totals: dict[str, list[float]] = {key: [] for key in keys}
    for _ in range(settings.ppo_epochs):
        order = torch.randperm(batch_size)
        for start in range(0, batch_size, settings.mini_batch_size):
            minibatch = by_prompt_length(rollout, order[start : start + settings.mini_batch_size])
            for rows in minibatch.split(settings.micro_batch_size):
                part = micro_batch(rollout, rows)
                mask = part["mask"]
                weight = len(rows) / len(minibatch)
                release_freed_memory()
                # Policy and value use different adapters on the same backbone, and train disjoint
                # parameters: each loss goes backward before the other forward, so only one forward's
                # activations are alive at a time (the same gradients as one backward of the sum).
                logprobs, entropy = roles.policy_logprobs(part, settings.temperature)
                policy_loss, clipfrac, approxkl = ppo_policy_loss(
                    logprobs, old_logprobs[rows], advantages[rows], mask, settings.clip_range
                )
                _check_finite(policy_loss, "policy loss", step)
                accelerator.backward(policy_loss * weight)
                release_freed_memory()
                values = roles.values(part)
                value_loss, value_clipfrac = ppo_value_loss(
                    values, old_values[rows], returns[rows], mask, settings.clip_range_value
                )
                _check_finite(value_loss, "value loss", step)
                accelerator.backward(settings.vf_coef * value_loss * weight)
                measured = (approxkl, clipfrac, policy_loss, value_loss, value_clipfrac, masked_mean(entropy, mask))
                for key, value in zip(keys, measured):
                    totals[key].append(float(value.detach()))
            average_gradients(accelerator, roles.trainable)
            grad_norm = accelerator.clip_grad_norm_(roles.trainable, settings.max_grad_norm)
            _check_finite(grad_norm, "gradient norm", step)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return {key: sum(v) / len(v) for key, v in totals.items()}


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


# --- data, logging, checkpoints -----------------------------------------------------------------


def load_prompts(
    path: Path, tokenizer, count: int, seed: int, model=None, max_new_tokens: int = 0, counts: dict | None = None
) -> list[list[int]]:
    """Token ids of up to `count` chat prompts, tokenized once. With the `model`, prompts that leave no room
    for `max_new_tokens` in its context are dropped first; `counts["too_long"]` says how many."""
    from rlhf.models import prompt_budget

    prompts = []
    for messages in read_conversations(path):
        encoded = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
        prompts.append(list(encoded["input_ids"]))
    budget = prompt_budget(model, max_new_tokens, "ppo.max_new_tokens") if model is not None else None
    fit = [p for p in prompts if budget is None or len(p) <= budget]
    if counts is not None:
        counts["too_long"] = len(prompts) - len(fit)
    if len(fit) < len(prompts):
        console.print(
            f"ppo: dropped {len(prompts) - len(fit)} of {len(prompts)} prompts longer than {budget} tokens "
            f"(the model's context minus ppo.max_new_tokens={max_new_tokens})"
        )
    if not fit:
        raise UserError(f"{path}: no prompts for PPO" + (f" of at most {budget} tokens" if prompts else ""))
    return random.Random(seed).sample(fit, min(count, len(fit)))


def log_samples(path: Path, wandb_run, step: int, batch, rollout, tokenizer, scores) -> None:
    context = rollout["context_length"]
    rows = []
    for i in range(min(4, len(batch))):
        length = int(rollout["mask"][i].sum().item())
        rows.append(
            {
                "step": step,
                "prompt": tokenizer.decode(batch[i], skip_special_tokens=True),
                "response": tokenizer.decode(rollout["input_ids"][i, context : context + length], skip_special_tokens=True),
                "score": round(float(scores[i]), 4),
            }
        )
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    if wandb_run:
        import wandb

        table = wandb.Table(columns=["step", "prompt", "response", "score"], data=[list(r.values()) for r in rows])
        wandb_run.log({"samples": table}, step=step)


def count_resident_models() -> int:
    """Live transformers models in this process: the one backbone that all four roles share."""
    import gc

    from transformers import PreTrainedModel

    gc.collect()
    models = [obj for obj in gc.get_objects() if isinstance(obj, PreTrainedModel)]
    # A causal LM holds its body (LlamaModel inside LlamaForCausalLM): count only the outermost.
    inner = {id(sub) for model in models for sub in model.modules() if sub is not model}
    return sum(1 for model in models if id(model) not in inner)


def save_checkpoint(checkpoints: Path, step: int, roles: Roles, optimizer, scheduler, kl_ctl) -> None:
    """Adapters, heads, optimizer, scheduler, KL controller, RNG and step; `COMPLETE` written last."""
    directory = checkpoints / f"step-{step:06d}"
    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    roles.model.save_pretrained(tmp / "adapters", selected_adapters=list(TRAINABLE_ADAPTERS))
    save_file({"weight": value_head_weight(roles)}, tmp / "value_head.safetensors")
    torch.save(
        {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "kl_controller": kl_ctl.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
        },
        tmp / "state.pt",
    )
    (tmp / "COMPLETE").write_text(str(step))
    tmp.rename(directory)


def load_checkpoint(checkpoints: Path, roles: Roles, optimizer, scheduler, kl_ctl) -> int:
    """Restore the newest complete checkpoint; return its step (0 when there is none)."""
    complete = sorted(p for p in checkpoints.glob("step-*") if (p / "COMPLETE").exists() and not p.name.endswith(".tmp"))
    if not complete:
        return 0
    directory = complete[-1]
    for name in TRAINABLE_ADAPTERS:
        weights = load_file(directory / "adapters" / name / "adapter_model.safetensors")
        set_peft_model_state_dict(roles.model, weights, adapter_name=name)
    with torch.no_grad():
        roles.value_head.weight.copy_(load_file(directory / "value_head.safetensors")["weight"])
    state = torch.load(directory / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    kl_ctl.load_state_dict(state["kl_controller"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    return int(state["step"])


def _flatten_adapter_dirs(out_dir: Path) -> None:
    """PEFT saves a non-default adapter in a subfolder named after it: lift it to the top, so that
    `PeftModel.from_pretrained(base, out_dir / "policy")` works."""
    for name in ("policy", "value"):
        nested = out_dir / name / name
        if nested.is_dir():
            for item in nested.iterdir():
                item.rename(out_dir / name / item.name)
            nested.rmdir()

