"""The preferences stage's pieces: responses A and B, on a real tiny VLM."""

import numpy as np
import torch

from vlm_rlaif.generation import encode_videos
from vlm_rlaif.modeling import build_inputs
from vlm_rlaif.preferences import sample_pairs


def prompts(n: int) -> tuple[list[np.ndarray], list[list[dict]]]:
    videos = [np.random.default_rng(20 + i).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for i in range(n)]
    return videos, [[{"from": "human", "value": "<image>\nDescribe the video in detail."}] for _ in range(n)]


def test_equal_pairs_are_drawn_again_then_dropped_and_counted(tiny_vlm):
    model, processor = tiny_vlm
    videos, conversations = prompts(3)
    torch.manual_seed(0)
    # nearly greedy: both draws of a pair agree, every redraw too
    same = sample_pairs(model, processor, videos, conversations, temperature=1e-4, top_p=1.0, max_new_tokens=4, max_resample=2)
    assert same.responses == [None, None, None] and same.resampled == 6
    torch.manual_seed(0)
    varied = sample_pairs(model, processor, videos, conversations, temperature=2.0, top_p=1.0, max_new_tokens=8, max_resample=2)
    kept = [pair for pair in varied.responses if pair is not None]
    assert kept and all(a.strip() != b.strip() for a, b in kept)
    assert varied.resampled <= 6


def test_precomputed_features_serve_every_draw_without_the_vision_tower(tiny_vlm):
    model, processor = tiny_vlm
    videos, conversations = prompts(2)
    features = encode_videos(model, build_inputs(processor, videos, conversations, add_generation_prompt=True))
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        torch.manual_seed(1)
        with_features = sample_pairs(model, processor, videos, conversations, temperature=1e-4, top_p=1.0,
                                     max_new_tokens=4, max_resample=1, features=features)
    finally:
        hook.remove()
    assert calls == [] and with_features.resampled == 2
    torch.manual_seed(1)
    plain = sample_pairs(model, processor, videos, conversations, temperature=1e-4, top_p=1.0, max_new_tokens=4, max_resample=1)
    assert plain.responses == with_features.responses
