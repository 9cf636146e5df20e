"""The reward stage: a Bradley-Terry reward model on the merged SFT backbone, LoRA or QLoRA.

Outputs:
- `adapter/`: the LoRA adapter with the score head (PEFT's modules_to_save), and `score_head.safetensors`:
  what the PPO stage loads onto its one resident backbone;
- `model/`: a standalone `AutoModelForSequenceClassification` (adapter merged) that any tool can load;
- `metrics.jsonl`, and the held-out pairwise accuracy and mean margin in the manifest.
Pairs are tokenized here, by rlhf.chat_format (`reward_ids`), not by TRL: the reward model learns its score
at exactly the position where preferences, ppo and evaluate read it (rlhf.reward.readout), and a response
cut at the length limit is shown to it unfinished.
With `reward.model` set, an existing reward model is evaluated and used as is: `external.json` names it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers.modeling_outputs import SequenceClassifierOutput
from trl import RewardConfig, RewardTrainer

from rlhf.chat_format import ChatFormat
from rlhf.data_builders.json_files import iter_json_records, read_utf8
from rlhf.errors import UserError
from rlhf.generation import CACHE_ARGUMENT, shared_prefix_cache
from rlhf.models import load_reward_model, load_tokenizer, peft_lora_config
from rlhf.reward.readout import RewardModel
from rlhf.runner import StageContext
from rlhf.tracking import MetricsFile, MetricsFileCallback, StageHistory, start_wandb
from rlhf.training import (
    MarkCheckpointComplete,
    SaveAndStopOnSigterm,
    StopOnNonFinite,
    last_checkpoint,
    resumed_step,
    save_merged,
    stop_if_preempted,
    trainer_arguments,
)

console = Console(highlight=False, soft_wrap=True)


def run(ctx: StageContext) -> dict:
    config, settings = ctx.config, ctx.config.reward
    train_pairs = load_pairs(ctx.inputs["preferences"] / "train.jsonl")
    eval_pairs = load_pairs(ctx.inputs["preferences"] / "eval.jsonl")
    if settings.model:
        return use_external_reward_model(ctx, eval_pairs)

    # 1. Setup: the merged SFT model as a classifier with one output; LoRA (QLoRA when 4-bit); the pairs
    #    as the readout's token ids.
    backbone = str(ctx.inputs["sft"] / "merged")
    tokenizer = load_tokenizer(backbone, config.model.trust_remote_code)
    model = load_reward_model(backbone, config.model, tokenizer, quantize=True)
    chat = ChatFormat.of(tokenizer)
    train, evaluation = tokenize_pairs(train_pairs, chat), tokenize_pairs(eval_pairs, chat)
    wandb_run = start_wandb(config, "reward", ctx.run_dir)
    checkpoints = ctx.work_dir / "checkpoints"
    resume = last_checkpoint(checkpoints)
    history = StageHistory(ctx.work_dir, resumed_step(resume))  # metrics.jsonl of every attempt
    stop = SaveAndStopOnSigterm(ctx.sigterm)
    trainer = build_trainer(config, model, tokenizer, (train, evaluation), checkpoints, history, stop, wandb_run is not None)
    too_long = count_too_long(trainer, len(train), len(evaluation), settings.max_length)
    eval_pairs = len(trainer.eval_dataset)

    # 2. Train; held-out pairwise accuracy and margin before and after.
    before = trainer.evaluate()
    if resume:
        console.print(f"reward: resuming from {resume}")
    else:
        history.write({"step": 0, **before})
    trainer.train(resume_from_checkpoint=resume)
    stop_if_preempted(stop, "reward", checkpoints)
    after = trainer.evaluate()
    train_steps = trainer.state.global_step
    console.print(
        f"reward: held-out accuracy {before['eval_accuracy']:.3f} -> {after['eval_accuracy']:.3f}, "
        f"margin {before['eval_margin']:.3f} -> {after['eval_margin']:.3f} ({eval_pairs} pairs)"
    )

    # 3. Save the adapter and score head (for PPO's shared backbone) and a standalone merged model.
    #    Every process calls save_model (under ZeRO-3 it gathers the sharded weights); rank 0 writes.
    adapter_dir = ctx.out_dir / "adapter"
    trainer.save_model(str(adapter_dir))
    processes, main_process = trainer.args.world_size, trainer.is_world_process_zero()
    del trainer, model
    if main_process:
        publish(ctx, tokenizer, backbone, history)
    result = {
        "eval_accuracy": after["eval_accuracy"],
        "eval_margin": after["eval_margin"],
        "eval_accuracy_before": before["eval_accuracy"],
        "eval_pairs": eval_pairs,
        "train_pairs": len(train_pairs),
        **too_long,
        "train_steps": train_steps,
        "processes": processes,
    }
    if wandb_run:
        wandb_run.summary.update(result)
        wandb_run.finish()
    return result


def build_trainer(config, model, tokenizer, data, checkpoints, history: StageHistory, stop, wandb: bool) -> RewardTrainer:
    """TRL's RewardTrainer with LoRA (a score head trained whole), dropout off, checkpoints marked complete."""
    args = RewardConfig(
        **trainer_arguments(config.reward, config, checkpoints, "reward", wandb),
        center_rewards_coefficient=config.reward.center_rewards_coefficient,
        disable_dropout=True,
        remove_unused_columns=False,  # keeps `length` for the sampler; TRL's collator reads only the ids
    )
    return GuardedRewardTrainer(
        model=model,
        args=args,
        train_dataset=data[0],
        eval_dataset=data[1],
        processing_class=tokenizer,
        peft_config=peft_lora_config(config.lora, task_type="SEQ_CLS"),
        callbacks=[MetricsFileCallback(history.metrics), MarkCheckpointComplete(), stop],
        stage="reward",
    )


