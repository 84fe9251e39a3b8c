"""Context-aware AI preferences: the SFT model answers each RL prompt twice, captions the
video's clips, and judges which answer is better with the captions as context.

The responses A and B are drawn here (`sample_pairs`); the clip captions live in
`context.py` and the judge in `judge.py`. `prefer_shard` runs the three steps on a shard of
prompts, encoding each video once for all of them (DESIGN.md decision 8); `run` is the stage,
shard by shard, resumable; `feedback_quality` measures the result against the synthetic
world's oracle.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ProcessorMixin

from vlm_rlaif import context, generation, io, judge, modeling, prepare, prompts, stage, video
from vlm_rlaif.config import Params, PreferencesConfig
from vlm_rlaif.data import PLACEHOLDER, PreferenceRecord, RLPrompt, read_rl_prompts, write_records
from vlm_rlaif.evaluation import oracle_preference, oracle_score
from vlm_rlaif.generation import distinct_media, encode_video_list, generate
from vlm_rlaif.judge import Verdict, judge_pairs, select
from vlm_rlaif.modeling import load_model_and_processor
from vlm_rlaif.synthetic.language import clip_ranges
from vlm_rlaif.synthetic.oracle import score_description
from vlm_rlaif.verdict import accuracy_against
from vlm_rlaif.video import load_clips, load_video

OUT = Path("artifacts/preferences")
SHARDS = Path("artifacts/checkpoints/preferences")
JUDGES = ("context", "no_context")
# How the judge's verdict is read (preferences.judge_reading; judge.py says why there are two)
READINGS = {"label": judge_pairs, "likelihood": judge.likelihood_pairs}
DROP_REASONS = ("identical", "inconsistent", "low_margin")


@dataclass
class Pairs:
    """Two responses per prompt, or None where every draw gave the same text twice;
    `resampled`: how many pairs were drawn again because their two responses were equal."""

    responses: list[tuple[str, str] | None]
    resampled: int


def sample_pairs(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    videos: Sequence[np.ndarray],
    conversations: Sequence[list[dict]],
    *,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    max_resample: int,
    features: Sequence[torch.Tensor] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> Pairs:
    """Two sampled responses per (video, conversation). Two equal responses carry no
    preference: such a pair is drawn again, up to `max_resample` times, and is None if it is
    still equal. `features` (one per prompt) serve every draw, so no video is encoded twice."""

    def draw(rows: list[int]) -> list[tuple[str, str]]:
        texts = generate(
            model, processor, [videos[i] for i in rows], [conversations[i] for i in rows],
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, num_return_sequences=2,
            batch_size=batch_size, progress=progress, features=None if features is None else [features[i] for i in rows],
        )
        return [(a, b) for a, b in texts]

    pairs = draw(list(range(len(conversations))))
    resampled = 0
    for _ in range(max_resample):
        equal = [i for i, (a, b) in enumerate(pairs) if a.strip() == b.strip()]
        if not equal:
            break
        resampled += len(equal)
        for i, pair in zip(equal, draw(equal)):
            pairs[i] = pair
    return Pairs([pair if pair[0].strip() != pair[1].strip() else None for pair in pairs], resampled)


# --------------------------------------------------------------------------- one shard


def shard_prompts(rl_prompts: Sequence[RLPrompt], shard_size: int) -> list[list[int]]:
    """Prompt indices per shard, about `shard_size` each, a video's prompts always in one
    shard (so each video is encoded and captioned once), videos in order of first use."""
    by_video: dict[str, list[int]] = {}
    for i, prompt in enumerate(rl_prompts):
        by_video.setdefault(json.dumps(prompt.images or prompt.video), []).append(i)
    shards: list[list[int]] = []
    for indices in by_video.values():
        if not shards or len(shards[-1]) + len(indices) > shard_size:
            shards.append([])
        shards[-1].extend(indices)
    return shards


def _reading(verdict: Verdict) -> dict:
    return {"first_as_a": verdict.first_as_a, "first_as_b": verdict.first_as_b, "label_mass": verdict.label_mass}


def prefer_shard(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    shard: Sequence[RLPrompt],
    cfg: PreferencesConfig,
    *,
    video_root: str | os.PathLike,
    num_frames: int,
) -> tuple[list[dict], int]:
    """Context-aware AI feedback on one shard of prompts: `pairs_per_prompt` pairs of
    responses each, the clip captions of each video (and its whole-video description, to
    compare them with), and the judge's verdict in both orders with the context and without
    it (the ablation costs one forward pass per order). Returns one judged record per pair
    ("pair": its number within the prompt), `dropped` naming why a pair is not kept, and how
    many pairs were drawn again."""
    media, video_of = distinct_media(shard, video_root)
    # a prompt's pairs side by side
    shard = [prompt for prompt in shard for _ in range(cfg.pairs_per_prompt)]
    video_of = [v for v in video_of for _ in range(cfg.pairs_per_prompt)]
    videos = [load_video(source, num_frames) for source in media]
    features = encode_video_list(model, processor, videos, cfg.batch_size)
    pairs = sample_pairs(
        model, processor, [videos[v] for v in video_of], [[p.conversations[0].to_dict()] for p in shard],
        temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, max_resample=cfg.max_resample,
        features=[features[v] for v in video_of], batch_size=cfg.batch_size,
    )
    captions: list[list[str]] = [[] for _ in media]
    descriptions: list[str | None] = [None] * len(media)
    if cfg.use_context:
        clips = [load_clips(source, cfg.num_clips, cfg.max_clip_frames, num_frames) for source in media]
        captions = context.caption_clips(model, processor, clips, max_new_tokens=cfg.caption_max_new_tokens, batch_size=cfg.batch_size)
        asked = [{"from": "human", "value": f"{PLACEHOLDER}\n{prompts.describe_instruction(0)}"}]
        descriptions = [group[0] for group in generate(
            model, processor, videos, [asked] * len(videos), max_new_tokens=cfg.caption_max_new_tokens * cfg.num_clips,
            features=features, batch_size=cfg.batch_size,
        )]
    judged = [i for i, pair in enumerate(pairs.responses) if pair is not None]
    verdicts: dict[str, list[Verdict]] = {}
    reading = READINGS[cfg.judge_reading]
    for name in JUDGES if cfg.use_context else ("no_context",):
        verdicts[name] = reading(
            model, processor, [videos[video_of[i]] for i in judged], [shard[i].question() for i in judged],
            [pairs.responses[i][0] for i in judged], [pairs.responses[i][1] for i in judged],
            [prompts.format_context(captions[video_of[i]]) if name == "context" else None for i in judged],
            features=[features[video_of[i]] for i in judged], batch_size=cfg.batch_size,
        )
    in_use = verdicts[JUDGES[0] if cfg.use_context else JUDGES[1]]
    kept = set(select(in_use, cfg.min_margin, cfg.drop_inconsistent)[0])
    records = []
    for i, prompt in enumerate(shard):
        first, second = pairs.responses[i] or (None, None)
        records.append(prompt.to_dict() | {
            "pair": i % cfg.pairs_per_prompt,
            "output_1": {"value": first}, "output_2": {"value": second}, "preference": None, "margin": None,
            "judge": None, "dropped": "identical",
            "context": captions[video_of[i]], "description": descriptions[video_of[i]],
        })
    for j, i in enumerate(judged):
        verdict = in_use[j]
        records[i] |= {
            "preference": verdict.winner, "margin": verdict.margin,
            "judge": {name: _reading(v[j]) for name, v in verdicts.items()},
            "dropped": None if j in kept else "inconsistent" if not verdict.consistent else "low_margin",
        }
    return records, pairs.resampled


def preference_record(judged: Mapping) -> PreferenceRecord:
    """A kept judged record in the release's reward-model format: the question and an empty
    gpt turn (the slot each output fills; the prompt's reference answer stays out of the
    reward model's data), the two outputs and the preference; the context captions, the
    judge's readings and the margin ride along."""
    record = {k: v for k, v in judged.items() if k not in ("dropped", "description")}
    record["conversations"] = [judged["conversations"][0], {"from": "gpt", "value": ""}]
    return PreferenceRecord.from_dict(record, f"judged prompt {judged.get('uid')}")


# --------------------------------------------------------------------------- the stage


def run(params: Params, *, progress: bool = True, **paths: Path) -> dict:
    """The preferences stage: `judge_prompts` (with `paths` in place of its default paths) in
    this process, or in `preferences.num_processes` processes (each judges every n-th shard;
    the draws are the same either way); returns the counts: prompts, pairs drawn, pairs drawn
    again, pairs kept, prompts with a pair kept, and pairs dropped per reason."""
    stage.launch(params, "preferences", params.preferences.num_processes, progress=progress, **paths)
    return io.read_json(paths.get("out", OUT) / "counts.json")


def judge_prompts(
    params: Params,
    *,
    prompts_file: Path = prepare.OUT / "rl_prompts.json",
    model_dir: Path = Path("artifacts/sft"),
    out: Path = OUT,
    shards: Path = SHARDS,
    progress: bool = True,
) -> None:
    """Judge the RL prompts shard by shard under `shards` (a rerun of the same run skips
    finished shards; a shard draws under its own seed, whichever process judges it), then, in
    the main process, write every judged record (judged.json), the kept pairs in the reward
    model's format (preferences.json) and the counts under `out`."""
    cfg = params.preferences
    rl_prompts = read_rl_prompts(prompts_file).records[: cfg.num_prompts]
    if not rl_prompts:
        raise ValueError(f"{prompts_file}: no RL prompts to judge")
    code = [Path(m.__file__) for m in (sys.modules[__name__], context, generation, judge, modeling, video)]
    code += sorted(Path(prompts.__file__).parent.glob("*.txt"))
    drawn = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "num_processes"}  # shards do not depend on it
    settings = {"preferences": drawn, "seed": params.seed, "num_frames": params.data.num_frames, "video_root": params.data.video_root}
    state = stage.processes()
    if state.is_main_process:
        io.claim(shards, io.run_stamp(code, settings, [prompts_file], [model_dir]))
    state.wait_for_everyone()
    model, processor = load_model_and_processor(model_dir, dtype=params.base.dtype, load_in_4bit=params.base.load_in_4bit,
                                                device_map=modeling.process_device_map())
    plan = shard_prompts(rl_prompts, cfg.shard_size)
    for k, indices in enumerate(tqdm(plan, desc="preferences", unit="shard", disable=not (progress and state.is_main_process))):
        path = shards / f"shard_{k:05d}.json"
        if path.is_file() or k % state.num_processes != state.process_index:
            continue
        torch.manual_seed(params.seed * 1_000_003 + k)  # a shard's draws do not depend on which shards ran before it
        records, resampled = prefer_shard(
            model, processor, [rl_prompts[i] for i in indices], cfg, video_root=params.data.video_root, num_frames=params.data.num_frames,
        )
        io.write_json(path, {"resampled": resampled, "records": records})
    state.wait_for_everyone()
    if not state.is_main_process:
        return
    written = [io.read_json(shards / f"shard_{k:05d}.json") for k in range(len(plan))]
    judged = [r for shard in written for r in shard["records"]]
    kept = [preference_record(r) for r in judged if r["dropped"] is None]
    out.mkdir(parents=True, exist_ok=True)
    io.write_json(out / "judged.json", judged)
    write_records(out / "preferences.json", kept)
    resampled = sum(s["resampled"] for s in written)
    counts = {"prompts": len(rl_prompts), "pairs": len(judged), "resampled": resampled,
              "kept": len(kept), "prompts_kept": len({r.extra.get("uid") for r in kept})}
    counts["dropped"] = {reason: sum(r["dropped"] == reason for r in judged) for reason in DROP_REASONS}
    io.write_json(out / "counts.json", counts)


