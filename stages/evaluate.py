"""The evaluate stage: the SFT model against the PPO policy on held-out prompts.

Both models answer the instruction dataset's eval split (never trained on) `samples_per_prompt`
times per prompt, with the same decoding settings and seed. They are one resident backbone, as in
the ppo stage: the merged SFT model with the PPO policy adapter switched on (PPO) or all adapters
disabled (SFT), plus the reward adapter and score head (the proxy reward, read exactly as PPO's
`rlhf.roles.Roles.scores` reads it, rlhf.reward.readout). For each model it measures, averaged over every response:
- proxy reward: the learned reward model's score (or the external reward model's, when the reward
  stage used one);
- gold reward: the rubric judge with the eval split's reference answer, or a teacher's pairwise
  verdicts with `evaluate.judge: llm`;
- KL to SFT: per response, the sum over its tokens of log π_model − log π_sft on the model's own
  samples, at the sampling temperature, as ppo measures it (the quantity ppo.kl_budget bounds): 0 for
  SFT, unless top_p < 1 truncates what it samples from (rlhf.stages.ppo's docstring);
- response length in tokens and the fraction of responses that ended with EOS.
Then PPO's win rate over SFT under the gold judge, prompt by prompt on each prompt's mean gold score
(ties counted apart), and a reward-hacking flag (proxy up, gold down). General abilities (lm-evaluation-
harness tasks on the base, SFT and PPO models) are the benchmark stage's (rlhf.stages.benchmark).

Outputs: `report.json`, `report.md` (table, plots, side-by-side samples), `samples.jsonl` (every
response pair), `plots/` (PNG training curves from the sft, reward and ppo metrics).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import PeftModel
from rich.console import Console
from tqdm.auto import tqdm

from rlhf.chat_format import ChatFormat
from rlhf.data_builders.json_files import read_conversations, write_jsonl
from rlhf.data_builders.teacher import build_teacher
from rlhf.errors import UserError
from rlhf.generation import Sampling
from rlhf.models import fits_context, load_causal_lm, load_tokenizer
from rlhf.plots import draw_plots
from rlhf.report import (
    MODELS,
    markdown_report,
    reward_hacking,
    summary_table,
    verdict_scores,
    win_rate,
    win_rate_interval,
)
from rlhf.reward.judges import Candidate, LLMJudge, RubricJudge
from rlhf.reward.readout import (
    RewardModel,
    attach_reward_adapter,
    read_external_reward_model,
)
from rlhf.roles import Roles
from rlhf.rollout import decode_responses, engine_rollout, generate_rollout, in_micro_batches, with_trainer_logprobs
from rlhf.runner import StageContext, process_rank
from rlhf.tracking import start_wandb
from rlhf.vllm_engine import VllmEngine, lora_rank_for

console = Console(highlight=False, soft_wrap=True)

Example = tuple[list[dict], str]
"""(prompt conversation, reference answer)."""


@dataclass
class Responses:
    """One model's responses, one entry per (prompt, sample) row, each prompt's samples in a row."""

    text: list[str] = field(default_factory=list)
    length: list[int] = field(default_factory=list)
    finished: list[bool] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    """Per response: sum over its tokens of log π_model − log π_sft."""
    proxy: list[float | None] = field(default_factory=list)
    gold: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        def mean(values):
            return sum(values) / len(values) if values else 0.0

        return {
            "proxy_reward": mean(self.proxy),
            "gold_reward": mean(self.gold),
            "kl": mean(self.kl),
            "response_length": mean(self.length),
            "eos_fraction": mean([float(f) for f in self.finished]),
        }


def run(ctx: StageContext) -> dict:
    config, settings = ctx.config, ctx.config.evaluate
    examples = load_eval_examples(ctx.inputs["instructions"] / "eval.jsonl", settings.num_prompts)

    # 1-2. Both models on one backbone; generate batch by batch with the same seed and measure what needs
    #      the backbone: token counts, EOS, the KL of each model's samples to SFT, the proxy reward.
    #      Each prompt's responses sit next to each other: row r answers prompt r // samples_per_prompt.
    responses, nonfinite, examples, rows = generate_and_measure(ctx, examples)

    # 3. Proxy reward from the external reward model, when the reward stage used one.
    external = read_external_reward_model(ctx.inputs["reward"])
    if external:
        reward_model = RewardModel.load(external, config.model, "reward.model", settings.batch_size)
        for name in MODELS:
            responses[name].proxy = reward_model.scores([p for p, _ in rows], responses[name].text, responses[name].finished)
        del reward_model

    # 4. Gold reward: the rubric with the reference answer, or a teacher's pairwise verdicts.
    judge_gold(responses, rows, config)

    # 5. The report: per-model means, the win rate (prompt by prompt), the reward-hacking flag, the KL budget.
    report = build_report(config, len(examples), responses, external, nonfinite)
    samples = sample_rows(rows, responses, settings.samples_per_prompt)

    # 6. Save: report.json, samples.jsonl, the training curves, report.md; the same to wandb.
    return save(ctx, report, samples)


def load_eval_examples(path: Path, count: int) -> list[Example]:
    """(prompt conversation, reference answer) for the first `count` rows of the eval split."""
    examples = [(messages[:-1], messages[-1]["content"]) for messages in read_conversations(path)][:count]
    if not examples:
        raise UserError(f"{path}: no held-out prompts to evaluate on")
    return examples


def load_roles(ctx: StageContext) -> Roles:
    """The merged SFT model carrying the policy adapter and, unless the reward stage used an external
    model, the reward adapter and score head."""
    config = ctx.config
    backbone_dir = str(ctx.inputs["sft"] / "merged")
    tokenizer = load_tokenizer(backbone_dir, config.model.trust_remote_code)
    tokenizer.padding_side = "left"
    backbone = load_causal_lm(backbone_dir, config.model)
    chat = ChatFormat.of(tokenizer, backbone)
    model = PeftModel.from_pretrained(backbone, ctx.inputs["ppo"] / "policy", adapter_name="policy")
    external = read_external_reward_model(ctx.inputs["reward"])
    reward_head = None if external else attach_reward_adapter(model, ctx.inputs["reward"])
    return Roles(model.eval(), None, reward_head, [], chat)


def generate_and_measure(ctx: StageContext, examples: list[Example]):
    """Each model's Responses on every row, and the count of repaired samples; the examples and rows
    left once prompts too long for the model's context are dropped. The backbone is freed on return,
    before any judge model loads."""
    config, settings = ctx.config, ctx.config.evaluate
    roles, k = load_roles(ctx), settings.samples_per_prompt
    prompts = [roles.chat.prompt_ids(prompt) for prompt, _ in examples]
    fits = fits_context(roles.model, prompts, settings.max_new_tokens, "evaluate.max_new_tokens", "evaluate")
    examples = [e for e, fit in zip(examples, fits) if fit]
    if not examples:
        raise UserError(f"{ctx.inputs['instructions'] / 'eval.jsonl'}: no held-out prompts fit the model's context")
    rows = [e for e in examples for _ in range(k)]
    batches = [ids for ids, fit in zip(prompts, fits) if fit for _ in range(k)]
    sampling = Sampling(settings.temperature, settings.top_p)
    console.print(
        f"evaluate: {len(examples)} held-out prompts × {k} responses, SFT vs PPO (temperature {settings.temperature:g}, "
        f"top_p {settings.top_p:g}, max_new_tokens {settings.max_new_tokens}, seed {config.seed})"
    )
    sample = rollout_sampler(ctx, roles, sampling, settings.max_new_tokens)
    responses = {name: Responses() for name in MODELS}
    nonfinite = 0
    with tqdm(total=2 * len(batches), desc="evaluate: generating", unit="response") as progress:
        for start in range(0, len(batches), settings.batch_size):
            batch = batches[start : start + settings.batch_size]
            for name in MODELS:
                torch.manual_seed(config.seed + start)  # the same seed for both models
                rollout = sample(batch, name, config.seed + start)
                nonfinite += measure_batch(roles, rollout, name, sampling, settings.micro_batch_size, responses[name])
                progress.update(len(batch))
    if getattr(sample, "engine", None) is not None:
        sample.engine.close()
    return responses, nonfinite, examples, rows


def rollout_sampler(ctx: StageContext, roles: Roles, sampling: Sampling, max_new_tokens: int):
    """sample(batch, model name, seed) -> Rollout, from the configured engine. With vLLM: one engine on the
    merged SFT backbone, the PPO policy as a LoRA adapter, the log-probs recomputed by the trainer's forward
    (the KL is measured on the trainer's numerics, as ppo measures it)."""
    if ctx.config.generation.engine != "vllm":
        def sample(batch, name, seed):
            adapter = "policy" if name == "ppo" else None
            return generate_rollout(roles, batch, max_new_tokens=max_new_tokens, sampling=sampling, adapter=adapter)
        return sample
    config = ctx.config
    engine = VllmEngine(str(ctx.inputs["sft"] / "merged"), config.model, config.generation, seed=config.seed,
                        lora_rank=lora_rank_for(config.lora, config.generation))
    policy = engine.adapter(ctx.inputs["ppo"] / "policy", "ppo")
    device = next(roles.model.parameters()).device

    def sample(batch, name, seed):
        rollout = engine_rollout(engine, batch, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, device=device,
                                 lora=policy if name == "ppo" else None)
        if name == "sft" and not sampling.truncated:
            return rollout  # its log-probs go unused: SFT's KL to itself is 0
        adapter = "policy" if name == "ppo" else None
        with torch.no_grad():
            own = in_micro_batches(lambda part: roles.sampled_logprobs(part, sampling, adapter), rollout, config.evaluate.micro_batch_size)
        return with_trainer_logprobs(rollout, own)[0]
    sample.engine = engine
    return sample


@torch.no_grad()
def measure_batch(roles: Roles, rollout, name: str, sampling: Sampling, micro_batch_size: int, into: Responses) -> int:
    """Append what model `name`'s sampled `rollout` measures to `into`, `micro_batch_size` rows per forward;
    returns repaired samples."""
    mask, count = rollout.mask, rollout.mask.shape[0]
    if name == "ppo" or sampling.truncated:  # the KL ppo.kl_budget bounds, as ppo measures it
        reference = in_micro_batches(lambda part: roles.reference_logprobs(part, sampling), rollout, micro_batch_size)
        kl = ((rollout.logprobs - reference) * mask).sum(1).tolist()
    else:
        kl = [0.0] * count  # SFT sampled from its full distribution: log π_sft − log π_sft
    into.text += decode_responses(roles.chat, rollout)
    into.length += mask.sum(1).long().tolist()
    into.finished += rollout.finished.tolist()
    into.kl += kl
    into.proxy += in_micro_batches(roles.scores, rollout, micro_batch_size).tolist() if roles.reward_head is not None else [None] * count
    return rollout.repaired


def judge_gold(responses: dict[str, Responses], rows: list[Example], config) -> None:
    settings = config.evaluate
    candidates = {
        name: [Candidate(prompt, text, finished, reference)
               for (prompt, reference), text, finished in zip(rows, responses[name].text, responses[name].finished)]
        for name in MODELS
    }
    if settings.judge == "rubric":
        for name in MODELS:
            responses[name].gold = RubricJudge().scores(candidates[name])
    else:
        teacher = build_teacher(settings.judge_teacher, config.model)
        verdicts = LLMJudge(teacher, seed=config.seed).verdicts(list(zip(candidates["ppo"], candidates["sft"])))
        responses["ppo"].gold, responses["sft"].gold = verdict_scores(verdicts)


def build_report(config, prompts: int, responses: dict[str, Responses], external: str | None, nonfinite: int) -> dict:
    settings, k = config.evaluate, config.evaluate.samples_per_prompt
    models = {name: responses[name].summary() for name in MODELS}
    gold_per_prompt = per_prompt_means(responses["ppo"].gold, k), per_prompt_means(responses["sft"].gold, k)
    return {
        "prompts": prompts,
        "samples_per_prompt": k,
        "decoding": {
            "temperature": settings.temperature,
            "top_p": settings.top_p,
            "max_new_tokens": settings.max_new_tokens,
            "seed": config.seed,
        },
        "proxy_reward_model": f"external reward model {external}" if external else "reward stage (adapter + score head)",
        "judge": settings.judge,
        "models": models,
        "win_rate": win_rate(*gold_per_prompt),
        "win_rate_interval": list(win_rate_interval(*gold_per_prompt)),
        "reward_hacking": reward_hacking(
            models["sft"]["proxy_reward"], models["ppo"]["proxy_reward"], models["sft"]["gold_reward"], models["ppo"]["gold_reward"]
        ),
        "kl_budget": config.ppo.kl_budget,
        "kl_within_budget": models["ppo"]["kl"] <= config.ppo.kl_budget,
        "nonfinite_samples": nonfinite,
    }


def per_prompt_means(values: list[float], samples_per_prompt: int) -> list[float]:
    """[P·k] scores, each prompt's k in a row -> [P] means."""
    k = samples_per_prompt
    return [sum(values[i : i + k]) / k for i in range(0, len(values), k)]


def sample_rows(rows: list[Example], responses: dict[str, Responses], samples_per_prompt: int) -> list[dict]:
    """One row per (prompt, sample): both models' responses and measures side by side."""
    table = []
    for i, (prompt, reference) in enumerate(rows):
        row = {"prompt": prompt[-1]["content"], "reference": reference, "sample": i % samples_per_prompt}
        for name in MODELS:
            r = responses[name]
            row |= {
                f"{name}_response": r.text[i],
                f"{name}_proxy": round(r.proxy[i], 4),
                f"{name}_gold": round(r.gold[i], 4),
                f"{name}_kl": round(r.kl[i], 4),
                f"{name}_length": r.length[i],
                f"{name}_finished": r.finished[i],
            }
        table.append(row)
    return table


def save(ctx: StageContext, report: dict, samples: list[dict]) -> dict:
    """report.json, samples.jsonl, plots/, report.md, wandb; the manifest's metrics."""
    (ctx.out_dir / "report.json").write_text(json.dumps(report, indent=2))
    write_jsonl(ctx.out_dir / "samples.jsonl", samples)
    metrics_files = {stage: ctx.inputs[stage] / "metrics.jsonl" for stage in ("sft", "reward", "ppo")}
    plots = draw_plots(metrics_files, ctx.out_dir / "plots")
    (ctx.out_dir / "report.md").write_text(markdown_report(report, samples, plots, ctx.config.evaluate.num_samples), encoding="utf-8")
    summary = flat_summary(report)
    if process_rank() == 0:
        log_to_wandb(ctx, summary, samples, plots)
    console.print(summary_table(report), markup=False)
    return summary


def flat_summary(report: dict) -> dict:
    """The manifest's metrics and wandb's summary: one flat dict of numbers and flags."""
    summary = {f"{name}/{key}": value for name in MODELS for key, value in report["models"][name].items()}
    wins = report["win_rate"]
    summary |= {
        "win_rate": wins["win_rate"],
        "win_rate_ties_half": wins["win_rate_ties_half"],
        "wins": wins["wins"],
        "ties": wins["ties"],
        "losses": wins["losses"],
        "reward_hacking": report["reward_hacking"],
        "kl_within_budget": report["kl_within_budget"],
        "prompts": report["prompts"],
        "samples_per_prompt": report["samples_per_prompt"],
    }
    return summary


def log_to_wandb(ctx: StageContext, summary: dict, samples: list[dict], plots: list[str]) -> None:
    wandb_run = start_wandb(ctx.config, "evaluate", ctx.run_dir)
    if wandb_run is None:
        return
    import wandb

    columns = ["prompt", "sft_response", "ppo_response", "sft_proxy", "ppo_proxy", "sft_gold", "ppo_gold", "ppo_kl"]
    table = wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in samples])
    images = {f"plots/{name}": wandb.Image(str(ctx.out_dir / "plots" / name)) for name in plots}
    wandb_run.log({"samples": table, **images})
    wandb_run.summary.update(summary)
    wandb_run.finish()

