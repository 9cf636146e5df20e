"""The ppo stage on the tiny model: one backbone with four roles, the KL penalty, learning, resume."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rlhf.chat_format import ChatFormat
from rlhf.cli import main
from rlhf.config import load_config
from rlhf.generation import Sampling
from rlhf.models import (
    enable_checkpointing_with_grad,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)
from rlhf.ppo_math import logprobs_from_logits
from rlhf.roles import Roles, build_actor_critic
from rlhf.rollout import (
    by_prompt_length,
    generate_rollout,
    in_micro_batches,
    reward_sequences,
)
from rlhf.stages import ppo
from rlhf.training import NonFiniteTraining

SMOKE = str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml")


def run_ppo(run_dir: Path, *overrides: str) -> int:
    return main(["run", SMOKE, f"output_dir={run_dir}", "--only", "ppo", *overrides])


def curve(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]


def setup_roles(run_dir: Path, quantization: str = "none", dtype: str = "auto"):
    config = load_config(SMOKE, [f"output_dir={run_dir}", f"model.quantization={quantization}", f"model.dtype={dtype}"])
    backbone = load_causal_lm(str(run_dir / "sft" / "merged"), config.model)
    model, value_head, reward_head = build_actor_critic(backbone, run_dir / "reward", config)
    trainable = [p for n, p in model.named_parameters() if ".policy." in n or ".value." in n]
    chat = ChatFormat.of(load_tokenizer(str(run_dir / "sft" / "merged")), backbone)
    roles = Roles(model.eval(), value_head, reward_head, trainable, chat)
    prompts = ppo.load_prompts(run_dir / "instructions" / "train.jsonl", chat, 4, 0)[0]
    rollout = sample(roles, prompts, config.ppo)
    return roles, rollout, config


def sample(roles, prompts, settings, **changes):
    settings = settings.model_copy(update=changes)
    return generate_rollout(
        roles, [p.ids for p in prompts], max_new_tokens=settings.max_new_tokens, sampling=ppo.ppo_sampling(settings)
    )


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_policy_equals_reference_at_step_zero(upstream, quantization):
    roles, rollout, config = setup_roles(upstream, quantization)
    with torch.no_grad():
        policy, _ = roles.policy_logprobs(rollout, Sampling(1.0))
        reference = roles.reference_logprobs(rollout, Sampling(1.0))
    assert torch.equal(policy, reference)


def test_reference_is_the_sft_model_not_the_base(upstream):
    roles, rollout, config = setup_roles(upstream)
    with torch.no_grad():
        reference = roles.reference_logprobs(rollout, Sampling(1.0))
        mask = rollout.mask

        def logprobs_of(model) -> torch.Tensor:
            context = rollout.context_length
            logits = model(
                input_ids=rollout.input_ids, attention_mask=rollout.attention_mask, position_ids=rollout.position_ids
            ).logits[:, context - 1 : -1]
            return logprobs_from_logits(logits.float(), rollout.input_ids[:, context:])

        sft = logprobs_of(AutoModelForCausalLM.from_pretrained(upstream / "sft" / "merged").eval())
        base = logprobs_of(AutoModelForCausalLM.from_pretrained(resolve_model("tiny-random-llama")).eval())
    assert torch.allclose(reference * mask, sft * mask, atol=1e-5)
    assert (reference * mask - base * mask).abs().max() > 1e-3


def test_value_and_reward_start_from_the_reward_model(upstream):
    roles, rollout, config = setup_roles(upstream)
    reward_model = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(upstream / "sft" / "merged", num_labels=1),
        upstream / "reward" / "adapter",
    ).eval()
    reward_model.config.pad_token_id = roles.chat.tokenizer.pad_token_id
    with torch.no_grad():
        expected = torch.tensor(
            [reward_model(input_ids=torch.tensor([ids])).logits[0, 0].item() for ids in reward_sequences(rollout, roles.chat)]
        )
        scores = roles.scores(rollout)
        values = roles.values(rollout)
    assert torch.allclose(scores, expected, atol=1e-4)
    assert values.shape == rollout.mask.shape
    # The value head starts as the reward model's score head.
    assert torch.equal(roles.value_head.weight, roles.reward_head.weight)


def target_token_reward(monkeypatch, run_dir: Path) -> float:
    """Make the task learnable by a tiny random model in a few steps, and observable:
    - every prompt is the same instruction, so the first response token has one distribution;
    - the reward model is replaced by a programmatic reward: 5 when the response starts with the token the
      SFT policy most often starts with, else 0 (the scale puts it above the noise of the value head,
      which starts from an unrelated reward model).
    Returns the target token's starting frequency."""
    row = {"messages": [{"role": "user", "content": "Give one tip."}, {"role": "assistant", "content": "Rest."}]}
    (run_dir / "instructions" / "train.jsonl").write_text((json.dumps(row) + "\n") * 64)
    roles, _, config = setup_roles(run_dir)
    prompt = ppo.load_prompts(run_dir / "instructions" / "train.jsonl", roles.chat, 1, 0)[0]
    torch.manual_seed(0)
    rollout = sample(roles, prompt * 64, config.ppo, max_new_tokens=1)
    first_tokens = rollout.input_ids[:, -1]
    target = first_tokens.mode().values

    def scores(self, rollout):
        return 5.0 * (rollout.input_ids[:, rollout.context_length] == target).float()

    monkeypatch.setattr(Roles, "scores", scores)
    return (first_tokens == target).float().mean().item()


