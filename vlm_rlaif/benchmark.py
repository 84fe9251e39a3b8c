"""The paper's evaluation protocol: the Video-ChatGPT generative benchmark and zero-shot QA.

A model answers the benchmark's questions (`answer_sets`); a judge then grades every answer
(`judge_answers`) and the grades are averaged (`summarise`). Video-ChatGPT grades open answers
0-5 on five dimensions: correctness, detail orientation and contextual understanding on the
generic set, temporal understanding on the temporal set, consistency on pairs of questions that
ask one thing in two phrasings. Zero-shot QA has the judge say whether a short answer matches
the reference (yes/no, accuracy = share of yes) and grade the match 0-5.

Two judges grade alike. `LLMJudge` asks an LLM behind an OpenAI-compatible API (gpt-3.5-turbo
in the paper) with the instructions in benchmark_prompts/; `OracleJudge` reads the synthetic
world's ground truth exactly. Every grade carries the id of the judge that gave it, because
judge versions move these numbers by ten points (PAPER.md).
"""

from __future__ import annotations

import ast
import json
import os
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Mapping, Protocol, Sequence

import numpy as np
from tqdm import tqdm
from transformers import PreTrainedModel, ProcessorMixin

from vlm_rlaif.data import ConsistencyQA, GenericQA, ZeroShotQA, read_consistency_qa, read_generic_qa, read_zeroshot_qa
from vlm_rlaif.errors import InputError
from vlm_rlaif.evaluation import TEMPORAL_KINDS, answer_questions
from vlm_rlaif.llm_client import ChatClient
from vlm_rlaif.synthetic.oracle import as_scene, score_answer, score_description
from vlm_rlaif.synthetic.scene import Scene

DIMENSIONS = ("correctness", "detail", "context", "temporal", "consistency")
# The question set each dimension grades, as in Video-ChatGPT.
DIMENSION_SET = {"correctness": "generic", "detail": "generic", "context": "generic", "temporal": "temporal", "consistency": "consistency"}
MAX_SCORE = 5.0
ZEROSHOT = "zeroshot/"  # answer-set key prefix: zeroshot/<benchmark name>


class BenchmarkError(InputError):
    """Benchmark files, answers or judge replies that do not fit; the message names which."""


@dataclass(frozen=True)
class Verdict:
    """One graded answer: a 0-5 score (None when the judge's reply could not be read), for
    zero-shot QA the yes/no match, and who graded it."""

    score: float | None
    judge: str
    match: bool | None = None


# --------------------------------------------------------------------------- question sets


@dataclass
class BenchmarkSets:
    """The evaluation sets the prepare stage wrote under <prepared>/eval/."""

    generic: list[GenericQA]
    temporal: list[GenericQA]
    consistency: list[ConsistencyQA]
    zeroshot: dict[str, list[ZeroShotQA]]

    @classmethod
    def load(cls, prepared: str | os.PathLike, num_samples: int | None = None) -> BenchmarkSets:
        """The sets, each cut to its first `num_samples` questions when given (`evaluate.num_samples`)."""
        folder = Path(prepared) / "eval"

        def read(name: str, reader):
            path = folder / name
            if not path.is_file():
                raise BenchmarkError(f"{path} does not exist: run the prepare stage first (dvc repro prepare)")
            return reader(path).records[:num_samples]

        zeroshot = {p.stem.removeprefix("zeroshot_"): read(p.name, read_zeroshot_qa) for p in sorted(folder.glob("zeroshot_*.json"))}
        return cls(read("generic_qa.json", read_generic_qa), read("temporal_qa.json", read_generic_qa),
                   read("consistency_qa.json", read_consistency_qa), zeroshot)

    def questions(self) -> dict[str, list]:
        """Every set that has questions, by its answer-set key."""
        sets = {"generic": self.generic, "temporal": self.temporal, "consistency": self.consistency,
                **{ZEROSHOT + name: records for name, records in self.zeroshot.items()}}
        return {key: records for key, records in sets.items() if records}


