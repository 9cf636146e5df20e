#!/usr/bin/env python
"""Our ppo stage with `advantage_estimator: grpo` vs TRL's GRPOTrainer (the TRL of this environment, 1.16),
on the same backbone, prompts and settings: seconds per step and peak resident memory.

    python bench/grpo_vs_trl.py            # SmolLM2-135M-Instruct (the embedded default), fp32, LoRA r=16
    python bench/grpo_vs_trl.py --tiny     # the same comparison on a tiny random Llama (about a minute)

What runs:
- ours: `rlhf.stages.ppo.run` itself on a prepared run directory (bench/ppo_vs_trl.py's `prepare`: the
  backbone, the first prompts of the shipped seeds, a LoRA reward adapter with its score head), with
  advantage_estimator grpo, K samples per prompt, the KL as a k3 loss term (kl_in loss, as GRPO has it):
  one backbone with the policy and reward adapters, no value adapter.
- TRL: `GRPOTrainer` as its docs show it: the backbone plus `peft_config` (reference = adapter disabled),
  num_generations K, beta = our kl_coef, the reward model = the same reward adapter merged into its own
  `AutoModelForSequenceClassification` (TRL scores with a separate model), gradient checkpointing off
  on both sides (GRPOConfig turns it on by default; `--gradient-checkpointing` turns it on for both: TRL's
  and our `ppo.gradient_checkpointing`), loss_type left at TRL's default (dapo: token-level, as ours).
- Same: prompts, K, rollout size (ROLLOUT completions per optimizer step: TRL's per-device batch × its
  gradient accumulation, generation batch = the same, so one generation per step in both), one
  iteration per rollout, LoRA rank/alpha (all linear layers), learning rate, temperature 1.0, seed, fp32 on
  the CPU. Responses are exactly MAX_NEW_TOKENS long in both: EOS is masked until then (TRL:
  generation_kwargs min_new_tokens; ours: the same key added to the generation config in the child).
- Each run is its own process (its peak RSS is its own), alternating ours and TRL. Per-step time = wall time
  between the ends of consecutive steps; the first WARMUP_STEPS steps of each run are left out; median
  over all runs' remaining steps. Peak memory: median over runs of the process's peak resident set.

The last line reads `time_ratio=<ours/TRL> mem_ratio=<ours/TRL>`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402
from ppo_vs_trl import prepare  # noqa: E402  (the run directory both sides read)

FULL = dict(model="smollm2-135m-instruct", runs=3, steps=4, samples_per_prompt=4, rollout_batch_size=16,
            micro_batch_size=8, max_new_tokens=48, lora_r=16, lora_alpha=32)
TINY = dict(model="tiny-random-llama", runs=2, steps=4, samples_per_prompt=4, rollout_batch_size=8,
            micro_batch_size=4, max_new_tokens=16, lora_r=8, lora_alpha=16)
KL_COEF = 0.05


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama and small sizes (about a minute)")
    parser.add_argument("--model", help="reserved name, local directory or hub id (default: smollm2-135m-instruct; --tiny: tiny-random-llama)")
    parser.add_argument("--runs", type=int, help="runs of each implementation, alternating (default 3; --tiny 2)")
    parser.add_argument("--steps", type=int, help="optimizer steps per run, one rollout each (default 4)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="leading steps of each run left out of the timing (default 1)")
    parser.add_argument("--samples-per-prompt", type=int, help="K, the group size (default 4)")
    parser.add_argument("--rollout-batch-size", type=int, help="completions per step (default 16; --tiny 8)")
    parser.add_argument("--micro-batch-size", type=int, help="completions per forward/backward (default 8; --tiny 4)")
    parser.add_argument("--max-new-tokens", type=int, help="response length, exact (default 48; --tiny 16)")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (default 16; --tiny 8)")
    parser.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 32; --tiny 16)")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, help="CPU threads per run (OMP_NUM_THREADS; default: one per core)")
    parser.add_argument("--workdir", help="scratch directory (default /tmp/rlhf-bench-grpo-<model>)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass on both sides (TRL's default; ours: ppo.gradient_checkpointing)")
    parser.add_argument("--only", choices=["ours", "trl"], help="run one implementation only (no ratios)")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rollout_batch_size % args.samples_per_prompt or args.rollout_batch_size % args.micro_batch_size:
        parser.error("--rollout-batch-size must be a multiple of --samples-per-prompt and of --micro-batch-size")
    args.mini_batch_size, args.ppo_epochs = args.rollout_batch_size, 1  # what `prepare` reads
    if args.workdir is None:
        args.workdir = f"/tmp/rlhf-bench-grpo-{Path(args.model).name}"
    return args


def write_our_config(args, work: Path) -> None:
    never = args.steps + 1
    ours = json.loads((work / "ours.yaml").read_text())
    ours["ppo"].update(
        advantage_estimator="grpo", samples_per_prompt=args.samples_per_prompt, kl_in="loss", kl_coef=KL_COEF,
        missing_eos_penalty=None, mini_batch_size=args.rollout_batch_size, ppo_epochs=1,
        num_prompts=args.rollout_batch_size, sample_every=never, save_every=never,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    (work / "ours.yaml").write_text(json.dumps(ours, indent=1))


# --- children -----------------------------------------------------------------------------------


def child_ours(args, work: Path) -> dict:
    """Our ppo stage as the runner calls it (minus fingerprinting and publishing), EOS masked until the end."""
    from transformers import GenerationConfig

    import rlhf.generation
    from rlhf.config import load_config
    from rlhf.dag import STAGES
    from rlhf.runner import StageContext
    from rlhf.stages import ppo

    rlhf.generation.GenerationConfig = lambda **kw: GenerationConfig(**kw, min_new_tokens=args.max_new_tokens)
    marks: list[tuple[float, float]] = []
    rollout = ppo.generate_rollout

    def first_rollout_marked(*a, **k):
        if not marks:
            marks.append((time.time(), time.process_time()))
        return rollout(*a, **k)

    class TimedHistory(ppo.StageHistory):  # one metrics line at the end of each step
        def write(self, record):
            marks.append((time.time(), time.process_time()))
            super().write(record)

    ppo.generate_rollout, ppo.StageHistory = first_rollout_marked, TimedHistory
    config = load_config(work / "ours.yaml")
    run_dir = Path(config.output_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "out").mkdir(parents=True)
    ctx = StageContext(
        stage=next(s for s in STAGES if s.name == "ppo"), config=config, run_dir=run_dir, out_dir=run_dir / "out",
        work_dir=run_dir / "work",
        inputs={"instructions": work / "instructions", "sft": work / "sft", "reward": work / "reward"},
    )
    summary = ppo.run(ctx)
    records = [json.loads(line) for line in (run_dir / "out" / "metrics.jsonl").read_text().splitlines()]
    return {
        "step_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])],
        "step_cpu_s": [b[1] - a[1] for a, b in zip(marks, marks[1:])],
        "response_length": [r["val/response_length"] for r in records],
        "resident_adapters": summary["resident_adapters"],
        "resident_backbones": summary["resident_backbones"],
    }


def child_trl(args, work: Path) -> dict:
    """TRL's GRPOTrainer on the same backbone, prompts and settings."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    backbone = str(work / "backbone")
    tokenizer = AutoTokenizer.from_pretrained(backbone, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32)
    classifier = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, dtype=torch.float32)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    reward_model = PeftModel.from_pretrained(classifier, work / "reward" / "adapter").merge_and_unload()
    rows = [json.loads(line) for line in (work / "instructions" / "train.jsonl").read_text().splitlines()]
    dataset = Dataset.from_dict({"prompt": [row["messages"][:-1] for row in rows]})
    per_device = args.micro_batch_size
    config = GRPOConfig(
        output_dir=str(work / "trl-run"),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=args.rollout_batch_size // per_device,
        generation_batch_size=args.rollout_batch_size,
        num_generations=args.samples_per_prompt,
        num_iterations=1,
        max_steps=args.steps,
        max_completion_length=args.max_new_tokens,
        generation_kwargs={"min_new_tokens": args.max_new_tokens},
        temperature=1.0,
        beta=KL_COEF,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        seed=args.seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=args.gradient_checkpointing,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    marks: list[tuple[float, float]] = []
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append((time.time(), time.process_time()))

        def on_step_end(self, *a, **k):
            marks.append((time.time(), time.process_time()))

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer = GRPOTrainer(
        model=policy, reward_funcs=reward_model, args=config, train_dataset=dataset, processing_class=tokenizer,
        reward_processing_classes=tokenizer, peft_config=peft_config, callbacks=[Timer()],
    )
    trainer.train()
    return {
        "step_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])],
        "step_cpu_s": [b[1] - a[1] for a, b in zip(marks, marks[1:])],
        "response_length": lengths,
    }


# --- main ---------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.workdir)
    if args.child:
        result = (child_ours if args.child == "ours" else child_trl)(args, work)
        h.write_result(args.result, {**result, "vm_hwm_mb": h.vm_hwm_mb()})
        return

    from importlib.metadata import version

    h.log(f"machine: {h.cpu_info()}; load average before: {h.loadavg()}; trl {version('trl')}")
    h.log(h.code_state("stages/ppo.py", "pipeline/ppo_math.py", "pipeline/rollout.py", "pipeline/roles.py"))
    prepare(args, work)
    write_our_config(args, work)
    h.log(
        f"model {args.model}, fp32, LoRA r={args.lora_r} alpha={args.lora_alpha} (all linear layers); {args.steps} steps x "
        f"{args.rollout_batch_size} completions ({args.rollout_batch_size // args.samples_per_prompt} prompts x K={args.samples_per_prompt}), "
        f"micro-batch {args.micro_batch_size}, {args.max_new_tokens} new tokens, beta {KL_COEF} (k3 in the loss); "
        f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} on both sides; "
        f"{args.runs} runs each, alternating; first {args.warmup_steps} step(s) of each run left out"
    )
    passthrough = [f"--model={args.model}", f"--steps={args.steps}", f"--samples-per-prompt={args.samples_per_prompt}",
                   f"--rollout-batch-size={args.rollout_batch_size}", f"--micro-batch-size={args.micro_batch_size}",
                   f"--max-new-tokens={args.max_new_tokens}", f"--lora-r={args.lora_r}", f"--lora-alpha={args.lora_alpha}",
                   f"--learning-rate={args.learning_rate}", f"--seed={args.seed}",
                   *(["--gradient-checkpointing"] if args.gradient_checkpointing else [])]
    names = [args.only] if args.only else ["ours", "trl"]

    def command(name: str, result_file: Path) -> list[str]:
        return [sys.executable, str(Path(__file__).resolve()), *passthrough, "--workdir", str(work), "--child", name,
                "--result", str(result_file)]

    results = h.alternate(names, args.runs, command, work, h.bench_env(args.threads),
                          describe=lambda result: f"response length {result['response_length']}")
    summary = h.summarize(results, args.warmup_steps)
    if "ours" in results:
        h.log(f"ours: resident adapters {results['ours'][-1]['resident_adapters']}, backbones {results['ours'][-1]['resident_backbones']}")
    h.log(f"load average after: {h.loadavg()}")
    if not args.only:
        h.ratio_lines(summary)


if __name__ == "__main__":
    main()