def count_too_long(trainer, train_pairs: int, eval_pairs: int, max_length: int) -> dict:
    """TRL drops pairs whose chosen or rejected conversation is longer than reward.max_length: count them,
    and stop in one line when nothing is left of a split."""
    too_long = {
        "train_dropped_too_long": train_pairs - len(trainer.train_dataset),
        "eval_dropped_too_long": eval_pairs - len(trainer.eval_dataset),
    }
    if any(too_long.values()):
        console.print(
            f"reward: dropped {too_long['train_dropped_too_long']} training and {too_long['eval_dropped_too_long']} "
            f"held-out pairs longer than reward.max_length={max_length} tokens"
        )
    for name, prepared in (("training", trainer.train_dataset), ("held-out", trainer.eval_dataset)):
        if not len(prepared):
            raise UserError(f"reward: every {name} pair is longer than reward.max_length={max_length} tokens: raise reward.max_length")
    return too_long


def publish(ctx: StageContext, tokenizer, backbone: str, history: StageHistory) -> None:
    """Beside the saved adapter: the tokenizer, the score head alone, a standalone merged model, the history."""
    adapter_dir = ctx.out_dir / "adapter"
    (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # pickled: publish safetensors only
    tokenizer.save_pretrained(adapter_dir)
    # The score head as saved with the adapter (PEFT's modules_to_save): whole, whatever the sharding.
    score = load_file(adapter_dir / "adapter_model.safetensors")["base_model.model.score.weight"]
    save_file({"weight": score.float().contiguous()}, ctx.out_dir / "score_head.safetensors")
    load = lambda path, model_config: load_reward_model(path, model_config, tokenizer)  # noqa: E731
    save_merged(load, backbone, adapter_dir, ctx.out_dir / "model", ctx.config)
    history.publish(ctx.out_dir)


class GuardedRewardTrainer(StopOnNonFinite, RewardTrainer):
    """TRL's RewardTrainer, stopped by a non-finite loss or gradient (rlhf.training.StopOnNonFinite), with
    each pair's prompt run once (PromptOnce): TRL's loss and metrics, on the same logits. Under a launcher the
    model is wrapped (DDP, DeepSpeed), and a wrapper syncs gradients from its own one forward per step: there
    every row runs whole."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.accelerator.unwrap_model(model) is model:
            model = PromptOnce(model, self.processing_class.pad_token_id)
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


@dataclass
class PromptOnce:
    """The reward model's forward on TRL's batch of pairs ([2B, L] right-padded: B chosen rows, then their B
    rejected rows), running the tokens a pair's two rows begin with (its prompt, and any words both answers
    start with) once. Each row is laid out as that shared prefix, left-padded, then its own tail; the
    prefix's keys and values, computed with gradients, feed both rows (rlhf.generation.shared_prefix_cache),
    and the model reads its score at the last token of the tail: where it reads it on the whole row. The same
    logits and gradients as `model(**inputs)`."""

    model: object
    pad_id: int

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, use_cache: bool = False):
        layout = prefix_layout(input_ids, attention_mask, self.pad_id)
        cache = None
        if layout is not None:
            ids, mask, width = layout
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            cache = shared_prefix_cache(self.model, ids, mask, positions, width)  # None under activation checkpointing
        if cache is None:  # whole rows
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        start = width - 1
        output = self.model(input_ids=ids[:, start:], attention_mask=mask, position_ids=positions[:, start:], **{CACHE_ARGUMENT: cache})
        return SequenceClassifierOutput(logits=output.logits)


def prefix_layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """TRL's [2B, L] right-padded pair rows re-laid as ([2B, W + T] ids, mask, W): row r holds its pair's
    shared prefix (the leading tokens both rows of the pair have) right-aligned in the first W columns, then its
    own remaining tokens, right-padded. Both rows of a pair are equal in their first W columns. None when the
    prefixes once and the tails (B·(W − 1) + 2B·(T + 1) tokens) are not fewer than the rows as they are (2B·L):
    a long prompt and a long answer in one batch pad both parts to their longest."""
    pairs = input_ids.shape[0] // 2
    lengths = attention_mask.sum(1).tolist()
    same = (input_ids[:pairs] == input_ids[pairs:]) & attention_mask[:pairs].bool() & attention_mask[pairs:].bool()
    shared = same.long().cumprod(1).sum(1).tolist()  # each pair's leading run of equal tokens
    prefix = [shared[r % pairs] for r in range(len(lengths))]
    width, tail = max(prefix), max(n - p for n, p in zip(lengths, prefix))
    if pairs * (width - 1) + 2 * pairs * (tail + 1) >= input_ids.numel():
        return None
    ids = torch.full((len(lengths), width + tail), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = torch.zeros_like(ids, dtype=attention_mask.dtype)
    for row, (n, p) in enumerate(zip(lengths, prefix)):
        ids[row, width - p : width - p + n] = input_ids[row, :n]
        mask[row, width - p : width - p + n] = 1
    return ids, mask, width


def use_external_reward_model(ctx: StageContext, pairs: list[PreferencePair]) -> dict:
    """Score the held-out pairs with the user's reward model (its own tokenizer and template); no training."""
    config = ctx.config
    reward_model = RewardModel.load(config.reward.model, config.model, "reward.model", config.reward.batch_size)
    chosen = reward_model.scores([p.prompt_for(p.chosen) for p in pairs], [p.chosen[-1]["content"] for p in pairs],
                                 [p.chosen_finished for p in pairs])
    rejected = reward_model.scores([p.prompt_for(p.rejected) for p in pairs], [p.rejected[-1]["content"] for p in pairs],
                                   [p.rejected_finished for p in pairs])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)
    (ctx.out_dir / "external.json").write_text(json.dumps({"model": config.reward.model}, indent=2))
    MetricsFile(ctx.out_dir / "metrics.jsonl").write({"step": 0, "eval_accuracy": accuracy, "eval_margin": margin})
    console.print(f"reward: external model {config.reward.model}: held-out accuracy {accuracy:.3f}")
    return {"eval_accuracy": accuracy, "eval_margin": margin, "eval_pairs": len(chosen), "external": True}


