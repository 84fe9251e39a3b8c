"""Video input: frames sampled uniformly from a video file, a frame folder or a frame list.

The release stores each video as a folder of 50 pre-extracted jpg frames and lists them in a
record's "images" field; benchmarks name raw videos (mp4 and friends, MSVD's avi, TGIF's
animated GIFs), often without extension and, for ActivityNet, without the "v_" its files
carry. Every source ends up as the same uint8 array [T, H, W, 3] in RGB, with T frames
picked by `np.linspace` over the whole video exactly as the paper does, so a model sees the
same frames whichever way the video is stored.

Video files are decoded with decord when it is installed and can read the file (it decodes
only the sampled frames), otherwise with PyAV (sequential decoding); GIFs go to PyAV, as
decord cannot count their frames. A source that neither can read raises `VideoError`
naming the file.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Literal, Sequence

import av
import numpy as np
from PIL import Image

from vlm_rlaif.errors import InputError

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov", ".gif", ".m4v", ".mpg", ".mpeg")
PYAV_ONLY = (".gif",)  # decord fails to measure an animated GIF's length
# ActivityNet's video files are v_<YouTube id>; ActivityNet-QA's questions name the bare id.
ACTIVITYNET_PREFIX = "v_"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

Backend = Literal["auto", "decord", "pyav"]
VideoSource = str | os.PathLike | Sequence[str | os.PathLike]


class VideoError(InputError):
    """A video or frame source that cannot be read; the message names the file."""


# --------------------------------------------------------------------------- frame choice


def sample_indices(total: int, num_frames: int) -> np.ndarray:
    """Indices of `num_frames` frames spread uniformly over `total` (repeats when total < N)."""
    if total < 1:
        raise ValueError(f"cannot sample frames from a video of {total} frames")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return np.linspace(0, total - 1, num_frames).round().astype(np.int64)


def split_clips(total: int, num_clips: int, max_clip_frames: int | None = None) -> list[np.ndarray]:
    """Split frames 0..total-1 into `num_clips` contiguous clips of near-equal length.

    The clips are what the SFT model captions to build the judge's context (the paper: 50
    frames, clips of at most 20 frames, 3 clips best). A clip longer than `max_clip_frames`
    keeps that many of its frames, spread uniformly from its first to its last.
    """
    if num_clips < 1:
        raise ValueError(f"num_clips must be >= 1, got {num_clips}")
    if total < num_clips:
        raise ValueError(f"cannot split {total} frames into {num_clips} clips")
    if max_clip_frames is not None and max_clip_frames < 1:
        raise ValueError(f"max_clip_frames must be >= 1, got {max_clip_frames}")
    bounds = np.linspace(0, total, num_clips + 1).round().astype(np.int64)
    clips = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        clip = np.arange(start, stop)
        if max_clip_frames is not None and len(clip) > max_clip_frames:
            clip = clip[sample_indices(len(clip), max_clip_frames)]
        clips.append(clip)
    return clips


# --------------------------------------------------------------------------- paths


def natural_key(name: str) -> list[str | int]:
    """Sort key that orders embedded numbers by value: frame_2 before frame_10."""
    return [int(part) if i % 2 else part.lower() for i, part in enumerate(re.split(r"([0-9]+)", name))]


def list_frames(folder: str | os.PathLike) -> list[Path]:
    """The frame images of a folder in natural order; hidden files are not frames."""
    folder = Path(folder)
    frames = [
        p for p in folder.iterdir()
        if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
    ]
    if not frames:
        raise VideoError(f"{folder}: frame folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
    return sorted(frames, key=lambda p: natural_key(p.name))


def safe_join(root: str | os.PathLike, relative: str | os.PathLike) -> Path:
    """`root / relative`, refusing a path that leaves `root`.

    The check is on the normalised path, not the resolved one, so a symlink that the user
    placed under the root (a DVC cache link, a mounted dataset) still counts as inside.
    """
    if not str(relative):
        raise VideoError(f"empty path under video root {root}")
    base = os.path.abspath(root)
    joined = os.path.normpath(os.path.join(base, relative))
    if os.path.commonpath([base, joined]) != base or joined == base:
        raise VideoError(f"{relative}: path leaves the video root {root}")
    return Path(joined)


def _named_variants(path: Path) -> list[Path]:
    """The name as given, then with ActivityNet's prefix unless it has it already."""
    if path.name.startswith(ACTIVITYNET_PREFIX):
        return [path]
    return [path, path.with_name(ACTIVITYNET_PREFIX + path.name)]


