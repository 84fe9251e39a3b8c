"""Rollouts: responses sampled from the policy, and everything PPO needs to learn from them.

For a batch of RL prompts: each video encoded once; a response per prompt from the policy
(temperature and top_p, PAPER.md); under no gradient the log-probs of its tokens under the
policy and the reference, the value model's estimates, and the reward model's score; then
the per-token rewards (KL penalty at every token, the penalised score at the last, all
scaled; with `ppo.token_rewards` the likelihood reading's share of the score lands on the
token that earned it), GAE advantages (whitened) and returns. On a fresh run's first rollout
the value head can be calibrated first: rescaled and shifted onto the returns it is about to
learn.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from vlm_rlaif import ppo_math
from vlm_rlaif.config import PPOConfig
from vlm_rlaif.data import RLPrompt
from vlm_rlaif.generation import distinct_media, eos_token_ids, generate_sequences
from vlm_rlaif.policy import POLICY, Models
from vlm_rlaif.video import load_video


@dataclass
class Rollout:
    """One rollout batch, row-aligned. Tensors are [B] or [B, R] with R the longest response."""

    prompts: list[list[dict]]
    videos: list[np.ndarray]
    features: list[torch.Tensor]
    texts: list[str]
    responses: torch.Tensor
    mask: torch.Tensor
    ended: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # the reward model's
    penalised: torch.Tensor  # the scores with the length and missing-EOS penalties
    kl: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor

    def __len__(self) -> int:
        return len(self.prompts)

    def rows(self, index: Sequence[int]) -> Rollout:
        """The rollout restricted to rows `index` (a PPO minibatch), trimmed to its longest response."""
        index = list(index)
        width = int(self.mask[index].sum(1).max())
        picked = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = value[index]
                picked[f.name] = value[:, :width] if value.dim() == 2 else value
            else:
                picked[f.name] = [value[i] for i in index]
        return Rollout(**picked)


def _pad(sequences: Sequence[torch.Tensor], pad_id: int) -> torch.Tensor:
    """Right-pad token id rows to one width."""
    ids = torch.full((len(sequences), max(len(s) for s in sequences)), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = s
    return ids


@torch.no_grad()
def _in_batches(fn, rollout_rows: int, batch_size: int, **columns) -> torch.Tensor:
    """`fn(**columns restricted to a batch)` over the rows, batch by batch, padded back to full width."""
    outs = []
    for start in range(0, rollout_rows, batch_size):
        part = {k: v[start : start + batch_size] for k, v in columns.items()}
        outs.append(fn(**part).cpu())  # the rollout lives on the CPU; a minibatch step moves what it uses
    width = max(o.shape[1] for o in outs)
    return torch.cat([torch.nn.functional.pad(o, (0, width - o.shape[1])) for o in outs])


def collect(
    models: Models,
    prompts: Sequence[RLPrompt],
    cfg: PPOConfig,
    *,
    kl_coef: float,
    video_root: str | Path,
    num_frames: int,
    batch_size: int,
    calibrate_value: bool = False,
    oracle: Callable[[Sequence[RLPrompt], list[str]], torch.Tensor] | None = None,
) -> Rollout:
    """A rollout batch for `prompts` (see the module docstring), reproducible under a fixed
    torch seed; with `calibrate_value`, the value head is calibrated on it first; `oracle`
    (prompts, responses) -> rewards scores the responses in the reward model's place."""
    media, video_of = distinct_media(prompts, video_root)
    unique = [load_video(source, num_frames) for source in media]
    encoded = models.encode(unique, batch_size)
    videos, features = [unique[v] for v in video_of], [encoded[v] for v in video_of]
    asked = [[p.conversations[0].to_dict()] for p in prompts]

    models.model.eval()
    with models.adapter(POLICY):
        generations = [g[0] for g in generate_sequences(
            models.model, models.processor, videos, asked, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_p=cfg.top_p, features=features, batch_size=batch_size,
        )]
    eos = eos_token_ids(models.model, models.processor)
    pad_id = models.processor.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else min(eos)
    responses = _pad([g.token_ids for g in generations], pad_id)
    mask = ppo_math.response_mask(responses, eos, pad_id)  # a response without EOS ran to max_new_tokens: the full width
    ended = torch.tensor([g.ended for g in generations])
    texts = [g.text for g in generations]

    rows = dict(prompts=asked, features=features, responses=responses, response_mask=mask, videos=videos)
    n = len(prompts)
    logprobs = _in_batches(lambda **c: models.logprobs(POLICY, **c)[0], n, batch_size, **rows)
    ref_logprobs = _in_batches(lambda **c: models.logprobs(None, **c)[0], n, batch_size, **rows)
    values = _in_batches(models.values, n, batch_size, **rows)
    if oracle is not None:
        earned, scores = None, oracle(prompts, texts)
    elif cfg.token_rewards:
        earned = _in_batches(lambda ref, **c: models.token_rewards(c, ref), n, batch_size,
                             ref=ref_logprobs, **rows)
        scores = earned.sum(1)
    else:
        earned, scores = None, models.rewards(videos, asked, texts, features, batch_size)

    mask_f = mask.float()
    kl = ppo_math.kl_penalty(logprobs, ref_logprobs, cfg.kl_estimator) * mask_f
    score = ppo_math.sequence_score(scores, mask.sum(1), ended, length_penalty=cfg.length_penalty,
                                    length_penalty_tokens=cfg.length_penalty_tokens,
                                    missing_eos_penalty=cfg.missing_eos_penalty)
    rewards = ppo_math.shaped_rewards(score, kl, mask_f, kl_coef=kl_coef,
                                      reward_scale=cfg.reward_scale, earned=earned)
    if cfg.whiten_rewards:
        rewards = ppo_math.whiten(rewards, mask_f, shift_mean=False)
    if calibrate_value:
        to_go = ppo_math.reward_to_go(rewards, mask_f, cfg.gamma)
        scale, shift = ppo_math.affine_fit(values, to_go, mask_f)
        mean, variance = ppo_math.masked_moments(to_go, mask_f)
        std = max(float(variance) ** 0.5, 1e-6)
        models.value_head.calibrate(scale, shift, mean=float(mean), std=std)
        values = scale * values + shift  # what the calibrated head now says
    advantages, returns = ppo_math.gae(rewards, values * mask_f, mask_f, cfg.gamma, cfg.lam)
    advantages = ppo_math.whiten(advantages, mask_f)
    return Rollout(asked, videos, features, texts, responses, mask, ended, logprobs * mask_f, ref_logprobs * mask_f,
                   values * mask_f, scores, score, kl, rewards, advantages, returns)
