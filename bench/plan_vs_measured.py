#!/usr/bin/env python
"""`rlhf plan`'s estimates against each stage's measured peak memory, on a randomly initialized model
of a given shape and synthetic data at the lengths the plan assumes.

    # on a GPU: the 7B QLoRA check (random weights: nothing is downloaded)
    python bench/plan_vs_measured.py configs/qwen2.5-7b-qlora-24gb.yaml \\
        --model-config configs/model_shapes/qwen2.5-7b-instruct.json
    # on the CPU: SmolLM2's shape under the quickstart's settings
    python bench/plan_vs_measured.py configs/quickstart.yaml \\
        --model-config configs/model_shapes/smollm2-135m-instruct.json --prompt-tokens 128 model.dtype=float32

1. The model: built from the shape's config.json with random weights, saved in the dtype this machine
   computes in (`model.dtype`, `auto` resolved as the pipeline resolves it: the plan is given that), with
   a word-level tokenizer that covers its whole vocabulary. Random weights almost never sample the end
   token, so every generation runs to its max_new_tokens: the plan's worst case.
2. The data, at the planned lengths: seeds whose chat prompts are --prompt-tokens long (one teacher
   batch of them without an answer, for the teacher to answer; the others with answers that fill
   sft.max_length), and imported preference pairs whose conversations fill reward.max_length.
3. The stages: instructions, sft, preferences (imported), reward and ppo, each through
   `rlhf run --only STAGE` in a process of its own, for --steps optimizer steps (ppo: one step). Each
   published manifest records the stage's memory (pipeline/memory.py: `stage_memory`).
4. The comparison, per stage: the estimate, the measurement and their ratio. The last line reads
   `worst_ratio=<the measured/estimated ratio furthest from 1>`.

What is measured: on a GPU, the peak of allocated tensors (`torch.cuda.max_memory_allocated`) against
the estimate less its CUDA context, which the allocator does not see (the allocator's reserved peak
is printed beside it). On the CPU, how far the process's resident set grew over the stage (its peak
less what the process held when the stage began: the runtime and libraries), with glibc told to hand
freed blocks of 64 KiB or more back to the OS at once (MALLOC_MMAP_THRESHOLD_), so that the resident
set follows the live tensors. The plan assumes a GPU; on the CPU the comparison is a cross-check of
its arithmetic, not of CUDA's kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

STAGES = ("instructions", "sft", "preferences", "reward", "ppo")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]")
TEMPLATE_WORDS = ("user", "assistant", "system")  # the chat template's role names, as whole words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a pipeline config (YAML)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of the config")
    parser.add_argument("--model-config", required=True, help="the config.json of the shape to build")
    parser.add_argument("--prompt-tokens", type=int, default=512, help="chat prompt length (default 512)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps of sft and reward (default 2)")
    parser.add_argument("--work", default="runs/plan-vs-measured", help="work folder (replaced)")
    parser.add_argument("--ppo-steps", type=int, default=1, help="ppo steps (default 1)")
    parser.add_argument("--with-evaluate", action="store_true", help="run the evaluate stage too (it has no estimate)")
    args = parser.parse_intermixed_args()

    from rlhf.config import load_config, to_yaml

    from rlhf.models import pick_dtype

    if not Path(args.model_config).is_file():
        sys.exit(f"plan_vs_measured: --model-config {args.model_config}: file not found")
    work = Path(args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = load_config(args.config, args.overrides)
    # The plan reads `auto` as bfloat16 (a GPU); the run would take float32 on a CPU without AVX-512.
    # Name the dtype this machine will use, so that the model, the run and the plan agree.
    dtype = str(pick_dtype(base.model)).removeprefix("torch.")
    args.overrides.append(f"model.dtype={dtype}")

    # 1. A model of the shape, with random weights, and a tokenizer for its whole vocabulary.
    model_dir = work / "model"
    build_random_model(Path(args.model_config), model_dir, dtype)

    # 2. Synthetic seeds and preference pairs at the planned lengths.
    words = Words(model_dir)
    num_eval = 2
    answered_by_teacher = base.instructions.teacher.batch_size
    with_answers = args.steps * base.sft.batch_size * base.sft.grad_accum * base.launch.num_processes
    seeds = [{"instruction": words.prompt(args.prompt_tokens)} for _ in range(answered_by_teacher)]
    answer_tokens = base.sft.max_length - args.prompt_tokens - words.answer_overhead
    seeds += [
        {"instruction": words.prompt(args.prompt_tokens), "output": words.text(answer_tokens)}
        for _ in range(with_answers + num_eval)
    ]
    write_jsonl(work / "seeds.jsonl", seeds)
    pair_count = args.steps * base.reward.batch_size * base.reward.grad_accum * base.launch.num_processes
    response_tokens = base.reward.max_length - args.prompt_tokens - words.answer_overhead - 2  # TRL drops longer
    pairs = [
        {"prompt": words.prompt(args.prompt_tokens), "chosen": words.text(response_tokens),
         "rejected": words.text(response_tokens)}
        for _ in range(pair_count + num_eval)
    ]
    write_jsonl(work / "pairs.jsonl", pairs)

    # 3. The stages, one process each, on a config pointed at that model and data.
    overrides = [
        *args.overrides,
        f"output_dir={work / 'run'}",
        f"model.name_or_path={model_dir}",
        "wandb.mode=disabled",
        f"instructions.seeds={work / 'seeds.jsonl'}",
        "instructions.expand=false",
        f"instructions.num_instructions={len(seeds)}",
        f"instructions.num_eval={num_eval}",
        f"sft.max_steps={args.steps}",
        "preferences.source=import",
        f"preferences.path={work / 'pairs.jsonl'}",
        f"preferences.num_eval={num_eval}",
        f"reward.max_steps={args.steps}",
        f"ppo.steps={args.ppo_steps}",
    ]
    config = load_config(args.config, overrides)
    config_file = work / "config.yaml"
    config_file.write_text(to_yaml(config))
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONUNBUFFERED": "1"}
    for stage in (*STAGES, "evaluate") if args.with_evaluate else STAGES:
        print(f"--- {stage}", flush=True)
        command = [sys.executable, "-m", "rlhf.cli", "run", str(config_file), "--only", stage]
        if subprocess.run(command, env=env).returncode != 0:
            sys.exit(f"plan_vs_measured: stage {stage} failed")

    # 4. Estimates against measurements.
    print(compare(config, model_dir, args.prompt_tokens, work / "run"))


def build_random_model(shape_file: Path, dest: Path, dtype_name: str) -> None:
    """A causal LM of the shape in `shape_file` with random weights, and a word-level tokenizer that has
    one word per id of the model's vocabulary (the ChatML template's special tokens first)."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from rlhf.models import CHATML_TEMPLATE

    config = AutoConfig.from_pretrained(str(shape_file))
    text = config.get_text_config()
    fixed = [*SPECIAL_TOKENS, *TEMPLATE_WORDS]
    vocab = {token: i for i, token in enumerate(fixed)}
    vocab.update({f"w{i}": i for i in range(len(fixed), text.vocab_size)})
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>",
        unk_token="[UNK]",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[:3])})
    tokenizer.chat_template = CHATML_TEMPLATE
    text.bos_token_id, text.eos_token_id, text.pad_token_id = 1, 2, 0
    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random init of 7B parameters: seconds on a GPU
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = 1, 2
    model.generation_config.pad_token_id = 0
    print(f"plan_vs_measured: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters, "
          f"random, {dtype} -> {dest}", flush=True)
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()


