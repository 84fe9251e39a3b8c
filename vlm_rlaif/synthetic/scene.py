"""Scenes of the synthetic world: the exact ground truth of one video.

A scene holds one to three objects (a colour, a shape, a motion, a track of positions) and
events in time (an object enters, leaves, or changes colour at a frame). The renderer draws
it, the describer words it and the oracle scores free text against it. Everything is drawn
from a numpy Generator, so the world's seed fixes every scene; `difficulty` in [0, 1] moves
the distribution towards more objects, more events and subtler cues (smaller objects,
easily confused colours, shorter motions, background noise and clutter).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "orange": (240, 140, 20),
    "yellow": (230, 215, 40),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "purple": (150, 60, 195),
    "white": (235, 235, 235),
}
# Pairs a small vision tower confuses more easily; hard scenes put them together more often.
SIMILAR_COLOURS = {
    frozenset(pair)
    for pair in [("red", "orange"), ("orange", "yellow"), ("yellow", "white"), ("blue", "purple"), ("purple", "red"), ("green", "yellow")]
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
MOTIONS = ("still", "right", "left", "down", "up")
EVENT_KINDS = ("enters", "leaves", "changes_colour")
DIRECTION = {"still": (0, 0), "right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}
# Boxes of two visible objects stay this many pixels apart, so no object ever hides another.
MIN_GAP = 2


class SceneError(ValueError):
    """A scene record that does not describe a valid scene; the message names the key."""


@dataclass
class SceneObject:
    colour: str
    shape: str  # unique within a scene, so the shape names the object
    motion: str
    size: int  # side of the bounding box, pixels
    rgb: list[int]  # the drawn colour: the named colour with a per-object shade
    track: list[list[int]]  # centre [x, y] at every frame, also where the object is hidden

    def box(self, t: int) -> tuple[int, int]:
        """Top-left corner of the object's box at frame t."""
        x, y = self.track[t]
        return x - self.size // 2, y - self.size // 2


@dataclass
class Event:
    kind: str
    shape: str  # the object it happens to
    frame: int  # first frame showing the outcome: visible from, gone from, or recoloured from
    colour: str | None = None  # the new colour (changes_colour only)
    rgb: list[int] | None = None


@dataclass
class Scene:
    video_id: str
    num_frames: int
    frame_size: int
    difficulty: float
    background: list[int]
    noise: float  # standard deviation of the per-pixel background noise
    clutter: list[list[int]]  # [x, y, size, grey] specks drawn under the objects
    render_seed: int
    objects: list[SceneObject]
    events: list[Event]  # sorted by frame

    def object(self, shape: str) -> SceneObject:
        return next(o for o in self.objects if o.shape == shape)

    def span(self, obj: SceneObject) -> tuple[int, int]:
        """Frames [first, end) in which the object is visible."""
        first, end = 0, self.num_frames
        for e in self.events:
            if e.shape == obj.shape and e.kind == "enters":
                first = e.frame
            elif e.shape == obj.shape and e.kind == "leaves":
                end = e.frame
        return first, end

    def visible(self, obj: SceneObject, t: int) -> bool:
        first, end = self.span(obj)
        return first <= t < end

    def colour_at(self, obj: SceneObject, t: int) -> str:
        change = self._change(obj, t)
        return change.colour if change else obj.colour

    def rgb_at(self, obj: SceneObject, t: int) -> list[int]:
        change = self._change(obj, t)
        return change.rgb if change else obj.rgb

    def _change(self, obj: SceneObject, t: int) -> Event | None:
        return next((e for e in self.events if e.shape == obj.shape and e.kind == "changes_colour" and e.frame <= t), None)

    def colours(self, obj: SceneObject) -> set[str]:
        """Every colour the object has at some time."""
        return {obj.colour} | {e.colour for e in self.events if e.shape == obj.shape and e.colour}

    def palette(self) -> set[str]:
        """Every colour any object has at any time."""
        return set().union(*(self.colours(o) for o in self.objects))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: Any, where: str = "scene") -> Scene:
        """Validate a scene record (scenes.json); errors name the record and the key."""
        if not isinstance(record, dict):
            raise SceneError(f"{where}: expected an object, got {type(record).__name__}")
        try:
            return cls._from_dict(record)
        except SceneError as e:
            raise SceneError(f"{where} {record.get('video_id', '?')}: {e}") from None

    @classmethod
    def _from_dict(cls, record: dict) -> Scene:
        num_frames = _get(record, "num_frames", int)
        objects = [_object(o, num_frames, f"objects[{i}]") for i, o in enumerate(_get(record, "objects", list))]
        _require(len(objects) > 0, "objects", "a scene needs at least one object")
        shapes = [o.shape for o in objects]
        _require(len(set(shapes)) == len(shapes), "objects", f"shapes must be unique, got {shapes}")
        events = [_event(e, num_frames, shapes, f"events[{i}]") for i, e in enumerate(_get(record, "events", list))]
        return cls(
            video_id=_get(record, "video_id", str),
            num_frames=num_frames,
            frame_size=_get(record, "frame_size", int),
            difficulty=float(_get(record, "difficulty", (int, float))),
            background=_int_list(_get(record, "background", list), 3, "background"),
            noise=float(_get(record, "noise", (int, float))),
            clutter=[_int_list(c, 4, f"clutter[{i}]") for i, c in enumerate(_get(record, "clutter", list))],
            render_seed=_get(record, "render_seed", int),
            objects=objects,
            events=sorted(events, key=lambda e: e.frame),
        )


