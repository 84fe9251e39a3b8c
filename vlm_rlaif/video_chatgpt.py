"""The released VLM-RLAIF models' architecture: LLaVA-1.5 with Video-ChatGPT pooling.

The published checkpoints (SNUMPR/vlm_rlaif_video_llava_7b and its SFT siblings) read a
video as LLaVA-1.5 reads an image, frame by frame: CLIP ViT-L/14-336 features of the second
to last layer, CLS dropped, through a two-layer GELU projector. The frames' projected
features are then pooled the Video-ChatGPT way: one token per frame (its mean over space)
followed by one token per patch position (its mean over time), T + 576 tokens for T frames
of 336 px. LLaVA-NeXT-Video has the same tower, projector and language model but pools each
frame 2x2 instead, so this module keeps its modules and weights' names and overrides only
the pooling (the model) and the count of video tokens (the processor).

`register` adds the `video_chatgpt_llava` model type to transformers' Auto classes (the
package's loading path calls it), so a converted checkpoint (`vlm_rlaif.convert`) loads by path through
`modeling.load_model_and_processor` like any other base.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from transformers import LlavaNextVideoConfig, LlavaNextVideoProcessor
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava_next_video.modeling_llava_next_video import LlavaNextVideoModel

from vlm_rlaif.llava_variants import VariantForConditionalGeneration, register_variant

MODEL_TYPE = "video_chatgpt_llava"


class VideoChatGPTLlavaConfig(LlavaNextVideoConfig):
    """LLaVA-NeXT-Video's configuration under its own model type; `spatial_pool_*` go unused."""

    model_type = MODEL_TYPE


def pool_spatio_temporal(features: torch.Tensor) -> torch.Tensor:
    """[B, T, P, D] frame features -> [B, T + P, D]: T temporal tokens (each frame's mean over
    its P patches), then P spatial tokens (each patch position's mean over the T frames)."""
    return torch.cat([features.mean(dim=2), features.mean(dim=1)], dim=1)


class VideoChatGPTLlavaModel(LlavaNextVideoModel):
    config_class = VideoChatGPTLlavaConfig

    def get_video_features(
        self,
        pixel_values_videos: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """Projected, spatio-temporally pooled features of [B, T, C, H, W] frames: pooler_output
        [B, T + patches, hidden]. The pooling follows the projector, as in the release."""
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or self.config.vision_feature_select_strategy
        batch, frames = pixel_values_videos.shape[:2]
        tower = self.vision_tower(pixel_values_videos.flatten(0, 1), output_hidden_states=True, return_dict=True)
        layers = [layer] if isinstance(layer, int) else layer
        selected = torch.cat([tower.hidden_states[i] for i in layers], dim=-1)
        if strategy == "default":
            selected = selected[:, 1:]  # CLS
        projected = self.multi_modal_projector(selected).unflatten(0, (batch, frames))
        return BaseModelOutputWithPooling(last_hidden_state=tower.last_hidden_state, pooler_output=pool_spatio_temporal(projected))


class VideoChatGPTLlavaForConditionalGeneration(VariantForConditionalGeneration):
    config_class = VideoChatGPTLlavaConfig
    inner_model_class = VideoChatGPTLlavaModel


def pad_to_square(frames: np.ndarray, colour: Sequence[int]) -> np.ndarray:
    """[T, H, W, 3] frames centred on a square canvas of `colour`: LLaVA's "pad" aspect ratio,
    under which the later resize and centre crop keep the whole frame."""
    height, width = frames.shape[1:3]
    if height == width:
        return frames
    side = max(height, width)
    canvas = np.empty((len(frames), side, side, frames.shape[3]), dtype=frames.dtype)
    canvas[...] = np.asarray(colour, dtype=frames.dtype)
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, top : top + height, left : left + width] = frames
    return canvas


class VideoChatGPTLlavaProcessor(LlavaNextVideoProcessor):
    """LLaVA-NeXT-Video's processor with the pooled token count (`<video>` expands to frames +
    patches per frame tokens) and, with `pad_to_square`, frames padded square in the video
    processor's mean colour first, as the release trained and evaluated (LLaVA's "pad")."""

    def __init__(self, video_processor=None, image_processor=None, tokenizer=None, chat_template=None, patch_size=None,
                 vision_feature_select_strategy=None, video_token="<video>", image_token="<image>", num_additional_image_tokens=0,
                 pad_to_square: bool = False, **kwargs):
        # the full signature, not **kwargs: the processor saves the arguments its __init__ names
        super().__init__(video_processor, image_processor, tokenizer, chat_template, patch_size, vision_feature_select_strategy,
                         video_token, image_token, num_additional_image_tokens, **kwargs)
        self.pad_to_square = pad_to_square

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        if self.pad_to_square and videos is not None:
            colour = [int(m * 255) for m in self.video_processor.image_mean]
            videos = [pad_to_square(np.asarray(v), colour) for v in videos]
        return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def replace_video_token(self, video_inputs: dict | None = None, video_idx: int = 0, **kwargs) -> str:
        video = video_inputs["pixel_values_videos"][video_idx]  # [T, C, H, W]
        height, width = video.shape[-2:]
        return self.video_token * (len(video) + (height // self.patch_size) * (width // self.patch_size))


def register() -> None:
    """Make `video_chatgpt_llava` folders load through the Auto classes (idempotent)."""
    register_variant(
        VideoChatGPTLlavaConfig,
        VideoChatGPTLlavaForConditionalGeneration,
        VideoChatGPTLlavaProcessor,
    )
