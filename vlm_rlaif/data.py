"""Record formats of the VLM-RLAIF release (PAPER.md): read, validate, write.

One small dataclass per kind of record, each with `from_dict(d, where)` and `to_dict()`:
SFT conversations, AI preference pairs, RL prompts, and the three evaluation formats. The
synthetic world writes exactly these formats, so the same readers serve the embedded
default and the real release.

Zero-shot QA benchmarks come either merged (one list, each question with its answer) or as
distributed: a questions file and an answers file joined by "question_id".

A malformed record raises `RecordError` naming the file, the record (its index in a JSON
list, its line in JSONL) and the field, before any stage spends time on it. With
`on_bad_record="skip"` the reader keeps going and returns the skipped records' messages,
so the caller can report how many were dropped and why.

Written records are canonical: turns use "from" with "human"/"gpt" whatever the source
used, known keys come first in a fixed order, and unknown keys follow unchanged, so a
read/write round trip is lossless for the data and byte-stable on disk.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, Iterable, Literal, NamedTuple, Sequence, TypeVar

import numpy as np

from vlm_rlaif.errors import InputError
from vlm_rlaif.io import read_json, write_json, write_jsonl
from vlm_rlaif.video import resolve_video, safe_join

PLACEHOLDER = "<image>"
GROUNDED = "grounded"  # an SFT record's answer as its clip captions support it, where that differs
SPEAKERS = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt"}


class RecordError(InputError):
    """A malformed annotation file or record; the message names file, record and field."""


# --------------------------------------------------------------------------- field checks


def _is_str(value: Any) -> bool:
    return isinstance(value, str)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    return _is_str(value) or _is_int(value)


def _preview(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:37] + "..."


def _field(d: dict, key: str, where: str, check: Callable[[Any], bool], what: str, *, required: bool = True, prefix: str = "") -> Any:
    """d[key] if it passes `check`; `prefix` locates a nested object in the message."""
    if key not in d:
        if required:
            raise RecordError(f'{where}: missing "{prefix}{key}"')
        return None
    value = d[key]
    if not check(value):
        raise RecordError(f'{where}: "{prefix}{key}" must be {what}, got {_preview(value)}')
    return value


def _present(d: dict, key: str, where: str) -> Any:
    if key not in d:
        raise RecordError(f'{where}: missing "{key}"')
    return d[key]


def _object(d: Any, where: str, name: str = "record") -> dict:
    if not isinstance(d, dict):
        raise RecordError(f"{where}: {name} must be a JSON object, got {_preview(d)}")
    return d


def _relative_path(path: Any, where: str, name: str) -> str:
    """A media path relative to the video root; one that would leave the root is refused here,
    at read time, so the error names the record rather than surfacing mid-training."""
    if not isinstance(path, str) or not path:
        raise RecordError(f'{where}: "{name}" must be a non-empty path, got {_preview(path)}')
    norm = os.path.normpath(path)
    if os.path.isabs(path) or norm in (".", "..") or norm.startswith(".." + os.sep):
        raise RecordError(f'{where}: "{name}" = {path!r} must be a path inside the video root')
    return path


def _extra(d: dict, known: Iterable[str]) -> dict:
    known = set(known)
    return {k: v for k, v in d.items() if k not in known}


# --------------------------------------------------------------------------- conversations


@dataclass
class Turn:
    """One turn of a conversation; `speaker` is normalised to "human" or "gpt"."""

    speaker: Literal["human", "gpt"]
    value: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str, name: str) -> Turn:
        d = _object(d, where, f'"{name}"')
        key = "from" if "from" in d or "role" not in d else "role"
        speaker = _field(d, key, where, lambda v: _is_str(v) and v in SPEAKERS, "one of human, gpt, user, assistant", prefix=f"{name}.")
        value = _field(d, "value", where, _is_str, "a string", prefix=f"{name}.")
        return cls(speaker=SPEAKERS[speaker], value=value, extra=_extra(d, (key, "value")))

    def to_dict(self) -> dict:
        return {"from": self.speaker, "value": self.value, **self.extra}


@dataclass
class Response:
    """One candidate answer of a preference pair ("output_1" / "output_2")."""

    value: str
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Any, where: str, name: str) -> Response:
        d = _object(d, where, f'"{name}"')
        value = _field(d, "value", where, _is_str, "a string", prefix=f"{name}.")
        return cls(value=value, extra=_extra(d, ("value",)))

    def to_dict(self) -> dict:
        return {"value": self.value, **self.extra}


def _check_alternating(turns: list[Turn], where: str, count: int | None = None) -> None:
    """Turns go human, gpt, human, ... (the first `count` of them) as the chat format needs."""
    for i, turn in enumerate(turns[:count]):
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.speaker != expected:
            raise RecordError(f'{where}: "conversations[{i}]" must be a {expected} turn (turns alternate human, gpt)')


@dataclass(kw_only=True)
class Dialogue:
    """What SFT, preference and RL records share: a conversation about one video.

    The video is either "images" (frame paths, the release's form) or "video" (a file or
    frame folder), both relative to the video root.
    """

    conversations: list[Turn]
    images: list[str] | None = None
    video: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _OWN_KEYS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def _dialogue_fields(cls, d: dict, where: str) -> dict[str, Any]:
        turns = _field(d, "conversations", where, lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list of turns")
        conversations = [Turn.from_dict(t, where, f"conversations[{i}]") for i, t in enumerate(turns)]
        marks = [i for i, t in enumerate(conversations) for _ in range(t.value.count(PLACEHOLDER))]
        if marks != [0] and conversations[0].speaker == "human":  # a wrong first speaker is named by the turn check
            raise RecordError(f'{where}: the video placeholder {PLACEHOLDER} must appear once, in "conversations[0]"; '
                              f"found {len(marks)}" + (f" (in turns {sorted(set(marks))})" if marks else ""))
        if ("images" in d) == ("video" in d):
            raise RecordError(f'{where}: needs exactly one of "images" (frame paths) and "video" (a file or frame folder)')
        images = video = None
        if "images" in d:
            paths = _field(d, "images", where, lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list of frame paths")
            images = [_relative_path(p, where, f"images[{i}]") for i, p in enumerate(paths)]
        else:
            video = _relative_path(d["video"], where, "video")
        known = ("conversations", "images", "video", *cls._OWN_KEYS)
        return {"conversations": conversations, "images": images, "video": video, "extra": _extra(d, known)}

    def _dialogue_dict(self) -> dict:
        out: dict[str, Any] = {"conversations": [t.to_dict() for t in self.conversations]}
        if self.images is not None:
            out["images"] = list(self.images)
        if self.video is not None:
            out["video"] = self.video
        return out

    def question(self) -> str:
        """The first human turn without the visual placeholder."""
        first = next(t.value for t in self.conversations if t.speaker == "human")
        return first.replace(PLACEHOLDER, "").strip()

    def answer(self) -> str:
        """Every gpt turn, one per line: what the curriculum measures in words."""
        return "\n".join(t.value for t in self.conversations if t.speaker == "gpt")

    def media(self, video_root: str | os.PathLike) -> Path | list[Path]:
        """The frames or the video under `video_root`, ready for `video.load_video`."""
        if self.images is not None:
            return [safe_join(video_root, p) for p in self.images]
        return safe_join(video_root, self.video)


@dataclass(kw_only=True)
class SFTRecord(Dialogue):
    """A supervised conversation: SFT_short/SFT_long (also the caption and judge sets)."""

    id: str | int
    src_data: str | None = None

    _OWN_KEYS = ("id", "src_data")

    @classmethod
    def from_dict(cls, d: Any, where: str) -> SFTRecord:
        d = _object(d, where)
        record = cls(
            id=_field(d, "id", where, _is_id, "a string or an integer"),
            src_data=_field(d, "src_data", where, _is_str, "a string", required=False),
            **cls._dialogue_fields(d, where),
        )
        _check_alternating(record.conversations, where)
        if record.conversations[-1].speaker != "gpt":
            raise RecordError(f'{where}: "conversations" must end with a gpt turn (the answer to learn)')
        return record

    def to_dict(self) -> dict:
        head: dict[str, Any] = {"id": self.id}
        if self.src_data is not None:
            head["src_data"] = self.src_data
        return {**head, **self._dialogue_dict(), **self.extra}


@dataclass(kw_only=True)
class PreferenceRecord(Dialogue):
    """An AI preference pair; the last gpt turn of `conversations` is where an output goes."""

    output_1: Response
    output_2: Response
    preference: Literal[1, 2]

    _OWN_KEYS = ("output_1", "output_2", "preference")

    @classmethod
    def from_dict(cls, d: Any, where: str) -> PreferenceRecord:
        d = _object(d, where)
        record = cls(
            output_1=Response.from_dict(_present(d, "output_1", where), where, "output_1"),
            output_2=Response.from_dict(_present(d, "output_2", where), where, "output_2"),
            preference=_field(d, "preference", where, lambda v: _is_int(v) and v in (1, 2), "1 or 2"),
            **cls._dialogue_fields(d, where),
        )
        _check_alternating(record.conversations, where)
        if record.conversations[-1].speaker != "gpt":
            raise RecordError(f'{where}: "conversations" must end with a gpt turn (the slot the outputs fill)')
        return record

    @property
    def chosen(self) -> str:
        return (self.output_1 if self.preference == 1 else self.output_2).value

    @property
    def rejected(self) -> str:
        return (self.output_2 if self.preference == 1 else self.output_1).value

    def to_dict(self) -> dict:
        pair = {"output_1": self.output_1.to_dict(), "output_2": self.output_2.to_dict(), "preference": self.preference}
        return {**self._dialogue_dict(), **pair, **self.extra}


@dataclass(kw_only=True)
class RLPrompt(Dialogue):
    """A PPO prompt: the first human turn is the query (a second, gpt, turn is a reference)."""

    uid: int

    _OWN_KEYS = ("uid",)

    @classmethod
    def from_dict(cls, d: Any, where: str) -> RLPrompt:
        d = _object(d, where)
        record = cls(uid=_field(d, "uid", where, _is_int, "an integer"), **cls._dialogue_fields(d, where))
        _check_alternating(record.conversations, where, count=2)
        return record

    def to_dict(self) -> dict:
        return {**self._dialogue_dict(), "uid": self.uid, **self.extra}


# --------------------------------------------------------------------------- evaluation sets


@dataclass(kw_only=True)
class VideoQuestion:
    """What the evaluation formats share: a "video_name" under a video root, maybe without extension."""

    video_name: str
    extra: dict[str, Any] = field(default_factory=dict)

    def video_path(self, video_root: str | os.PathLike) -> Path:
        return resolve_video(video_root, self.video_name)


def _video_name(d: dict, where: str) -> str:
    return _relative_path(_field(d, "video_name", where, _is_str, "a string"), where, "video_name")


@dataclass(kw_only=True)
class ZeroShotQA(VideoQuestion):
    """Zero-shot open-ended QA (MSVD-QA, MSRVTT-QA, ActivityNet-QA, ... merged form)."""

    question_id: str | int
    question: str
    answer: str

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ZeroShotQA:
        d = _object(d, where)
        return cls(
            video_name=_video_name(d, where),
            question_id=_field(d, "question_id", where, _is_id, "a string or an integer"),
            question=_field(d, "question", where, _is_str, "a string"),
            answer=_field(d, "answer", where, _is_str, "a string"),
            extra=_extra(d, ("video_name", "question_id", "question", "answer")),
        )

    def to_dict(self) -> dict:
        own = {"video_name": self.video_name, "question_id": self.question_id, "question": self.question, "answer": self.answer}
        return {**own, **self.extra}


@dataclass(kw_only=True)
class GenericQA(VideoQuestion):
    """Video-ChatGPT benchmark question ("Q", "A"): generic, temporal and detail sets."""

    question: str
    answer: str

    @classmethod
    def from_dict(cls, d: Any, where: str) -> GenericQA:
        d = _object(d, where)
        return cls(
            video_name=_video_name(d, where),
            question=_field(d, "Q", where, _is_str, "a string"),
            answer=_field(d, "A", where, _is_str, "a string"),
            extra=_extra(d, ("video_name", "Q", "A")),
        )

    def to_dict(self) -> dict:
        return {"video_name": self.video_name, "Q": self.question, "A": self.answer, **self.extra}


@dataclass(kw_only=True)
class ConsistencyQA(VideoQuestion):
    """Video-ChatGPT consistency pair: two phrasings ("Q1", "Q2") of one fact ("A")."""

    question_1: str
    question_2: str
    answer: str

    @classmethod
    def from_dict(cls, d: Any, where: str) -> ConsistencyQA:
        d = _object(d, where)
        return cls(
            video_name=_video_name(d, where),
            question_1=_field(d, "Q1", where, _is_str, "a string"),
            question_2=_field(d, "Q2", where, _is_str, "a string"),
            answer=_field(d, "A", where, _is_str, "a string"),
            extra=_extra(d, ("video_name", "Q1", "Q2", "A")),
        )

    def to_dict(self) -> dict:
        own = {"video_name": self.video_name, "Q1": self.question_1, "Q2": self.question_2, "A": self.answer}
        return {**own, **self.extra}


# --------------------------------------------------------------------------- files

Record = TypeVar("Record", SFTRecord, PreferenceRecord, RLPrompt, ZeroShotQA, GenericQA, ConsistencyQA)


class ReadResult(NamedTuple, Generic[Record]):
    """The good records, and (index, message) for each record skipped as malformed."""

    records: list[Record]
    skipped: list[tuple[int, str]]


def _entries(path: Path) -> list[tuple[str, Any]]:
    """(where, raw record) for every record of a JSON list, or of a JSONL file by its suffix.

    A JSONL line that is not JSON stands as a RecordError in its place, so skip mode can
    step over it like any other bad record.
    """
    if path.suffix.lower() == ".jsonl":
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: file not found") from None
        entries = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                entries.append((where, json.loads(line)))
            except json.JSONDecodeError as e:
                entries.append((where, RecordError(f"{where}: invalid JSON: {e.msg}")))
        return entries
    try:
        data = read_json(path)
    except ValueError as e:
        raise RecordError(str(e)) from None
    if not isinstance(data, list):
        raise RecordError(f"{path}: expected a JSON list of records (or JSONL, named *.jsonl), got {type(data).__name__}")
    return [(f"{path}, record {i}", d) for i, d in enumerate(data)]


def _question_id(raw: Any, where: str) -> str | int:
    """The "question_id" of a raw question or answer record: the key that joins the two."""
    if isinstance(raw, RecordError):
        raise raw
    return _field(_object(raw, where), "question_id", where, _is_id, "a string or an integer")


class _Answer(NamedTuple):
    index: int  # in the answers file, so left-over answers are reported in its order
    where: str
    record: dict


def _answers_by_id(path: Path) -> tuple[dict[Any, _Answer], list[tuple[int, str, RecordError]]]:
    """The answer records of `path` by question_id, and (index, where, error) for each record
    without a usable question_id or with one an earlier answer already has."""
    by_id: dict[Any, _Answer] = {}
    bad: list[tuple[int, str, RecordError]] = []
    for index, (where, raw) in enumerate(_entries(path)):
        try:
            qid = _question_id(raw, where)
        except RecordError as e:
            bad.append((index, where, e))
            continue
        if qid in by_id:
            message = f"{where}: question_id {qid!r} is answered already by {by_id[qid].where}"
            bad.append((index, where, RecordError(message)))
        else:
            by_id[qid] = _Answer(index, where, raw)
    return by_id, bad


def _with_answer(
    raw: Any, where: str, answers: Path, by_id: dict[Any, _Answer], asked: dict[Any, str]
) -> Any:
    """The question record with the fields of its answer in `answers` (whose "answer" wins),
    or the RecordError that says why it has none; `asked` collects the question_ids seen."""
    try:
        qid = _question_id(raw, where)
    except RecordError as e:
        return e
    if qid in asked:
        return RecordError(f"{where}: question_id {qid!r} is asked already by {asked[qid]}")
    asked[qid] = where
    if qid not in by_id:
        return RecordError(f"{where}: question_id {qid!r} has no answer in {answers}")
    answer = by_id[qid]
    try:
        value = _field(answer.record, "answer", answer.where, _is_str, "a string")
    except RecordError as e:
        return e
    return {**raw, **{k: v for k, v in answer.record.items() if k not in raw}, "answer": value}


def _joined_entries(questions: Path, answers: Path) -> list[tuple[str, Any]]:
    """The questions' entries joined to their answers by question_id, then an error entry for
    each answer record that no question asks for or that is malformed, in its file's order."""
    by_id, bad = _answers_by_id(answers)
    asked: dict[Any, str] = {}
    entries = [(where, _with_answer(raw, where, answers, by_id, asked))
               for where, raw in _entries(questions)]
    for qid, answer in by_id.items():
        if qid not in asked:
            message = f"{answer.where}: question_id {qid!r} has no question in {questions}"
            bad.append((answer.index, answer.where, RecordError(message)))
    return entries + [(where, error) for _, where, error in sorted(bad, key=lambda e: e[0])]


