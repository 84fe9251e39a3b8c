"""Pretraining of the tiny base's vision side: the embedded default's stand-in for CLIP.

At paper scale the vision tower arrives pretrained (CLIP on web images) and the projector
aligned; a tower initialised from a seed sees nothing, and SFT alone cannot teach it to tell
a cross from a square in a few minutes of CPU time. So the `base` stage first trains the tiny
tower on the world's own frames with the world's exact ground truth: every visible object
marks its colour and its shape in the pooled cell (the grid of visual tokens the language
model reads) that holds its centre; a tower that reads frame pairs also marks there how the
object moves and whether it enters, leaves or changes colour before the next frame, and every
cell of the frame marks that it happened. A linear probe on the pooled features learns the
marks, and through it the tower learns to see. The probe is then dropped: what the language
model gets is the tower, as with CLIP.

The projector stays as initialised except for its output layer, which is shifted and scaled
so that visual tokens are zero-mean and as long as the text embeddings: a fresh language
model otherwise sees one large shared vector in every visual token and learns to ignore
them (visual tokens with cosine similarity near 1 are what collapse looks like).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vlm_rlaif.config import VisionPretrainConfig
from vlm_rlaif.llava_variants import tower_frames
from vlm_rlaif.synthetic.scene import COLOURS, EVENT_KINDS, MOTIONS, SHAPES, Scene

ATTRIBUTES = [*COLOURS, *SHAPES]
# What a frame-pairs tower also marks: how each object moves, and what happens between the pair.
CHANGES = [*MOTIONS, *EVENT_KINDS]
# ... and, in every cell of the pair, that it happened somewhere in the frame: a question about
# the whole video ("does anything enter?") then finds it in any of the frame's visual tokens.
IN_FRAME = [f"{kind} in frame" for kind in EVENT_KINDS]


def cell_targets(
    scene: Scene, grid: int, frames: Sequence[int] | None = None, pairs: bool = False
) -> np.ndarray:
    """Multi-hot [frames, grid, grid, colours + shapes (+ motions + events + events in frame)]:
    each visible object's colour (at that frame) and shape in the cell holding its centre; with
    `pairs`, also how it moves and whether it enters, leaves or changes colour before the next
    of `frames`, and in every cell of the frame which of those happens there."""
    frames = list(range(scene.num_frames)) if frames is None else list(frames)
    cell = scene.frame_size / grid
    width = len(ATTRIBUTES) + pairs * (len(CHANGES) + len(IN_FRAME))
    out = np.zeros((len(frames), grid, grid, width), np.float32)

    def mark(i: int, obj, t: int, event: str | None = None) -> None:
        x, y = obj.track[t]
        row, col = min(int(y // cell), grid - 1), min(int(x // cell), grid - 1)
        marks = [ATTRIBUTES.index(scene.colour_at(obj, t)), ATTRIBUTES.index(obj.shape)]
        marks += [len(ATTRIBUTES) + CHANGES.index(obj.motion)] if pairs else []
        marks += [len(ATTRIBUTES) + CHANGES.index(event)] if event else []
        out[i, row, col, marks] = 1
        if event:
            out[i, :, :, len(ATTRIBUTES) + len(CHANGES) + EVENT_KINDS.index(event)] = 1

    for i, t in enumerate(frames):
        for obj in scene.objects:
            if scene.visible(obj, t):
                mark(i, obj, t)
        if not pairs or len(frames) == 1:
            continue
        # the tower reads frame i beside the next one (the last beside the one before it)
        a, b = (t, frames[i + 1]) if i + 1 < len(frames) else (frames[i - 1], t)
        for obj in scene.objects:
            before, after = scene.visible(obj, a), scene.visible(obj, b)
            if after and not before:
                mark(i, obj, b, "enters")
            elif before and not after:
                mark(i, obj, a, "leaves")
            elif before and scene.colour_at(obj, a) != scene.colour_at(obj, b):
                mark(i, obj, a, "changes_colour")
                mark(i, obj, b, "changes_colour")  # both colours: which it was and which it is
    return out


def pooled_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Vision tower features of single frames [B, C, H, W] on the language model's token
    grid [B, grid, grid, hidden]: the configured layer, CLS dropped, through the model's own
    pooler (the projector is left out)."""
    hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
    pooled = model.model.vision_resampler(hidden[model.config.vision_feature_layer][:, 1:])
    side = int(pooled.shape[1] ** 0.5)
    return pooled.view(pooled.shape[0], side, side, pooled.shape[2])


@dataclass
class PretrainResult:
    """Loss per step and the probe's accuracy on held-out frames (cells holding one object)."""

    losses: list[float] = field(default_factory=list)
    probe: dict[str, float] = field(default_factory=dict)


