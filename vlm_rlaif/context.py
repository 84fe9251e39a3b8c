"""Context for the judge: the SFT model's captions of consecutive clips of the video.

The paper's judge reads, beside the video, a detailed caption of each of its clips (3 clips of
at most 20 of the 50 frames worked best), concatenated in order: a video LMM sees a short clip
at a finer time scale than the whole video at the same frame count, and the captions spell
out the facts the judge checks the two responses against. `video.load_clips` cuts the clips;
`prompts.format_context` turns the captions into the judge's context block.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from transformers import PreTrainedModel, ProcessorMixin

from vlm_rlaif import prompts
from vlm_rlaif.data import PLACEHOLDER
from vlm_rlaif.generation import generate


def caption_clips(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    clips: Sequence[Sequence[np.ndarray]],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    progress: bool = False,
) -> list[list[str]]:
    """A greedy detailed caption of every clip, per video in clip order (`clips[v][k]`: uint8
    frames of clip k of video v). All clips of all videos go through one batched generation."""
    flat = [clip for video in clips for clip in video]
    if not flat:
        return [[] for _ in clips]
    asked = [{"from": "human", "value": f"{PLACEHOLDER}\n{prompts.caption_instruction(0)}"}]
    texts = generate(
        model, processor, flat, [asked] * len(flat), max_new_tokens=max_new_tokens, temperature=0.0,
        batch_size=batch_size, progress=progress,
    )
    captions, start = [], 0
    for video in clips:
        captions.append([group[0] for group in texts[start : start + len(video)]])
        start += len(video)
    return captions
