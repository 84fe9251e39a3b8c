"""The mathematics of PPO with a KL penalty, on [batch, response tokens] tensors.

A response's tokens are its actions. The reward model scores the whole response once; that
score, with the length and missing-EOS penalties, lands on the response's last token (a
likelihood reward model's score can instead be earned token by token), every
token pays the KL penalty to the reference policy (PAPER.md: coefficient 0.1, the k1
estimator clamped at zero), and the whole shaped reward is scaled (x10, as the release does).
Advantages come from GAE over the value model's estimates and are whitened over the batch;
the policy loss is PPO's clipped surrogate and the value loss is clipped around the
rollout's values. `mask` is 1 on a response's tokens up to and
including its EOS and 0 after: nothing after EOS earns reward, advantage or loss.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is 1."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def summed_over_processes(x: torch.Tensor) -> torch.Tensor:
    """`x` summed over every process of a data-parallel run; `x` itself in a single process."""
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        x = x.clone()
        torch.distributed.all_reduce(x)
    return x


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of `x` over the masked positions of the whole rollout: over every
    process of a data-parallel run."""
    mask = mask.to(x.dtype)
    count, total = summed_over_processes(torch.stack([mask.sum(), (x * mask).sum()]))
    count = count.clamp(min=1)
    mean = total / count
    return mean, summed_over_processes(((x - mean) ** 2 * mask).sum()) / count


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """`x` scaled to unit variance over the masked positions (and centred, unless
    `shift_mean` is off); zero where masked; the moments are the whole rollout's."""
    mean, variance = masked_moments(x, mask)
    out = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def response_mask(tokens: torch.Tensor, eos_ids: set[int], pad_id: int | None = None) -> torch.Tensor:
    """1 on each response's tokens up to and including its first EOS, 0 after it. Without an
    EOS the response runs to the end, less any padding (`pad_id`) generation added after it."""
    is_eos = torch.zeros_like(tokens, dtype=torch.bool)
    for eos in eos_ids:
        is_eos |= tokens == eos
    before_eos = (is_eos.long().cumsum(1) - is_eos.long()) == 0  # no EOS strictly before this position
    mask = before_eos
    if pad_id is not None and pad_id not in eos_ids:
        mask &= tokens != pad_id
    return mask.long()


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probs:
    k1 = log p - log q; k1_clamped = max(k1, 0), the paper's; k3 = (q/p - 1) - log(q/p),
    never negative and of lower variance (Schulman, "Approximating KL divergence")."""
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k1_clamped":
        return log_ratio.clamp(min=0.0)
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; known: k1, k1_clamped, k3")


def sequence_score(
    reward: torch.Tensor, lengths: torch.Tensor, has_eos: torch.Tensor, *, length_penalty: float,
    length_penalty_tokens: int, missing_eos_penalty: float,
) -> torch.Tensor:
    """The reward model's score of each response with the paper's penalties: minus
    `length_penalty` per `length_penalty_tokens` tokens of response (the paper's -10 per 896),
    and minus `missing_eos_penalty` when generation stopped without an EOS."""
    per_token = length_penalty / length_penalty_tokens
    no_eos = (~has_eos.bool()).to(reward.dtype)
    return reward - per_token * lengths.to(reward.dtype) - missing_eos_penalty * no_eos


def shaped_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, kl_coef: float,
                   reward_scale: float, earned: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL at every response token and the sequence score added at
    each response's last token, all times `reward_scale` (the release scales the whole shaped
    reward, so the KL penalty keeps its weight). `earned` [B, R], the part of the score each
    token earned, lands on its token and the rest of the score at the last."""
    rewards = -kl_coef * kl * mask
    if earned is not None:
        rewards = rewards + earned * mask
        score = score - (earned * mask).sum(1)
    last = (mask.sum(1) - 1).clamp(min=0).long()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += score * (mask.sum(1) > 0)
    return reward_scale * rewards


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """The discounted sum of each token's reward and all after it: the return a perfect critic
    would predict, whatever the critic now says."""
    mask = mask.to(rewards.dtype)
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = (rewards[:, t] + gamma * running) * mask[:, t]
        out[:, t] = running
    return out


def affine_fit(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> tuple[float, float]:
    """(a, b) minimising the squared error of a * x + b against y over the masked positions of
    the whole rollout (every process fits the same): how to rescale and shift a critic so that
    its estimates sit on the returns' scale."""
    x, y = x.double(), y.double()
    (x_mean, x_var), (y_mean, _) = masked_moments(x, mask), masked_moments(y, mask)
    m = mask.to(x.dtype)
    count = summed_over_processes(m.sum()).clamp(min=1)
    covariance = summed_over_processes(((x - x_mean) * (y - y_mean) * m).sum()) / count
    a = covariance / x_var if x_var > 1e-12 else torch.zeros(())
    return float(a), float(y_mean - a * x_mean)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(returns - values) / Var(returns) over the masked positions: 1 for a critic that
    predicts every return, 0 for one no better than the mean, negative for worse."""
    values, returns = values[mask.bool()].double(), returns[mask.bool()].double()
    total = returns.var(unbiased=False)
    return float(1 - (returns - values).var(unbiased=False) / total) if total > 1e-12 else 0.0


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation along each response: A_t = sum_k (gamma lam)^k
    delta_{t+k}, delta_t = r_t + gamma V_{t+1} - V_t, with V = 0 after the last token.
    Returns (advantages, returns = advantages + values), zero where masked."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    length = values.shape[1]
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate, -min(ratio A, clip(ratio, 1 +- eps) A), averaged over
    response tokens; with the share of tokens where the clip binds and the approximate KL
    from the rollout policy (mean of (ratio - 1) - log ratio)."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask)}
    return loss, stats


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, value_clip: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss, 0.5 * max((V - R)^2, (V_clipped - R)^2) with V_clipped within
    `value_clip` of the rollout's values, averaged over response tokens; with the share of
    tokens where the clipped term is the larger."""
    clipped_values = old_values + (values - old_values).clamp(-value_clip, value_clip)
    unclipped, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"value_clip_fraction": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


class AdaptiveKLController:
    """The KL coefficient adjusted towards a target KL (Ziegler et al. 2019): raised when the
    measured KL is above target, lowered when below, by at most 20 % of the step's share of
    `horizon`. With `adaptive` off the coefficient stays fixed (the paper's 0.1)."""

    def __init__(self, coef: float, target: float, horizon: int = 10000, adaptive: bool = False):
        self.coef, self.target, self.horizon, self.adaptive = coef, target, horizon, adaptive

    def update(self, kl: float, n_steps: int) -> float:
        if self.adaptive:
            error = max(-0.2, min(0.2, kl / self.target - 1.0))
            self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef
