"""Clip captions for the judge's context, on a real tiny VLM."""

import numpy as np

from vlm_rlaif import prompts
from vlm_rlaif.context import caption_clips
from vlm_rlaif.generation import generate


def clip(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)


def test_every_clip_gets_its_own_caption_in_order(tiny_vlm):
    model, processor = tiny_vlm
    clips = [[clip(0), clip(1), clip(2)], [clip(3)], []]
    captions = caption_clips(model, processor, clips, max_new_tokens=6, batch_size=2)
    assert [len(c) for c in captions] == [3, 1, 0]
    asked = [{"from": "human", "value": "<image>\n" + prompts.caption_instruction(0)}]
    alone = [generate(model, processor, [c], [asked], max_new_tokens=6)[0][0] for c in clips[0] + clips[1]]
    assert captions[0] + captions[1] == alone  # batching changes nothing; greedy, so repeatable
    context = prompts.format_context(captions[0])
    assert all(f"Clip {k}: " in context for k in (1, 2, 3))
    assert caption_clips(model, processor, [[], []], max_new_tokens=6) == [[], []]
