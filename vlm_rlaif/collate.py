"""Video conversations -> training batches, with the loss on the assistant's tokens only.

The SFT model learns to answer, never to predict the question or the visual placeholder
tokens; `modeling.build_inputs` marks the assistant's replies (and their end-of-turn token),
and everything else gets the ignore label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from vlm_rlaif.data import Dialogue
from vlm_rlaif.modeling import build_inputs
from vlm_rlaif.video import load_video

IGNORE_INDEX = -100


class VideoConversationCollator:
    """Loads each record's frames and renders its conversation through the chat template."""

    def __init__(self, processor, video_root: str | Path, num_frames: int, max_length: int):
        self.processor = processor
        self.video_root = Path(video_root)
        self.num_frames = num_frames
        self.max_length = max_length
        self.video_token_id = processor.tokenizer.convert_tokens_to_ids(processor.video_token)

    def __call__(self, records: Sequence[Dialogue]) -> dict[str, torch.Tensor]:
        videos = [load_video(r.media(self.video_root), self.num_frames) for r in records]
        batch = build_inputs(
            self.processor, videos, [r.conversations for r in records], add_generation_prompt=False, assistant_masks=True
        )
        mask = batch.pop("assistant_masks").bool()
        batch["labels"] = batch["input_ids"].masked_fill(~mask, IGNORE_INDEX)
        return self._truncate(dict(batch))

    def _truncate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cut text beyond max_length; the video tokens come first and must survive whole."""
        if batch["input_ids"].shape[1] <= self.max_length:
            return batch
        visual = (batch["input_ids"] == self.video_token_id).sum(1)
        for key in ("input_ids", "attention_mask", "labels"):
            batch[key] = batch[key][:, : self.max_length]
        if not torch.equal((batch["input_ids"] == self.video_token_id).sum(1), visual):
            raise ValueError(
                f"max_length {self.max_length} cuts into the {int(visual.max())} visual tokens of a video; raise sft.max_length"
            )
        return batch
