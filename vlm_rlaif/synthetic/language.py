"""The world's closed English grammar: short questions and answers, detailed descriptions,
clip captions, and corruptions that make a description worse by a known set of facts.

A description is built as a structure first (`Description`) and only then worded, so the
facts it states are known exactly; the oracle has to recover the same facts from the words.
Objects are named by colour and shape ("the red circle"), with the colour they have when
they are first seen in the video (or clip) described.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from itertools import combinations
from typing import Iterable, NamedTuple, Sequence, TypeVar

import numpy as np

from vlm_rlaif.synthetic.scene import COLOURS, MOTIONS, SHAPES, Scene, SceneObject
from vlm_rlaif.video import split_clips

NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
MOTION_PHRASES = {
    "still": "stays still",
    "right": "moves from left to right",
    "left": "moves from right to left",
    "down": "moves from top to bottom",
    "up": "moves from bottom to top",
}
MOTION_ANSWERS = {
    "still": "It stays still.",
    "right": "Left to right.",
    "left": "Right to left.",
    "down": "Top to bottom.",
    "up": "Bottom to top.",
}
GENERIC_QUESTIONS = (
    "What objects appear in the video, and what does each of them do?",
    "Can you describe everything that happens in this video?",
    "What can you see in this video?",
)
TEMPORAL_QUESTIONS = (
    "What happens in the video, in order?",
    "In what order do things happen in this video?",
    "What changes over the course of the video?",
)
CORRUPTIONS = ("wrong_colour", "wrong_shape", "wrong_motion", "hallucinated_object", "dropped_object", "swapped_events")
FACT_KINDS = ("count", "colour", "shape", "motion", "event", "order")
T = TypeVar("T")


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else str(n)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


# --------------------------------------------------------------------------- facts


class Fact(NamedTuple):
    """One checkable statement about a video or clip.

    `subject` is the scene object's shape (shapes are unique within a scene), "extra <colour>
    <shape>" for an object the scene does not hold, or "" for the object count.
    """

    kind: str
    subject: str
    value: str

    def __str__(self) -> str:
        if self.kind == "count":
            return f"{self.value} objects"
        if self.kind == "event":
            return f"{self.subject} {self.value}"
        if self.kind == "order":
            return f"{self.subject} before {self.value}"
        return f"{self.subject} {self.kind} {self.value}"


def object_facts(label: str, colour: str, shape: str, motions: Iterable[str]) -> set[Fact]:
    return {Fact("colour", label, colour), Fact("shape", label, shape)} | {Fact("motion", label, m) for m in motions}


def event_facts(events: Iterable[tuple[str, str, str | None]]) -> set[Fact]:
    """Facts of (label, kind, new colour) events stated in this order: each event, and for
    every pair which one comes first. The order facts leave out the new colour, so a wrong
    colour costs the event fact alone."""
    facts, order = set(), []
    for label, kind, colour in events:
        facts.add(Fact("event", label, f"turns {colour}" if kind == "changes_colour" else kind))
        key = f"{label} {kind.replace('_', ' ')}"
        if key not in order:
            order.append(key)
    return facts | {Fact("order", a, b) for a, b in combinations(order, 2)}


# --------------------------------------------------------------------------- descriptions


@dataclass
class ObjectStatement:
    subject: str | None  # shape of the scene object this is about; None: an object not in the scene
    colour: str
    shape: str
    motion: str

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"

    @property
    def label(self) -> str:
        return self.subject or f"extra {self.name}"


@dataclass
class EventStatement:
    obj: int  # index into Description.objects
    kind: str
    colour: str | None = None


@dataclass
class Description:
    noun: str  # "video" or "clip"
    count: int
    objects: list[ObjectStatement]
    events: list[EventStatement]  # in the order the description tells them

    def facts(self) -> set[Fact]:
        facts = {Fact("count", "", str(self.count))}
        for o in self.objects:
            facts |= object_facts(o.label, o.colour, o.shape, [o.motion])
        return facts | event_facts((self.objects[e.obj].label, e.kind, e.colour) for e in self.events)

    def text(self) -> str:
        head = f"The {self.noun} shows {number_word(self.count)} object{'' if self.count == 1 else 's'}."
        body = [f"{capitalise(article(o.colour))} {o.name} {MOTION_PHRASES[o.motion]}." for o in self.objects]
        return " ".join([head, *body, self.event_text()])

    def event_text(self) -> str:
        """The events in order ("First, ... Then ... Finally, ..."), or that there are none."""
        if not self.events:
            return f"Nothing enters, leaves or changes colour in the {self.noun}."
        n = len(self.events)
        steps = ["Later, "] if n == 1 else ["First, "] + ["Then "] * (n - 2) + ["Finally, " if n > 2 else "Then "]
        clauses = [event_clause(self.objects[e.obj].name, e.kind, e.colour) for e in self.events]
        return " ".join(f"{step}{clause}." for step, clause in zip(steps, clauses))


def event_clause(name: str, kind: str, colour: str | None) -> str:
    return f"the {name} " + (f"turns {colour}" if kind == "changes_colour" else kind)


def check_frames(scene: Scene, frames: tuple[int, int] | None) -> tuple[int, int]:
    if frames is None:
        return 0, scene.num_frames
    start, end = frames
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= scene.num_frames):
        raise ValueError(f"{scene.video_id}: frames {frames!r} must satisfy 0 <= start < end <= {scene.num_frames}")
    return start, end


def clip_ranges(num_frames: int, num_clips: int) -> list[tuple[int, int]]:
    """Frames [start, end) of each clip, cut exactly as `video.split_clips` cuts a video for
    the preferences stage, so the world's clip captions describe the clips the SFT model sees."""
    return [(int(clip[0]), int(clip[-1]) + 1) for clip in split_clips(num_frames, num_clips)]