def answer_sets(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    sets: BenchmarkSets,
    *,
    video_root: str | os.PathLike,
    num_frames: int,
    max_new_tokens: int,
    temperature: float,
    batch_size: int = 16,
    progress: bool = False,
    only: Sequence[str] | None = None,
    zeroshot_max_new_tokens: int | None = None,
) -> dict[str, list]:
    """The model's answers to every set (or the sets keyed in `only`): one string per question,
    a pair per consistency question. Zero-shot answers stop at `zeroshot_max_new_tokens` where
    given: a model that never learnt to stop would otherwise ramble to max_new_tokens."""
    ask = dict(video_root=video_root, num_frames=num_frames, temperature=temperature,
               batch_size=batch_size, progress=progress)
    answers: dict[str, list] = {}
    for key, questions in sets.questions().items():
        if only is not None and key not in only:
            continue
        short = key.startswith(ZEROSHOT) and zeroshot_max_new_tokens is not None
        ask["max_new_tokens"] = zeroshot_max_new_tokens if short else max_new_tokens
        if key == "consistency":
            asked = [GenericQA(video_name=q.video_name, question=text, answer=q.answer) for q in questions for text in (q.question_1, q.question_2)]
            flat = answer_questions(model, processor, asked, **ask)
            answers[key] = [[flat[i], flat[i + 1]] for i in range(0, len(flat), 2)]
        else:
            answers[key] = answer_questions(model, processor, questions, **ask)
    return answers


# --------------------------------------------------------------------------- judges


class Judge(Protocol):
    def grade(self, dimension: str, question: GenericQA | ConsistencyQA, answer: str | Sequence[str]) -> Verdict: ...

    def match(self, question: ZeroShotQA, answer: str) -> Verdict: ...


class OracleJudge:
    """Grades from the synthetic world's scene records, exactly. On the 0-5 scale: correctness
    is the share of the facts an answer states that are true (precision), detail orientation
    the share of the scene's facts it states (recall), contextual understanding their F1,
    temporal understanding the F1 on event and order facts, and consistency 5 when both
    phrasings are answered right, else 0. A zero-shot answer scores 5 when right, 0 when not."""

    name = "oracle"

    def __init__(self, scenes: Mapping[str, Scene | Mapping]) -> None:
        self.scenes = scenes

    def _scene(self, video_name: str) -> Scene:
        if video_name not in self.scenes:
            raise BenchmarkError(f"video_name {video_name!r} has no scene record ({len(self.scenes)} known): the oracle judges the synthetic world only")
        return as_scene(self.scenes[video_name])

    def grade(self, dimension: str, question: GenericQA | ConsistencyQA, answer: str | Sequence[str]) -> Verdict:
        scene = self._scene(question.video_name)
        if dimension == "consistency":
            first, second = answer
            right = all(score_answer(scene, {"question": q, "answer": question.answer}, a)
                        for q, a in ((question.question_1, first), (question.question_2, second)))
            return Verdict(MAX_SCORE * right, self.name)
        facts = score_description(scene, answer, kinds=TEMPORAL_KINDS if dimension == "temporal" else None)
        share = {"correctness": facts.precision, "detail": facts.recall, "context": facts.f1, "temporal": facts.f1}
        if dimension not in share:
            raise BenchmarkError(f"unknown dimension {dimension!r}; known: {', '.join(DIMENSIONS)}")
        return Verdict(MAX_SCORE * share[dimension], self.name)

    def match(self, question: ZeroShotQA, answer: str) -> Verdict:
        right = score_answer(self._scene(question.video_name), question.to_dict(), answer)
        return Verdict(MAX_SCORE * right, self.name, right)


@cache
def instruction(name: str) -> str:
    """The text of benchmark_prompts/<name>.txt."""
    path = resources.files("vlm_rlaif.benchmark_prompts").joinpath(f"{name}.txt")
    if not path.is_file():
        raise BenchmarkError(f"no judge instruction benchmark_prompts/{name}.txt")
    return path.read_text(encoding="utf-8").strip()


def read_reply(text: str) -> dict | None:
    """The first {...} object in a judge's reply, read as JSON or as a Python literal (judges
    answer both ways); None when there is none."""
    for found in re.findall(r"\{[^{}]*\}", text):
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(found)
            except (ValueError, SyntaxError):
                continue
            if isinstance(value, dict):
                return value
    return None


def _score(reply: dict | None) -> float | None:
    value = (reply or {}).get("score")
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= MAX_SCORE:
        return float(value)
    return None