def _pixels(processor, videos: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [T, H, W, 3] videos -> normalised pixel values [videos, T, 3, H, W]."""
    return processor.video_processor(videos=list(videos), return_tensors="pt")["pixel_values_videos"]


def _visual_tokens(model, pixels: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Every visual token the language model would get for these videos, [tokens, hidden]."""
    chunks = [model.get_video_features(pixel_values_videos=pixels[i : i + batch]).pooler_output for i in range(0, len(pixels), batch)]
    return torch.cat([c.flatten(0, -2) for c in chunks])


def pretrain_vision(
    model, processor, videos: Sequence[np.ndarray], targets: Sequence[np.ndarray], cfg: VisionPretrainConfig, seed: int
) -> PretrainResult:
    """Train the vision tower (with a linear probe) to find each object's colour and shape
    (and motion, where `targets` mark it); the last `cfg.heldout` videos are kept out of
    training and measure the probe."""
    held = max(1, round(len(videos) * cfg.heldout))
    x = tower_frames(model, _pixels(processor, videos)).flatten(0, 1)  # the tower's input per frame
    y = torch.from_numpy(np.concatenate(targets))
    split = sum(len(v) for v in videos[:-held])
    x_train, y_train, x_held, y_held = x[:split], y[:split], x[split:], y[split:]

    tower = model.model.vision_tower
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(model.config.vision_config.hidden_size, y.shape[-1])
    params = [*tower.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, cfg.learning_rate, total_steps=cfg.steps, pct_start=0.05)
    # An object fills one cell of 16 and marks 2 of 12 attributes there: positives are rare.
    # Marks of what happens in the frame fill all of its cells: weighed up, they crowd out shape.
    pos_weight = torch.full((y.shape[-1],), 4.0)
    pos_weight[len(ATTRIBUTES) + len(CHANGES) :] = 0.5
    result = PretrainResult()
    tower.train()
    for _ in tqdm(range(cfg.steps), desc="vision pretraining", leave=False):
        idx = torch.randint(len(x_train), (cfg.batch_size,), generator=generator)
        logits = probe(pooled_features(model, x_train[idx]))
        loss = F.binary_cross_entropy_with_logits(logits, y_train[idx], pos_weight=pos_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        result.losses.append(round(loss.item(), 5))
    tower.eval()
    result.probe = probe_accuracy(model, probe, x_held, y_held)
    return result


@torch.no_grad()
def probe_accuracy(model, probe: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Colour, shape (and motion) read off each cell that holds exactly one object; with
    event marks, the share of events the probe finds (in their cell; anywhere in the frame) and
    of quiet cells it raises one in."""
    logits = torch.cat([probe(pooled_features(model, x[i : i + 256])) for i in range(0, len(x), 256)])
    n, m = len(COLOURS), len(ATTRIBUTES)
    single = y[..., :n].sum(-1) == 1
    read = {"colour": slice(0, n), "shape": slice(n, m)}
    if y.shape[-1] > m:
        read["motion"] = slice(m, m + len(MOTIONS))
    right = {k: logits[..., s].argmax(-1) == y[..., s].argmax(-1) for k, s in read.items()}
    accuracy = {k: round(r[single].float().mean().item(), 4) for k, r in right.items()}
    if y.shape[-1] > m:
        events, in_frame = slice(m + len(MOTIONS), m + len(CHANGES)), slice(m + len(CHANGES), None)
        for name, marks in {"events": events, "in_frame": in_frame}.items():
            happens, raised = y[..., marks].bool(), logits[..., marks] > 0
            accuracy[f"{name}_found"] = round(raised[happens].float().mean().item(), 4)
            accuracy[f"{name}_false"] = round(raised[~happens].float().mean().item(), 4)
    return accuracy | {"cells": int(single.sum())}


@torch.no_grad()
def centre_projector(model, processor, videos: Sequence[np.ndarray]) -> dict[str, float]:
    """Shift and scale the projector's output layer: visual tokens of `videos` come out
    zero-mean, with the mean norm of the text embeddings. Returns the tokens' mean cosine
    similarity before and after (near 1 means the language model cannot tell them apart)."""
    pixels = _pixels(processor, videos)
    before = _visual_tokens(model, pixels)
    out = model.model.multi_modal_projector.linear_2
    out.bias -= before.mean(0)
    centred = before - before.mean(0)
    scale = model.get_input_embeddings().weight.norm(dim=-1).mean() / centred.norm(dim=-1).mean()
    out.weight *= scale
    out.bias *= scale
    after = _visual_tokens(model, pixels)
    return {"cosine_before": _mean_cosine(before), "cosine_after": _mean_cosine(after)}


def _mean_cosine(tokens: torch.Tensor, sample: int = 2048) -> float:
    unit = F.normalize(tokens[:sample], dim=-1)
    return round((unit @ unit.T).mean().item(), 4)
