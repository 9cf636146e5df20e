#!/usr/bin/env python
"""Our sft stage vs TRL's SFTTrainer called directly, same data and settings: seconds per training step.

    python bench/sft_vs_trl.py            # SmolLM2-135M-Instruct, fp32, LoRA r=16, batch 8, max_length 256
    python bench/sft_vs_trl.py --tiny     # the same comparison on a tiny random Llama (well under a minute)

Three implementations, each run in its own process (this project's environment and its TRL):
- ours: `rlhf.stages.sft.run` itself on a prepared run directory (the shipped seed instructions as
  the train split). Its trainer is `SFTTrainerOnCPU`, an SFTTrainer subclass that on the
  CPU takes the model's own cross-entropy instead of TRL's tiled LM-head loss.
- trl: `trl.SFTTrainer` as a user would call it, with the same SFTConfig values (batch, max_length,
  steps, learning rate and schedule, seed, completion-only loss, LoRA via `peft_config`, fp32 on the
  CPU, no gradient checkpointing, no checkpoints saved): TRL's own loss path.
- trl-plain-loss: the same SFTTrainer with only `compute_loss` replaced by transformers'
  `Trainer.compute_loss` (what ours does on the CPU): the like-for-like comparison of everything else.

Timing: a callback stamps the start of training and the end of each step (wall time, and the
process CPU time, which moves less with other processes' load on a shared machine); the first WARMUP_STEPS
steps of each run are left out, median over the remaining steps of all runs. Ours and
trl-plain-loss alternate for --runs runs each; plain TRL (its tiled loss is slow on a CPU, much
more so in bfloat16 than in fp32) runs --trl-runs times. Only the training loop is timed: our stage's evaluation before/after and its
merge, and model loading in all three, are not. Peak resident memory (whole process) is printed too.

The last line reads `time_ratio=<ours / plain TRL> time_ratio_same_loss=<ours / TRL with the plain loss>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

FULL = dict(model="smollm2-135m-instruct", runs=3, trl_runs=1, steps=6, trl_steps=3, batch_size=8, max_length=256, lora_r=16, lora_alpha=32)
TINY = dict(model="tiny-random-llama", runs=2, trl_runs=1, steps=6, trl_steps=4, batch_size=4, max_length=128, lora_r=8, lora_alpha=16)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama and small sizes")
    parser.add_argument("--model", help="reserved name, local directory or hub id (default: smollm2-135m-instruct; --tiny: tiny-random-llama)")
    parser.add_argument("--runs", type=int, help="runs of ours and of trl-plain-loss, alternating (default 3; --tiny 2)")
    parser.add_argument("--trl-runs", type=int, help="runs of plain TRL (default 1)")
    parser.add_argument("--steps", type=int, help="training steps per run, ours and trl-plain-loss (default 6)")
    parser.add_argument("--trl-steps", type=int, help="training steps per plain-TRL run (default 3; --tiny 4)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="leading steps of each run left out (default 1)")
    parser.add_argument("--batch-size", type=int, help="examples per step (default 8; --tiny 4)")
    parser.add_argument("--max-length", type=int, help="tokens per example (default 256; --tiny 128)")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (default 16; --tiny 8)")
    parser.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 32; --tiny 16)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-plain-trl", action="store_true", help="leave out plain TRL (its steps are slow on a CPU)")
    parser.add_argument("--threads", type=int, help="CPU threads per run (OMP_NUM_THREADS; default: torch's default, one per core). "
                        "On a machine shared with other busy processes, 1 avoids threads spin-waiting for each other")
    parser.add_argument("--workdir", help="scratch directory (default /tmp/rlhf-bench-sft-<model>)")
    parser.add_argument("--child", choices=["ours", "trl", "trl-plain-loss"], help=argparse.SUPPRESS)
    parser.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for key, value in (TINY if args.tiny else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.workdir is None:
        args.workdir = f"/tmp/rlhf-bench-sft-{Path(args.model).name}"
    return args


def prepare(args, work: Path) -> None:
    """instructions/{train,eval}.jsonl from the shipped seeds; ours.yaml."""
    import importlib.resources

    shutil.rmtree(work, ignore_errors=True)
    seeds_file = importlib.resources.files("rlhf.data_builders") / "default_seeds.jsonl"
    rows = [json.loads(line) for line in seeds_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    conversations = []
    for row in rows:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        conversations.append([{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}])
    (work / "instructions").mkdir(parents=True)
    for name, part in (("train", conversations[8:]), ("eval", conversations[:8])):
        with (work / "instructions" / f"{name}.jsonl").open("w", encoding="utf-8") as f:
            for messages in part:
                f.write(json.dumps({"messages": messages, "source": "seed"}) + "\n")
    (work / "ours.yaml").write_text(
        json.dumps(
            {
                "output_dir": str(work / "ours-run"),
                "seed": args.seed,
                "model": {"name_or_path": args.model, "dtype": args.dtype, "device": "cpu"},
                "lora": {"r": args.lora_r, "alpha": args.lora_alpha},
                "wandb": {"mode": "disabled"},
                "sft": {
                    "max_steps": args.steps,
                    "batch_size": args.batch_size,
                    "max_length": args.max_length,
                    "learning_rate": args.learning_rate,
                    "logging_steps": 1,
                    "save_steps": args.steps + 1,  # no checkpoint inside the timed steps
                },
            },
            indent=1,
        )
    )


def timer_callback(marks: list[tuple[float, float]]):
    """Stamps (wall, process CPU) at the start of training and at the end of every step."""
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append((time.time(), time.process_time()))

        def on_step_end(self, *a, **k):
            marks.append((time.time(), time.process_time()))

    return Timer()


def child_ours(args, work: Path) -> dict:
    from rlhf.config import load_config
    from rlhf.dag import STAGES
    from rlhf.runner import StageContext
    from rlhf.stages import sft

    marks: list[tuple[float, float]] = []
    stage_trainer = sft.SFTTrainerOnCPU

    class Timed(stage_trainer):  # the stage's own trainer, plus a timing callback
        def __init__(self, *a, callbacks=None, **k):
            super().__init__(*a, callbacks=[*(callbacks or []), timer_callback(marks)], **k)

    sft.SFTTrainerOnCPU = Timed
    config = load_config(work / "ours.yaml")
    run_dir = Path(config.output_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "out").mkdir(parents=True)
    ctx = StageContext(
        stage=next(s for s in STAGES if s.name == "sft"),
        config=config,
        run_dir=run_dir,
        out_dir=run_dir / "out",
        work_dir=run_dir / "work",
        inputs={"instructions": work / "instructions"},
    )
    started = time.time()
    summary = sft.run(ctx)
    return {"step_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])], "step_cpu_s": [b[1] - a[1] for a, b in zip(marks, marks[1:])], "stage_s": time.time() - started,
            "train_steps": summary["train_steps"], "vm_hwm_mb": h.vm_hwm_mb()}


def child_trl(args, work: Path, plain_loss: bool) -> dict:
    from peft import LoraConfig
    from transformers import AutoTokenizer, Trainer
    from trl import SFTConfig, SFTTrainer

    from rlhf.config import ModelConfig
    from rlhf.models import load_causal_lm, resolve_model
    from rlhf.stages.sft import load_chat_dataset  # the same rows: {"prompt": [...], "completion": [...]}

    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Loaded as our stage loads it: the embedded model's cached config.json still names its GGUF
    # origin, which a plain from_pretrained turns into a quantizer that Trainer refuses to train.
    model = load_causal_lm(path, ModelConfig(name_or_path=path, dtype=args.dtype, device="cpu"))
    marks: list[tuple[float, float]] = []
    config = SFTConfig(
        output_dir=str(work / "trl-run"),
        max_steps=args.child_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_length=args.max_length,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        activation_checkpointing=False,
        completion_only_loss=True,
        bf16=args.dtype == "bfloat16",
        use_cpu=True,
        seed=args.seed,
        report_to="none",
        disable_tqdm=True,
    )

    class SFTTrainerWithPlainLoss(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    trainer = (SFTTrainerWithPlainLoss if plain_loss else SFTTrainer)(
        model=model,
        args=config,
        train_dataset=load_chat_dataset(work / "instructions" / "train.jsonl"),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM"),
        callbacks=[timer_callback(marks)],
    )
    trainer.train()
    return {"step_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])], "step_cpu_s": [b[1] - a[1] for a, b in zip(marks, marks[1:])], "vm_hwm_mb": h.vm_hwm_mb()}


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.workdir)
    if args.child:
        result = child_ours(args, work) if args.child == "ours" else child_trl(args, work, args.child == "trl-plain-loss")
        h.write_result(args.result, result)
        return

    h.log(f"machine: {h.cpu_info()}; load average before: {h.loadavg()}")
    h.log(h.code_state("stages/sft.py", "pipeline/training.py", "pipeline/models.py"))
    prepare(args, work)
    h.log(
        f"model {args.model}, {args.dtype}, LoRA r={args.lora_r} alpha={args.lora_alpha} (all linear layers), "
        f"batch {args.batch_size}, max_length {args.max_length}, completion-only loss; ours and trl-plain-loss: "
        f"{args.steps} steps x {args.runs} runs, alternating; plain TRL: {args.trl_steps} steps x {args.trl_runs} run(s); "
        f"first {args.warmup_steps} step(s) of each run left out; threads per run: {args.threads or 'default'}"
    )
    common = [f"--model={args.model}", f"--batch-size={args.batch_size}", f"--max-length={args.max_length}",
              f"--lora-r={args.lora_r}", f"--lora-alpha={args.lora_alpha}", f"--dtype={args.dtype}",
              f"--learning-rate={args.learning_rate}", f"--seed={args.seed}", f"--workdir={work}"]
    env = {**os.environ, "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    schedule = []
    for run in range(args.runs):
        schedule += [("ours", args.steps), ("trl-plain-loss", args.steps)][:: 1 if run % 2 == 0 else -1]
    if not args.skip_plain_trl:
        schedule += [("trl", args.trl_steps)] * args.trl_runs
    results: dict[str, list[dict]] = {}
    for index, (name, steps) in enumerate(schedule):
        result_file = work / f"result-{name}.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *common, "--child", name,
               f"--child-steps={steps}", "--result", str(result_file)]
        result = h.run_child(cmd, result_file, env=env, log_file=work / f"log-{name}-{index}.txt")
        results.setdefault(name, []).append(result)
        h.log(f"{name:<15}: steps {' '.join(f'{s:.2f}' for s in result['step_s'])} s wall, "
              f"{' '.join(f'{s:.2f}' for s in result['step_cpu_s'])} s CPU; peak RSS "
              f"{result['peak_rss_mb']:.0f} MB; process {result['wall_s']:.1f} s; load {h.loadavg()}")

    h.log("")
    per_step, per_step_cpu = {}, {}
    for name, runs in results.items():
        steps = [s for r in runs for s in r["step_s"][args.warmup_steps:]]
        per_step[name] = h.median(steps)
        per_step_cpu[name] = h.median(s for r in runs for s in r["step_cpu_s"][args.warmup_steps:])
        h.log(f"{name:<15}: {per_step[name]:.2f} s per step (wall, median of {len(steps)}); {per_step_cpu[name]:.2f} CPU-s per step; peak RSS "
              f"{h.median(r['peak_rss_mb'] for r in runs):.0f} MB")
    h.log(f"load average after: {h.loadavg()}")
    plain = per_step["ours"] / per_step["trl"] if "trl" in per_step else float("nan")
    same = per_step["ours"] / per_step["trl-plain-loss"]
    cpu_plain = per_step_cpu["ours"] / per_step_cpu["trl"] if "trl" in per_step_cpu else float("nan")
    h.log(f"CPU time per step, ours/TRL: {cpu_plain:.3f}; ours/TRL with the plain loss: "
          f"{per_step_cpu['ours'] / per_step_cpu['trl-plain-loss']:.3f} (less sensitive than wall time to other processes)")
    h.log(f"time_ratio={plain:.3f} time_ratio_same_loss={same:.3f}")


if __name__ == "__main__":
    main()
