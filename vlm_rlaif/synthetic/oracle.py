"""The exact judge of the synthetic world: free text -> facts, scored against the scene.

Model output may be ungrammatical, partial or repetitive, so reading is by pattern, not by
grammar: an object is any "<colour> <shape>" phrase; a motion or event phrase belongs to the
nearest object named before it in the same sentence; a count is "<number> object(s)"; events
are ordered as the text tells them. Each object named in the text is then matched to at most
one object of the scene (same colour and shape first, then same shape, then same colour), so
"a green circle" where the scene has a red circle costs the colour fact alone, and a name
that matches nothing is a hallucinated object. Facts are those of `language.Fact`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

from vlm_rlaif.synthetic.language import FACT_KINDS, NUMBER_WORDS, Fact, check_frames, describe, event_facts, object_facts
from vlm_rlaif.synthetic.scene import COLOURS, SHAPES, Scene

_COLOUR = "|".join(COLOURS)
_SHAPE = "|".join(SHAPES)
_NUMBERS = {w: i for i, w in enumerate(NUMBER_WORDS)} | {"zero": 0}
MENTION = re.compile(rf"\b({_COLOUR}) ({_SHAPE})(?:e?s)?\b")
COUNT = re.compile(rf"\b({'|'.join(_NUMBERS)}|\d+) objects?\b")
MOTION = [
    (re.compile(r"\bleft to (?:the )?right\b"), "right"),
    (re.compile(r"\bright to (?:the )?left\b"), "left"),
    (re.compile(r"\btop to (?:the )?bottom\b"), "down"),
    (re.compile(r"\bbottom to (?:the )?top\b"), "up"),
    (re.compile(r"\b(?:stays|stay|staying|remains|remain|is|keeps|stands) (?:completely )?still\b|\bstationary\b"), "still"),
    (re.compile(r"\b(?:does|do|did)(?: not|n't) move\b|\bnot moving\b|\bnever moves\b"), "still"),
    (re.compile(r"\b(?:moves|move|moving|moved|goes|go|going|travels|slides|drifts)(?: to the| towards the| toward the)? (left|right|up|down)(?:wards?)?\b"), None),
    (re.compile(r"\b(left|right|up|down)wards?\b"), None),
]
EVENT = [
    (re.compile(r"\b(?:enters|enter|entering|entered|appears|appear|appearing|appeared|comes in)\b"), "enters"),
    (re.compile(r"\b(?:leaves|leave|leaving|disappears|disappear|disappearing|disappeared|exits|exit|exiting|exited)\b"), "leaves"),
    (
        re.compile(
            rf"\b(?:turns|turn|turning|turned|becomes|become|becoming|became|changes|change|changing|changed)"
            rf"(?: its)?(?: colour)?(?: from (?:{_COLOUR}))?(?: to| into)?(?: an?)? ({_COLOUR})\b"
        ),
        "changes_colour",
    ),
]


@dataclass
class OracleScore:
    """Facts stated and true, facts of the scene not stated, and stated facts that are false.

    Edge cases: with nothing to state (an empty clip) and nothing stated, all scores are 1;
    stating nothing about a non-empty scene scores 0 precision and 0 recall.
    """

    true_facts: list[str] = field(default_factory=list)
    missed_facts: list[str] = field(default_factory=list)
    hallucinated: list[str] = field(default_factory=list)
    precision: float = 0.0
    recall: float = 0.0
    f1: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def as_scene(scene: Scene | Mapping) -> Scene:
    return scene if isinstance(scene, Scene) else Scene.from_dict(scene)


def _normalise(text: str) -> str:
    return text.lower().replace("color", "colour").replace("’", "'")


def _sentences(text: str) -> list[str]:
    return [" ".join(re.findall(r"[a-z0-9']+", s)) for s in re.split(r"[.!?;:\n]+", _normalise(text))]


def _motions(sentence: str) -> list[tuple[int, str]]:
    """(position, motion) of every motion phrase, a phrase's span claimed by the first pattern."""
    found, taken = [], []
    for pattern, motion in MOTION:
        for m in pattern.finditer(sentence):
            if not any(a < m.end() and m.start() < b for a, b in taken):
                taken.append(m.span())
                found.append((m.start(), motion or m.group(1)))
    return sorted(found)


def _events(sentence: str) -> list[tuple[int, str, str | None]]:
    found = []
    for pattern, kind in EVENT:
        for m in pattern.finditer(sentence):
            found.append((m.start(), kind, m.group(1) if kind == "changes_colour" else None))
    return sorted(found)


@dataclass
class Reading:
    """What a text states, before it is matched to a scene."""

    names: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (colour, shape) -> motions
    events: list[tuple[tuple[str, str], str, str | None]] = field(default_factory=list)
    counts: set[int] = field(default_factory=set)


def read(text: str) -> Reading:
    """What the text states: named objects with their motions, events in order, counts."""
    reading = Reading()
    for sentence in _sentences(text):
        mentions = [(m.start(), (m.group(1), m.group(2))) for m in MENTION.finditer(sentence)]
        for _, name in mentions:
            reading.names.setdefault(name, set())
        reading.counts |= {_number(m.group(1)) for m in COUNT.finditer(sentence)}
        for pos, motion in _motions(sentence):
            if owner := _owner(mentions, pos):
                reading.names[owner].add(motion)
        for pos, kind, colour in _events(sentence):
            if owner := _owner(mentions, pos):
                reading.events.append((owner, kind, colour))
    return reading


def _owner(mentions: list[tuple[int, tuple[str, str]]], pos: int) -> tuple[str, str] | None:
    """The object named last before `pos`: the subject of a motion or event phrase."""
    return next((name for start, name in reversed(mentions) if start < pos), None)