def resolve_video(root: str | os.PathLike, name: str) -> Path:
    """Find a benchmark's "video_name" under `root`: as given, then with a video extension;
    then the same with ActivityNet's "v_" prefix. The first that exists wins."""
    names = _named_variants(safe_join(root, name))
    for stem in names:
        for candidate in (stem, *(stem.with_name(stem.name + ext) for ext in VIDEO_EXTENSIONS)):
            if candidate.exists():
                return candidate
    tried = ", ".join(stem.name for stem in names)
    extensions = ", ".join(VIDEO_EXTENSIONS)
    raise VideoError(f"{names[0]}: video not found (tried {tried}, as given and with {extensions})")


# --------------------------------------------------------------------------- decoding


def load_video(source: VideoSource, num_frames: int, backend: Backend = "auto") -> np.ndarray:
    """`num_frames` frames, uniformly sampled, as uint8 [T, H, W, 3] RGB.

    `source` is a video file, a folder of frame images, or an explicit list of frame image
    paths (kept in the given order).
    """
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"unknown video backend {backend!r}; use 'auto', 'decord' or 'pyav'")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            frames = list_frames(path)
        elif path.is_file():
            return _read_video_file(path, num_frames, backend)
        else:
            raise VideoError(f"{path}: no such video file or frame folder")
    else:
        frames = [Path(p) for p in source]
        if not frames:
            raise VideoError("empty list of frame paths")
    return _read_images([frames[i] for i in sample_indices(len(frames), num_frames)])


class Kept(dict):
    """Arrays or tensors by key, kept while they fit in `budget` bytes; past it, a value is
    not kept and its owner computes it anew."""

    def __init__(self, budget: int = 2**30):
        super().__init__()
        self.budget, self.held = budget, 0

    def keep(self, key, value):
        if self.held + value.nbytes <= self.budget:
            self[key] = value
            self.held += value.nbytes
        return value


class FrameCache:
    """`load_video` that keeps what it decodes (`Kept`): a training run reads every video once
    per epoch, and holding the frames costs less than decoding them again."""

    def __init__(self, num_frames: int, budget: int = 2**30):
        self.num_frames = num_frames
        self._frames = Kept(budget)

    @staticmethod
    def key(source: VideoSource) -> str | tuple[str, ...]:
        """What names a video: its path, or its frames' paths."""
        return str(source) if isinstance(source, (str, os.PathLike)) else tuple(map(str, source))

    def __call__(self, source: VideoSource) -> np.ndarray:
        key = self.key(source)
        if (frames := self._frames.get(key)) is not None:
            return frames
        return self._frames.keep(key, load_video(source, self.num_frames))


