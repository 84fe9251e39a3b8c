"""Preference pairs per second: the preferences stage's batched path against a naive loop.

Both do the same work on the same RL prompts: two sampled responses, the clip captions and
the whole-video description, and the judge in both orders with and without the context.
The stage (`preferences.prefer_shard`) encodes each video once and batches every step; the
naive loop makes one call per sample, caption and judge reading, and every call encodes
the video again. Run from the repo root after `dvc repro` (it needs artifacts/sft):

    python benchmarks/preferences_throughput.py --prompts 32
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vlm_rlaif import prompts, stage
from vlm_rlaif.data import PLACEHOLDER, read_rl_prompts
from vlm_rlaif.generation import generate
from vlm_rlaif.judge import read_judge
from vlm_rlaif.modeling import load_model_and_processor
from vlm_rlaif.preferences import prefer_shard
from vlm_rlaif.video import load_clips, load_video


def naive(model, processor, shard, cfg, video_root, num_frames) -> None:
    """One prompt at a time, one call per output, the video loaded and encoded at each call."""
    for prompt in shard:
        source = prompt.media(video_root)
        question = [prompt.conversations[0].to_dict()]
        draw = dict(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, batch_size=1)
        first, second = (generate(model, processor, [load_video(source, num_frames)], [question], **draw)[0][0] for _ in range(2))
        captions = []
        for clip in load_clips(source, cfg.num_clips, cfg.max_clip_frames, num_frames):
            asked = [{"from": "human", "value": f"{PLACEHOLDER}\n{prompts.caption_instruction(0)}"}]
            captions.append(generate(model, processor, [clip], [asked], max_new_tokens=cfg.caption_max_new_tokens, batch_size=1)[0][0])
        asked = [{"from": "human", "value": f"{PLACEHOLDER}\n{prompts.describe_instruction(0)}"}]
        generate(model, processor, [load_video(source, num_frames)], [asked], max_new_tokens=cfg.caption_max_new_tokens * cfg.num_clips, batch_size=1)
        for context in (prompts.format_context(captions), None):
            for a, b in ((first, second), (second, first)):
                judge_prompt = prompts.judge_prompt(prompt.question(), a, b, context)
                read_judge(model, processor, [load_video(source, num_frames)], [judge_prompt], batch_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=32, help="RL prompts to judge (from the start of rl_prompts.json)")
    parser.add_argument("--model", type=Path, default=Path("artifacts/sft"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    params = stage.setup()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = params.preferences
    shard = read_rl_prompts("artifacts/prepare/rl_prompts.json").records[: args.prompts]
    model, processor = load_model_and_processor(args.model, dtype=params.base.dtype)
    where = dict(video_root=params.data.video_root, num_frames=params.data.num_frames)
    timings = {}
    for name, step in (("stage (batched, encode once)", lambda: prefer_shard(model, processor, shard, cfg, **where)),
                       ("naive loop", lambda: naive(model, processor, shard, cfg, **where))):
        torch.manual_seed(0)
        start = time.perf_counter()
        step()
        timings[name] = time.perf_counter() - start
    device = next(model.parameters()).device
    print(f"{len(shard)} prompts, {args.model}, {device}, {torch.get_num_threads()} threads, batch_size {cfg.batch_size}, "
          f"max_new_tokens {cfg.max_new_tokens}, {cfg.num_clips} clips")
    for name, seconds in timings.items():
        print(f"  {name:30s} {seconds:8.1f} s  {len(shard) / seconds:6.2f} pairs/s")
    print(f"  speedup {timings['naive loop'] / timings['stage (batched, encode once)']:.1f}x")


if __name__ == "__main__":
    main()
