"""The reward stage: a Bradley-Terry reward model on the merged SFT backbone, LoRA or QLoRA.

Outputs:
- `adapter/`: the LoRA adapter with the score head (PEFT's modules_to_save), and `score_head.safetensors`:
  what the PPO stage loads onto its one resident backbone;
- `model/`: a standalone `AutoModelForSequenceClassification` (adapter merged) that any tool can load;
- `metrics.jsonl`, and the held-out pairwise accuracy and mean margin in the manifest.
With `reward.model` set, an existing reward model is evaluated and used as is: `external.json` names it.
"""

from __future__ import annotations

import json
from pathlib import Path

from datasets import Dataset
from rich.console import Console
from safetensors.torch import load_file, save_file
from trl import RewardConfig, RewardTrainer

from rlhf.data_builders.json_files import iter_json_records, read_utf8
from rlhf.errors import UserError
from rlhf.models import load_reward_model, load_tokenizer, peft_lora_config, resolve_model
from rlhf.reward.judges import score_conversations
from rlhf.runner import StageContext
from rlhf.tracking import MetricsFile, MetricsFileCallback, start_wandb
from rlhf.training import MarkCheckpointComplete, StopOnNonFinite, last_checkpoint, save_merged, trainer_arguments

console = Console(highlight=False, soft_wrap=True)


def run(ctx: StageContext) -> dict:
    config, settings = ctx.config, ctx.config.reward
    train = load_pairs(ctx.inputs["preferences"] / "train.jsonl")
    evaluation = load_pairs(ctx.inputs["preferences"] / "eval.jsonl")
    if settings.model:
        return use_external_reward_model(ctx, evaluation)

    # 1. Setup: the merged SFT model as a classifier with one output; LoRA (QLoRA when 4-bit).
    backbone = str(ctx.inputs["sft"] / "merged")
    tokenizer = load_tokenizer(backbone, config.model.trust_remote_code)
    model = load_reward_model(backbone, config.model, tokenizer, quantize=True)
    wandb_run = start_wandb(config, "reward", ctx.run_dir)
    metrics = MetricsFile(ctx.out_dir / "metrics.jsonl")
    checkpoints = ctx.work_dir / "checkpoints"
    args = RewardConfig(
        **trainer_arguments(settings, config, checkpoints, "reward", wandb_run is not None),
        center_rewards_coefficient=settings.center_rewards_coefficient,
        disable_dropout=True,
    )
    trainer = GuardedRewardTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_lora_config(config.lora, task_type="SEQ_CLS"),
        callbacks=[MetricsFileCallback(metrics), MarkCheckpointComplete()],
        stage="reward",
    )
    # TRL drops pairs whose chosen or rejected conversation is longer than reward.max_length: count them.
    too_long = {
        "train_dropped_too_long": len(train) - len(trainer.train_dataset),
        "eval_dropped_too_long": len(evaluation) - len(trainer.eval_dataset),
    }
    if any(too_long.values()):
        console.print(
            f"reward: dropped {too_long['train_dropped_too_long']} training and {too_long['eval_dropped_too_long']} "
            f"held-out pairs longer than reward.max_length={settings.max_length} tokens"
        )
    for name, prepared in (("training", trainer.train_dataset), ("held-out", trainer.eval_dataset)):
        if not len(prepared):
            raise UserError(
                f"reward: every {name} pair is longer than reward.max_length={settings.max_length} tokens: "
                "raise reward.max_length"
            )
    eval_pairs = len(trainer.eval_dataset)

    # 2. Train; held-out pairwise accuracy and margin before and after.
    before = trainer.evaluate()
    metrics.write({"step": 0, **before})
    resume = last_checkpoint(checkpoints)
    if resume:
        console.print(f"reward: resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
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
        (adapter_dir / "training_args.bin").unlink(missing_ok=True)  # pickled: publish safetensors only
        tokenizer.save_pretrained(adapter_dir)
        # The score head as saved with the adapter (PEFT's modules_to_save): whole, whatever the sharding.
        score = load_file(adapter_dir / "adapter_model.safetensors")["base_model.model.score.weight"]
        save_file({"weight": score.float().contiguous()}, ctx.out_dir / "score_head.safetensors")
        load = lambda path, model_config: load_reward_model(path, model_config, tokenizer)  # noqa: E731
        save_merged(load, backbone, adapter_dir, ctx.out_dir / "model", config)
    result = {
        "eval_accuracy": after["eval_accuracy"],
        "eval_margin": after["eval_margin"],
        "eval_accuracy_before": before["eval_accuracy"],
        "eval_pairs": eval_pairs,
        "train_pairs": len(train),
        **too_long,
        "train_steps": train_steps,
        "processes": processes,
    }
    if wandb_run:
        wandb_run.summary.update(result)
        wandb_run.finish()
    return result


class GuardedRewardTrainer(StopOnNonFinite, RewardTrainer):
    """TRL's RewardTrainer, stopped by a non-finite loss or gradient (rlhf.training.StopOnNonFinite)."""


def use_external_reward_model(ctx: StageContext, evaluation: Dataset) -> dict:
    """Score the held-out pairs with the user's reward model (and its own tokenizer); no training."""
    config = ctx.config
    path = resolve_model(config.reward.model, "reward.model")
    tokenizer = load_tokenizer(path, config.model.trust_remote_code)
    model = load_reward_model(path, config.model, tokenizer).eval()
    chosen = score_conversations(model, tokenizer, [r["prompt"] + r["chosen"] for r in evaluation])
    rejected = score_conversations(model, tokenizer, [r["prompt"] + r["rejected"] for r in evaluation])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(chosen)
    margin = sum(c - r for c, r in zip(chosen, rejected)) / len(chosen)
    (ctx.out_dir / "external.json").write_text(json.dumps({"model": config.reward.model}, indent=2))
    MetricsFile(ctx.out_dir / "metrics.jsonl").write({"step": 0, "eval_accuracy": accuracy, "eval_margin": margin})
    console.print(f"reward: external model {config.reward.model}: held-out accuracy {accuracy:.3f}")
    return {"eval_accuracy": accuracy, "eval_margin": margin, "eval_pairs": len(chosen), "external": True}


def load_pairs(path: Path) -> Dataset:
    """Conversational prompt/chosen/rejected rows (judge scores dropped: TRL reads a `margin` column).
    A bad row is a UserError naming the file and line."""
    if not path.is_file():
        raise UserError(f"{path}: preference split not found (run the preferences stage)")
    rows = []
    for record in iter_json_records(path, read_utf8(path)):
        row = record.value
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(row, dict) or not isinstance(row.get(key), list) or not row[key]:
                raise UserError(f'{record.where}: expected "{key}" to be a non-empty list of messages')
        rows.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
    if not rows:
        raise UserError(f"{path}: expected at least one preference pair, found none")
    return Dataset.from_list(rows)
