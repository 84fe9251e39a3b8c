"""The mathematics of PPO with a KL penalty, on [batch, response tokens] tensors.

A response's tokens are its actions. The reward model scores the whole response once; that
score, with the length and missing-EOS penalties, scaled, lands on the response's last token,
and every token pays the KL penalty to the reference policy (PAPER.md: coefficient 0.1, the
k1 estimator clamped at zero). Advantages come from GAE over the value model's estimates and
are whitened over the batch; the policy loss is PPO's clipped surrogate and the value loss
is clipped around the rollout's values. `mask` is 1 on a response's tokens up to and
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


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """`x` scaled to unit variance over the masked positions (and centred, unless
    `shift_mean` is off); zero where masked. The moments are the whole rollout's: over every
    process of a data-parallel run."""
    mask = mask.to(x.dtype)
    count, total = summed_over_processes(torch.stack([mask.sum(), (x * mask).sum()]))
    count = count.clamp(min=1)
    mean = total / count
    variance = summed_over_processes(((x - mean) ** 2 * mask).sum()) / count
    out = (x - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


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
    reward: torch.Tensor, lengths: torch.Tensor, has_eos: torch.Tensor, *, max_new_tokens: int, length_penalty: float, missing_eos_penalty: float
) -> torch.Tensor:
    """The reward model's score of each response with the paper's penalties: minus
    `length_penalty` times the response's share of `max_new_tokens`, and minus
    `missing_eos_penalty` when generation stopped without an EOS."""
    return reward - length_penalty * lengths.to(reward.dtype) / max_new_tokens - missing_eos_penalty * (~has_eos.bool()).to(reward.dtype)


def shaped_rewards(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, *, kl_coef: float, reward_scale: float) -> torch.Tensor:
    """Per-token rewards: -kl_coef * KL at every response token, and the scaled sequence
    score (`sequence_score` x `reward_scale`) added at each response's last token. The scale
    applies to the score alone, so `kl_coef` keeps its meaning."""
    rewards = -kl_coef * kl * mask
    last = (mask.sum(1) - 1).clamp(min=0).long()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += reward_scale * score * (mask.sum(1) > 0)
    return rewards


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
