"""The pure math of InstructGPT-style PPO for language models, torch only.

Everything here is a small function of tensors (or, for the KL controllers, a tiny object whose whole state
is one float), so it can be checked against numbers worked out by hand (tests/test_ppo_math.py).
The formulas follow Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", and
Huang et al. 2024, "The N+ implementation details of RLHF with PPO".

Shapes: B = batch (prompts), T = response tokens, V = vocabulary. A mask is [B, T], 1.0 (or True) on real
response tokens and 0 on the padding after the first EOS; masks are binary and a prefix of each row
(what `truncate_after_eos` returns). Masked-out positions may hold anything (even inf/nan): every function
selects with `torch.where` instead of multiplying, so padding never leaks into a result or a gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "logprobs_from_logits",
    "entropy_from_logits",
    "truncate_after_eos",
    "kl_penalty_rewards",
    "kl_k3",
    "gae",
    "ppo_policy_loss",
    "ppo_value_loss",
    "AdaptiveKLController",
    "FixedKLController",
    "kl_controller",
    "clip_scores",
]

WHITEN_EPS = 1e-8
LOG_RATIO_FLOOR = 20.0


def _keep(mask: Tensor) -> Tensor:
    """The mask as bool, True on kept positions."""
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_out(x: Tensor, mask: Tensor) -> Tensor:
    """x where mask is set, 0 elsewhere (by selection, so padding that holds inf or nan gives 0, not nan)."""
    return torch.where(_keep(mask), x, torch.zeros((), dtype=x.dtype, device=x.device))


# --- masked statistics ---------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over the positions where mask is set.

    x, mask: same shape (e.g. [B, T]). dim=None: a scalar over all kept entries; dim=d: reduced over d.
    Formula: sum(x · m) / sum(m). Where nothing is kept the result is 0 (not nan).
    """
    keep = _keep(mask)
    total = _zero_out(x, keep).sum() if dim is None else _zero_out(x, keep).sum(dim)
    count = keep.sum() if dim is None else keep.sum(dim)
    count = count.to(total.dtype)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over all kept entries, a scalar.

    x, mask: same shape. Formula: v = mean_m((x − mean_m(x))²); unbiased multiplies by n / (n − 1)
    (Bessel), n = number of kept entries. With n < 2 the correction is skipped (the variance is then 0).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = _keep(mask).sum().to(var.dtype)
        var = var * torch.where(n > 1, n / (n - 1).clamp(min=1), torch.ones_like(n))
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalize x over its kept entries to mean 0 and variance 1.

    x, mask: same shape (e.g. advantages [B, T]). Formula: (x − mean) / sqrt(var + 1e-8), with mean and
    (unbiased) var over the kept entries; shift_mean=False adds the mean back, (x − mean)/sqrt(var + 1e-8)
    + mean, which rescales but keeps the sign/level (as used for rewards). Masked-out entries are 0.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    whitened = (x - mean) * torch.rsqrt(var + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return _zero_out(whitened, mask)


# --- log-probabilities and entropy ------------------------------------------------------------------


def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """Log-probability of each token under its logits.

    logits [B, T, V] (any float dtype), tokens [B, T] (long) -> [B, T] float32.
    Formula: log_softmax(logits)[b, t, tokens[b, t]] = logits[b, t, y] − logsumexp_v logits[b, t, v],
    computed in float32 (bf16/fp16 log-softmax is too coarse for PPO ratios).
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the next-token distribution.

    logits [B, T, V] -> [B, T] float32. Formula: H = −Σ_v p_v log p_v = logsumexp(logits) − Σ_v p_v · logits_v.
    Entries at −inf (cut by top-k / top-p) have p_v = 0 and add nothing.
    """
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - torch.where(p > 0, p * logits, 0.0).sum(-1)


# --- responses ---------------------------------------------------------------------------------------


def truncate_after_eos(
    tokens: Tensor, eos_token_id: int | list[int], pad_token_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Cut each response after its first EOS.

    tokens [B, T] (generated response ids, no prompt). eos_token_id: one id or a list of ids (any counts).
    Returns (tokens [B, T] with everything after the first EOS replaced by pad_token_id, mask [B, T] float
    1.0 on the kept tokens including that EOS, finished [B] bool: the row contains an EOS). A row without
    EOS is kept whole (truncated by the length limit) and not finished.
    """
    eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    is_eos = torch.isin(tokens, torch.tensor(eos_ids, dtype=tokens.dtype, device=tokens.device))
    eos_before = torch.cumsum(is_eos.long(), dim=-1) - is_eos.long()  # EOS strictly before position t
    keep = eos_before == 0
    out = torch.where(keep, tokens, torch.full_like(tokens, pad_token_id))
    return out, keep.float(), is_eos.any(dim=-1)


# --- rewards and KL ----------------------------------------------------------------------------------


def kl_penalty_rewards(
    scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kl_coef: float
) -> tuple[Tensor, Tensor]:
    """Per-token rewards: the KL penalty on every token, the reward-model score on the last one.

    scores [B] (reward model, one per sequence), logprobs / ref_logprobs [B, T] (policy / frozen reference
    at rollout time), mask [B, T]. Formula: kl_t = (logprobs_t − ref_logprobs_t) · m_t (k1 estimator);
    rewards_t = −kl_coef · kl_t, plus scores[b] at the last kept token of row b (nothing for an all-masked
    row). Returns (rewards [B, T], kl [B, T]), 0 at masked positions.
    """
    keep = _keep(mask)
    kl = _zero_out(logprobs - ref_logprobs, keep)
    rewards = -kl_coef * kl
    T = mask.shape[-1]
    positions = torch.arange(T, device=mask.device).expand_as(keep)
    last = torch.where(keep, positions, torch.zeros_like(positions)).max(dim=-1).values  # [B]
    has_any = keep.any(dim=-1)
    score = torch.where(has_any, scores.to(rewards.dtype), torch.zeros((), dtype=rewards.dtype, device=rewards.device))
    rewards = rewards + torch.nn.functional.one_hot(last, T).to(rewards.dtype) * score.unsqueeze(-1)
    return rewards, kl


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token KL estimate that is never negative (Schulman's k3), for logging beside k1.

    logprobs, ref_logprobs, mask: [B, T] -> [B, T]. Formula: r = ref_logprobs − logprobs,
    k3 = exp(r) − 1 − r ≥ 0 (0 iff r = 0), 0 at masked positions.
    """
    r = _zero_out(ref_logprobs - logprobs, mask)
    return _zero_out(torch.expm1(r) - r, mask)


def kl_loss_k3(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """The KL term of the policy loss when ppo.kl_in is loss (GRPO): k3 averaged over the kept tokens.

    logprobs [B, T] (current policy, with grad), ref_logprobs [B, T], mask [B, T] -> scalar.
    Formula: r = min(ref_logprobs − logprobs, 20), loss = mean_m(e^r − 1 − r). Its gradient with respect to
    logprobs is 1 − e^r per token: 0 where π = π_ref, pushing log π down where π > π_ref. (The cap keeps a
    token the policy's top-k / top-p no longer keeps, log π = −inf, finite.)
    """
    r = _zero_out((ref_logprobs - logprobs).clamp(max=LOG_RATIO_FLOOR), mask)
    return masked_mean(torch.expm1(r) - r, mask)


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025), a reward source (ppo.rewards kind overlong).

    lengths [B] (response tokens), max_length L (ppo.max_new_tokens), buffer C -> [B]. Formula: 0 for
    length ≤ L − C; (L − C − length) / C between, falling linearly to −1 at L; −1 from L on.
    """
    return ((max_length - buffer - lengths.float()) / buffer).clamp(-1.0, 0.0)


def clip_scores(scores: Tensor, clip: float | None) -> Tensor:
    """Reward-model scores [B] clamped to [−clip, clip]; unchanged when clip is None."""
    return scores if clip is None else scores.clamp(-clip, clip)


# --- advantages ----------------------------------------------------------------------------------------


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation, backwards over the response tokens.

    rewards, values, mask: [B, T] (values from the critic at rollout time). The episode ends at the last kept
    token (EOS or length limit), so the value after it is 0:
      δ_t = r_t + γ · V_{t+1} − V_t,   A_t = δ_t + γ λ A_{t+1},   with V and A past the last kept token = 0.
    Returns (advantages [B, T], returns [B, T] = advantages + values), both 0 at masked positions.
    Computed without gradient: these are targets.
    """
    with torch.no_grad():
        keep = _keep(mask)
        r = _zero_out(rewards, keep)
        v = _zero_out(values, keep)
        T = r.shape[-1]
        last_gae = torch.zeros_like(r[..., 0])
        next_value = torch.zeros_like(v[..., 0])
        advantages = []
        for t in reversed(range(T)):
            delta = r[..., t] + gamma * next_value - v[..., t]
            last_gae = _zero_out(delta + gamma * lam * last_gae, keep[..., t])
            advantages.append(last_gae)
            next_value = v[..., t]
        adv = torch.stack(advantages[::-1], dim=-1)
        returns = _zero_out(adv + v, keep)
    return adv, returns


def group_advantages(scores: Tensor, samples_per_prompt: int, estimator: str, scale_by_std: bool = True) -> Tensor:
    """Critic-free, sequence-level advantages from groups of K responses to the same prompt.

    scores [B] with each prompt's K = `samples_per_prompt` responses in a row (B = P·K) -> [B]:
    - rloo (Ahmadian et al. 2024): s_i − mean of the other K − 1 scores of its group;
    - grpo (Shao et al. 2024): (s_i − group mean) / (group std + 1e-6), the std unbiased as in TRL;
      without the division with `scale_by_std=False` (Dr. GRPO, Liu et al. 2025);
    - reinforce_baseline (REINFORCE++-baseline, Hu 2025): s_i − group mean, then whitened over the batch.
    """
    k = samples_per_prompt
    if k < 2:
        raise ValueError(f"{estimator} needs at least 2 samples per prompt, got {k}")
    groups = scores.reshape(-1, k)
    mean = groups.mean(dim=1, keepdim=True)
    if estimator == "rloo":
        advantages = groups - (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)
    elif estimator == "grpo":
        advantages = groups - mean
        if scale_by_std:
            advantages = advantages / (groups.std(dim=1, keepdim=True) + 1e-6)
    elif estimator == "reinforce_baseline":
        centered = (groups - mean).flatten()
        return (centered - centered.mean()) / (centered.std() + 1e-8)
    else:
        raise ValueError(f"unknown estimator {estimator!r}")
    return advantages.flatten()


def reward_to_go(rewards: Tensor, mask: Tensor) -> Tensor:
    """Undiscounted returns: A_t = Σ_{t' ≥ t} r_t' over kept tokens. rewards, mask [B, T] -> [B, T], 0 at
    masked positions. With the sequence's advantage on its last token and −β·kl on every token
    (kl_penalty_rewards), this is the critic-free estimators' per-token advantage."""
    keep = _keep(mask)
    r = _zero_out(rewards, keep)
    return _zero_out(r.flip(-1).cumsum(-1).flip(-1), keep)


# --- losses ----------------------------------------------------------------------------------------------


def ppo_policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate loss, averaged over all kept tokens of the batch.

    logprobs [B, T] (current policy, with grad), old_logprobs [B, T] (rollout), advantages [B, T], mask [B, T];
    weights [B, T] (no grad): each token's importance weight w (`truncated_importance_weights`), 1 when None.
    Formula: ratio = exp(max(logprobs − old_logprobs, −20)) (a token the policy's top-k / top-p no longer
    keeps has logprobs −inf: its ratio is 0, e^−20 here so the statistics stay finite; no gradient either way);
      loss = mean_m(w · max(−A · ratio, −A · clip(ratio, 1 − ε, 1 + ε)));
      clipfrac = mean_m([−A · clip(ratio) > −A · ratio]);  approxkl = ½ · mean_m((logprobs − old_logprobs)²).
    Returns (loss scalar, clipfrac scalar detached, approxkl scalar detached).
    """
    log_ratio = _zero_out((logprobs - old_logprobs).clamp(min=-LOG_RATIO_FLOOR), mask)
    ratio = torch.exp(log_ratio)
    adv = _zero_out(advantages, mask)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_token if weights is None else weights.detach() * per_token, mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approxkl = 0.5 * masked_mean(log_ratio**2, mask)
    return loss, clipfrac, approxkl


def truncated_importance_weights(trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (TIS; TRL's vllm_importance_sampling_cap): the tokens were drawn by an
    inference engine whose numerics differ from the trainer's, so each token's policy loss is reweighted by
    how much likelier the trainer makes it, capped.

    trainer_logprobs, engine_logprobs, mask: [B, T]. Formula: w = min(exp(trainer − engine), cap) on the
    mask, 0 outside. Returns [B, T] weights, without gradient."""
    with torch.no_grad():
        weights = torch.exp(trainer_logprobs - engine_logprobs).clamp(max=cap)
        return _zero_out(weights, mask)


def logprob_gap(trainer_logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> tuple[float, float]:
    """(mean, max) of |trainer − engine| log-prob over the mask ([B, T] each): how far the engine's sampling
    log-probs are from the trainer's on the same tokens (0, 0 when the mask is empty)."""
    gap = (trainer_logprobs - engine_logprobs).abs()[mask.bool()]
    return (float(gap.mean()), float(gap.max())) if gap.numel() else (0.0, 0.0)


def ppo_value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range_value: float
) -> tuple[Tensor, Tensor]:
    """Clipped value-function loss, averaged over all kept tokens of the batch.

    values [B, T] (current critic, with grad), old_values [B, T] (rollout), returns [B, T] (from `gae`), mask.
    Formula: V_clip = old + clip(values − old, −c, c);
      loss = ½ · mean_m(max((values − returns)², (V_clip − returns)²));  clipfrac = mean_m([(V_clip − R)² > (V − R)²]).
    Returns (loss scalar, clipfrac scalar detached).
    """
    values = _zero_out(values, mask)
    old_values = _zero_out(old_values, mask)
    returns = _zero_out(returns, mask)
    clipped_values = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    loss_unclipped = (values - returns) ** 2
    loss_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(loss_unclipped, loss_clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((loss_clipped > loss_unclipped).float(), mask)
    return loss, clipfrac


# --- KL coefficient controllers --------------------------------------------------------------------------


class AdaptiveKLController:
    """The KL coefficient β, steered so the measured KL stays near `target` (Ziegler et al. 2019).

    update: e = clip(KL / target − 1, −0.2, 0.2);  β ← β · (1 + e · n_steps / horizon).
    KL is the mean per-sequence KL (sum over tokens of k1) of the latest batch; n_steps the number of
    sequences (episodes) in it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        """Restore β; target and horizon stay those of the (possibly edited) config."""
        self.value = float(d["value"])


class FixedKLController:
    """A constant KL coefficient β, with the same interface as AdaptiveKLController."""

    def __init__(self, kl_coef: float) -> None:
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Nothing: β stays fixed."""

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = float(d["value"])


def kl_controller(kl_coef: float, target: float | None, horizon: int) -> AdaptiveKLController | FixedKLController:
    """AdaptiveKLController(kl_coef, target, horizon) when target is set, else FixedKLController(kl_coef)."""
    if target is None:
        return FixedKLController(kl_coef)
    return AdaptiveKLController(kl_coef, target, horizon)