def _check_policy(on_bad_record: str) -> None:
    if on_bad_record not in ("stop", "skip"):
        raise ValueError(f"on_bad_record must be 'stop' or 'skip', got {on_bad_record!r}")


def read_records(path: str | os.PathLike, kind: type[Record], on_bad_record: Literal["stop", "skip"] = "stop") -> ReadResult[Record]:
    """Every record of `kind` in `path` (a JSON list, or JSONL when named *.jsonl)."""
    _check_policy(on_bad_record)
    return _parse(_entries(Path(path)), kind, on_bad_record)


def _parse(entries: list[tuple[str, Any]], kind: type[Record], on_bad_record: str) -> ReadResult:
    """Records of `kind` from (where, raw) entries; a bad one raises or is skipped by its index."""
    records, skipped = [], []
    for index, (where, raw) in enumerate(entries):
        try:
            if isinstance(raw, RecordError):
                raise raw
            records.append(kind.from_dict(raw, where))
        except RecordError as e:
            if on_bad_record == "stop":
                raise
            skipped.append((index, str(e)))
    return ReadResult(records, skipped)


def read_sft(path: str | os.PathLike, on_bad_record: Literal["stop", "skip"] = "stop") -> ReadResult[SFTRecord]:
    return read_records(path, SFTRecord, on_bad_record)


