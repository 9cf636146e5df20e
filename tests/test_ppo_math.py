"""rlhf.ppo_math against numbers worked out by hand (the arithmetic is in the comments).

Tiny tensors throughout (B <= 3, T <= 4, V = 3). Padding positions often hold garbage (nan, inf, huge
values) on purpose: a masked-out entry must never reach a result or a gradient.
"""

import json
import math

import pytest
import torch

from rlhf.ppo_math import (
    AdaptiveKLController,
    FixedKLController,
    clip_scores,
    entropy_from_logits,
    gae,
    kl_controller,
    kl_k3,
    kl_penalty_rewards,
    logprob_gap,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    ppo_value_loss,
    truncate_after_eos,
    truncated_importance_weights,
)

NAN = float("nan")
INF = float("inf")


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(torch.as_tensor(actual).double(), expected, atol=atol, rtol=1e-6)


# --- masked statistics ----------------------------------------------------------------------------

X = torch.tensor([[1.0, 2.0, NAN], [4.0, INF, 6.0]])  # padding holds nan / inf
M = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])  # kept: 1, 2, 4


def test_masked_mean_over_all_and_per_row():
    close(masked_mean(X, M), 7 / 3)  # (1 + 2 + 4) / 3
    close(masked_mean(X, M, dim=1), [1.5, 4.0])  # (1 + 2) / 2 ; 4 / 1
    close(masked_mean(X, M.bool()), 7 / 3)  # a bool mask works the same


def test_masked_mean_of_nothing_is_zero():
    close(masked_mean(X, torch.zeros_like(M)), 0.0)
    close(masked_mean(X, torch.tensor([[1.0, 0, 0], [0, 0, 0]]), dim=1), [1.0, 0.0])


def test_masked_var_biased_and_unbiased():
    # mean 7/3; deviations -4/3, -1/3, 5/3; squares 16/9 + 1/9 + 25/9 = 42/9
    close(masked_var(X, M, unbiased=False), 42 / 9 / 3)  # 14/9
    close(masked_var(X, M, unbiased=True), 42 / 9 / 2)  # 7/3
    close(masked_var(X, torch.tensor([[1.0, 0, 0], [0, 0, 0]])), 0.0)  # one entry: no Bessel blow-up


def test_masked_whiten():
    s = math.sqrt(7 / 3 + 1e-8)  # unbiased var 7/3 (above)
    close(masked_whiten(X, M), [[-4 / 3 / s, -1 / 3 / s, 0.0], [5 / 3 / s, 0.0, 0.0]])
    # shift_mean=False: the mean 7/3 is added back to the kept entries; padding stays 0
    close(
        masked_whiten(X, M, shift_mean=False),
        [[-4 / 3 / s + 7 / 3, -1 / 3 / s + 7 / 3, 0.0], [5 / 3 / s + 7 / 3, 0.0, 0.0]],
    )
    w = masked_whiten(X, M)
    close(masked_mean(w, M), 0.0)
    close(masked_var(w, M), 1.0, atol=1e-5)


# --- log-probabilities and entropy ---------------------------------------------------------------------


def test_logprobs_from_logits_by_hand():
    # logits [0, ln2, ln3] -> exp = 1, 2, 3, sum 6 -> p = 1/6, 2/6, 3/6; [c, c, c] -> 1/3 each
    a = [0.0, math.log(2), math.log(3)]
    logits = torch.tensor([[a, [5.0, 5.0, 5.0], [x + 7 for x in a]], [a, a, [0.0, 0.0, 0.0]]])
    tokens = torch.tensor([[2, 1, 0], [0, 1, 2]])
    out = logprobs_from_logits(logits, tokens)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    close(
        out,
        [
            [math.log(3 / 6), -math.log(3), math.log(1 / 6)],  # a shift of the logits changes nothing
            [math.log(1 / 6), math.log(2 / 6), -math.log(3)],
        ],
    )


def test_logprobs_and_entropy_are_float32_for_bf16_logits():
    logits = torch.zeros(1, 2, 3, dtype=torch.bfloat16)  # uniform over 3
    lp = logprobs_from_logits(logits, torch.tensor([[0, 2]]))
    ent = entropy_from_logits(logits)
    assert lp.dtype == torch.float32 and ent.dtype == torch.float32
    close(lp, [[-math.log(3), -math.log(3)]])
    close(ent, [[math.log(3), math.log(3)]])


def test_entropy_by_hand():
    # p = 1/6, 1/3, 1/2: H = 1/6 ln 6 + 1/3 ln 3 + 1/2 ln 2
    a = [0.0, math.log(2), math.log(3)]
    ent = entropy_from_logits(torch.tensor([[a, [0.0, 0.0, 0.0]]]))
    close(ent, [[math.log(6) / 6 + math.log(3) / 3 + math.log(2) / 2, math.log(3)]])
    # a (nearly) certain token: entropy ~ 0
    close(entropy_from_logits(torch.tensor([[[100.0, 0.0, 0.0]]])), [[0.0]], atol=1e-6)


# --- truncate_after_eos -------------------------------------------------------------------------------------


def test_truncate_after_eos_middle_end_absent():
    eos, pad = 2, 0
    tokens = torch.tensor(
        [
            [5, 2, 7, 8],  # EOS in the middle: 7, 8 become pad
            [5, 6, 7, 2],  # EOS at the end
            [5, 6, 7, 8],  # no EOS: kept whole (length limit), not finished
            [2, 2, 9, 9],  # EOS first: only it is kept
        ]
    )
    out, mask, finished = truncate_after_eos(tokens, eos, pad)
    assert torch.equal(out, torch.tensor([[5, 2, 0, 0], [5, 6, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]]))
    assert mask.dtype == torch.float32
    assert torch.equal(mask, torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]]))
    assert torch.equal(finished, torch.tensor([True, True, False, True]))
    assert torch.equal(tokens[0], torch.tensor([5, 2, 7, 8]))  # input untouched


def test_truncate_after_eos_two_eos_ids_and_pad_equal_eos():
    tokens = torch.tensor([[5, 3, 7, 2], [5, 6, 2, 3], [5, 6, 7, 8]])
    out, mask, finished = truncate_after_eos(tokens, [2, 3], pad_token_id=0)
    assert torch.equal(out, torch.tensor([[5, 3, 0, 0], [5, 6, 2, 0], [5, 6, 7, 8]]))
    assert torch.equal(mask, torch.tensor([[1.0, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]))
    assert torch.equal(finished, torch.tensor([True, True, False]))
    # pad == eos (common for chat models): generate() pads with EOS; only the first one is a real token
    out, mask, finished = truncate_after_eos(torch.tensor([[5, 2, 2, 2]]), 2, 2)
    assert torch.equal(out, torch.tensor([[5, 2, 2, 2]]))
    assert torch.equal(mask, torch.tensor([[1.0, 1, 0, 0]]))
    assert finished.tolist() == [True]


# --- rewards and KL --------------------------------------------------------------------------------------------


def test_kl_penalty_rewards_score_on_last_real_token():
    scores = torch.tensor([1.0, 2.0, 5.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, NAN], [-1.0, -1.0, -1.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-1.0, -0.25, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0], [0, 0, 0]])  # row 2: nothing kept
    rewards, kl = kl_penalty_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    # kl = logprobs - ref: row 0: 0.5, -1, 0; row 1: 0.5, -0.25, (masked) 0; row 2: all masked
    close(kl, [[0.5, -1.0, 0.0], [0.5, -0.25, 0.0], [0.0, 0.0, 0.0]])
    # rewards = -0.1 kl, + score at the last kept token: row 0 at t=2 (0 + 1), row 1 at t=1 (0.025 + 2)
    close(rewards, [[-0.05, 0.1, 1.0], [-0.05, 2.025, 0.0], [0.0, 0.0, 0.0]])


def test_kl_k3_by_hand_and_non_negative():
    logprobs = torch.tensor([[-1.0, -2.0, 50.0]])  # padding holds a value whose exp(r) would be 0/overflow
    ref = torch.tensor([[-1.5, -1.0, -50.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    # r = ref - logprobs: -0.5 -> e^-0.5 - 1 + 0.5 ; 1 -> e - 1 - 1
    close(kl_k3(logprobs, ref, mask), [[math.exp(-0.5) - 0.5, math.e - 2, 0.0]])
    assert torch.equal(kl_k3(ref, ref, torch.ones(1, 3)), torch.zeros(1, 3))  # equal policies: exactly 0
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 5, generator=g) * 3, torch.randn(4, 5, generator=g) * 3
    assert (kl_k3(a, b, torch.ones(4, 5)) >= 0).all()


def test_clip_scores():
    s = torch.tensor([-3.0, 0.5, 4.0])
    close(clip_scores(s, 2.0), [-2.0, 0.5, 2.0])
    assert clip_scores(s, None) is s


# --- GAE --------------------------------------------------------------------------------------------------------


def test_gae_gamma1_lam1_is_future_reward_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 99.0]])
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 99.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: A_t = sum_{k>=t} r_k - V_t: 6 - 0.5, 5 - 1, 3 - 1.5
    # row 1 (ends at t=1, padding ignored): 3 - 0.5, 2 - 1, 0
    close(adv, [[5.5, 4.0, 1.5], [2.5, 1.0, 0.0]])
    close(ret, [[6.0, 5.0, 3.0], [3.0, 2.0, 0.0]])  # A + V