# --------------------------------------------------------------------------- measured quality


def video_id(record: Mapping) -> str:
    """The world's video id: the frame folder's name, or the video file's stem."""
    return Path(record["images"][0]).parent.name if record.get("images") else Path(record["video"]).stem


def _oracle_inputs(record: Mapping, scenes: Mapping[str, Mapping]) -> tuple[Mapping, str, str, str]:
    """What the oracle scores a record's outputs against: its scene, its prompt kind (a record
    without a "type" is a description request), the question and the reference answer."""
    question, reference = (t["value"] for t in record["conversations"][:2])
    return scenes[video_id(record)], record.get("type", "describe"), question.replace(PLACEHOLDER, "").strip(), reference


def oracle_scores(record: Mapping, scenes: Mapping[str, Mapping]) -> tuple[float, float]:
    """The oracle's score (`evaluation.oracle_score`) of each of a record's two outputs."""
    first, second = (answer_score(record, record[k]["value"], scenes)
                     for k in ("output_1", "output_2"))
    return first, second


def answer_score(record: Mapping, response: str, scenes: Mapping[str, Mapping]) -> float:
    """The oracle's score of one response to a record's prompt (an RL prompt or a judged pair)."""
    return oracle_score(*_oracle_inputs(record, scenes), response)


def oracle_verdict(record: Mapping, scenes: Mapping[str, Mapping] | None) -> int | None:
    """The oracle's preference (1 or 2) for a judged record: None without scenes, for an
    unjudged pair, or where it scores both responses equal."""
    if scenes is None or record["judge"] is None:
        return None
    return oracle_preference(*_oracle_inputs(record, scenes), record["output_1"]["value"], record["output_2"]["value"])