def check_readable(source: VideoSource, num_frames: int) -> None:
    """Decode what a stage may read of `source`, so a bad video stops `prepare` rather than a
    training run hours later: every frame of a frame folder or list (clip captions read
    frames the uniform sample skips), the `num_frames` sampled frames of a video file."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        source = list_frames(source)
    load_video(source, len(source) if isinstance(source, (list, tuple)) else num_frames)


def load_clips(source: VideoSource, num_clips: int, max_clip_frames: int, num_frames: int, backend: Backend = "auto") -> list[np.ndarray]:
    """The video cut by `split_clips` into consecutive clips, each as `num_frames` frames
    sampled over its span: the input the SFT model captions clip by clip. Frame folders and
    lists are cut by their frames (as the world's clip-caption examples are); a video file
    is first decoded to num_clips * max_clip_frames frames spread over its whole length."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_file():
        decoded = _read_video_file(Path(source), num_clips * max_clip_frames, backend)
        return [decoded[clip][sample_indices(len(clip), num_frames)] for clip in split_clips(len(decoded), num_clips, max_clip_frames)]
    if isinstance(source, (str, os.PathLike)):
        if not Path(source).is_dir():
            raise VideoError(f"{source}: no such video file or frame folder")
        frames = list_frames(source)
    else:
        frames = [Path(p) for p in source]
    if len(frames) < num_clips:
        where = source if isinstance(source, (str, os.PathLike)) else (frames[0].parent if frames else "frame list")
        raise VideoError(f"{where}: {len(frames)} frames cannot make {num_clips} clips")
    return [load_video([frames[i] for i in clip], num_frames) for clip in split_clips(len(frames), num_clips, max_clip_frames)]


def _read_images(paths: list[Path]) -> np.ndarray:
    """Decode each distinct frame once, then stack (repeats share one decode)."""
    decoded: dict[Path, np.ndarray] = {}
    for path in paths:
        if path in decoded:
            continue
        try:
            with Image.open(path) as image:
                decoded[path] = np.asarray(image.convert("RGB"))
        except OSError as e:  # PIL's unreadable, truncated and missing files all land here
            raise VideoError(f"{path}: cannot read frame image: {e}") from None
    first = decoded[paths[0]]
    for path, frame in decoded.items():
        if frame.shape != first.shape:
            raise VideoError(
                f"{path}: frame is {frame.shape[1]}x{frame.shape[0]}, "
                f"but {paths[0].name} is {first.shape[1]}x{first.shape[0]}"
            )
    return np.stack([decoded[p] for p in paths])


def _read_video_file(path: Path, num_frames: int, backend: Backend) -> np.ndarray:
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: empty file")
    errors = []
    for name, read in _decoders(path, backend):
        try:
            return read(path, num_frames)
        except VideoError as e:
            errors.append(f"{name}: {e}")
    raise VideoError(f"{path}: unreadable video ({'; '.join(errors)})")


def _decoders(path: Path, backend: Backend) -> list[tuple[str, Callable[[Path, int], np.ndarray]]]:
    """The decoders to try in turn: the one `backend` names, else decord then PyAV (PyAV alone
    for the formats decord cannot read)."""
    decoders = {"decord": _read_decord, "pyav": _read_pyav}
    if backend != "auto":
        return [(backend, decoders[backend])]
    if path.suffix.lower() in PYAV_ONLY:
        return [("pyav", _read_pyav)]
    return list(decoders.items())


def _read_decord(path: Path, num_frames: int) -> np.ndarray:
    try:
        import decord
    except ImportError:
        raise VideoError("not installed") from None
    try:
        reader = decord.VideoReader(str(path))
        total = len(reader)
        if total == 0:
            raise VideoError("video has no frames")
        return reader.get_batch(sample_indices(total, num_frames).tolist()).asnumpy()
    except (decord.DECORDError, RuntimeError) as e:
        raise VideoError(_first_line(e)) from None


def _read_pyav(path: Path, num_frames: int) -> np.ndarray:
    try:
        total = _pyav_frame_count(path)
        if total == 0:
            raise VideoError("video has no frames")
        return _pyav_decode(path, sample_indices(total, num_frames), total)
    except av.FFmpegError as e:
        raise VideoError(_first_line(e)) from None


def _pyav_frame_count(path: Path) -> int:
    """Frames in the first video stream: the container's count, else one per packet."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError("no video stream")
        stream = container.streams.video[0]
        if stream.frames > 0:
            return stream.frames
        return sum(1 for packet in container.demux(stream) if packet.size > 0)


def _pyav_decode(path: Path, indices: np.ndarray, total: int) -> np.ndarray:
    """Decode in order up to the last wanted frame, keeping the wanted ones.

    Every frame is converted at the first frame's size, so a stream whose resolution
    changes midway still stacks into one array.
    """
    wanted = set(indices.tolist())
    last = int(indices.max())
    kept: dict[int, np.ndarray] = {}
    decoded = 0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i == 0:
                width, height = frame.width, frame.height
            decoded = i + 1
            if i in wanted:
                kept[i] = frame.to_ndarray(format="rgb24", width=width, height=height)
            if i >= last:
                break
    if last not in kept:
        raise VideoError(f"declares {total} frames but only {decoded} could be decoded (truncated?)")
    return np.stack([kept[i] for i in indices.tolist()])


def _first_line(error: Exception) -> str:
    """decord's messages carry a C++ log prefix and backtrace; the rest of the first line says it."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return re.sub(r"^\[[0-9:]+\] \S+:[0-9]+: ", "", line)