def describe(scene: Scene, frames: tuple[int, int] | None = None) -> Description:
    """The correct description of the video, or of the clip of frames [start, end): every
    object seen, in the order it is first seen (then left to right), with the colour it has
    then; and the events that happen inside the clip, in order."""
    start, end = check_frames(scene, frames)
    seen = []
    for obj in scene.objects:
        first, stop = scene.span(obj)
        t0 = max(first, start)
        if t0 < min(stop, end):
            seen.append((t0, obj.track[t0][0], obj.track[t0][1], obj))
    seen.sort(key=lambda s: s[:3])
    objects = [ObjectStatement(obj.shape, scene.colour_at(obj, t0), obj.shape, obj.motion) for t0, _, _, obj in seen]
    index = {o.subject: i for i, o in enumerate(objects)}
    events = [EventStatement(index[e.shape], e.kind, e.colour) for e in scene.events if start < e.frame < end]
    return Description("video" if frames is None else "clip", len(objects), objects, events)


def generic_question(rng: np.random.Generator) -> str:
    return GENERIC_QUESTIONS[int(rng.integers(len(GENERIC_QUESTIONS)))]


def temporal_question(rng: np.random.Generator) -> str:
    return TEMPORAL_QUESTIONS[int(rng.integers(len(TEMPORAL_QUESTIONS)))]


# --------------------------------------------------------------------------- short questions


@dataclass
class QA:
    type: str
    question: str
    answer: str
    wrong: str  # a plausible answer with the one asked-for fact wrong


