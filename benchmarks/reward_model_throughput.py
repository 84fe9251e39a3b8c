"""Reward-model throughput: scoring pairs, and training on them.

Scoring is what PPO asks of the reward model on every rollout batch. The stage's path
(`reward_model.reward_pairs`) encodes each video once for both outputs of a pair and scores
in batches; the naive path scores one row at a time and encodes the video for each. Training
is measured as preference pairs per second through the stage's collator, forward pass, loss
and backward pass (no optimizer step), with peak GPU memory when there is a GPU. Run from the
repo root after `dvc repro` (it needs artifacts/reward_model and artifacts/preferences):

    python benchmarks/reward_model_throughput.py --pairs 64
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vlm_rlaif import io, reward_model as rm, stage
from vlm_rlaif.data import PreferenceRecord, RLPrompt
from vlm_rlaif.video import load_video


def naive(reward_model, processor, judged, video_root, num_frames) -> None:
    """One row per call, the video loaded and encoded for each."""
    for r in judged:
        source = RLPrompt.from_dict(r, "pair").media(video_root)
        for key in ("output_1", "output_2"):
            rm.score(reward_model, processor, [load_video(source, num_frames)], [r["conversations"][:1]], [r[key]["value"]], batch_size=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=64, help="judged pairs to score (from the start of judged.json)")
    parser.add_argument("--model", type=Path, default=rm.OUT)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    params = stage.setup()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = params.reward_model
    judged = [r for r in io.read_json("artifacts/preferences/judged.json") if r["judge"] is not None][: args.pairs]
    reward_model, processor = rm.load_reward_model(args.model, dtype=params.base.dtype)
    where = dict(video_root=params.data.video_root, num_frames=params.data.num_frames)
    timings = {}
    for name, step in (
        ("stage (batched, encode once)", lambda: rm.reward_pairs(reward_model, processor, judged, context_in_instruction=False,
                                                                 batch_size=cfg.batch_size, **where)),
        ("naive loop", lambda: naive(reward_model, processor, judged, **where)),
    ):
        start = time.perf_counter()
        step()
        timings[name] = time.perf_counter() - start

    pairs = [PreferenceRecord.from_dict(r, "pair") for r in io.read_json("artifacts/preferences/preferences.json")][: cfg.batch_size]
    collator = rm.PairCollator(processor, params.data.video_root, params.data.num_frames, cfg)
    reward_model.train()
    for name, p in reward_model.backbone.named_parameters():
        p.requires_grad_("lora_" in name)  # a loaded adapter is frozen; training unfreezes it
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps, start = 3, time.perf_counter()
    for _ in range(steps):
        batch = {k: v.to(reward_model.device) for k, v in collator(pairs).items()}
        chosen, rejected = reward_model(**batch).chunk(2)
        rm.preference_loss(chosen, rejected, cfg.centering_coef).backward()
    train_seconds = time.perf_counter() - start

    device = reward_model.device
    print(f"{len(judged)} pairs, {args.model}, {device}, {torch.get_num_threads()} threads, batch_size {cfg.batch_size}")
    for name, seconds in timings.items():
        print(f"  scoring: {name:30s} {seconds:8.1f} s  {len(judged) / seconds:6.2f} pairs/s")
    print(f"  scoring speedup {timings['naive loop'] / timings['stage (batched, encode once)']:.1f}x")
    print(f"  training (forward + backward, batches of {len(pairs)}): {steps * len(pairs) / train_seconds:.2f} pairs/s"
          + (f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""))


if __name__ == "__main__":
    main()
