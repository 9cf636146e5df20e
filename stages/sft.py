"""The sft stage: supervised fine-tuning of the base model on the instruction dataset, LoRA or QLoRA.

Outputs: `adapter/` (the LoRA adapter), `merged/` (the base with the adapter merged in full precision:
the backbone every later stage starts from), `metrics.jsonl` (the training curve).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from datasets import Dataset
from rich.console import Console
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

from rlhf.models import load_causal_lm, load_tokenizer, peft_lora_config, pick_device, pick_dtype, resolve_model
from rlhf.runner import StageContext
from rlhf.tracking import MetricsFile, MetricsFileCallback, start_wandb

console = Console(highlight=False, soft_wrap=True)


def run(ctx: StageContext) -> dict:
    config, settings = ctx.config, ctx.config.sft

    # 1. Setup: data as prompt/completion pairs, so the loss covers the assistant's answer only.
    train = load_chat_dataset(ctx.inputs["instructions"] / "train.jsonl")
    evaluation = load_chat_dataset(ctx.inputs["instructions"] / "eval.jsonl")
    base_path = resolve_model(config.model.name_or_path)
    tokenizer = load_tokenizer(base_path, config.model.trust_remote_code)
    model = load_causal_lm(base_path, config.model)
    wandb_run = start_wandb(config, "sft", ctx.run_dir)
    metrics = MetricsFile(ctx.out_dir / "metrics.jsonl")

    checkpoints = ctx.work_dir / "checkpoints"
    args = SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=settings.epochs,
        max_steps=settings.max_steps,
        learning_rate=settings.learning_rate,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=settings.batch_size,
        gradient_accumulation_steps=settings.grad_accum,
        max_length=settings.max_length,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a fraction of the total steps
        lr_scheduler_type=settings.lr_scheduler,
        weight_decay=settings.weight_decay,
        logging_steps=settings.logging_steps,
        save_strategy="steps",
        save_steps=settings.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        completion_only_loss=True,
        activation_checkpointing=settings.gradient_checkpointing,
        bf16=pick_dtype(config.model) == torch.bfloat16,
        use_cpu=pick_device(config.model) == "cpu",
        seed=config.seed,
        report_to=["wandb"] if wandb_run else "none",
        run_name=f"{config.run_name}-sft",
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        peft_config=peft_lora_config(config.lora),
        callbacks=[MetricsFileCallback(metrics)],
    )

    # 2. Train, resuming from the last checkpoint of an interrupted attempt with the same fingerprint.
    eval_loss_before = trainer.evaluate()["eval_loss"]
    metrics.write({"step": 0, "eval_loss": eval_loss_before})
    resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if resume:
        console.print(f"sft: resuming from {resume}")
    trainer.train(resume_from_checkpoint=resume)
    eval_loss = trainer.evaluate()["eval_loss"]
    console.print(f"sft: eval loss {eval_loss_before:.4f} -> {eval_loss:.4f}")

    # 3. Save the adapter, then merge it into a full-precision copy of the base.
    trainer.model.save_pretrained(ctx.out_dir / "adapter")
    tokenizer.save_pretrained(ctx.out_dir / "adapter")
    del trainer, model
    save_merged(base_path, ctx.out_dir / "adapter", ctx.out_dir / "merged", config)
    if wandb_run:
        wandb_run.summary.update({"eval_loss_before": eval_loss_before, "eval_loss": eval_loss})
        wandb_run.finish()
    return {"eval_loss_before": eval_loss_before, "eval_loss": eval_loss, "train_examples": len(train)}


def load_chat_dataset(path: Path) -> Dataset:
    """`messages` rows → conversational prompt (all turns but the last) / completion (the last)."""
    rows = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            messages = json.loads(line)["messages"]
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return Dataset.from_list(rows)


def save_merged(base_path: str, adapter_dir: Path, dest: Path, config) -> None:
    """Merge into an unquantized reload of the base (never into 4-bit weights), on the CPU."""
    from peft import PeftModel

    full_precision = config.model.model_copy(update={"quantization": "none", "device": "cpu"})
    base = load_causal_lm(base_path, full_precision)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(dest)
    load_tokenizer(base_path, config.model.trust_remote_code).save_pretrained(dest)
    console.print(f"sft: merged model saved to {dest}")
