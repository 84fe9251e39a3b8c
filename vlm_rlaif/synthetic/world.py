"""Write the whole synthetic world to disk, in the VLM-RLAIF release layout.

Videos are folders of PNG frames; the SFT, RL and evaluation files are the release's JSON
formats (PAPER.md), so the same loaders read this world and the real data. Video i draws its
scene from the seed sequence [seed, 0, i] and its texts from [seed, 1, i] (an SFT description's
writer's additions from [seed, 3, i]): a given video is the same whatever the split sizes, and
the same config writes byte-identical files.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vlm_rlaif import __version__, prompts
from vlm_rlaif.config import WorldConfig, from_dict
from vlm_rlaif.data import GROUNDED
from vlm_rlaif.io import atomic_dir, write_json
from vlm_rlaif.synthetic.language import (
    clip_ranges,
    consistency_question,
    corrupt,
    describe,
    generic_question,
    short_questions,
    temporal_question,
    with_unseen_object,
)
from vlm_rlaif.synthetic.render import render
from vlm_rlaif.synthetic.scene import Scene, sample_scene

SPLITS = ("sft", "rl", "eval")
SFT_FILES = ("SFT_short.json", "SFT_long.json", "SFT_captions.json", "SFT_judge.json")
EVAL_FILES = ("eval/zeroshot_qa.json", "eval/generic_qa.json", "eval/temporal_qa.json", "eval/consistency_qa.json")
# Judge examples: some on a short question; half against a description of another scene
# (a response about objects the video does not show: the coarse end of judging, which a
# language model from scratch learns first); the rest graded descriptions of the same scene.
SHORT_JUDGE_SHARE = 0.2
FOREIGN_JUDGE_SHARE = 0.5


def video_id(index: int) -> str:
    return f"syn_{index:06d}"


def conversation(question: str, answer: str) -> list[dict]:
    """One exchange; "<image>" opens the human turn, as in the release."""
    return [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]


def sft_record(record_id: str, question: str, answer: str, images: list[str]) -> dict:
    return {"id": record_id, "src_data": "synthetic", "conversations": conversation(question, answer), "images": images}


def write_frames(folder: Path, frames: np.ndarray) -> None:
    """Plain writes: the whole world is written into a temp folder that is renamed at the end."""
    folder.mkdir(parents=True)
    for t, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{t:03d}.png", format="PNG")


def _describe_request(rng: np.random.Generator) -> str:
    return prompts.describe_instruction(int(rng.integers(len(prompts.variants("describe")))))


def _judge_pair(scene: Scene, rng: np.random.Generator, max_objects: int) -> tuple[str, str, str]:
    """(question, better response, worse response). Short questions: the right and a wrong
    answer. Descriptions: the better one has 0 or 1 wrong facts; the worse one is either the
    description of another scene drawn at random, or the better one with 1 or 2 more wrong
    facts, so the judge learns graded comparison, not just "spot the perfect answer"."""
    roll = rng.random()
    if roll < SHORT_JUDGE_SHARE:
        qa = short_questions(scene, rng, 1)[0]
        return qa.question, qa.answer, qa.wrong
    better = corrupt(scene, describe(scene), int(rng.integers(0, 2)), rng).description
    if roll < SHORT_JUDGE_SHARE + FOREIGN_JUDGE_SHARE:
        other = sample_scene(rng, "other", scene.num_frames, scene.frame_size, max_objects, scene.difficulty)
        return _describe_request(rng), better.text(), describe(other).text()
    worse = corrupt(scene, better, int(rng.integers(1, 3)), rng).description
    return _describe_request(rng), better.text(), worse.text()


def _judge_records(pending: list[tuple[str, list[str], str, str, str, list[str]]], rng: np.random.Generator) -> list[dict]:
    """Turn (id, images, question, better, worse, captions) into judge SFT records: half with
    the clip captions as context, and the better response first in half of each half."""
    layouts = [(i % 2 == 0, (i // 2) % 2 == 0) for i in range(len(pending))]
    records = []
    for (record_id, images, question, better, worse, captions), i in zip(pending, rng.permutation(len(pending))):
        with_context, better_first = layouts[i]
        a, b = (better, worse) if better_first else (worse, better)
        context = prompts.format_context(captions) if with_context else None
        label = prompts.JUDGE_LABELS[0] if better_first else prompts.JUDGE_LABELS[1]
        records.append(sft_record(record_id, prompts.judge_prompt(question, a, b, context), label, images))
    return records


def _sft_video(cfg: WorldConfig, scene: Scene, images: list[str], rng: np.random.Generator,
               writer: np.random.Generator, files: dict, pending: list) -> None:
    """The SFT records of one video. `writer` draws which description gets the writer's
    addition (its own generator: the world's other texts are the same whatever
    `annotator_additions` is)."""
    vid = scene.video_id
    for i, qa in enumerate(short_questions(scene, rng, cfg.questions_per_video)):
        files["SFT_short.json"].append(sft_record(f"{vid}_short_{i}", qa.question, qa.answer, images))
    # Half the description requests are worded as the benchmark's open questions: a language
    # model from scratch answers a wording it never saw in training with a short answer.
    request = _describe_request(rng) if rng.random() < 0.5 else generic_question(rng)
    truth = describe(scene)
    adds = writer.random() < cfg.annotator_additions
    written = with_unseen_object(scene, truth) if adds else truth
    record = sft_record(f"{vid}_long", request, written.text(), images)
    if written.text() != truth.text():  # the clip captions support only the truth
        record[GROUNDED] = truth.text()
    files["SFT_long.json"].append(record)
    captions = []
    for i, (start, end) in enumerate(clip_ranges(scene.num_frames, cfg.num_clips)):
        captions.append(describe(scene, (start, end)).text())
        instruction = prompts.caption_instruction(int(rng.integers(len(prompts.variants("caption_clip")))))
        files["SFT_captions.json"].append(sft_record(f"{vid}_clip_{i}", instruction, captions[-1], images[start:end]))
    for i in range(cfg.judge_examples_per_video):
        pending.append((f"{vid}_judge_{i}", images, *_judge_pair(scene, rng, cfg.max_objects), captions))


def _rl_video(scene: Scene, images: list[str], rng: np.random.Generator, files: dict) -> None:
    """Two PPO prompts per video: a description request, then an open or a short question.
    "type" (one of `evaluation.PROMPT_KINDS`) tells the oracle how to score a response."""
    description = describe(scene)
    asked = [("describe", _describe_request(rng), description.text())]
    roll = rng.random()
    if roll < 0.25:
        asked.append(("generic", generic_question(rng), description.text()))
    elif roll < 0.5:
        asked.append(("temporal", temporal_question(rng), description.event_text()))
    else:
        qa = short_questions(scene, rng, 1)[0]
        asked.append(("short", qa.question, qa.answer))
    for kind, question, answer in asked:
        uid = len(files["RL_data.json"])
        files["RL_data.json"].append({"conversations": conversation(question, answer), "images": images, "uid": uid, "type": kind})


def _eval_video(cfg: WorldConfig, scene: Scene, rng: np.random.Generator, files: dict) -> None:
    vid = scene.video_id
    for i, qa in enumerate(short_questions(scene, rng, cfg.eval_questions_per_video)):
        files["eval/zeroshot_qa.json"].append({"video_name": vid, "question_id": f"{vid}_{i}", "question": qa.question, "answer": qa.answer, "type": qa.type})
    description = describe(scene)
    files["eval/generic_qa.json"].append({"video_name": vid, "Q": generic_question(rng), "A": description.text()})
    files["eval/temporal_qa.json"].append({"video_name": vid, "Q": temporal_question(rng), "A": description.event_text()})
    q1, q2, answer = consistency_question(scene, rng)
    files["eval/consistency_qa.json"].append({"video_name": vid, "Q1": q1, "Q2": q2, "A": answer})


def video_folder(cfg: WorldConfig) -> str:
    """The folder under videos/ that holds the world's frame folders."""
    return f"synthetic_{cfg.num_frames}frames"


