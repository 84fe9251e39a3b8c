"""How well a model answers, scored exactly by the synthetic world's oracle.

`answer_questions` asks a model the evaluation sets' questions (zero-shot QA and the
Video-ChatGPT formats) through the one generation path. The oracle then scores the answers
against each video's ground-truth scene: short answers right or wrong, descriptions by the
facts they state (true, missed, hallucinated). Temporal questions ask what happens and in
what order, so they are scored on the event and order facts alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
from transformers import PreTrainedModel, ProcessorMixin
from tqdm import tqdm

from vlm_rlaif import io
from vlm_rlaif.data import PLACEHOLDER, GenericQA, ZeroShotQA, read_generic_qa, read_zeroshot_qa
from vlm_rlaif.errors import InputError
from vlm_rlaif.generation import encode_video_list, generate
from vlm_rlaif.modeling import ConversationError
from vlm_rlaif.synthetic.oracle import OracleScore, as_scene, score_answer, score_description
from vlm_rlaif.synthetic.scene import Scene
from vlm_rlaif.video import VideoError, load_video, resolve_video

TEMPORAL_KINDS = ("event", "order")
# What an RL prompt asks for, and so how the oracle scores a response to it.
PROMPT_KINDS = ("describe", "generic", "temporal", "short")


class EvaluationError(InputError):
    """Questions, answers and scenes that do not fit together; the message names the question."""


def release_conversation(question: str) -> list[dict]:
    """The question as the release's first human turn, the video placeholder in front."""
    return [{"from": "human", "value": f"{PLACEHOLDER}\n{question}"}]


def _load_videos(questions: Sequence[ZeroShotQA | GenericQA], first: int,
                 video_root: str | os.PathLike, num_frames: int
                 ) -> tuple[list[np.ndarray], list[int]]:
    """Each distinct video the questions ask about, decoded once, and each question's index
    into that list."""
    loaded: dict[str, int] = {}
    videos: list[np.ndarray] = []
    for index, question in enumerate(questions, first):
        if question.video_name in loaded:
            continue
        try:
            videos.append(load_video(resolve_video(video_root, question.video_name), num_frames))
        except VideoError as e:
            raise VideoError(f"question {index} (video_name {question.video_name!r}): {e}") from None
        loaded[question.video_name] = len(videos) - 1
    return videos, [loaded[q.video_name] for q in questions]


def answer_questions(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    questions: Sequence[ZeroShotQA | GenericQA],
    video_root: str | os.PathLike,
    num_frames: int,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 8,
    progress: bool = False,
) -> list[str]:
    """One answer per question, in order. Videos are loaded one batch at a time, so a
    benchmark of thousands of 50-frame videos never sits in memory whole, and a video asked
    several questions in a batch is encoded once."""
    answers: list[str] = []
    bar = tqdm(total=len(questions), desc="answer", unit="question", disable=not progress)
    for start in range(0, len(questions), batch_size):
        chunk = questions[start : start + batch_size]
        videos, video_of = _load_videos(chunk, start, video_root, num_frames)
        features = encode_video_list(model, processor, videos, batch_size=batch_size)
        try:
            texts = generate(
                model,
                processor,
                [videos[i] for i in video_of],
                [release_conversation(q.question) for q in chunk],
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                batch_size=batch_size,
                features=[features[i] for i in video_of],
            )
        except ConversationError as e:
            raise ConversationError(f"questions {start}..{start + len(chunk) - 1}: {e}") from None
        answers.extend(group[0] for group in texts)
        bar.update(len(chunk))
    bar.close()
    return answers


# --------------------------------------------------------------------------- oracle scores


def _scenes_for(scenes: Mapping[str, Scene | Mapping], questions: Sequence, answers: Sequence) -> list[Scene]:
    """Each question's scene, after checking that the answers line up with the questions."""
    if len(questions) != len(answers):
        raise EvaluationError(f"{len(answers)} answers for {len(questions)} questions")
    if not questions:
        raise EvaluationError("no questions to score")
    parsed: dict[str, Scene] = {}
    out = []
    for index, (question, answer) in enumerate(zip(questions, answers)):
        if not isinstance(answer, str):
            raise EvaluationError(f"answer {index}: expected a string, got {type(answer).__name__}")
        name = question.video_name
        if name not in parsed:
            if name not in scenes:
                raise EvaluationError(f"question {index}: no scene for video_name {name!r} ({len(scenes)} scenes known)")
            parsed[name] = as_scene(scenes[name])
        out.append(parsed[name])
    return out


def score_short_answers(scenes: Mapping[str, Scene | Mapping], questions: Sequence[ZeroShotQA], answers: Sequence[str]) -> list[bool]:
    """Whether each short answer is right, by the oracle."""
    return [score_answer(scene, q.to_dict(), a) for scene, q, a in zip(_scenes_for(scenes, questions, answers), questions, answers)]


def oracle_short_accuracy(scenes: Mapping[str, Scene | Mapping], questions: Sequence[ZeroShotQA], answers: Sequence[str]) -> dict:
    """Accuracy overall and, for questions whose record carries a "type", per type."""
    right = score_short_answers(scenes, questions, answers)
    by_type: dict[str, list[bool]] = {}
    for question, ok in zip(questions, right):
        if "type" in question.extra:
            by_type.setdefault(str(question.extra["type"]), []).append(ok)
    return {**_accuracy(right), "by_type": {kind: _accuracy(by_type[kind]) for kind in sorted(by_type)}}


