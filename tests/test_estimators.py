"""Critic-free advantage estimators: the formulas on hand-made batches, the config's refusals, and the
ppo stage learning a programmatic reward with each of them and no value adapter at all."""

import json
import math

import pytest
import torch
from test_ppo import LEARN, SMOKE, crash_ppo_at_step, curve, run_ppo, target_token_reward

from rlhf.config import load_config
from rlhf.errors import UserError
from rlhf.ppo_math import group_advantages, kl_penalty_rewards, reward_to_go



def test_rloo_subtracts_the_mean_of_the_other_responses():
    # Group 1: scores 1, 2, 6 -> 1 - (2+6)/2 = -3, 2 - (1+6)/2 = -1.5, 6 - (1+2)/2 = 4.5; group 2: 0, 0, 3 -> -1.5, -1.5, 3.
    scores = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])
    assert group_advantages(scores, 3, "rloo").tolist() == pytest.approx([-3.0, -1.5, 4.5, -1.5, -1.5, 3.0])


def test_grpo_normalizes_by_the_group_std_and_dr_grpo_does_not():
    # Group 1, 2: mean 1.5, unbiased std sqrt(0.5) -> ±0.5 / 0.70711 = ±0.70711; group 4, 4: std 0 -> 0 (not nan).
    scores = torch.tensor([1.0, 2.0, 4.0, 4.0])
    assert group_advantages(scores, 2, "grpo").tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0, 0.0], abs=1e-5)
    assert group_advantages(scores, 2, "grpo", scale_by_std=False).tolist() == pytest.approx([-0.5, 0.5, 0.0, 0.0])


def test_reinforce_baseline_centres_per_group_then_whitens_over_the_batch():
    # Centred: [-1, 1, -2, 2]; its mean is 0 and its unbiased std sqrt(10/3) = 1.82574 -> [-0.5477, 0.5477, -1.0954, 1.0954].
    scores = torch.tensor([0.0, 2.0, 3.0, 7.0])
    s = math.sqrt(10 / 3)
    assert group_advantages(scores, 2, "reinforce_baseline").tolist() == pytest.approx([-1 / s, 1 / s, -2 / s, 2 / s], abs=1e-5)


def test_one_sample_per_prompt_has_no_baseline():
    with pytest.raises(ValueError, match="rloo needs at least 2 samples per prompt, got 1"):
        group_advantages(torch.tensor([1.0, 2.0]), 1, "rloo")


def test_reward_to_go_sums_the_rest_of_each_response():
    # Row 1 keeps 3 tokens: rewards -0.1, -0.2, 1.0 (score on the last) -> 0.7, 0.8, 1.0; row 2 keeps 1 token.
    rewards = torch.tensor([[-0.1, -0.2, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(reward_to_go(rewards, mask), torch.tensor([[0.7, 0.8, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]]))
    # With kl_penalty_rewards: baselined score 1.5 on the last kept token, −β·kl before it (β 0.5, kl 0.2 each).
    logprobs, ref = torch.full((1, 3), -1.0), torch.full((1, 3), -1.2)
    per_token, _ = kl_penalty_rewards(torch.tensor([1.5]), logprobs, ref, torch.ones(1, 3), 0.5)
    assert torch.allclose(reward_to_go(per_token, torch.ones(1, 3)), torch.tensor([[1.2, 1.3, 1.4]]))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["ppo.advantage_estimator=rloo"], "advantage_estimator rloo needs samples_per_prompt >= 2"),
        (["ppo.advantage_estimator=grpo", "ppo.samples_per_prompt=3"], "rollout_batch_size 4 is not a multiple of samples_per_prompt 3"),
    ],
)
def test_the_config_refuses_groups_that_cannot_work(overrides, message):
    with pytest.raises(UserError, match=message) as error:
        load_config(SMOKE, overrides)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("estimator", ["rloo", "grpo", "reinforce_baseline"])
def test_a_critic_free_policy_learns_a_programmatic_reward_without_a_value_adapter(run_dir, monkeypatch, estimator):
    base_rate = target_token_reward(monkeypatch, run_dir)
    assert run_ppo(run_dir, *LEARN, "ppo.kl_coef=0.01", f"ppo.advantage_estimator={estimator}", "ppo.samples_per_prompt=4") == 0
    scores = [p["objective/scores"] / 5 for p in curve(run_dir)]  # the fraction starting with the target token
    assert sum(scores[-3:]) / 3 > max(0.9, base_rate + 0.2), (base_rate, scores)
    manifest = json.loads((run_dir / "ppo" / "manifest.json").read_text())["metrics"]
    assert manifest["advantage_estimator"] == estimator
    assert manifest["resident_adapters"] == ["policy", "reward"] and manifest["value_head"] is False
    assert not (run_dir / "ppo" / "value").exists()
    assert "loss/value" not in curve(run_dir)[-1]


def test_a_critic_free_run_resumes_from_its_checkpoint(run_dir, monkeypatch, capsys):
    from rlhf.stages import ppo

    settings = ["ppo.steps=4", "ppo.save_every=2", "ppo.advantage_estimator=rloo", "ppo.samples_per_prompt=2"]
    original = crash_ppo_at_step(monkeypatch, 3)
    assert run_ppo(run_dir, *settings) == 130
    checkpoint = next((run_dir / ".work").glob("ppo-*/checkpoints/step-000002"))
    assert sorted(p.name for p in (checkpoint / "adapters").iterdir() if p.is_dir()) == ["policy"]
    assert not (checkpoint / "value_head.safetensors").exists()
    monkeypatch.setattr(ppo, "ppo_update", original)
    assert run_ppo(run_dir, *settings) == 0
    assert "ppo: resuming after step 2" in capsys.readouterr().out
    assert [p["step"] for p in curve(run_dir)] == [1, 2, 3, 4]