@dataclass(frozen=True)
class PreferencePair:
    """One row of the preference dataset. `chosen` / `rejected` end with the assistant's reply (earlier
    messages in them continue the prompt); `*_finished` is False for a reply cut at the length limit."""

    prompt: list[dict]
    chosen: list[dict]
    rejected: list[dict]
    chosen_finished: bool = True
    rejected_finished: bool = True

    def prompt_for(self, side: list[dict]) -> list[dict]:
        return [*self.prompt, *side[:-1]]


def tokenize_pairs(pairs: list[PreferencePair], chat: ChatFormat) -> Dataset:
    """TRL's pre-tokenized form (`chosen_ids`, `rejected_ids`), rendered by the one reward readout, and the
    pair's `length` (its longer side)."""

    def ids(pair: PreferencePair, side: list[dict], finished: bool) -> list[int]:
        return chat.reward_ids(pair.prompt_for(side), side[-1]["content"], finished)

    rows = [{"chosen_ids": ids(p, p.chosen, p.chosen_finished), "rejected_ids": ids(p, p.rejected, p.rejected_finished)}
            for p in pairs]
    # A batch pads both sides to its longest sequence: the length that reward.group_by_length groups pairs by.
    return Dataset.from_list([row | {"length": max(len(row["chosen_ids"]), len(row["rejected_ids"]))} for row in rows])


def load_pairs(path: Path) -> list[PreferencePair]:
    """The preference rows of a split (judge scores dropped). A bad row is a UserError naming the file and line."""
    if not path.is_file():
        raise UserError(f"{path}: preference split not found (run the preferences stage)")
    pairs = []
    for record in iter_json_records(path, read_utf8(path)):
        row = record.value
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row, dict) or not isinstance(row.get(key), list) or not row[key]:
                raise UserError(f'{record.where}: expected "{key}" to be a non-empty list of messages')
        for key in ("chosen", "rejected"):
            last = row[key][-1]
            if not isinstance(last, dict) or last.get("role") != "assistant" or not isinstance(last.get("content"), str):
                raise UserError(f'{record.where}: expected "{key}" to end with an assistant message')
            if not isinstance(row.get(f"{key}_finished", True), bool):
                raise UserError(f'{record.where}: expected "{key}_finished" to be true or false')
        pairs.append(PreferencePair(
            row["prompt"], row["chosen"], row["rejected"], row.get("chosen_finished", True), row.get("rejected_finished", True)
        ))
    if not pairs:
        raise UserError(f"{path}: expected at least one preference pair, found none")
    return pairs