def _require(ok: bool, path: str, message: str) -> None:
    if not ok:
        raise SceneError(f"{path}: {message}")


def _get(record: Any, key: str, kind: type | tuple[type, ...], path: str = "") -> Any:
    """record[key], checked against `kind`; `path` locates the record inside the scene."""
    _require(isinstance(record, dict), path or "record", "expected an object")
    where = f"{path}.{key}" if path else key
    _require(key in record, where, "missing")
    value = record[key]
    names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
    _require(isinstance(value, kind) and not isinstance(value, bool), where, f"expected {names}, got {value!r}")
    return value


def _int_list(value: Any, length: int, path: str) -> list[int]:
    ok = isinstance(value, list) and len(value) == length and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    _require(ok, path, f"expected {length} integers, got {value!r}")
    return value


def _one_of(record: dict, key: str, options: tuple[str, ...] | dict, path: str) -> str:
    value = _get(record, key, str, path)
    _require(value in options, f"{path}.{key}", f"{value!r} is not one of {list(options)}")
    return value


def _object(record: Any, num_frames: int, path: str) -> SceneObject:
    track = _get(record, "track", list, path)
    _require(len(track) == num_frames, f"{path}.track", f"needs {num_frames} positions, got {len(track)}")
    return SceneObject(
        colour=_one_of(record, "colour", COLOURS, path),
        shape=_one_of(record, "shape", SHAPES, path),
        motion=_one_of(record, "motion", MOTIONS, path),
        size=_get(record, "size", int, path),
        rgb=_int_list(_get(record, "rgb", list, path), 3, f"{path}.rgb"),
        track=[_int_list(p, 2, f"{path}.track[{t}]") for t, p in enumerate(track)],
    )


def _event(record: Any, num_frames: int, shapes: list[str], path: str) -> Event:
    kind = _one_of(record, "kind", EVENT_KINDS, path)
    frame = _get(record, "frame", int, path)
    _require(0 < frame < num_frames, f"{path}.frame", f"{frame} is outside 1..{num_frames - 1}")
    event = Event(kind, _one_of(record, "shape", tuple(shapes), path), frame)
    if kind == "changes_colour":
        event.colour = _one_of(record, "colour", COLOURS, path)
        event.rgb = _int_list(_get(record, "rgb", list, path), 3, f"{path}.rgb")
    return event


# --------------------------------------------------------------------------- sampling


def sample_scene(
    rng: np.random.Generator, video_id: str, num_frames: int, frame_size: int, max_objects: int, difficulty: float
) -> Scene:
    """Draw one scene; a layout whose objects would touch is drawn again (with fewer objects
    after 100 failures, which only happens in frames too small for them)."""
    d = difficulty
    weights = np.exp((3 * d - 1) * np.arange(max_objects))
    n = 1 + int(rng.choice(max_objects, p=weights / weights.sum()))
    level = int(rng.integers(10, 31 + int(40 * d)))
    background = [int(v) for v in np.clip(level + rng.integers(-6, 7, 3), 0, 255)]
    noise = round(float(18 * d * rng.uniform(0.5, 1.0)), 3)
    clutter = []
    for _ in range(int(rng.integers(0, int(round(8 * d)) + 1))):
        size = int(rng.integers(1, 3))
        x, y = (int(v) for v in rng.integers(0, frame_size - size + 1, 2))
        clutter.append([x, y, size, level + int(rng.integers(20, 50))])
    render_seed = int(rng.integers(2**31))
    while True:
        for _ in range(100):
            objects = _sample_objects(rng, n, num_frames, frame_size, d)
            events = _sample_events(rng, objects, num_frames, d)
            scene = Scene(video_id, num_frames, frame_size, d, background, noise, clutter, render_seed, objects, events)
            if _separated(scene):
                return scene
        n -= 1