def blind_answers(scenes: Mapping[str, Scene | Mapping], questions: Sequence[ZeroShotQA]) -> list[str]:
    """The answers of a model that never looks at the video: per question type, the one
    reference answer of that type that is right most often, given to every question of the
    type. Scored like a model's answers, it is the floor that accuracy must clear to show
    the model reads the video (it knows the answer counts of the very questions it answers,
    so no video-blind model does better by a constant)."""
    groups: dict[str, list[int]] = {}
    for i, question in enumerate(questions):
        groups.setdefault(str(question.extra.get("type", "")), []).append(i)
    answers = [""] * len(questions)
    for members in groups.values():
        group = [questions[i] for i in members]
        best = max(sorted({q.answer for q in group}), key=lambda a: sum(score_short_answers(scenes, group, [a] * len(group))))
        for i in members:
            answers[i] = best
    return answers


def _accuracy(right: list[bool]) -> dict:
    return {"accuracy": sum(right) / len(right), "correct": sum(right), "count": len(right)}


def score_descriptions(
    scenes: Mapping[str, Scene | Mapping], questions: Sequence[GenericQA], answers: Sequence[str], kinds: Iterable[str] | None = None
) -> list[OracleScore]:
    """The oracle's score of each free-text answer; `kinds` keeps only some kinds of fact
    (TEMPORAL_KINDS for the temporal set)."""
    kinds = tuple(kinds) if kinds is not None else None
    return [score_description(scene, a, kinds=kinds) for scene, a in zip(_scenes_for(scenes, questions, answers), answers)]


def oracle_description_scores(
    scenes: Mapping[str, Scene | Mapping], questions: Sequence[GenericQA], answers: Sequence[str], kinds: Iterable[str] | None = None
) -> dict:
    """Mean precision, recall and F1 over answers, hallucinated facts per answer, and the
    share of perfect answers (every fact stated, nothing false)."""
    return description_summary(score_descriptions(scenes, questions, answers, kinds))


def description_summary(scores: Sequence[OracleScore]) -> dict:
    """`oracle_description_scores` of answers the oracle has already scored."""
    n = len(scores)
    return {
        "precision": sum(s.precision for s in scores) / n,
        "recall": sum(s.recall for s in scores) / n,
        "f1": sum(s.f1 for s in scores) / n,
        "hallucinated_per_answer": sum(len(s.hallucinated) for s in scores) / n,
        "perfect": sum(not s.missed_facts and not s.hallucinated for s in scores) / n,
        "count": n,
    }


def oracle_score(scene: Scene | Mapping, kind: str, question: str, reference: str, response: str) -> float:
    """How right one response to a prompt is, on one scale per kind: a short answer is 1 or 0,
    a description its fact F1 (event and order facts alone for a temporal question)."""
    if kind == "short":
        return float(score_answer(scene, {"question": question, "answer": reference}, response))
    if kind in ("describe", "generic"):
        return score_description(scene, response).f1
    if kind == "temporal":
        return score_description(scene, response, kinds=TEMPORAL_KINDS).f1
    raise EvaluationError(f"unknown prompt kind {kind!r}; known: {', '.join(PROMPT_KINDS)}")


def oracle_preference(scene: Scene | Mapping, kind: str, question: str, reference: str, first: str, second: str) -> int | None:
    """1 if the oracle scores the first response higher, 2 if the second, None on a tie: the
    verdict a judge's preference is measured against."""
    a, b = (oracle_score(scene, kind, question, reference, r) for r in (first, second))
    return None if a == b else 1 if a > b else 2


def held_out_oracle(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    prepared: str | os.PathLike,
    *,
    video_root: str | os.PathLike,
    num_frames: int,
    max_new_tokens: int,
    batch_size: int = 16,
    progress: bool = False,
) -> tuple[dict, dict[str, list[str]]]:
    """A model on the synthetic world's held-out sets, scored by the oracle: short-answer
    accuracy (the zero-shot QA set) beside the video-blind baseline, and the descriptions
    asked by the generic benchmark questions. Returns (scores, answers by set): the SFT and
    PPO stages report the same table, so their models compare."""
    prepared = Path(prepared)
    scenes = io.read_json(prepared / "scenes.json")
    short = read_zeroshot_qa(prepared / "eval/zeroshot_synthetic.json").records
    long = read_generic_qa(prepared / "eval/generic_qa.json").records
    ask = dict(video_root=video_root, num_frames=num_frames, max_new_tokens=max_new_tokens,
               batch_size=batch_size, progress=progress)
    answers = {"short": answer_questions(model, processor, short, **ask), "long": answer_questions(model, processor, long, **ask)}
    scores = {
        "short": oracle_short_accuracy(scenes, short, answers["short"]),
        "blind": oracle_short_accuracy(scenes, short, blind_answers(scenes, short)),
        "long": oracle_description_scores(scenes, long, answers["long"]),
    }
    return scores, answers