def test_gae_gamma09_lam095_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 1.0, 7.0]])
    values = torch.tensor([[0.2, 0.4, 0.6], [0.3, 0.2, 5.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.95)  # gamma * lam = 0.855
    # row 0: d2 = 1 + 0.9*0 - 0.6 = 0.4            A2 = 0.4
    #        d1 = 0 + 0.9*0.6 - 0.4 = 0.14         A1 = 0.14 + 0.855*0.4 = 0.482
    #        d0 = 0 + 0.9*0.4 - 0.2 = 0.16         A0 = 0.16 + 0.855*0.482 = 0.57211
    # row 1: (t=2 is padding: value after the last real token is 0)
    #        d1 = 1 + 0.9*0 - 0.2 = 0.8            A1 = 0.8
    #        d0 = 0.5 + 0.9*0.2 - 0.3 = 0.38       A0 = 0.38 + 0.855*0.8 = 1.064
    close(adv, [[0.57211, 0.482, 0.4], [1.064, 0.8, 0.0]])
    close(ret, [[0.77211, 0.882, 1.0], [1.364, 1.0, 0.0]])
    assert not adv.requires_grad


# --- losses ----------------------------------------------------------------------------------------------------


def test_policy_loss_unclipped():
    old = torch.tensor([[-1.0, -2.0]])
    logprobs = (old + math.log(1.1)).requires_grad_()  # ratio 1.1, inside [0.8, 1.2]
    adv = torch.tensor([[1.0, 1.0]])
    loss, clipfrac, approxkl = ppo_policy_loss(logprobs, old, adv, torch.ones(1, 2), clip_range=0.2)
    close(loss, -1.1)  # mean(max(-1*1.1, -1*1.1))
    close(clipfrac, 0.0)
    close(approxkl, 0.5 * math.log(1.1) ** 2)
    loss.backward()
    close(logprobs.grad, [[-1.1 / 2, -1.1 / 2]])  # d(-A ratio)/dlogp = -A ratio, / 2 tokens


def test_policy_loss_clipped_mixed_with_padding():
    eps = 0.2
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0, 0.0]])
    logratio = torch.tensor([[math.log(1.1), math.log(1.5), math.log(1.5), math.log(0.5), 80.0]])
    logprobs = (old + logratio).requires_grad_()
    adv = torch.tensor([[1.0, 2.0, -1.0, -1.0, NAN]])
    mask = torch.tensor([[1.0, 1, 1, 1, 0]])  # last token is padding holding garbage
    loss, clipfrac, approxkl = ppo_policy_loss(logprobs, old, adv, mask, clip_range=eps)
    # t0: ratio 1.1, A= 1: max(-1.1, -1.1)       = -1.1  not clipped
    # t1: ratio 1.5, A= 2: max(-3.0, -2*1.2=-2.4) = -2.4  clipped  (above 1+eps with A > 0)
    # t2: ratio 1.5, A=-1: max( 1.5,  1.2)        =  1.5  not clipped (pessimistic side)
    # t3: ratio 0.5, A=-1: max( 0.5,  0.8)        =  0.8  clipped  (below 1-eps with A < 0)
    close(loss, (-1.1 - 2.4 + 1.5 + 0.8) / 4)
    close(clipfrac, 2 / 4)
    close(approxkl, 0.5 * (math.log(1.1) ** 2 + 2 * math.log(1.5) ** 2 + math.log(0.5) ** 2) / 4)
    assert not clipfrac.requires_grad and not approxkl.requires_grad
    loss.backward()
    # gradient only through the unclipped terms: -A * ratio / 4; clipped tokens and padding get 0
    close(logprobs.grad, [[-1.1 / 4, 0.0, 1.5 / 4, 0.0, 0.0]])


def test_truncated_importance_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, NAN]])
    engine = torch.tensor([[-1.0, -2.0 - math.log(1.5), -0.5 + math.log(2.0), 0.0]])
    mask = torch.tensor([[1.0, 1, 1, 0]])  # the last token is padding holding garbage
    weights = truncated_importance_weights(trainer, engine, mask, cap=1.2)
    # t0: exp(0) = 1; t1: exp(log 1.5) = 1.5, capped at 1.2; t2: exp(-log 2) = 0.5; padding: 0
    close(weights, [[1.0, 1.2, 0.5, 0.0]])
    assert not weights.requires_grad
    close(torch.tensor(logprob_gap(trainer, engine, mask)), [(0 + math.log(1.5) + math.log(2.0)) / 3, math.log(2.0)])