def _pick_colour(rng: np.random.Generator, exclude: list[str], near: list[str], d: float) -> str:
    """A colour not in `exclude`; with probability 0.6*d one easily confused with a colour in `near`."""
    free = [c for c in COLOURS if c not in exclude]
    close = [c for c in free if any(frozenset((c, m)) in SIMILAR_COLOURS for m in near)]
    pool = close if close and rng.random() < 0.6 * d else free
    return pool[int(rng.integers(len(pool)))]


def _shade(rng: np.random.Generator, colour: str, d: float) -> list[int]:
    """The named colour, shifted per object; at most 26 per channel so names stay separable."""
    j = int(round(6 + 20 * d))
    return [int(v) for v in np.clip(np.array(COLOURS[colour]) + rng.integers(-j, j + 1, 3), 0, 255)]


def _sample_track(rng: np.random.Generator, motion: str, size: int, num_frames: int, frame_size: int, d: float) -> list[list[int]]:
    """Centres along a straight path that keeps the whole box inside the frame."""
    lo, hi = size // 2 + 1, frame_size - 1 - (size - size // 2)
    dx, dy = DIRECTION[motion]
    if dx == dy == 0:
        x, y = (int(v) for v in rng.integers(lo, hi + 1, 2))
        return [[x, y] for _ in range(num_frames)]
    distance = max(1, int(round(rng.uniform(0.45 - 0.2 * d, 0.75 - 0.2 * d) * (hi - lo))))
    low_end = int(rng.integers(lo, hi - distance + 1))
    across = int(rng.integers(lo, hi + 1))
    along = [low_end + int(round(distance * t / (num_frames - 1))) for t in range(num_frames)]
    if dx + dy < 0:
        along.reverse()
    return [[a, across] if dx else [across, a] for a in along]


def _sample_objects(rng: np.random.Generator, n: int, num_frames: int, frame_size: int, d: float) -> list[SceneObject]:
    colours: list[str] = []
    for _ in range(n):
        colours.append(_pick_colour(rng, colours, colours, d))
    shapes = [str(s) for s in rng.choice(SHAPES, size=n, replace=False)]
    objects = []
    for colour, shape in zip(colours, shapes):
        size = max(3, int(round(frame_size * (0.25 - 0.08 * d))) + int(rng.integers(-1, 2)))
        motion = MOTIONS[int(rng.integers(len(MOTIONS)))]
        track = _sample_track(rng, motion, size, num_frames, frame_size, d)
        objects.append(SceneObject(colour, shape, motion, size, _shade(rng, colour, d), track))
    return objects


def _sample_events(rng: np.random.Generator, objects: list[SceneObject], num_frames: int, d: float) -> list[Event]:
    """At most one event per object, at frames at least `gap` apart so that a video sampled at
    half its frames still shows which came first; each object stays visible for >= 2 frames."""
    gap = max(2, num_frames // 5)
    events: list[Event] = []
    colours = [o.colour for o in objects]
    for obj in objects:
        if rng.random() >= 0.15 + 0.55 * d:
            continue
        frames = [f for f in range(2, num_frames - 1) if all(abs(f - e.frame) >= gap for e in events)]
        if not frames:
            break
        event = Event(EVENT_KINDS[int(rng.integers(len(EVENT_KINDS)))], obj.shape, frames[int(rng.integers(len(frames)))])
        if event.kind == "changes_colour":
            event.colour = _pick_colour(rng, colours, [obj.colour], d)
            event.rgb = _shade(rng, event.colour, d)
            colours.append(event.colour)
        events.append(event)
    return sorted(events, key=lambda e: e.frame)


def _separated(scene: Scene) -> bool:
    """No two boxes come within MIN_GAP pixels while both objects are visible."""
    spans = [scene.span(o) for o in scene.objects]
    for i, a in enumerate(scene.objects):
        for j in range(i + 1, len(scene.objects)):
            b = scene.objects[j]
            for t in range(max(spans[i][0], spans[j][0]), min(spans[i][1], spans[j][1])):
                (ax, ay), (bx, by) = a.box(t), b.box(t)
                gap_x = max(ax - (bx + b.size), bx - (ax + a.size))
                gap_y = max(ay - (by + b.size), by - (ay + a.size))
                if max(gap_x, gap_y) < MIN_GAP:
                    return False
    return True
