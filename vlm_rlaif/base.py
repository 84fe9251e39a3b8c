"""The `base` stage: materialise the starting VLM as a folder every later stage loads by path.

`base.model: tiny` builds the embedded default's tiny LLaVA-NeXT-Video, its tokenizer trained
on the words of the prepared training data and the prompt files, and pretrains its vision
tower on the world's frames (`vlm_rlaif.pretrain`: the stand-in for CLIP); any other value is
a hub id or a path, loaded and saved once so the pipeline's later stages never reach for the hub.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Iterator

import numpy as np

from vlm_rlaif import data as records, io, pretrain, tiny
from vlm_rlaif.config import Params
from vlm_rlaif.io import atomic_dir
from vlm_rlaif.modeling import load_model_and_processor
from vlm_rlaif.synthetic.scene import Scene
from vlm_rlaif.video import load_video, sample_indices

OUT = Path("artifacts/base")
PRETRAINING = "pretraining.json"  # the tiny base's pretraining report, saved beside its weights
TRAINING_SETS = ("sft_easy.json", "sft_hard.json", "sft_captions.json", "sft_judge.json", "policy_init.json", "rl_prompts.json")


def corpus(prepared: Path) -> Iterator[str]:
    """Every conversation turn of the prepared training sets, then every prompt file. An answer
    the writer added to counts as what the video supports: the tokenizer learns the world's
    language, not the writer's habit, so the model starts the same whatever the writer adds."""
    for name in TRAINING_SETS:
        path = prepared / name
        if not path.is_file():
            continue
        read = records.read_rl_prompts if name == "rl_prompts.json" else records.read_sft
        for record in read(path).records:
            grounded = record.extra.get(records.GROUNDED)
            turns = [turn.value for turn in record.conversations]
            yield from turns[:-1] + [grounded] if grounded else turns
    prompts = resources.files("vlm_rlaif.prompts")
    for item in sorted(prompts.iterdir(), key=lambda p: p.name):
        if item.name.endswith(".txt"):
            yield item.read_text(encoding="utf-8")


def _training_videos(prepared: Path, video_root: str | Path) -> dict[str, Path | list[Path]]:
    """The distinct videos of the easy SFT split, by video id (the folder or file name)."""
    videos: dict[str, Path | list[Path]] = {}
    for record in records.read_sft(prepared / "sft_easy.json").records:
        media = record.media(video_root)
        key = media[0].parent.name if isinstance(media, list) else Path(media).stem
        videos.setdefault(key, media)
    return videos


def pixel_statistics(prepared: Path, video_root: str | Path, num_frames: int, max_videos: int = 200) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training frames, for the tiny model's normaliser.

    CLIP's constants come from CLIP's data; a vision tower trained from scratch on the world
    gets the world's own (tiny.build_processor says what goes wrong otherwise).
    """
    sample = list(_training_videos(prepared, video_root).values())[:max_videos]
    pixels = np.concatenate([load_video(m, num_frames).reshape(-1, 3) for m in sample]) / 255.0
    return pixels.mean(0).round(4).tolist(), pixels.std(0).round(4).tolist()


def pretraining_set(
    prepared: Path,
    video_root: str | Path,
    grid: int,
    *,
    num_frames: int | None = None,
    pairs: bool = False,
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The training videos' frames (every frame, or `num_frames` sampled as SFT samples them),
    with their cell targets from the world's scenes (with `pairs`, what changes between frames)."""
    path = prepared / "scenes.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: pretraining the tiny vision tower needs the world's scenes (data.scenes_file); "
            "set base.tiny.pretrain.steps: 0 to build the tiny base without it"
        )
    scenes = io.read_json(path)
    videos, targets = [], []
    for video_id, media in _training_videos(prepared, video_root).items():
        if video_id not in scenes:
            raise KeyError(f"{path}: no scene for training video {video_id!r}")
        scene = Scene.from_dict(scenes[video_id], where=f"{path}: scene")
        keep = sample_indices(scene.num_frames, num_frames or scene.num_frames)
        videos.append(load_video(media, len(keep)))
        targets.append(pretrain.cell_targets(scene, grid, keep, pairs=pairs))
    return videos, targets


def build_tiny(params: Params, prepared: Path) -> tuple[object, object, dict]:
    """The tiny base, its vision tower pretrained and its projector centred; and the report."""
    cfg = params.base.tiny
    stats = pixel_statistics(prepared, params.data.video_root, params.data.num_frames)
    model, processor = tiny.build_tiny(cfg, corpus(prepared), params.seed, stats)
    if cfg.pretrain.steps == 0:
        return model, processor, {}
    grid = cfg.image_size // cfg.patch_size // model.config.spatial_pool_stride
    # a tower that reads frame pairs learns from pairs as far apart as the frames SFT samples
    sampled = params.data.num_frames if cfg.frame_pairs else None
    videos, targets = pretraining_set(
        prepared, params.data.video_root, grid, num_frames=sampled, pairs=cfg.frame_pairs
    )
    result = pretrain.pretrain_vision(model, processor, videos, targets, cfg.pretrain, params.seed)
    centring = pretrain.centre_projector(model, processor, videos[:64])
    return model, processor, {"losses": result.losses, "probe": result.probe, "projector": centring}


def materialise(params: Params, prepared: Path = Path("artifacts/prepare"), out: Path = OUT) -> Path:
    """Build or fetch the base model into `out` (save_pretrained layout, safetensors)."""
    cfg = params.base
    report = None
    if cfg.model == "tiny":
        model, processor, report = build_tiny(params, prepared)
    else:
        model, processor = load_model_and_processor(cfg.model, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if report is not None:
            io.write_json(tmp / PRETRAINING, report)
    return out