def test_policy_loss_with_importance_weights():
    old = torch.tensor([[-1.0, -2.0]])
    logprobs = (old + math.log(1.1)).requires_grad_()  # ratio 1.1, inside the clip range
    adv = torch.tensor([[1.0, 1.0]])
    weights = torch.tensor([[0.5, 2.0]])
    loss, _, _ = ppo_policy_loss(logprobs, old, adv, torch.ones(1, 2), clip_range=0.2, weights=weights)
    close(loss, (0.5 * -1.1 + 2.0 * -1.1) / 2)  # each token's surrogate times its weight
    loss.backward()
    close(logprobs.grad, [[-0.5 * 1.1 / 2, -2.0 * 1.1 / 2]])


def test_value_loss_clipped_and_unclipped():
    c = 0.2
    values = torch.tensor([[1.0, 2.0, 1.0, NAN]], requires_grad=True)
    old = torch.tensor([[0.9, 1.0, 0.0, 3.0]])
    returns = torch.tensor([[1.5, 1.1, 0.9, INF]])
    mask = torch.tensor([[1.0, 1, 1, 0]])
    loss, clipfrac = ppo_value_loss(values, old, returns, mask, clip_range_value=c)
    # t0: move 0.1 within c: clipped = 1.0; (1-1.5)^2 = 0.25 both          -> 0.25 not clipped
    # t1: clipped = 1.0 + 0.2 = 1.2; (2-1.1)^2 = 0.81, (1.2-1.1)^2 = 0.01  -> 0.81 not clipped
    # t2: clipped = 0.0 + 0.2 = 0.2; (1-0.9)^2 = 0.01, (0.2-0.9)^2 = 0.49  -> 0.49 clipped
    close(loss, 0.5 * (0.25 + 0.81 + 0.49) / 3)
    close(clipfrac, 1 / 3)
    assert not clipfrac.requires_grad
    loss.backward()
    # d/dV 0.5*(V-R)^2/3 = (V-R)/3 on unclipped terms; the clipped term (t2) has no gradient
    close(values.grad, [[-0.5 / 3, 0.9 / 3, 0.0, 0.0]])


def test_value_loss_all_within_clip_is_plain_mse():
    values = torch.tensor([[1.0, 3.0]])
    loss, clipfrac = ppo_value_loss(values, values - 0.1, torch.tensor([[0.0, 1.0]]), torch.ones(1, 2), 0.2)
    close(loss, 0.5 * (1.0 + 4.0) / 2)  # 0.5 * mean(1^2, 2^2)
    close(clipfrac, 0.0)


# --- KL controllers ---------------------------------------------------------------------------------------------


def test_adaptive_kl_controller_two_updates_and_state():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=9.0, n_steps=256)
    # error = 9/6 - 1 = 0.5 -> clipped to 0.2; value = 0.1 * (1 + 0.2*256/10000) = 0.1 * 1.00512
    assert ctl.value == pytest.approx(0.100512)
    ctl.update(current_kl=5.4, n_steps=512)
    # error = 5.4/6 - 1 = -0.1; value = 0.100512 * (1 - 0.1*512/10000) = 0.100512 * 0.99488
    assert ctl.value == pytest.approx(0.100512 * 0.99488)  # = 0.09999737856
    assert ctl.value == pytest.approx(0.09999737856)

    low = AdaptiveKLController(0.2, target=6.0, horizon=100)
    low.update(0.0, n_steps=10)  # error = -1 -> clipped to -0.2; 0.2 * (1 - 0.2*10/100) = 0.196
    assert low.value == pytest.approx(0.196)

    state = json.loads(json.dumps(ctl.state_dict()))  # checkpoints can hold it as JSON
    fresh = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    fresh.load_state_dict(state)
    assert fresh.value == ctl.value
    fresh.update(9.0, 256)
    ctl.update(9.0, 256)
    assert fresh.value == ctl.value


def test_fixed_kl_controller_and_factory():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.value == 0.05
    other = FixedKLController(0.3)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05

    assert isinstance(kl_controller(0.05, None, 10000), FixedKLController)
    adaptive = kl_controller(0.05, 6.0, 10000)
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.05, 6.0, 10000)
