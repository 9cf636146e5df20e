#!/usr/bin/env python
"""Our ppo stage vs TRL's PPOTrainer (TRL 1.12, the last release that has one: trl.experimental.ppo),
on the same backbone, prompts and settings: per-step seconds and peak resident memory.

    python bench/ppo_vs_trl.py            # SmolLM2-135M-Instruct (the embedded default), fp32, LoRA r=16
    python bench/ppo_vs_trl.py --tiny     # the same comparison on a tiny random Llama (about a minute)

What runs:
- TRL 1.12 goes into its own throwaway virtual environment (default /tmp/rlhf-bench-trl112: `python -m
  venv`, then torch, transformers, peft, accelerate and datasets at the versions of this project's
  environment, and trl==1.12.*), created on first use and reused after. The project's own
  environment keeps its current TRL.
- ours: `rlhf.stages.ppo.run` itself (one backbone, policy / value / reward LoRA adapters) on a
  prepared run directory; TRL: `PPOTrainer` as its docs show it, with policy = the backbone plus
  `peft_config` (reference = adapter disabled), and reward and value models =
  `AutoModelForSequenceClassification` from the same backbone (TRL trains the value model in full).
- Same: prompts (the first ROLLOUT_BATCH_SIZE shipped seed instructions, so every step uses the
  same batch in both), batch sizes, PPO epochs, LoRA rank/alpha (all linear layers), learning rate,
  KL coefficient, temperature 1.0, seed, fp32 on the CPU, no gradient checkpointing (TRL's PPOConfig
  turns it on by default: --trl-gradient-checkpointing keeps that). Responses are exactly
  MAX_NEW_TOKENS long in both: the prepared backbone's generation_config.json sets min_new_tokens =
  max_new_tokens, which keeps EOS from being sampled, so neither implementation stops early.
- Each run is its own process (so its peak RSS is its own: ru_maxrss from wait4), alternating ours
  and TRL. Per-step time = wall time between the ends of consecutive steps (the first step: from the
  start of training: ours, the first rollout; TRL, on_train_begin); the first WARMUP_STEPS steps of
  each run are left out; median over all runs' remaining steps. The process CPU time per step (all
  threads) is printed too: on a shared machine it moves less than wall time with other processes' load. Peak memory: median over runs of the whole process's peak resident set
  (imports and model loading included, for both).

The last line reads `time_ratio=<ours/TRL> mem_ratio=<ours/TRL>`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h  # noqa: E402

TRL_SPEC = "trl==1.12.*"
SAME_VERSIONS = ("torch", "transformers", "peft", "accelerate", "datasets")

FULL = dict(model="smollm2-135m-instruct", runs=3, steps=3, rollout_batch_size=16, mini_batch_size=16,
            micro_batch_size=8, ppo_epochs=1, max_new_tokens=48, lora_r=16, lora_alpha=32)
TINY = dict(model="tiny-random-llama", runs=2, steps=4, rollout_batch_size=8, mini_batch_size=8,
            micro_batch_size=4, ppo_epochs=1, max_new_tokens=16, lora_r=8, lora_alpha=16)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny random Llama and small sizes (about a minute)")
    parser.add_argument("--model", help="reserved name, local directory or hub id (default: smollm2-135m-instruct; --tiny: tiny-random-llama)")
    parser.add_argument("--runs", type=int, help="runs of each implementation, alternating (default 3; --tiny 2)")
    parser.add_argument("--steps", type=int, help="PPO steps per run (default 3; --tiny 4)")
    parser.add_argument("--warmup-steps", type=int, default=1, help="leading steps of each run left out of the timing (default 1)")
    parser.add_argument("--rollout-batch-size", type=int, help="prompts per step (default 16; --tiny 8)")
    parser.add_argument("--mini-batch-size", type=int, help="rows per optimizer step (default 16; --tiny 8)")
    parser.add_argument("--micro-batch-size", type=int, help="rows per forward/backward (default 8; --tiny 4)")
    parser.add_argument("--ppo-epochs", type=int, help="PPO epochs per step (default 1)")
    parser.add_argument("--max-new-tokens", type=int, help="response length, exact (default 48; --tiny 16)")
    parser.add_argument("--lora-r", type=int, help="LoRA rank (default 16; --tiny 8)")
    parser.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 32; --tiny 16)")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--trl-gradient-checkpointing", action="store_true", help="keep TRL PPOConfig's default gradient checkpointing (ours has none)")
    parser.add_argument("--trl-venv", default="/tmp/rlhf-bench-trl112", help="virtual environment for TRL 1.12 (created if missing)")
    parser.add_argument("--threads", type=int, help="CPU threads per run (OMP_NUM_THREADS; default: torch's default, one per core). "
                        "On a machine shared with other busy processes, 1 avoids threads spin-waiting for each other")
    parser.add_argument("--workdir", help="scratch directory (default /tmp/rlhf-bench-ppo-<model>)")
    parser.add_argument("--only", choices=["ours", "trl"], help="run one implementation only (no ratios)")
    parser.add_argument("--child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = TINY if args.tiny else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rollout_batch_size % args.mini_batch_size or args.mini_batch_size % args.micro_batch_size:
        parser.error("rollout batch must be a multiple of the minibatch, the minibatch of the micro-batch")
    if args.mini_batch_size != args.rollout_batch_size:
        # TRL accumulates gradients over rollout/micro micro-batches (gradient_accumulation_steps), not
        # over one minibatch: with several minibatches its optimizer steps would not match ours.
        parser.error("--mini-batch-size must equal --rollout-batch-size (TRL's accumulation spans the whole rollout batch)")
    if args.workdir is None:
        args.workdir = f"/tmp/rlhf-bench-ppo-{Path(args.model).name}"
    return args


# --- the TRL environment ------------------------------------------------------------------------


def ensure_trl_venv(venv: Path) -> str:
    """A venv with TRL 1.12 and this environment's torch/transformers/peft/accelerate/datasets."""
    from importlib.metadata import version

    python = str(venv / "bin" / "python")
    pins = [f"{name}=={version(name)}" for name in SAME_VERSIONS]
    check = (
        "import importlib.metadata as m, sys; import trl.experimental.ppo; "
        f"sys.exit(0 if m.version('trl').startswith('1.12.') and all(m.version(p.split('==')[0]) == p.split('==')[1] for p in {pins!r}) else 1)"
    )
    if Path(python).exists() and h.python_has(python, check):
        return python
    h.log(f"creating {venv} with {TRL_SPEC} and {' '.join(pins)} (once; a few minutes)")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [python, "-m", "pip", "install", "-q"]
    torch_pin = pins[0].replace("+cpu", "")  # pip resolves the local CPU build from the same spec
    subprocess.run([*pip, torch_pin], check=True)
    result = subprocess.run([*pip, *pins[1:], TRL_SPEC, "rich"])
    if result.returncode != 0 or not h.python_has(python, check):
        raise SystemExit(f"blocked: could not install {TRL_SPEC} into {venv} (pip exit {result.returncode}); "
                         "check that pip can reach the package index")
    return python