LEARN = [
    "ppo.steps=12",
    "ppo.rollout_batch_size=16",
    "ppo.mini_batch_size=8",
    "ppo.micro_batch_size=8",
    "ppo.ppo_epochs=4",
    "ppo.max_new_tokens=4",
    "ppo.learning_rate=3e-3",
    "ppo.missing_eos_penalty=null",
    "ppo.save_every=100",
]


def test_policy_learns_a_programmatic_reward_within_a_kl_bound(run_dir, monkeypatch):
    base_rate = target_token_reward(monkeypatch, run_dir)
    assert 0.05 < base_rate < 0.8
    assert run_ppo(run_dir, *LEARN, "ppo.kl_coef=0.01") == 0
    points = curve(run_dir)
    scores = [p["objective/scores"] / 5 for p in points]  # the fraction starting with the target token
    assert sum(scores[-3:]) / 3 > max(0.9, base_rate + 0.2), (base_rate, scores)
    assert all(p["objective/kl"] < 8.0 for p in points)  # the configured smoke budget
    last = points[-1]
    # KL is reported per sequence (summed over tokens) and per token, and is a proper estimate.
    # Step 1 samples from the reference itself; the rollout's log-probs (KV cache) and the reference's
    # (one forward) differ only by float rounding.
    assert points[0]["objective/kl"] == pytest.approx(0.0, abs=1e-4)
    assert sum(p["objective/kl"] for p in points) / len(points) >= 0
    assert all(p["objective/kl_k3"] >= 0 for p in points)
    for key in ("objective/entropy", "policy/approxkl", "policy/clipfrac", "loss/policy", "loss/value",
                "val/response_length", "val/eos_fraction", "val/nonfinite_samples", "kl_coef", "learning_rate",
                "time/rollout", "time/update", "tokens_per_second", "memory/peak_mb", "objective/rlhf_reward"):
        assert key in last
    assert (run_dir / "ppo" / "policy" / "adapter_model.safetensors").exists()
    assert (run_dir / "ppo" / "value" / "value_head.safetensors").exists()
    assert json.loads((run_dir / "ppo" / "samples.jsonl").read_text().splitlines()[0]).keys() >= {"prompt", "response", "score"}


def test_large_kl_coefficient_keeps_the_policy_near_the_reference(run_dir, tmp_path, monkeypatch):
    target_token_reward(monkeypatch, run_dir)
    free = Path(shutil.copytree(run_dir, tmp_path / "free"))
    assert run_ppo(free, *LEARN, "ppo.kl_coef=0.01") == 0
    assert run_ppo(run_dir, *LEARN, "ppo.kl_coef=50") == 0
    kl_free = [p["objective/kl"] for p in curve(free)]
    kl_held = [p["objective/kl"] for p in curve(run_dir)]
    assert sum(kl_held) < 0.5 * sum(kl_free), (kl_held, kl_free)
    held_scores = [p["objective/scores"] / 5 for p in curve(run_dir)]
    free_scores = [p["objective/scores"] / 5 for p in curve(free)]
    assert sum(held_scores[-3:]) / 3 < sum(free_scores[-3:]) / 3 - 0.3, (held_scores, free_scores)


