"""A vision tower that sees each frame beside the next: the tiny base's way of seeing motion.

A tower that reads frames one at a time leaves motion to the language model, which must find an
object in two frames and compare where it is; the tiny language model never learns that within
the SFT budget (README: "What the language model lacks is comparing frames"). Video encoders
see time themselves (Qwen2.5-VL's patches span two frames). Here each sampled frame goes into
the tower stacked on the channels with the next one (the last with the one before it), so every
visual token can say how its object moves. Tokens, pooling and projector are LLaVA-NeXT-Video's.

`register` adds the `llava_next_video_pairs` model type to transformers' Auto classes, so the
tiny base loads by path like any other.
"""

from __future__ import annotations

import torch
from transformers import LlavaNextVideoConfig
from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoModel

from vlm_rlaif.llava_variants import VariantForConditionalGeneration, register_variant

MODEL_TYPE = "llava_next_video_pairs"


class FramePairsConfig(LlavaNextVideoConfig):
    """LLaVA-NeXT-Video's configuration under its own type; the tower reads 2 x 3 channels."""

    model_type = MODEL_TYPE


def pair_frames(frames: torch.Tensor) -> torch.Tensor:
    """[B, T, C, H, W] -> [B, T, 2C, H, W]: frame t beside frame t + 1, the last frame after
    the one before it (a still image, T = 1, beside itself)."""
    if frames.shape[1] == 1:
        return torch.cat([frames, frames], dim=2)
    later = torch.cat([frames[:, 1:], frames[:, -1:]], dim=1)
    earlier = torch.cat([frames[:, :-1], frames[:, -2:-1]], dim=1)
    return torch.cat([earlier, later], dim=2)


class FramePairsModel(LlavaNextVideoModel):
    config_class = FramePairsConfig

    def tower_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, T, C, H, W] frames as the tower reads them: each beside the next."""
        return pair_frames(frames)

    def get_video_features(self, pixel_values_videos: torch.Tensor, *args, **kwargs):
        """LLaVA-NeXT-Video's video features, the tower reading each frame with the next."""
        return super().get_video_features(self.tower_frames(pixel_values_videos), *args, **kwargs)

    def get_image_features(self, pixel_values: torch.Tensor, *args, **kwargs):
        """An image is a frame that does not move: it is read beside itself."""
        return super().get_image_features(
            torch.cat([pixel_values, pixel_values], dim=-3), *args, **kwargs
        )


class FramePairsForConditionalGeneration(VariantForConditionalGeneration):
    config_class = FramePairsConfig
    inner_model_class = FramePairsModel


def register() -> None:
    """Make `llava_next_video_pairs` folders load through the Auto classes (idempotent)."""
    register_variant(FramePairsConfig, FramePairsForConditionalGeneration)