class Words:
    """Texts of an exact number of tokens under the random model's word-level tokenizer."""

    def __init__(self, model_dir: Path):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.first = len(SPECIAL_TOKENS) + len(TEMPLATE_WORDS)
        self.rng = random.Random(0)
        empty = [{"role": "user", "content": ""}]
        self.prompt_overhead = len(self._ids(empty, add_generation_prompt=True))
        turn = [*empty, {"role": "assistant", "content": ""}]
        self.answer_overhead = len(self._ids(turn)) - self.prompt_overhead  # the answer's closing marker

    def _ids(self, messages, **kwargs) -> list[int]:
        return list(self.tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])

    def text(self, tokens: int) -> str:
        return " ".join(f"w{self.rng.randrange(self.first, len(self.tokenizer) - 1)}" for _ in range(tokens))

    def prompt(self, tokens: int) -> str:
        """A user message whose chat prompt (with the assistant's opening) is `tokens` long."""
        text = self.text(tokens - self.prompt_overhead)
        assert len(self._ids([{"role": "user", "content": text}], add_generation_prompt=True)) == tokens
        return text


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def compare(config, model_dir: Path, prompt_tokens: int, run_dir: Path) -> str:
    """The table of estimates and measurements, MiB, and the worst ratio."""
    from rlhf.plan import CUDA_CONTEXT_BYTES, load_shape, plan_memory

    shape = load_shape(str(model_dir))
    estimates = {e.stage: e for e in plan_memory(config, shape, prompt_tokens) if e.parts}
    lines = [
        f"{'stage':<13} {'estimate':>9} {'measured':>9} {'ratio':>6}  MiB; what was measured",
        f"{'-' * 13} {'-' * 9} {'-' * 9} {'-' * 6}  {'-' * 40}",
    ]
    ratios = []
    for stage in STAGES:
        if stage not in estimates:
            continue
        memory = json.loads((run_dir / stage / "manifest.json").read_text())["memory"]
        estimate = (estimates[stage].total - CUDA_CONTEXT_BYTES) / 2**20  # what the allocator sees
        if memory["device"] == "cpu":
            measured = memory["peak_mb"] - memory["start_mb"]
            what = f"resident growth ({memory['start_mb']:.0f} MiB at the start)"
        else:
            measured = memory["peak_mb"]
            what = f"allocated on {memory['device']} (reserved {memory['peak_reserved_mb']:.0f})"
        ratios.append(measured / estimate)
        lines.append(f"{stage:<13} {estimate:>9.1f} {measured:>9.1f} {measured / estimate:>6.3f}  {what}")
    worst = max(ratios, key=lambda r: abs(r - 1))
    lines.append(f"estimates exclude the CUDA context ({CUDA_CONTEXT_BYTES / 2**20:.0f} MiB); prompts {prompt_tokens} tokens")
    lines.append(f"worst_ratio={worst:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
