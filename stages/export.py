"""The export stage: the PPO policy as a model to ship.

Outputs:
- `model/`: the merged SFT model with the PPO policy adapter merged in (in float32, never into
  quantized weights; saved as export.dtype): safetensors weights, tokenizer with its chat template,
  a generation config set to the decoding the evaluate stage measured, and a README.md model card (base model, data, stages with
  their fingerprints and metrics, evaluation results). Plain `AutoModelForCausalLM.from_pretrained`
  loads it;
- `adapter/`: the policy adapter alone (a LoRA on the merged SFT model, `sft/merged/`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console
from transformers import GenerationConfig

from rlhf.chat_format import ChatFormat
from rlhf.benchmark_report import benchmark_tables
from rlhf.config import EMBEDDED_MODEL
from rlhf.data_builders.json_files import read_conversations
from rlhf.models import load_causal_lm, load_tokenizer
from rlhf.report import shipped_gap_line, summary_table
from rlhf.runner import StageContext

console = Console(highlight=False, soft_wrap=True)

# The stages whose manifests the model card lists, in pipeline order (benchmark when it has run).
CARD_STAGES = ("instructions", "sft", "preferences", "reward", "ppo", "evaluate", "benchmark")
HUB_NAMES = {EMBEDDED_MODEL: "HuggingFaceTB/SmolLM2-135M-Instruct"}


def run(ctx: StageContext) -> dict:
    config, settings = ctx.config, ctx.config.export
    sft_dir, policy_dir = ctx.inputs["sft"] / "merged", ctx.inputs["ppo"] / "policy"
    report = json.loads((ctx.inputs["evaluate"] / "report.json").read_text())

    # 1. Setup: the merged SFT model in float32 on the CPU, never quantized: a LoRA update merged into
    #    4-bit or bfloat16 weights would be rounded away. The policy adapter goes on top.
    full_precision = config.model.model_copy(update={"quantization": "none", "device": "cpu", "dtype": "float32"})
    tokenizer = load_tokenizer(str(sft_dir), config.model.trust_remote_code)
    policy = PeftModel.from_pretrained(load_causal_lm(str(sft_dir), full_precision), policy_dir).eval()

    # 2. Merge, and check that the merged weights give the logits the adapter gave; then cast to the
    #    export dtype and measure what the cast costs.
    probe = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        before = policy(**probe).logits
        merged = policy.merge_and_unload()
        merge_error = (merged(**probe).logits - before).abs().max().item()
        tolerance = 1e-4 * max(1.0, before.abs().max().item())
        if merge_error > tolerance:
            raise RuntimeError(f"export: merged logits differ from the adapter's by {merge_error:.3g} (tolerance {tolerance:.3g})")
        merged = merged.to(getattr(torch, settings.dtype))
        cast_error = (merged(**probe).logits.float() - before).abs().max().item()

        # QLoRA: evaluate judged the NF4 backbone + adapter; what ships is the full-precision merge.
        shipped_gap = evaluated_vs_shipped(ctx, tokenizer, merged)

    # 3. Save the model, tokenizer (with its chat template) and a generation config with the evaluated decoding.
    model_dir = ctx.out_dir / "model"
    set_generation_config(merged, tokenizer, report["decoding"])
    merged.save_pretrained(model_dir)  # safetensors only
    tokenizer.save_pretrained(model_dir)
    (model_dir / "README.md").write_text(model_card(ctx, report, shipped_gap), encoding="utf-8")

    # 4. Keep the adapter-only form beside it.
    shutil.copytree(policy_dir, ctx.out_dir / "adapter")
    size_mb = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20
    console.print(
        f"export: {ctx.run_dir / 'export' / 'model'} ({size_mb:.1f} MB of {settings.dtype} weights; "
        f"max |Δlogit| against the adapter: {merge_error:.2g} after merging, {cast_error:.2g} in {settings.dtype})"
    )
    return {
        "dtype": settings.dtype,
        "size_mb": round(size_mb, 2),
        "merge_max_abs_logit_diff": merge_error,
        "export_max_abs_logit_diff": cast_error,
        **({f"evaluated_vs_shipped_{key}": value for key, value in shipped_gap.items()} if shipped_gap else {}),
    }


def evaluated_vs_shipped(ctx: StageContext, tokenizer, shipped) -> dict | None:
    """For a quantized run, how far the shipped model's logits are from those of the model evaluate judged
    (the quantized merged SFT backbone + the policy adapter), over every position of the held-out prompts:
    max and mean |Δlogit| and the mean KL(shipped ‖ evaluated) of the next-token distributions. None when
    nothing was quantized (then both are the same weights, up to export.dtype's cast)."""
    config = ctx.config
    if config.model.quantization == "none":
        return None
    sft_dir, policy_dir = ctx.inputs["sft"] / "merged", ctx.inputs["ppo"] / "policy"
    evaluated = PeftModel.from_pretrained(load_causal_lm(str(sft_dir), config.model), policy_dir).eval()
    device = next(evaluated.parameters()).device
    chat = ChatFormat.of(tokenizer)
    conversations = read_conversations(ctx.inputs["instructions"] / "eval.jsonl")[: config.evaluate.num_prompts]
    largest, total, kl, positions = 0.0, 0.0, 0.0, 0
    for messages in conversations:
        ids = torch.tensor([chat.prompt_ids(messages[:-1])])
        ours = shipped(input_ids=ids).logits[0].float()
        theirs = evaluated(input_ids=ids.to(device)).logits[0].float().cpu()
        gap = (ours - theirs).abs()
        largest, total, positions = max(largest, gap.max().item()), total + gap.mean(-1).sum().item(), positions + len(ids[0])
        log_ours, log_theirs = torch.log_softmax(ours, -1), torch.log_softmax(theirs, -1)
        kl += (log_ours.exp() * (log_ours - log_theirs)).sum(-1).sum().item()
    del evaluated
    gap = {
        "prompts": len(conversations), "max_abs_logit_diff": largest, "mean_abs_logit_diff": total / positions,
        "mean_kl_per_token": kl / positions,
    }
    console.print(
        f"export: shipped vs evaluated ({config.model.quantization} backbone) on {gap['prompts']} held-out prompts: "
        f"max |Δlogit| {largest:.3g}, mean {gap['mean_abs_logit_diff']:.3g}, mean KL {gap['mean_kl_per_token']:.3g} per token"
    )
    return gap


def set_generation_config(model, tokenizer, decoding: dict) -> None:
    """The decoding the evaluate stage measured becomes the model's default, and nothing else: a fresh
    config, so no processor of the base model's own (Qwen2.5's repetition_penalty, a top_k) is shipped as
    if it had been evaluated. It stops at every EOS id the pipeline stopped at."""
    chat = ChatFormat.of(tokenizer, model)
    sampled = decoding["temperature"] > 0
    model.generation_config = GenerationConfig(
        bos_token_id=model.generation_config.bos_token_id,
        eos_token_id=list(chat.eos_ids),
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=decoding["max_new_tokens"],
        do_sample=sampled,
        temperature=decoding["temperature"] if sampled else None,
        top_p=decoding["top_p"] if sampled else None,
        top_k=0 if sampled else None,  # as evaluated: no top-k cut (transformers' default would be 50)
    )


# --- the model card -----------------------------------------------------------------------------


USAGE = [
    "## Use",
    "",
    "```python",
    "from transformers import AutoModelForCausalLM, AutoTokenizer",
    "",
    'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/model")',
    'model = AutoModelForCausalLM.from_pretrained("PATH/TO/model")',
    'ids = tokenizer.apply_chat_template([{"role": "user", "content": "Give me one tip for sleeping well."}],',
    "                                    add_generation_prompt=True, return_tensors='pt', return_dict=True)",
    "print(tokenizer.decode(model.generate(**ids)[0][ids['input_ids'].shape[1]:], skip_special_tokens=True))",
    "```",
    "",
]


def model_card(ctx: StageContext, report: dict, shipped_gap: dict | None = None) -> str:
    config = ctx.config
    base = config.model.name_or_path
    hub_base = HUB_NAMES.get(base, base if _looks_like_hub_id(base) else None)
    name = config.export.name or f"{Path(hub_base or base).name}-rlhf-ppo"
    manifests = {stage: _read_json(ctx.run_dir / stage / "manifest.json") for stage in CARD_STAGES}
    instructions = _read_json(ctx.run_dir / "instructions" / "stats.json")
    preferences = _read_json(ctx.run_dir / "preferences" / "stats.json")

    front = ["---", "library_name: transformers", "pipeline_tag: text-generation", "tags: [rlhf, ppo, lora]"]
    if hub_base:
        front.append(f"base_model: {hub_base}")
    front.append("---")
    lines = [
        *front,
        "",
        f"# {name}",
        "",
        f"`{base}`{f' ({hub_base})' if hub_base and hub_base != base else ''}, fine-tuned with supervised "
        "fine-tuning (LoRA) and then PPO against a learned reward model, by rlhf-pipeline. The LoRA adapters are "
        "merged: this folder is a plain transformers model.",
        "",
        *USAGE,
        "The generation config holds the decoding it was evaluated with "
        f"(temperature {report['decoding']['temperature']:g}, top_p {report['decoding']['top_p']:g}, "
        f"max_new_tokens {report['decoding']['max_new_tokens']}). `../adapter/` is the PPO policy alone, a LoRA "
        "adapter on the merged SFT model (`sft/merged/` of the run).",
        "",
        "## Data",
        "",
    ]
    if instructions:
        lines.append(
            f"- instructions: {instructions.get('train', '?')} train / {instructions.get('eval', '?')} held-out "
            f"conversations ({instructions.get('seeds', '?')} seed instructions, self-instruct expansion by a teacher model)"
        )
    if preferences:
        lines.append(
            f"- preference pairs: {preferences.get('train', '?')} train / {preferences.get('eval', '?')} held-out "
            f"(source: {preferences.get('source', '?')}{', judge: ' + preferences['judge'] if 'judge' in preferences else ''})"
        )
    lines += ["", "## Evaluation", "", summary_table(report)]
    if shipped_gap:
        lines += ["", shipped_gap_line(shipped_gap, config.model.quantization)]
    # The benchmark stage's table when it was published before export ran (export does not wait for it).
    benchmark = _read_json(ctx.run_dir / "benchmark" / "report.json") if manifests["benchmark"] else {}
    if benchmark.get("tasks"):
        lines += ["", "## Benchmarks (lm-evaluation-harness): base, SFT and this model (PPO)", "", benchmark_tables(benchmark)]
    lines += ["", "## Stages", "", "| stage | fingerprint | finished | metrics |", "|---|---|---|---|"]
    for stage, manifest in manifests.items():
        if manifest:
            metrics = ", ".join(f"{k}={_short(v)}" for k, v in manifest.get("metrics", {}).items())
            lines.append(f"| {stage} | `{manifest['fingerprint'][:12]}` | {manifest.get('finished_at', '')} | {metrics} |")
    lines += ["", f"LoRA r={config.lora.r}, alpha={config.lora.alpha}; seed {config.seed}.", ""]
    return "\n".join(lines)


def _looks_like_hub_id(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith((".", "/")) and not Path(name).exists()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
