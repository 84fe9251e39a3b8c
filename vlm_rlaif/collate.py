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
from vlm_rlaif.modeling import build_inputs, visual_token_ids
from vlm_rlaif.video import FrameCache

IGNORE_INDEX = -100


class VideoConversationCollator:
    """Loads each record's frames and renders its conversation through the chat template;
    with `independent_turns`, every turn sees the visual input and itself only
    (`turn_attention`); with `video_keys`, the batch names its videos (`FrameCache.key`)."""

    def __init__(
        self,
        processor,
        video_root: str | Path,
        num_frames: int,
        max_length: int,
        independent_turns: bool = False,
        video_keys: bool = False,
    ):
        self.processor = processor
        self.video_root = Path(video_root)
        self.frames = FrameCache(num_frames)
        self.max_length = max_length
        self.independent_turns = independent_turns
        self.video_keys = video_keys
        self.visual_ids = torch.tensor(visual_token_ids(processor))  # a frame may be either

    def __call__(self, records: Sequence[Dialogue]) -> dict[str, torch.Tensor]:
        sources = [r.media(self.video_root) for r in records]
        videos = [self.frames(source) for source in sources]
        batch = build_inputs(
            self.processor, videos, [r.conversations for r in records], add_generation_prompt=False, assistant_masks=True
        )
        mask = batch.pop("assistant_masks").bool()
        batch["labels"] = batch["input_ids"].masked_fill(~mask, IGNORE_INDEX)
        batch = self._truncate(dict(batch))
        if self.independent_turns:
            replies = batch["labels"] != IGNORE_INDEX
            batch["attention_mask"], batch["position_ids"] = turn_attention(
                torch.isin(batch["input_ids"], self.visual_ids),
                replies,
                batch["attention_mask"].bool(),
            )
        if self.video_keys:
            batch["video_keys"] = [FrameCache.key(source) for source in sources]
        return batch

    def _truncate(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cut text beyond max_length; the visual tokens come first and must survive whole."""
        if batch["input_ids"].shape[1] <= self.max_length:
            return batch
        visual = torch.isin(batch["input_ids"], self.visual_ids).sum(1)
        for key in ("input_ids", "attention_mask", "labels"):
            batch[key] = batch[key][:, : self.max_length]
        if not torch.equal(torch.isin(batch["input_ids"], self.visual_ids).sum(1), visual):
            raise ValueError(
                f"max_length {self.max_length} cuts into the {int(visual.max())} visual tokens of a video; raise sft.max_length"
            )
        return batch


def turn_attention(
    visual: torch.Tensor, replies: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A 4D attention mask [B, 1, L, L] (True: may attend) and position ids [B, L] under which
    each turn of a right-padded conversation sees the visual input and its own tokens, at the
    positions it would have alone: a packed answer cannot be copied from the turns before it.

    visual, replies, valid: [B, L] bool, the visual tokens, the reply tokens (a turn ends with
    its reply) and the non-padding tokens."""
    length = visual.shape[1]
    index = torch.arange(length)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    masks, positions = [], []
    for seen, reply, keep in zip(visual, replies, valid):
        shared = int(index[seen].max()) + 1 if seen.any() else 0  # up to the last visual token
        ends = torch.cat([torch.zeros(1, dtype=torch.long), (reply[:-1] & ~reply[1:]).long()])
        turn = torch.where(index < shared, 0, 1 + ends.cumsum(0))
        start = torch.searchsorted(turn, turn)  # where each token's turn begins
        positions.append(torch.where(turn == 0, index, shared + index - start))
        own = (turn[None, :] == 0) | (turn[None, :] == turn[:, None])
        masks.append(own & causal & keep[None, :] | torch.eye(length, dtype=torch.bool))
    return torch.stack(masks)[:, None], torch.stack(positions)
