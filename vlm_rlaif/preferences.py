"""Context-aware AI preferences: the SFT model answers each RL prompt twice, captions the
video's clips, and judges which answer is better with the captions as context.

This module holds the responses A and B (`sample_pairs`); the clip captions live in
`context.py` and the judge in `judge.py`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from transformers import PreTrainedModel, ProcessorMixin

from vlm_rlaif.generation import generate


@dataclass
class Pairs:
    """Two responses per prompt, or None where every draw gave the same text twice;
    `resampled`: how many pairs were drawn again because their two responses were equal."""

    responses: list[tuple[str, str] | None]
    resampled: int


def sample_pairs(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    videos: Sequence[np.ndarray],
    conversations: Sequence[list[dict]],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    max_resample: int,
    features: Sequence[torch.Tensor] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Pairs:
    """Two sampled responses per (video, conversation). Two equal responses carry no
    preference: such a pair is drawn again, up to `max_resample` times, and is None if it is
    still equal. `features` (one per prompt) serve every draw, so no video is encoded twice."""

    def draw(rows: list[int]) -> list[tuple[str, str]]:
        texts = generate(
            model, processor, [videos[i] for i in rows], [conversations[i] for i in rows],
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, num_return_sequences=2,
            batch_size=batch_size, progress=progress, features=None if features is None else [features[i] for i in rows],
        )
        return [(a, b) for a, b in texts]

    pairs = draw(list(range(len(conversations))))
    resampled = 0
    for _ in range(max_resample):
        equal = [i for i, (a, b) in enumerate(pairs) if a.strip() == b.strip()]
        if not equal:
            break
        resampled += len(equal)
        for i, pair in zip(equal, draw(equal)):
            pairs[i] = pair
    return Pairs([pair if pair[0].strip() != pair[1].strip() else None for pair in pairs], resampled)