def read_preferences(path: str | os.PathLike, on_bad_record: Literal["stop", "skip"] = "stop") -> ReadResult[PreferenceRecord]:
    return read_records(path, PreferenceRecord, on_bad_record)


def read_rl_prompts(path: str | os.PathLike, on_bad_record: Literal["stop", "skip"] = "stop") -> ReadResult[RLPrompt]:
    return read_records(path, RLPrompt, on_bad_record)


def read_zeroshot_qa(
    path: str | os.PathLike,
    on_bad_record: Literal["stop", "skip"] = "stop",
    answers: str | os.PathLike | None = None,
) -> ReadResult[ZeroShotQA]:
    """Zero-shot QA records: merged in `path`, or questions in `path` and their answers in
    `answers`, joined by question_id. A question without an answer, or an answer without a
    question, is a bad record of its file; in skip mode the unanswered question is left out."""
    if answers is None:
        return read_records(path, ZeroShotQA, on_bad_record)
    _check_policy(on_bad_record)
    return _parse(_joined_entries(Path(path), Path(answers)), ZeroShotQA, on_bad_record)


def read_generic_qa(path: str | os.PathLike, on_bad_record: Literal["stop", "skip"] = "stop") -> ReadResult[GenericQA]:
    return read_records(path, GenericQA, on_bad_record)