@dataclass
class Ask:
    """A question with all its phrasings, so two of them can ask the same thing."""

    type: str
    phrasings: list[str]
    answer: str
    wrong: str


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def asks(scene: Scene, rng: np.random.Generator) -> list[Ask]:
    """Every kind of short question that fits this scene, one instance each."""
    objects, events = scene.objects, scene.events
    changes = [e for e in events if e.kind == "changes_colour"]
    out = []

    obj = _pick(rng, objects)
    when = " at the start" if any(e.shape == obj.shape for e in changes) else ""
    out.append(Ask(
        "colour",
        [f"What colour is the {obj.shape}{when}?", f"What is the colour of the {obj.shape}{when}?", f"Which colour does the {obj.shape} have{when}?"],
        f"{capitalise(obj.colour)}.",
        f"{capitalise(_pick(rng, _others(obj.colour, list(COLOURS))))}.",
    ))
    obj = _pick(rng, objects)
    out.append(Ask(
        "shape",
        [f"What shape is the {obj.colour} object?", f"What is the shape of the {obj.colour} object?", f"Which shape does the {obj.colour} object have?"],
        f"A {obj.shape}.",
        f"A {_pick(rng, _others(obj.shape, list(SHAPES)))}.",
    ))
    n = len(objects)
    out.append(Ask(
        "count",
        ["How many objects are in the video?", "How many objects appear in the video?", "What is the number of objects in the video?"],
        f"{capitalise(number_word(n))}.",
        f"{capitalise(number_word(_pick(rng, _others(n, [1, 2, 3, 4]))))}.",
    ))
    obj = _pick(rng, objects)
    out.append(Ask(
        "motion",
        [f"How does the {_named(obj)} move?", f"In which direction does the {_named(obj)} move?", f"What is the motion of the {_named(obj)}?"],
        MOTION_ANSWERS[obj.motion],
        MOTION_ANSWERS[_pick(rng, _others(obj.motion, list(MOTIONS)))],
    ))
    obj = _pick(rng, objects)
    moves = obj.motion != "still"
    out.append(Ask("moves", [f"Does the {_named(obj)} move?", f"Is the {_named(obj)} moving?"], "Yes." if moves else "No.", "No." if moves else "Yes."))

    absent = [f"{c} {s}" for c in COLOURS for s in SHAPES if not any(o.shape == s and c in scene.colours(o) for o in objects)]
    name, present = (_named(_pick(rng, objects)), True) if rng.random() < 0.5 else (_pick(rng, absent), False)
    out.append(Ask(
        "exists",
        [f"Is there {article(name)} {name} in the video?", f"Does the video show {article(name)} {name}?"],
        "Yes." if present else "No.",
        "No." if present else "Yes.",
    ))
    kind = _pick(rng, ["enters", "leaves", "changes_colour"])
    happens = any(e.kind == kind for e in events)
    phrasings = {
        "enters": ["Does any object enter the video?", "Does an object appear during the video?"],
        "leaves": ["Does any object leave the video?", "Does an object disappear during the video?"],
        "changes_colour": ["Does any object change colour?", "Does an object change its colour during the video?"],
    }[kind]
    out.append(Ask("any_event", phrasings, "Yes." if happens else "No.", "No." if happens else "Yes."))

    for kind, phrasings in (
        ("enters", ["Which object enters the video?", "What object appears during the video?"]),
        ("leaves", ["Which object leaves the video?", "What object disappears during the video?"]),
    ):
        matching = [e for e in events if e.kind == kind]
        if len(matching) == 1:
            obj = scene.object(matching[0].shape)
            out.append(Ask(f"which_{kind}", phrasings, f"The {_named(obj)}.", f"The {_wrong_name(scene, obj, rng)}."))
    if changes:
        change = _pick(rng, changes)
        obj = scene.object(change.shape)
        out.append(Ask(
            "which_changes",
            [f"Which object turns {change.colour}?", f"What object becomes {change.colour}?"],
            f"The {_named(obj)}.",
            f"The {_wrong_name(scene, obj, rng)}.",
        ))
        out.append(Ask(
            "new_colour",
            [f"What colour does the {_named(obj)} turn?", f"What colour does the {_named(obj)} change to?", f"Into which colour does the {_named(obj)} change?"],
            f"{capitalise(change.colour)}.",
            f"{capitalise(_pick(rng, [c for c in COLOURS if c not in (change.colour, obj.colour)]))}.",
        ))
    if len(events) >= 2:
        i, j = sorted(int(v) for v in rng.choice(len(events), size=2, replace=False))
        first, later = (event_clause(_named(scene.object(e.shape)), e.kind, e.colour) for e in (events[i], events[j]))
        a, b = (first, later) if rng.random() < 0.5 else (later, first)
        out.append(Ask(
            "order",
            [f"Which happens first: {a} or {b}?", f"What happens earlier: {a} or {b}?"],
            f"{capitalise(first)}.",
            f"{capitalise(later)}.",
        ))
    return out


def _others(value: object, pool: list) -> list:
    return [v for v in pool if v != value]


def _named(obj: SceneObject) -> str:
    return f"{obj.colour} {obj.shape}"


def _wrong_name(scene: Scene, obj: SceneObject, rng: np.random.Generator) -> str:
    """Another object of the scene, or else an object the scene does not hold."""
    rest = [f"{o.colour} {o.shape}" for o in scene.objects if o is not obj]
    if rest:
        return _pick(rng, rest)
    colour = _pick(rng, [c for c in COLOURS if c not in scene.palette()])
    return f"{colour} {_pick(rng, [s for s in SHAPES if s != obj.shape])}"


def short_questions(scene: Scene, rng: np.random.Generator, n: int) -> list[QA]:
    """n distinct short questions, each in a randomly chosen phrasing. Kinds are spread evenly:
    every kind that fits the scene once (in random order) before any kind twice; fewer than n
    if the scene runs out of distinct questions."""
    out: list[QA] = []
    asked: set[str] = set()
    for _ in range(n):
        fresh = [ask for ask in asks(scene, rng) if ask.phrasings[0] not in asked]
        for i in rng.choice(len(fresh), size=min(n - len(out), len(fresh)), replace=False):
            ask = fresh[i]
            asked.add(ask.phrasings[0])
            out.append(QA(ask.type, _pick(rng, ask.phrasings), ask.answer, ask.wrong))
        if len(out) == n:
            break
    return out


def consistency_question(scene: Scene, rng: np.random.Generator) -> tuple[str, str, str]:
    """Two phrasings of one short question, and its answer."""
    ask = _pick(rng, asks(scene, rng))
    i, j = rng.choice(len(ask.phrasings), size=2, replace=False)
    return ask.phrasings[i], ask.phrasings[j], ask.answer


# --------------------------------------------------------------------------- corruptions


@dataclass
class Corruption:
    description: Description
    ops: list[str]
    changed: list[str]  # the facts that differ from the input description: now missed or hallucinated