def feedback_quality(judged: Sequence[Mapping], scenes: Mapping[str, Mapping] | None, num_clips: int, min_margin: float,
                     drop_inconsistent: bool = True) -> dict:
    """What the synthetic world's oracle says of the stage's preferences. Per judge (with the
    context, without it): agreement with the oracle's verdict on every judged pair and on the
    pairs that judge keeps, overall and per prompt kind; how often its two orders pick the
    same winner; the share it keeps; the labels' probability mass. Pairs the oracle scores
    equal have no verdict and are left out of agreement. And the context itself: fact
    precision and F1 of each clip caption against its clip, next to the SFT model's
    description of the whole video against the whole video. Without `scenes` (data with no
    oracle) only what needs none is reported."""
    truth = {i: oracle_verdict(r, scenes) for i, r in enumerate(judged)}
    kinds = [r.get("type", "describe") for r in judged]
    n = len(judged)

    def agreement(rows: Sequence[int], winners: Mapping[int, int]) -> dict:
        measured = accuracy_against(winners, truth, rows)
        return {"agreement": measured.pop("accuracy"), **measured}

    judges = {}
    for name in JUDGES:
        rows = [i for i, r in enumerate(judged) if r["judge"] and name in r["judge"]]
        if not rows:
            continue
        verdicts = {i: Verdict(**judged[i]["judge"][name]) for i in rows}
        winners = {i: v.winner for i, v in verdicts.items()}
        kept = [rows[j] for j in select([verdicts[i] for i in rows], min_margin, drop_inconsistent)[0]]
        on_kept = agreement(kept, winners)
        judges[name] = agreement(rows, winners) | {
            "agreement_kept": on_kept["agreement"], "pairs_kept": on_kept["pairs"],
            "consistency": sum(v.consistent for v in verdicts.values()) / len(rows),
            "kept_fraction": len(kept) / n,
            "label_mass": sum(v.label_mass for v in verdicts.values()) / len(rows),
            "by_kind": {k: agreement([i for i in rows if kinds[i] == k], winners) for k in sorted(set(kinds))},
        }
    judged_rows = [i for i, r in enumerate(judged) if r["judge"] is not None]
    quality = {
        "judges": judges,
        "oracle": {"pairs": len(judged_rows), "ties": sum(truth[i] is None for i in judged_rows),
                   "first_better": sum(truth[i] == 1 for i in judged_rows) / max(1, len(judged_rows))},
    }
    videos = {video_id(r): r for r in judged if r.get("context")}
    if scenes is not None and videos:
        clip_scores, video_scores = [], []
        for vid, r in videos.items():
            spans = clip_ranges(scenes[vid]["num_frames"], num_clips)
            clip_scores += [score_description(scenes[vid], caption, span) for caption, span in zip(r["context"], spans)]
            video_scores.append(score_description(scenes[vid], r["description"]))
        quality["captions"] = {
            "clip": {"precision": float(np.mean([s.precision for s in clip_scores])), "f1": float(np.mean([s.f1 for s in clip_scores])),
                     "count": len(clip_scores)},
            "video": {"precision": float(np.mean([s.precision for s in video_scores])), "f1": float(np.mean([s.f1 for s in video_scores])),
                      "count": len(video_scores)},
        }
    return quality