def read_consistency_qa(path: str | os.PathLike, on_bad_record: Literal["stop", "skip"] = "stop") -> ReadResult[ConsistencyQA]:
    return read_records(path, ConsistencyQA, on_bad_record)


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Atomically write records as a JSON list, or as JSONL when `path` is named *.jsonl."""
    rows = [r.to_dict() for r in records]
    if Path(path).suffix.lower() == ".jsonl":
        write_jsonl(path, rows)
    else:
        write_json(path, rows)


# --------------------------------------------------------------------------- curriculum


D = TypeVar("D", bound=Dialogue)


def answer_words(record: Dialogue) -> int:
    return len(record.answer().split())


def curriculum_split(
    records: Sequence[D], threshold_words: int | None = None, quantile: float | None = None
) -> tuple[list[D], list[D], int]:
    """Split into easy (answer of at most `threshold` words) and hard (longer) records.

    Exactly one of `threshold_words` and `quantile` is given; a quantile picks the threshold
    from the data, as an answer length that occurs in it (so ties stay together on the easy
    side). Order within each split is the input order.
    """
    if (threshold_words is None) == (quantile is None):
        raise ValueError("curriculum_split: give exactly one of threshold_words and quantile")
    lengths = [answer_words(r) for r in records]
    if quantile is not None:
        if not 0 < quantile <= 1:
            raise ValueError(f"curriculum_split: quantile must be in (0, 1], got {quantile}")
        if not lengths:
            raise ValueError("curriculum_split: no records to take a quantile of")
        threshold = int(np.quantile(lengths, quantile, method="lower"))
    else:
        threshold = threshold_words
    easy = [r for r, n in zip(records, lengths) if n <= threshold]
    hard = [r for r, n in zip(records, lengths) if n > threshold]
    return easy, hard, threshold