def corrupt(scene: Scene, desc: Description, k: int, rng: np.random.Generator, frames: tuple[int, int] | None = None) -> Corruption:
    """Make `desc` worse by k changes, each drawn from CORRUPTIONS and each touching a part of
    the description that is still correct, so every change costs at least one true fact and
    the result scores strictly lower. The stated count follows an added or dropped object
    while it is still right (once wrong it stays, so no later change repairs it), and a drop
    always leaves one real object, so some fact stays true. `changed` lists every fact that
    moved, exactly."""
    truth = describe(scene, frames)
    out = copy.deepcopy(desc)
    ops: list[str] = []
    for _ in range(k):
        options = _options(scene, truth, out)
        if not options:
            raise ValueError(f"{scene.video_id}: cannot make {k} changes to this description (made {len(ops)})")
        op = _pick(rng, list(options))
        _apply(scene, truth, out, op, _pick(rng, options[op]), rng)
        ops.append(op)
    return Corruption(out, ops, sorted(str(f) for f in desc.facts() ^ out.facts()))


def with_unseen_object(scene: Scene, truth: Description) -> Description:
    """The video's description (`truth`, from `describe`) with one more object, told last and
    counted, that the video does not show: the writer's stock addition, the first colour and
    shape the scene lacks, standing still, so the words alone predict it as a habit would."""
    out = copy.deepcopy(truth)
    colours, shapes = _spares(scene, out)
    if colours and shapes:
        out.objects.append(ObjectStatement(None, colours[0], shapes[0], "still"))
        out.count += 1
    return out


def _spares(scene: Scene, desc: Description) -> tuple[list[str], list[str]]:
    """Colours and shapes neither the scene nor the description uses: a name built from them
    cannot be mistaken for any real object."""
    colours = [c for c in COLOURS if c not in scene.palette() and c not in {o.colour for o in desc.objects}]
    shapes = [s for s in SHAPES if s not in {o.shape for o in scene.objects} | {o.shape for o in desc.objects}]
    return colours, shapes


def _options(scene: Scene, truth: Description, desc: Description) -> dict[str, list[int]]:
    """Applicable changes, each with its targets: the object to change or drop, the place to
    insert a made-up object at, or i for the adjacent events (i, i + 1) to swap."""
    right = {o.subject: o for o in truth.objects}
    rank = {(truth.objects[e.obj].label, e.kind): i for i, e in enumerate(truth.events)}
    ranks = [rank.get((desc.objects[e.obj].label, e.kind)) for e in desc.events]
    misordered = set()
    for i, j in combinations(range(len(ranks)), 2):
        if ranks[i] is not None and ranks[j] is not None and ranks[i] > ranks[j]:
            misordered |= {desc.events[i].obj, desc.events[j].obj}
    clean = [
        i
        for i, o in enumerate(desc.objects)
        if o.subject in right and o == right[o.subject] and i not in misordered
    ]
    colours, shapes = _spares(scene, desc)
    options: dict[str, list[int]] = {}
    if clean and colours:
        options["wrong_colour"] = clean
    if clean and shapes:
        options["wrong_shape"] = clean
    if clean:
        options["wrong_motion"] = clean
    if colours and shapes:
        options["hallucinated_object"] = list(range(len(desc.objects) + 1))
    if clean and sum(o.subject is not None for o in desc.objects) >= 2:
        options["dropped_object"] = clean
    pairs = [i for i in range(len(ranks) - 1) if ranks[i] is not None and ranks[i + 1] is not None and ranks[i] < ranks[i + 1]]
    if pairs:
        options["swapped_events"] = pairs
    return options


def _apply(scene: Scene, truth: Description, desc: Description, op: str, target: int, rng: np.random.Generator) -> None:
    colours, shapes = _spares(scene, desc)
    if op == "wrong_colour":
        desc.objects[target].colour = _pick(rng, colours)
    elif op == "wrong_shape":
        desc.objects[target].shape = _pick(rng, shapes)
    elif op == "wrong_motion":
        desc.objects[target].motion = _pick(rng, [m for m in MOTIONS if m != desc.objects[target].motion])
    elif op == "hallucinated_object":
        desc.objects.insert(target, ObjectStatement(None, _pick(rng, colours), _pick(rng, shapes), _pick(rng, list(MOTIONS))))
        for e in desc.events:
            if e.obj >= target:
                e.obj += 1
        if desc.count == truth.count:
            desc.count += 1
    elif op == "dropped_object":
        del desc.objects[target]
        desc.events = [e for e in desc.events if e.obj != target]
        for e in desc.events:
            if e.obj > target:
                e.obj -= 1
        if desc.count == truth.count:
            desc.count -= 1
    elif op == "swapped_events":
        desc.events[target], desc.events[target + 1] = desc.events[target + 1], desc.events[target]
    else:
        raise ValueError(f"unknown corruption {op!r}; known: {', '.join(CORRUPTIONS)}")