def generate_world(cfg: WorldConfig, out: str | Path, progress: bool = False,
                   splits: tuple[str, ...] = SPLITS) -> dict:
    """Write every file of the world's `splits` under `out` and return the number of records
    per file. A split's videos are the same whether or not the others are written.

    `out` is replaced whole, at the end: a killed run leaves the previous world intact and
    a finished one holds no stale videos from an earlier config.
    """
    cfg = from_dict(WorldConfig, dataclasses.asdict(cfg), "world")
    if not splits or not set(splits) <= set(SPLITS):
        raise ValueError(f"splits: expected some of {', '.join(SPLITS)}; got {splits}")
    with atomic_dir(out) as tmp:
        return _write_world(cfg, tmp, progress, splits)


def _write_world(cfg: WorldConfig, out: Path, progress: bool, written: tuple[str, ...]) -> dict:
    folder = video_folder(cfg)
    sizes = {"sft": cfg.num_sft_videos, "rl": cfg.num_rl_videos, "eval": cfg.num_eval_videos}
    names = {"sft": SFT_FILES, "rl": ("RL_data.json",), "eval": EVAL_FILES}
    files: dict[str, list] = {name: [] for split in written for name in names[split]}
    splits: dict[str, list[str]] = {split: [] for split in written}
    scenes, pending = {}, []
    total = sum(sizes[s] for s in written)
    bar = tqdm(total=total, desc="synthetic world", unit="video", disable=not progress)
    for split in (s for s in SPLITS if s in written):
        first = sum(sizes[s] for s in SPLITS[: SPLITS.index(split)])  # video ids number every split
        for index in range(first, first + sizes[split]):
            vid = video_id(index)
            scene = sample_scene(
                np.random.default_rng([cfg.seed, 0, index]), vid, cfg.num_frames, cfg.frame_size, cfg.max_objects, cfg.difficulty
            )
            write_frames(out / "videos" / folder / vid, render(scene))
            images = [f"{folder}/{vid}/frame_{t:03d}.png" for t in range(cfg.num_frames)]
            rng = np.random.default_rng([cfg.seed, 1, index])
            if split == "sft":
                writer = np.random.default_rng([cfg.seed, 3, index])
                _sft_video(cfg, scene, images, rng, writer, files, pending)
            elif split == "rl":
                _rl_video(scene, images, rng, files)
            else:
                _eval_video(cfg, scene, rng, files)
            scenes[vid] = scene.to_dict()
            splits[split].append(vid)
            bar.update()
    bar.close()
    if "sft" in written:
        files["SFT_judge.json"] = _judge_records(pending, np.random.default_rng([cfg.seed, 2]))
    for name, records in files.items():
        write_json(out / name, records)
    write_json(out / "scenes.json", scenes, indent=None)
    counts = {"videos": {split: len(ids) for split, ids in splits.items()}} | {name: len(records) for name, records in files.items()}
    write_json(out / "world.json", {"version": __version__, "config": dataclasses.asdict(cfg), "counts": counts, "splits": splits})
    return counts
