"""The `base` stage: materialise the starting VLM as a folder every later stage loads by path.

`base.model: tiny` builds the embedded default's tiny LLaVA-NeXT-Video, its tokenizer trained
on the words of the prepared training data and the prompt files; any other value is a hub id
or a path, loaded and saved once so the pipeline's later stages never reach for the hub.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np

from vlm_rlaif import data as records
from vlm_rlaif.config import Params
from vlm_rlaif.io import atomic_dir
from vlm_rlaif.modeling import load_model_and_processor
from vlm_rlaif.tiny import build_tiny_model
from vlm_rlaif.video import load_video

OUT = Path("artifacts/base")
TRAINING_SETS = ("sft_easy.json", "sft_hard.json", "sft_captions.json", "sft_judge.json", "policy_init.json", "rl_prompts.json")


def corpus(prepared: Path) -> Iterator[str]:
    """Every conversation turn of the prepared training sets, then every prompt file."""
    for name in TRAINING_SETS:
        path = prepared / name
        if not path.is_file():
            continue
        read = records.read_rl_prompts if name == "rl_prompts.json" else records.read_sft
        for record in read(path).records:
            yield from (turn.value for turn in record.conversations)
    prompts = resources.files("vlm_rlaif.prompts")
    for item in sorted(prompts.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".txt"):
            yield item.read_text(encoding="utf-8")


def pixel_statistics(prepared: Path, video_root: str | Path, num_frames: int, max_videos: int = 200) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training frames, for the tiny model's normaliser.

    CLIP's constants come from CLIP's data; a vision tower trained from scratch on the world
    gets the world's own (tiny.build_processor says what goes wrong otherwise).
    """
    videos: dict[str, Path | list[Path]] = {}
    for record in records.read_sft(prepared / "sft_easy.json").records:
        media = record.media(video_root)
        videos.setdefault(str(media), media)
    sample = list(videos.values())[:max_videos]
    pixels = np.concatenate([load_video(m, num_frames).reshape(-1, 3) for m in sample]) / 255.0
    return pixels.mean(0).round(4).tolist(), pixels.std(0).round(4).tolist()


def materialise(params: Params, prepared: Path, out: Path = OUT) -> Path:
    """Build or fetch the base model into `out` (save_pretrained layout, safetensors)."""
    cfg = params.base
    if cfg.model == "tiny":
        stats = pixel_statistics(prepared, params.data.video_root, params.data.num_frames)
        return build_tiny_model(cfg.tiny, corpus(prepared), out, params.seed, stats)
    model, processor = load_model_and_processor(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out
