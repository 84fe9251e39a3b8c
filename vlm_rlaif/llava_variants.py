"""LLaVA-NeXT-Video variants: its modules and weights' names, with its inner model changed.

A variant is a config under its own model type, an inner model that overrides how visual
features are made, and `VariantForConditionalGeneration` over it; `register_variant` makes
its saved folders load by path through transformers' Auto classes.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
)
from transformers.models.llava_next_video.modeling_llava_next_video import (
    LlavaNextVideoModel,
    LlavaNextVideoPreTrainedModel,
)


class VariantForConditionalGeneration(LlavaNextVideoForConditionalGeneration):
    """LLaVA-NeXT-Video's language-model head over the variant's `inner_model_class`."""

    inner_model_class: type[LlavaNextVideoModel] = LlavaNextVideoModel

    def __init__(self, config: LlavaNextVideoConfig):
        # the parent's __init__ would build a second, unused inner model
        LlavaNextVideoPreTrainedModel.__init__(self, config)
        self.model = self.inner_model_class(config)
        self.lm_head = torch.nn.Linear(
            config.text_config.hidden_size, config.text_config.vocab_size, bias=False
        )
        self.post_init()


def tower_frames(model, frames: torch.Tensor) -> torch.Tensor:
    """[B, T, C, H, W] frames as `model`'s vision tower reads them: as its inner model's
    `tower_frames` says, else unchanged."""
    read = getattr(model.model, "tower_frames", None)
    return frames if read is None else read(frames)


def register_variant(
    config_class: type[LlavaNextVideoConfig],
    model_class: type[VariantForConditionalGeneration],
    processor_class: type[LlavaNextVideoProcessor] = LlavaNextVideoProcessor,
) -> None:
    """Make folders of `config_class.model_type` load through the Auto classes (idempotent)."""
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
    AutoProcessor.register(config_class, processor_class, exist_ok=True)