def _number(word: str) -> int:
    return int(word) if word.isdigit() else _NUMBERS[word]


def _align(names: Iterable[tuple[str, str]], scene_objects: Mapping[str, str]) -> dict[tuple[str, str], str]:
    """Label every named object with the scene object it is about (its shape), matching the
    same colour and shape first, then the same shape, then the same colour; unmatched names
    become "extra <colour> <shape>"."""
    free = dict(scene_objects)  # shape -> colour, of scene objects not matched yet
    names = list(names)
    subject: dict[tuple[str, str], str] = {}
    for fields in ((0, 1), (1,), (0,)):  # (colour, shape) must agree on: both, the shape, the colour
        for name in names:
            if name in subject:
                continue
            match = next((s for s, c in free.items() if all((c, s)[i] == name[i] for i in fields)), None)
            if match:
                subject[name] = match
                del free[match]
    return {name: subject.get(name, f"extra {name[0]} {name[1]}") for name in names}


def read_facts(scene: Scene | Mapping, text: str, frames: tuple[int, int] | None = None) -> set[Fact]:
    """The facts `text` states about the video (or the clip of frames [start, end))."""
    scene = as_scene(scene)
    if not isinstance(text, str):
        raise ValueError(f"{scene.video_id}: expected the text to score as a string, got {type(text).__name__}")
    truth = describe(scene, frames)
    reading = read(text)
    labels = _align(reading.names, {o.subject: o.colour for o in truth.objects})
    facts = {Fact("count", "", str(n)) for n in reading.counts}
    for (colour, shape), motions in reading.names.items():
        facts |= object_facts(labels[(colour, shape)], colour, shape, motions)
    return facts | event_facts((labels[name], kind, colour) for name, kind, colour in reading.events)


def score_description(
    scene: Scene | Mapping, text: str, frames: tuple[int, int] | None = None, kinds: Iterable[str] | None = None
) -> OracleScore:
    """Score free text against the scene, or against the clip of frames [start, end).
    `kinds` keeps only some kinds of fact (e.g. ("event", "order") for temporal questions)."""
    scene = as_scene(scene)
    check_frames(scene, frames)
    truth, claimed = describe(scene, frames).facts(), read_facts(scene, text, frames)
    if kinds is not None:
        kinds = set(kinds)
        if not kinds <= set(FACT_KINDS):
            raise ValueError(f"unknown fact kinds {sorted(kinds - set(FACT_KINDS))}; known: {', '.join(FACT_KINDS)}")
        truth = {f for f in truth if f.kind in kinds}
        claimed = {f for f in claimed if f.kind in kinds}
    true = truth & claimed
    precision = len(true) / len(claimed) if claimed else float(not truth)
    recall = len(true) / len(truth) if truth else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return OracleScore(_texts(true), _texts(truth - claimed), _texts(claimed - truth), precision, recall, f1)


def _texts(facts: set[Fact]) -> list[str]:
    return sorted(str(f) for f in facts)


# --------------------------------------------------------------------------- short answers


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", _normalise(text))


def _yes_no(words: list[str]) -> str | None:
    return next((w for w in words if w in ("yes", "no")), None)


def _motion_set(text: str) -> set[str]:
    """Motions a short answer states; a bare "Left." or "Still." counts too."""
    sentence = " ".join(_words(text))
    found = {motion for _, motion in _motions(sentence)}
    return found or {w for w in sentence.split() if w in ("left", "right", "up", "down", "still")}


def _first_object(text: str) -> tuple[str | None, str] | None:
    """(colour or None, shape) of the first shape named."""
    m = re.search(rf"(?:\b({_COLOUR}) )?\b({_SHAPE})(?:e?s)?\b", " ".join(_words(text)))
    return (m.group(1), m.group(2)) if m else None


def _numbers(words: list[str]) -> set[int]:
    return {_number(w) for w in words if w.isdigit() or (w in _NUMBERS and w != "no")}


def score_answer(scene: Scene | Mapping, question_record: Mapping[str, Any], answer: str) -> bool:
    """Is a short answer right? The reference answer ("answer" or "A") says what kind of fact
    is asked: yes/no, a motion, an object (its shape decides; a colour given with it must be
    one the object has), a colour, or a number. Answers match whatever their wording:
    "red" == "Red." == "It is red."."""
    scene = as_scene(scene)
    if not isinstance(question_record, Mapping):
        raise ValueError(f"{scene.video_id}: expected a question record (a mapping), got {type(question_record).__name__}")
    reference = question_record.get("answer", question_record.get("A"))
    question = question_record.get("question", question_record.get("Q", ""))
    if not isinstance(reference, str) or not isinstance(question, str):
        raise ValueError(f"{scene.video_id}: question record needs string 'answer' (or 'A') and 'question' (or 'Q'), got keys {sorted(question_record)}")
    if not isinstance(answer, str):
        raise ValueError(f"{scene.video_id}: expected the answer as a string, got {type(answer).__name__}")
    ref, got = _words(reference), _words(answer)
    if (want := _yes_no(ref)) is not None:
        return _yes_no(got) == want
    if want := _motion_set(reference):
        return _motion_set(answer) == want
    if want := _first_object(reference):
        said = _first_object(answer)
        if said is None or said[1] != want[1]:
            return False
        shapes = {o.shape for o in scene.objects}
        allowed = scene.colours(scene.object(want[1])) if want[1] in shapes else {want[0]}
        return said[0] is None or said[0] in allowed
    if want := {w for w in ref if w in COLOURS}:
        asked = {w for w in _words(question) if w in COLOURS} - want
        return {w for w in got if w in COLOURS} - asked == want
    if want := _numbers(ref):
        return _numbers(got) == want
    return [w for w in got if w not in ("a", "an", "the")] == [w for w in ref if w not in ("a", "an", "the")]

