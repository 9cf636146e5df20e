"""The sft stage: supervised fine-tuning of the base model on the instruction dataset, LoRA or QLoRA.

Outputs: `adapter/` (the LoRA adapter), `merged/` (the base with the adapter merged in full precision:
the backbone every later stage starts from), `metrics.jsonl` (the training curve).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch

from datasets import Dataset
from rich.console import Console
from trl import SFTConfig, SFTTrainer

from rlhf.data_builders.json_files import read_conversations
from rlhf.errors import UserError
from rlhf.models import load_causal_lm, load_tokenizer, peft_lora_config, resolve_model
from rlhf.runner import StageContext
from rlhf.tracking import MetricsFileCallback, StageHistory, start_wandb
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
    config, settings = ctx.config, ctx.config.sft

    # 1. Setup: data as prompt/completion pairs, so the loss covers the assistant's answer only.
    train = load_chat_dataset(ctx.inputs["instructions"] / "train.jsonl")
    evaluation = load_chat_dataset(ctx.inputs["instructions"] / "eval.jsonl")
    base_path = resolve_model(config.model.name_or_path)
    tokenizer = load_tokenizer(base_path, config.model.trust_remote_code)
    model = load_causal_lm(base_path, config.model)
    wandb_run = start_wandb(config, "sft", ctx.run_dir)
    checkpoints = ctx.work_dir / "checkpoints"
    resume = last_checkpoint(checkpoints)
    history = StageHistory(ctx.work_dir, resumed_step(resume))  # metrics.jsonl of every attempt
    stop = SaveAndStopOnSigterm(ctx.sigterm)
    trainer = build_trainer(config, model, tokenizer, (train, evaluation), checkpoints, history, stop, wandb_run is not None)
    too_long = count_too_long(
        tokenizer, settings.max_length, train=(train, trainer.train_dataset), eval=(evaluation, trainer.eval_dataset)
    )

    # 2. Train, resuming from the last checkpoint of an interrupted attempt with the same fingerprint.
    eval_loss_before = trainer.evaluate()["eval_loss"]
    if resume:
        console.print(f"sft: resuming from {resume}")
    else:
        history.write({"step": 0, "eval_loss": eval_loss_before})
    trainer.train(resume_from_checkpoint=resume)
    stop_if_preempted(stop, "sft", checkpoints)
    eval_loss = trainer.evaluate()["eval_loss"]
    train_steps = trainer.state.global_step
    console.print(f"sft: eval loss {eval_loss_before:.4f} -> {eval_loss:.4f}")

    # 3. Save the adapter (every process calls save_model: under ZeRO-3 it gathers the sharded weights;
    #    rank 0 writes), then rank 0 merges it into a full-precision copy of the base.
    trainer.save_model(str(ctx.out_dir / "adapter"))
    processes, main_process = trainer.args.world_size, trainer.is_world_process_zero()
    del trainer, model
    if main_process:
        (ctx.out_dir / "adapter" / "training_args.bin").unlink(missing_ok=True)  # pickled: publish safetensors only
        tokenizer.save_pretrained(ctx.out_dir / "adapter")
        save_merged(load_causal_lm, base_path, ctx.out_dir / "adapter", ctx.out_dir / "merged", config)
        history.publish(ctx.out_dir)
        console.print(f"sft: merged model saved to {ctx.out_dir / 'merged'}")
    if wandb_run:
        wandb_run.summary.update({"eval_loss_before": eval_loss_before, "eval_loss": eval_loss})
        wandb_run.finish()
    return {
        "eval_loss_before": eval_loss_before,
        "eval_loss": eval_loss,
        "train_examples": len(train),
        "train_steps": train_steps,
        "processes": processes,
        **too_long,
    }


def build_trainer(config, model, tokenizer, data, checkpoints, history: StageHistory, stop, wandb: bool) -> SFTTrainer:
    """TRL's SFTTrainer with LoRA, the loss on completions only, checkpoints marked complete."""
    args = SFTConfig(**trainer_arguments(config.sft, config, checkpoints, "sft", wandb), completion_only_loss=True)
    return SFTTrainerOnCPU(
        model=model,
        args=args,
        train_dataset=data[0],
        eval_dataset=data[1],
        processing_class=tokenizer,
        peft_config=peft_lora_config(config.lora),
        callbacks=[MetricsFileCallback(history.metrics), MarkCheckpointComplete(), stop],
        stage="sft",
    )


class SFTTrainerOnCPU(StopOnNonFinite, SFTTrainer):
    """TRL computes the loss through a tiled LM head that is fast with Triton on a GPU; its CPU fallback makes
    a training step many times slower (README, "Benchmarks": bench/sft_vs_trl.py). On the CPU the loss is the
    model's own cross-entropy (transformers' ForCausalLMLoss: a sum over answer tokens / num_items_in_batch,
    or their mean), with the LM head run only where a label follows: the prompt's and the padding's logits,
    a third or more of a batch's positions with a 49k vocabulary, would be computed and thrown away."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.args.use_cpu:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        targets = labels[:, 1:]  # hidden state t predicts token t + 1
        labelled = targets != -100
        with lm_head_at(self.accelerator.unwrap_model(model), torch.nn.functional.pad(labelled, (0, 1))):
            outputs = model(**inputs)
        logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])
        if logits.shape[0] != int(labelled.sum()):  # the model bypassed its head module: select here
            logits = outputs.logits[:, :-1][labelled]
        loss = torch.nn.functional.cross_entropy(logits.float(), targets[labelled], reduction="mean" if num_items_in_batch is None else "sum")
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices:  # num_items_in_batch counts every process's tokens
                loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


@contextmanager
def lm_head_at(model, positions: torch.Tensor):
    """Within it, the model's LM head sees only the hidden states at `positions` ([B, L] bool), as one [1, n, H]
    row: its logits come out [1, n, V], after whatever the model does to them (Gemma 2's softcapping, Cohere's
    logit scale)."""
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: (args[0][positions].unsqueeze(0), *args[1:]))
    try:
        yield
    finally:
        hook.remove()


def count_too_long(tokenizer, max_length: int, **splits: tuple[Dataset, Dataset]) -> dict:
    """For each split (name=(rows, as TRL prepared them)): the examples longer than `max_length` tokens that
    TRL truncated, and those it dropped because their prompt alone fills `max_length` (no answer token left)."""
    counts = {}
    for name, (rows, prepared) in splits.items():
        lengths = [
            len(tokenizer.apply_chat_template(row["prompt"] + row["completion"], tokenize=True, return_dict=True)["input_ids"])
            for row in rows
        ]
        dropped = len(rows) - len(prepared)
        if not len(prepared):
            raise UserError(
                f"sft: every {name} example's prompt is longer than sft.max_length={max_length} tokens: raise sft.max_length"
            )
        counts[f"{name}_truncated"] = sum(length > max_length for length in lengths) - dropped
        counts[f"{name}_dropped_too_long"] = dropped
    if any(counts.values()):
        console.print(
            f"sft: longer than sft.max_length={max_length} tokens: "
            + "; ".join(
                f"{counts[f'{name}_truncated']} {name} examples truncated, "
                f"{counts[f'{name}_dropped_too_long']} dropped (the prompt alone fills it)"
                for name in splits
            )
        )
    return counts


def load_chat_dataset(path: Path) -> Dataset:
    """`messages` rows → conversational prompt (all turns but the last) / completion (the last)."""
    rows = [{"prompt": messages[:-1], "completion": messages[-1:]} for messages in read_conversations(path)]
    return Dataset.from_list(rows)