def crash_ppo_at_step(monkeypatch, step: int):
    """Make the ppo stage stop during `step`'s update as if killed; returns the real ppo_update."""
    original = ppo.ppo_update

    def crash(*args, **kwargs):
        if args[-1] == step:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(ppo, "ppo_update", crash)
    return original


def test_resume_after_a_crash_matches_an_uninterrupted_run(run_dir, tmp_path, monkeypatch, capsys):
    settings = ["ppo.steps=4", "ppo.save_every=2", "ppo.learning_rate=1e-3"]
    uninterrupted = Path(shutil.copytree(run_dir, tmp_path / "uninterrupted"))
    assert run_ppo(uninterrupted, *settings) == 0

    original = crash_ppo_at_step(monkeypatch, 3)
    assert run_ppo(run_dir, *settings) == 130
    assert not (run_dir / "ppo").exists()
    assert list((run_dir / ".work").glob("ppo-*/checkpoints/step-000002/COMPLETE"))
    monkeypatch.setattr(ppo, "ppo_update", original)
    assert run_ppo(run_dir, *settings) == 0
    assert "ppo: resuming after step 2" in capsys.readouterr().out  # not from scratch
    # The published curve holds every step, the first attempt's too, as the uninterrupted run's does.
    resumed, whole = curve(run_dir), curve(uninterrupted)
    assert [p["step"] for p in resumed] == [1, 2, 3, 4]
    for key in ("objective/scores", "objective/kl", "loss/policy"):
        assert [p[key] for p in resumed] == pytest.approx([p[key] for p in whole], abs=1e-4), key
    a = load_file(run_dir / "ppo" / "policy" / "adapter_model.safetensors")
    b = load_file(uninterrupted / "ppo" / "policy" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_non_finite_loss_stops_with_a_clear_error_and_publishes_nothing(run_dir, monkeypatch, capsys):
    original = ppo.ppo_policy_loss

    def poisoned(*args, **kwargs):
        loss, clipfrac, approxkl = original(*args, **kwargs)
        return loss * float("nan"), clipfrac, approxkl

    monkeypatch.setattr(ppo, "ppo_policy_loss", poisoned)
    # A user error, as in sft and reward: one line, exit status 2, no traceback.
    assert run_ppo(run_dir) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ppo step 1: non-finite policy loss") and "Traceback" not in error
    assert not (run_dir / "ppo").exists()
    with pytest.raises(NonFiniteTraining):  # and with --debug, the exception itself
        run_ppo(run_dir, "--debug")


def test_two_processes_agree_on_the_final_weights(run_dir):
    """Data parallel over 2 CPU processes (gloo): each rank samples its own prompts, gradients are
    averaged, so both end with the same weights and the same adaptive β; only rank 0 publishes."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "rlhf.cli", "run", SMOKE,
         f"output_dir={run_dir}", "--only", "ppo", "ppo.steps=3", "ppo.learning_rate=1e-2", "ppo.target_kl=0.5",
         "ppo.kl_horizon=10"],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((run_dir / "ppo" / "manifest.json").read_text())["metrics"]
    assert metrics["processes"] == 2 and metrics["ranks_agree"] is True
    # The adaptive β follows the KL averaged over both ranks, so it is the same on each (each rank's own
    # KL would give two different β: the ranks sample different prompts).
    assert metrics["kl_coef_ranks_agree"] is True
    assert len({p["kl_coef"] for p in curve(run_dir)}) == 3  # β moved every step
    assert [p["step"] for p in curve(run_dir)] == [1, 2, 3]
    assert not list((run_dir / ".tmp").iterdir())


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(upstream):
    """ppo.gradient_checkpointing recomputes every decoder layer in the backward pass of the update, and
    changes neither the loss nor any gradient; sampling (no graph) keeps running without it, on its KV cache."""
    config = load_config(SMOKE, [f"output_dir={upstream}"])
    tokenizer = load_tokenizer(str(upstream / "sft" / "merged"))
    rollout, results, checkpointed = None, [], []
    for checkpointing in (False, True):
        torch.manual_seed(0)  # the same LoRA initialisation both times
        backbone = load_causal_lm(str(upstream / "sft" / "merged"), config.model)
        if checkpointing:
            enable_checkpointing_with_grad(backbone)
            for layer in backbone.model.layers:
                original = layer._gradient_checkpointing_func
                layer._gradient_checkpointing_func = lambda *a, _f=original, **k: (checkpointed.append(1), _f(*a, **k))[1]
        model, value_head, reward_head = build_actor_critic(backbone, upstream / "reward", config)
        named = [(n, p) for n, p in model.named_parameters() if ".policy." in n or ".value." in n]
        trainable = [p for _, p in named]
        roles = Roles(model.eval(), value_head, reward_head, trainable, ChatFormat.of(tokenizer, backbone))
        prompts = ppo.load_prompts(upstream / "instructions" / "train.jsonl", roles.chat, 2, 0)[0]
        # Rows sharing a prompt: without checkpointing the prompt runs once, with it every row runs whole.
        sampled = sample(roles, [p for p in prompts for _ in range(2)], config.ppo)
        assert not checkpointed  # no checkpointing while sampling
        rollout = rollout or sampled  # score the same rollout both times
        logprobs, _ = roles.policy_logprobs(rollout, Sampling(1.0))
        values = roles.values(rollout)
        mask = rollout.mask
        loss = -(logprobs * mask).sum() + ((values - 1.0) ** 2 * mask).sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in named if p.grad is not None}))
    assert len(checkpointed) == 2 * len(backbone.model.layers)  # policy and value forwards, every layer
    (loss, grads), (loss_ckpt, grads_ckpt) = results
    assert torch.allclose(loss, loss_ckpt, rtol=1e-6)
    assert grads.keys() == grads_ckpt.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name, g in grads.items():  # float32 sums in another order (the shared prompt against whole rows)
        assert torch.allclose(g, grads_ckpt[name], rtol=1e-4, atol=1e-5 * float(g.abs().max())), name


@pytest.mark.parametrize(
    "temperature, dtype, largest, mean", [(0.7, "float32", 1e-4, 1e-5), (0.0, "float32", 1e-4, 1e-5), (0.7, "bfloat16", 0.25, 0.02)]
)
def test_rollout_logprobs_equal_a_forward_of_the_policy(upstream, temperature, dtype, largest, mean):
    """The old log-probs come from the logits the rollout sampled from (KV cache, left padding): they
    match a full forward of the policy over the finished sequences (greedy: at temperature 1). In
    bfloat16 the two round differently: a log-prob of -3.5 is a logit gap near 0.06 apart in its spacing."""
    roles, _, config = setup_roles(upstream, dtype=dtype)
    prompts = ppo.load_prompts(upstream / "instructions" / "train.jsonl", roles.chat, 6, 1)[0]
    assert len({len(p.ids) for p in prompts}) > 1  # the test needs left padding
    rollout = sample(roles, prompts, config.ppo, temperature=temperature)
    with torch.no_grad():
        forward, _ = roles.policy_logprobs(rollout, Sampling(temperature))
    mask = rollout.mask
    assert mask.sum() > 0
    gap = (rollout.logprobs - forward * mask).abs()
    assert gap.max() <= largest and gap.sum() / mask.sum() <= mean, (gap.max(), gap.sum() / mask.sum())


def test_in_bfloat16_step_one_kl_is_small_and_the_policy_learns(run_dir, monkeypatch):
    """The whole stage in bfloat16. The rollout's log-probs (KV cache) and the reference's (one forward)
    round differently, so step 1's KL is not 0 as in float32: the bound is |KL| < 0.01 per token (measured
    at most 0.0014 over seeds 0-2 of the smoke run)."""
    base_rate = target_token_reward(monkeypatch, run_dir)
    assert run_ppo(run_dir, *LEARN, "ppo.kl_coef=0.01", "model.dtype=bfloat16") == 0
    points = curve(run_dir)
    assert abs(points[0]["objective/kl_per_token"]) < 0.01
    assert points[0]["policy/first_ratio_max_gap"] < 0.2
    scores = [p["objective/scores"] / 5 for p in points]
    assert sum(scores[-3:]) / 3 > max(0.9, base_rate + 0.2), (base_rate, scores)


def test_update_gradients_equal_one_backward_of_the_summed_loss(upstream, monkeypatch):
    """ppo_update backs the policy loss out before the value forward (memory); the gradients it steps
    with equal those of one backward of policy_loss + vf_coef · value_loss."""
    from accelerate import Accelerator

    roles, rollout, config = setup_roles(upstream)
    settings = config.ppo.model_copy(update={"ppo_epochs": 1, "mini_batch_size": 4, "micro_batch_size": 2, "max_grad_norm": 1e9})
    rows, width = rollout.mask.shape
    generator = torch.Generator().manual_seed(0)
    old_logprobs = rollout.logprobs - 0.05 * torch.rand(rows, width, generator=generator)
    with torch.no_grad():
        old_values = roles.values(rollout) + 0.1
    advantages = torch.randn(rows, width, generator=generator)
    returns = torch.randn(rows, width, generator=generator)

    expected = {id(p): torch.zeros_like(p) for p in roles.trainable}
    for micro in torch.arange(rows).split(2):
        part = rollout.rows(micro)
        mask = part.mask
        logprobs, _ = roles.policy_logprobs(part, ppo.ppo_sampling(settings))
        values = roles.values(part)
        policy_loss = ppo.ppo_policy_loss(logprobs, old_logprobs[micro], advantages[micro], mask, settings.clip_range)[0]
        value_loss = ppo.ppo_value_loss(values, old_values[micro], returns[micro], mask, settings.clip_range_value)[0]
        torch.autograd.backward((policy_loss + settings.vf_coef * value_loss) * len(micro) / rows)
        for p in roles.trainable:
            if p.grad is not None:
                expected[id(p)] += p.grad
                p.grad = None

    class Recorder(torch.optim.SGD):  # records the gradients of each step instead of stepping
        def step(self, closure=None):
            self.seen = {id(p): p.grad.clone() for p in roles.trainable if p.grad is not None}

    optimizer = Recorder(roles.trainable, lr=0.0)
    releases = []
    monkeypatch.setattr(ppo, "release_freed_memory", lambda: releases.append(1))
    torch.manual_seed(0)  # the update shuffles rows: with 4 rows in one minibatch, the sum is the same
    scored = ppo.ScoredRollout(scores=None, by_source={}, ref_logprobs=None, values=old_values, kl=None, advantages=advantages, returns=returns)
    ppo.ppo_update(Accelerator(cpu=True), roles, optimizer, replace(rollout, logprobs=old_logprobs), scored, settings, 1)
    assert len(releases) == 2 * 2  # freed memory released before each gradient forward: 2 micro-batches
    assert sum(g.abs().sum() > 0 for g in expected.values()) > len(expected) // 3  # policy B, value A and B, head
    for key, grad in expected.items():
        # atol: float32 sums in another order (measured up to 1.6e-6 on gradients of magnitude 0.8)
        assert torch.allclose(optimizer.seen.get(key, torch.zeros_like(grad)), grad, rtol=1e-4, atol=1e-5)


def test_micro_batches_drop_shared_padding_and_score_the_same(upstream):
    """Scoring and the update run on micro-batches of rows with similar prompt lengths, cut to the left
    padding they share: the same log-probs, values and scores as the whole padded rollout."""
    roles, _, config = setup_roles(upstream)
    prompts = ppo.load_prompts(upstream / "instructions" / "train.jsonl", roles.chat, 6, 1)[0]
    rollout = sample(roles, prompts, config.ppo)
    lengths = [len(p.ids) for p in prompts]
    order = by_prompt_length(rollout, torch.arange(len(prompts)))
    assert [lengths[i] for i in order] == sorted(lengths)
    shortest = rollout.rows(order[:2])
    assert shortest.context_length == max(lengths[i] for i in order[:2]) < max(lengths)
    assert shortest.input_ids.shape[1] == rollout.input_ids.shape[1] - (max(lengths) - shortest.context_length)
    with torch.no_grad():
        for name, forward in [
            ("reference", lambda part: roles.reference_logprobs(part, Sampling(0.7))),
            ("values", roles.values),
            ("scores", roles.scores),
        ]:
            whole = forward(rollout)
            in_parts = in_micro_batches(forward, rollout, 2)
            assert torch.allclose(in_parts, whole, atol=1e-5), name


def test_rows_sharing_a_prompt_get_its_forward_once_and_the_same_log_probs_and_values(upstream):
    """K samples per prompt (grpo, rloo; evaluate's samples): without gradients the shared prompt goes through
    the backbone once per distinct prompt; log-probs, values and reward scores equal those of each row run alone."""
    roles, _, config = setup_roles(upstream)
    prompts = ppo.load_prompts(upstream / "instructions" / "train.jsonl", roles.chat, 2, 0)[0]
    torch.manual_seed(0)
    rollout = sample(roles, [p for p in prompts for _ in range(3)], config.ppo)
    shapes = []
    hook = roles.model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        together = [roles.reference_logprobs(rollout, Sampling(0.7)), roles.values(rollout),
                    roles.policy_logprobs(rollout, Sampling(0.7))[0]]
    hook.remove()
    width, columns = rollout.context_length, rollout.input_ids.shape[1]
    assert shapes == [(2, width - 1), (6, columns - width + 1)] * 3  # each prompt once, then the responses
    with torch.no_grad():
        alone = [torch.cat([f(rollout.rows(torch.tensor([i]))) for i in range(6)]) for f in (
            lambda r: roles.reference_logprobs(r, Sampling(0.7)), roles.values,
            lambda r: roles.policy_logprobs(r, Sampling(0.7))[0])]
    for shared, single in zip(together, alone):
        assert torch.allclose(shared * rollout.mask, single * rollout.mask, atol=1e-4)
    with torch.no_grad():  # the reward adapter's score, read at the last token of each row's reward input
        scores, single_scores = roles.scores(rollout), torch.cat([roles.scores(rollout.rows(torch.tensor([i]))) for i in range(6)])
    assert torch.allclose(scores, single_scores, atol=1e-4)


def test_with_gradients_rows_sharing_a_prompt_get_its_forward_once_and_the_same_gradients(upstream):
    """The update's forwards (policy and value, building a graph) run a prompt that K rows share once: its
    keys and values, computed with gradients, feed every row, so the loss and the gradients of the policy and
    value adapters equal those of each row run alone (the prompt's share of each row's gradient included)."""
    roles, _, config = setup_roles(upstream)
    prompts = ppo.load_prompts(upstream / "instructions" / "train.jsonl", roles.chat, 2, 0)[0]
    torch.manual_seed(0)
    rollout = sample(roles, [p for p in prompts for _ in range(3)], config.ppo)
    named = [(n, p) for n, p in roles.model.named_parameters() if p in set(roles.trainable)]

    def loss_and_gradients(part):
        logprobs, _ = roles.policy_logprobs(part, Sampling(0.7))
        values = roles.values(part)
        loss = -(logprobs * part.mask).sum() + ((values - 1.0) ** 2 * part.mask).sum()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in named if p.grad is not None}
        for _, p in named:
            p.grad = None
        return loss.detach(), grads

    shapes = []
    hook = roles.model.get_input_embeddings().register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    loss, grads = loss_and_gradients(rollout)
    hook.remove()
    width, columns = rollout.context_length, rollout.input_ids.shape[1]
    assert shapes == [(2, width - 1), (6, columns - width + 1)] * 2  # policy, then value: each prompt once
    alone = [loss_and_gradients(rollout.rows(torch.tensor([i]))) for i in range(6)]
    assert torch.allclose(loss, sum(row_loss for row_loss, _ in alone), rtol=1e-5)
    assert grads.keys() == alone[0][1].keys() and len(grads) == len(named)  # the prompt's LoRA inputs included
    for name, grad in grads.items():
        summed = sum(row_grads[name] for _, row_grads in alone)
        assert torch.allclose(grad, summed, rtol=1e-4, atol=1e-5 * float(summed.abs().max())), name