class LLMJudge:
    """Grades through an LLM behind an OpenAI-compatible chat API; each grade records the model
    id the server reported."""

    def __init__(self, client: ChatClient) -> None:
        self.client = client

    def _ask(self, name: str, **slots: str) -> tuple[dict | None, str]:
        messages = [{"role": "system", "content": instruction("system")}, {"role": "user", "content": instruction(name).format(**slots)}]
        completion = self.client.complete(messages)
        return read_reply(completion.text), f"openai:{completion.model}"

    def grade(self, dimension: str, question: GenericQA | ConsistencyQA, answer: str | Sequence[str]) -> Verdict:
        if dimension not in DIMENSIONS:
            raise BenchmarkError(f"unknown dimension {dimension!r}; known: {', '.join(DIMENSIONS)}")
        if dimension == "consistency":
            reply, judge = self._ask(dimension, question_1=question.question_1, question_2=question.question_2,
                                     answer_1=answer[0], answer_2=answer[1], reference=question.answer)
        else:
            reply, judge = self._ask(dimension, question=question.question, reference=question.answer, answer=answer)
        return Verdict(_score(reply), judge)

    def match(self, question: ZeroShotQA, answer: str) -> Verdict:
        reply, judge = self._ask("qa", question=question.question, reference=question.answer, answer=answer)
        pred = str((reply or {}).get("pred", "")).strip().lower()
        return Verdict(_score(reply), judge, {"yes": True, "no": False}.get(pred))


# --------------------------------------------------------------------------- grading


def judge_answers(sets: BenchmarkSets, answers: Mapping[str, list], judge: Judge, progress: bool = False) -> dict[str, list[dict]]:
    """Every answer graded: per set, one record per question with its answer(s), the grade of
    each dimension that set serves (zero-shot: the match and its score) and the judge's id."""
    questions = sets.questions()
    if set(answers) != set(questions):
        raise BenchmarkError(f"answers for sets {sorted(answers)}, questions for {sorted(questions)}")
    judged: dict[str, list[dict]] = {}
    bar = tqdm(total=sum(map(len, questions.values())), desc="judge", unit="answer", disable=not progress)
    for key, records in questions.items():
        if len(answers[key]) != len(records):
            raise BenchmarkError(f"set {key}: {len(answers[key])} answers for {len(records)} questions")
        dims = [d for d in DIMENSIONS if DIMENSION_SET[d] == key]
        judged[key] = []
        for question, answer in zip(records, answers[key]):
            if key.startswith(ZEROSHOT):
                verdict = judge.match(question, answer)
                grades, judges = {"match": verdict.match, "score": verdict.score}, {verdict.judge}
            else:
                verdicts = {d: judge.grade(d, question, answer) for d in dims}
                grades, judges = {d: v.score for d, v in verdicts.items()}, {v.judge for v in verdicts.values()}
            judged[key].append({**question.to_dict(), "prediction": answer, **grades, "judge": ", ".join(sorted(judges))})
            bar.update()
    bar.close()
    return judged


def _mean(values: list) -> float | None:
    read = [float(v) for v in values if v is not None]
    return float(np.mean(read)) if read else None


def summarise(judged: Mapping[str, list[dict]]) -> dict:
    """Mean grade per dimension and their mean (the paper's table), zero-shot accuracy and mean
    score per benchmark, how many grades could not be read, and the judges that gave them."""
    dims = {d: _mean([r[d] for r in judged[DIMENSION_SET[d]]]) for d in DIMENSIONS}
    read = [v for v in dims.values() if v is not None]
    zeroshot = {key.removeprefix(ZEROSHOT): {"accuracy": _mean([r["match"] for r in records]), "score": _mean([r["score"] for r in records]),
                                             "count": len(records)}
                for key, records in judged.items() if key.startswith(ZEROSHOT)}
    unread = sum(r[k] is None for key, records in judged.items() for r in records
                 for k in (("match", "score") if key.startswith(ZEROSHOT) else [d for d in DIMENSIONS if DIMENSION_SET[d] == key]))
    judges = sorted({j for records in judged.values() for r in records for j in r["judge"].split(", ")})
    return {"video_chatgpt": {**dims, "mean": float(np.mean(read)) if read else None}, "zeroshot": zeroshot, "unread": unread, "judges": judges}