# --- the prepared run directory (shared by both) ------------------------------------------------


def prepare(args, work: Path) -> None:
    """backbone/ (the model, with min_new_tokens = max_new_tokens), instructions/train.jsonl,
    sft/merged (→ backbone), reward/adapter (a LoRA reward adapter with its score head, in the reward
    stage's format), prompts.json (token ids, for TRL), ours.yaml (our config)."""
    import importlib.resources

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification

    from rlhf.config import LoraConfig
    from rlhf.models import load_tokenizer, peft_lora_config, resolve_model

    shutil.rmtree(work, ignore_errors=True)
    source = Path(resolve_model(args.model))
    backbone = work / "backbone"
    backbone.mkdir(parents=True)
    for item in source.iterdir():
        if item.name not in ("generation_config.json", ".complete"):
            (backbone / item.name).symlink_to(item.resolve())
    generation = json.loads((source / "generation_config.json").read_text()) if (source / "generation_config.json").exists() else {}
    generation["min_new_tokens"] = args.max_new_tokens  # no EOS sampled: every response is max_new_tokens long
    (backbone / "generation_config.json").write_text(json.dumps(generation, indent=1))
    (work / "sft").mkdir()
    (work / "sft" / "merged").symlink_to(backbone)

    seeds_file = importlib.resources.files("rlhf.data_builders") / "default_seeds.jsonl"
    rows = [json.loads(line) for line in seeds_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    messages = []
    for row in rows[: args.rollout_batch_size]:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages.append([{"role": "user", "content": user}, {"role": "assistant", "content": row.get("output", "")}])
    (work / "instructions").mkdir()
    with (work / "instructions" / "train.jsonl").open("w", encoding="utf-8") as f:
        for m in messages:
            f.write(json.dumps({"messages": m, "source": "seed"}) + "\n")
    tokenizer = load_tokenizer(str(backbone))
    prompts = [
        list(tokenizer.apply_chat_template(m[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for m in messages
    ]
    (work / "prompts.json").write_text(json.dumps(prompts))

    torch.manual_seed(args.seed)
    classifier = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, dtype=torch.float32)
    classifier.config.pad_token_id = tokenizer.pad_token_id
    lora = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=0.0)
    reward = get_peft_model(classifier, peft_lora_config(lora, task_type="SEQ_CLS"))
    reward.save_pretrained(work / "reward" / "adapter")
    tokenizer.save_pretrained(work / "reward" / "adapter")

    never = args.steps + 1
    (work / "ours.yaml").write_text(
        json.dumps(  # JSON is YAML
            {
                "output_dir": str(work / "ours-run"),
                "seed": args.seed,
                "model": {"name_or_path": str(backbone), "dtype": "float32", "device": "cpu"},
                "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0},
                "wandb": {"mode": "disabled"},
                "ppo": {
                    "num_prompts": args.rollout_batch_size,
                    "steps": args.steps,
                    "rollout_batch_size": args.rollout_batch_size,
                    "mini_batch_size": args.mini_batch_size,
                    "micro_batch_size": args.micro_batch_size,
                    "ppo_epochs": args.ppo_epochs,
                    "learning_rate": args.learning_rate,
                    "max_new_tokens": args.max_new_tokens,
                    "temperature": 1.0,
                    "missing_eos_penalty": 1.0,
                    "kl_coef": 0.05,
                    "sample_every": never,
                    "save_every": never,
                },
            },
            indent=1,
        )
    )


# --- children -----------------------------------------------------------------------------------


def child_ours(args, work: Path) -> dict:
    """Our ppo stage, `rlhf.stages.ppo.run`, as the runner calls it (minus fingerprinting and publishing)."""
    from rlhf.config import load_config
    from rlhf.dag import STAGES
    from rlhf.runner import StageContext
    from rlhf.stages import ppo

    marks: list[tuple[float, float]] = []  # (wall, process CPU) at the start of step 1 and the end of every step
    rollout = ppo.generate_rollout

    def first_rollout_marked(*a, **k):
        if not marks:
            marks.append((time.time(), time.process_time()))
        return rollout(*a, **k)

    class TimedHistory(ppo.StageHistory):  # the stage writes one metrics line at the end of each step
        def write(self, record):
            marks.append((time.time(), time.process_time()))
            super().write(record)

    ppo.generate_rollout = first_rollout_marked
    ppo.StageHistory = TimedHistory
    config = load_config(work / "ours.yaml")
    run_dir = Path(config.output_dir)
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "out").mkdir(parents=True)
    ctx = StageContext(
        stage=next(s for s in STAGES if s.name == "ppo"),
        config=config,
        run_dir=run_dir,
        out_dir=run_dir / "out",
        work_dir=run_dir / "work",
        inputs={"instructions": work / "instructions", "sft": work / "sft", "reward": work / "reward"},
    )
    started = time.time()
    summary = ppo.run(ctx)
    records = [json.loads(line) for line in (run_dir / "out" / "metrics.jsonl").read_text().splitlines()]
    return {
        "step_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])],
        "step_cpu_s": [b[1] - a[1] for a, b in zip(marks, marks[1:])],
        "rollout_s": [r["time/rollout"] for r in records],
        "update_s": [r["time/update"] for r in records],
        "response_length": [r["val/response_length"] for r in records],
        "eos_fraction": [r["val/eos_fraction"] for r in records],
        "stage_s": time.time() - started,
        "resident_backbones": summary["resident_backbones"],
        "vm_hwm_mb": h.vm_hwm_mb(),
    }


def child_trl(args, work: Path) -> dict:
    """TRL 1.12's PPOTrainer on the same backbone, prompts and settings."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    backbone = str(work / "backbone")
    tokenizer = AutoTokenizer.from_pretrained(backbone, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    policy = AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32)
    value_model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, dtype=torch.float32)
    reward_model = AutoModelForSequenceClassification.from_pretrained(backbone, num_labels=1, dtype=torch.float32)
    value_model.config.pad_token_id = reward_model.config.pad_token_id = tokenizer.pad_token_id
    prompts = json.loads((work / "prompts.json").read_text())
    dataset = Dataset.from_dict({"input_ids": prompts})

    config = PPOConfig(
        output_dir=str(work / "trl-run"),
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=args.rollout_batch_size // args.micro_batch_size,
        num_mini_batches=args.rollout_batch_size // args.mini_batch_size,
        num_ppo_epochs=args.ppo_epochs,
        total_episodes=args.rollout_batch_size * args.steps,
        local_rollout_forward_batch_size=args.rollout_batch_size,
        response_length=args.max_new_tokens,
        stop_token="eos",
        temperature=1.0,
        missing_eos_penalty=1.0,
        kl_coef=0.05,
        learning_rate=args.learning_rate,
        lr_scheduler_type="linear",
        seed=args.seed,
        bf16=False,
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=args.trl_gradient_checkpointing,
        num_sample_generations=0,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    marks: list[tuple[float, float]] = []  # (wall, process CPU) at the start of training and the end of every step
    logs: list[dict] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks.append((time.time(), time.process_time()))

        def on_step_end(self, *a, **k):
            marks.append((time.time(), time.process_time()))

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs:
                collected.append(dict(logs))

    collected = logs
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=policy,
        ref_model=None,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=dataset,
        eval_dataset=dataset,
        peft_config=peft_config,
        callbacks=[Timer()],
    )
    started = time.time()
    trainer.train()
    return {
        "step_s": [b[0] - a[0] for a, b in zip(marks, marks[1:])],
        "step_cpu_s": [b[1] - a[1] for a, b in zip(marks, marks[1:])],
        "eos_tokens": [entry.get("val/num_eos_tokens") for entry in logs if "val/num_eos_tokens" in entry],
        "train_s": time.time() - started,
        "vm_hwm_mb": h.vm_hwm_mb(),
    }


# --- main ---------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse_args(argv)
    work = Path(args.workdir)
    if args.child:
        child = child_ours if args.child == "ours" else child_trl
        h.write_result(args.result, child(args, work))
        return

    h.log(f"machine: {h.cpu_info()}; load average before: {h.loadavg()}")
    h.log(h.code_state("stages/ppo.py", "pipeline/ppo_math.py", "pipeline/rollout.py", "pipeline/roles.py", "pipeline/models.py"))
    trl_python = ensure_trl_venv(Path(args.trl_venv)) if args.only != "ours" else None
    prepare(args, work)
    h.log(
        f"model {args.model}, fp32, LoRA r={args.lora_r} alpha={args.lora_alpha} (all linear layers); "
        f"{args.steps} steps x rollout {args.rollout_batch_size} (minibatch {args.mini_batch_size}, "
        f"micro-batch {args.micro_batch_size}, {args.ppo_epochs} PPO epoch(s)), {args.max_new_tokens} new tokens; "
        f"{args.runs} runs each, alternating; first {args.warmup_steps} step(s) of each run left out; "
        f"threads per run: {args.threads or 'default'}"
    )
    passthrough = [f"--model={args.model}", f"--steps={args.steps}", f"--rollout-batch-size={args.rollout_batch_size}",
                   f"--mini-batch-size={args.mini_batch_size}", f"--micro-batch-size={args.micro_batch_size}",
                   f"--ppo-epochs={args.ppo_epochs}", f"--max-new-tokens={args.max_new_tokens}", f"--lora-r={args.lora_r}",
                   f"--lora-alpha={args.lora_alpha}", f"--learning-rate={args.learning_rate}", f"--seed={args.seed}",
                   *(["--trl-gradient-checkpointing"] if args.trl_gradient_checkpointing else [])]
    pythons = {"ours": sys.executable, "trl": trl_python}
    names = [args.only] if args.only else ["ours", "trl"]

    def command(name: str, result_file: Path) -> list[str]:
        return [pythons[name], str(Path(__file__).resolve()), *passthrough, "--workdir", str(work),
                "--child", name, "--result", str(result_file)]

    results = h.alternate(names, args.runs, command, work, h.bench_env(args.threads))
    summary = h.summarize(results, args.warmup_steps)
    if "ours" in results:
        ours = results["ours"][-1]
        h.log(f"ours: response length {ours['response_length']}, EOS fraction {ours['eos_fraction']}, "
              f"rollout {['%.2f' % s for s in ours['rollout_s']]} s, rollout+update {['%.2f' % (a + b) for a, b in zip(ours['rollout_s'], ours['update_s'])]} s, "
              f"resident backbones {ours['resident_backbones']}")
    if "trl" in results:
        h.log(f"trl : EOS tokens per step {results['trl'][-1]['eos_tokens']}")
    h.log(f"load average after: {h.loadavg()}")
    if not args.only:
        h.ratio_lines(summary)


if __name__ == "__main__":
    main()
