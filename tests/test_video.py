"""Video input: which frames come back, from every kind of source, and how bad input fails."""

from __future__ import annotations

import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from vlm_rlaif import video
from vlm_rlaif.video import (
    FrameCache,
    VideoError,
    check_readable,
    list_frames,
    load_clips,
    load_video,
    natural_key,
    resolve_video,
    safe_join,
    sample_indices,
    split_clips,
)

NUM_FRAMES = 20
SIZE = 32
STEP = 12  # red channel of frame i is STEP * i: far enough apart to survive lossy coding


def frame_image(i: int) -> np.ndarray:
    image = np.zeros((SIZE, SIZE, 3), np.uint8)
    image[..., 0] = STEP * i
    image[..., 1] = 255 - STEP * i
    image[..., 2] = 128
    return image


def frame_ids(frames: np.ndarray) -> list[int]:
    """Which frame each returned image is, read back from its colour."""
    return np.rint(frames[..., 0].mean(axis=(1, 2)) / STEP).astype(int).tolist()


def write_video(path: Path, num_frames: int = NUM_FRAMES, codec: str = "libx264", faststart: bool = False) -> Path:
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=10)
        stream.width = stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        container.start_encoding()  # writes the header even when no frame follows
        for i in range(num_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame_image(i), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_gif(path: Path, num_frames: int = NUM_FRAMES) -> Path:
    """An animated GIF (TGIF-QA's format); each frame one flat colour, so the palette is exact."""
    frames = [Image.fromarray(frame_image(i)) for i in range(num_frames)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


@pytest.fixture(scope="module")
def mp4(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4")


@pytest.fixture
def frame_folder(tmp_path) -> Path:
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(frame_image(i)).save(folder / f"frame_{i}.png")
    (folder / "notes.txt").write_text("not a frame")
    return folder


# --------------------------------------------------------------------------- sampling


def test_sample_indices_is_rounded_linspace_over_whole_video():
    assert sample_indices(20, 8).tolist() == np.linspace(0, 19, 8).round().astype(int).tolist()
    assert sample_indices(50, 50).tolist() == list(range(50))
    assert sample_indices(1, 3).tolist() == [0, 0, 0]
    idx = sample_indices(5, 9)
    assert idx[0] == 0 and idx[-1] == 4 and sorted(set(idx.tolist())) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("total, n", [(0, 4), (10, 0)])
def test_sample_indices_rejects_impossible_requests(total, n):
    with pytest.raises(ValueError):
        sample_indices(total, n)


@pytest.mark.parametrize("total, num_clips, max_clip_frames", [(50, 3, 20), (50, 1, 20), (16, 3, None), (8, 3, 2), (7, 7, None), (100, 4, 20)])
def test_split_clips_covers_video_evenly(total, num_clips, max_clip_frames):
    clips = split_clips(total, num_clips, max_clip_frames)
    assert len(clips) == num_clips
    bounds = np.linspace(0, total, num_clips + 1).round().astype(int)
    for clip, start, stop in zip(clips, bounds[:-1], bounds[1:]):
        assert clip[0] == start and clip[-1] == stop - 1  # each clip spans its whole stretch
        assert np.all(np.diff(clip) > 0)
        if max_clip_frames is not None:
            assert len(clip) <= max_clip_frames
    if max_clip_frames is None:
        assert np.concatenate(clips).tolist() == list(range(total))
    lengths = np.diff(bounds)
    assert lengths.max() - lengths.min() <= 1


def test_split_clips_paper_setting():
    clips = split_clips(50, 3, 20)
    assert [len(c) for c in clips] == [17, 16, 17]
    assert [len(c) for c in split_clips(50, 2, 20)] == [20, 20]


@pytest.mark.parametrize("total, num_clips, max_clip_frames", [(2, 3, None), (10, 0, None), (10, 2, 0)])
def test_split_clips_rejects_impossible_splits(total, num_clips, max_clip_frames):
    with pytest.raises(ValueError):
        split_clips(total, num_clips, max_clip_frames)


def test_clips_of_a_frame_folder_and_of_a_video_file_cover_it_in_order(frame_folder, mp4):
    clips = load_clips(frame_folder, 3, 20, 2)
    assert [frame_ids(c) for c in clips] == [[0, 3], [4, 7], [8, 11]]  # 12 frames: clips 0-3, 4-7, 8-11
    assert [frame_ids(c) for c in load_clips(frame_folder, 2, 3, 3)] == [[0, 2, 5], [6, 8, 11]]  # at most 3 frames a clip
    listed = sorted(frame_folder.glob("*.png"), key=lambda p: int(p.stem.split("_")[1]))
    assert [frame_ids(c) for c in load_clips(listed, 3, 20, 2)] == [[0, 3], [4, 7], [8, 11]]
    decoded = load_clips(mp4, 2, 5, 5)  # 10 frames spread over 20, then halves
    assert [frame_ids(c) for c in decoded] == [sample_indices(NUM_FRAMES, 10)[:5].tolist(), sample_indices(NUM_FRAMES, 10)[5:].tolist()]
    with pytest.raises(VideoError, match="2 frames cannot make 3 clips"):
        load_clips(listed[:2], 3, 20, 2)
    with pytest.raises(VideoError, match="frame list: 0 frames"):
        load_clips([], 1, 20, 2)


# --------------------------------------------------------------------------- video files


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
def test_video_file_returns_the_sampled_frames(mp4, backend):
    frames = load_video(mp4, 8, backend=backend)
    assert frames.dtype == np.uint8 and frames.shape == (8, SIZE, SIZE, 3)
    assert frame_ids(frames) == sample_indices(NUM_FRAMES, 8).tolist()
    assert np.abs(frames[3].astype(int) - frame_image(frame_ids(frames)[3])).max() < 16  # RGB, not BGR


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_more_frames_than_the_video_has_repeats_frames(mp4, backend):
    frames = load_video(mp4, 30, backend=backend)
    assert frame_ids(frames) == sample_indices(NUM_FRAMES, 30).tolist()


@pytest.mark.parametrize("suffix, codec", [(".mkv", "libx264"), (".webm", "libvpx-vp9")])
def test_pyav_counts_frames_when_the_container_does_not(tmp_path, suffix, codec):
    path = write_video(tmp_path / f"clip{suffix}", codec=codec)
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # the count must come from the packets
    assert frame_ids(load_video(path, 5, backend="pyav")) == sample_indices(NUM_FRAMES, 5).tolist()


@pytest.mark.parametrize("backend", ["pyav", "auto"])
def test_animated_gif_returns_the_sampled_frames(tmp_path, backend):
    frames = load_video(write_gif(tmp_path / "tumblr_abc.gif"), 8, backend=backend)
    assert frames.dtype == np.uint8 and frames.shape == (8, SIZE, SIZE, 3)
    assert frame_ids(frames) == sample_indices(NUM_FRAMES, 8).tolist()
    assert np.abs(frames[3].astype(int) - frame_image(frame_ids(frames)[3])).max() <= 2


def test_msvd_avi_returns_the_sampled_frames(tmp_path):
    path = write_video(tmp_path / "-4wsuPCjDBc_5_15.avi", codec="mpeg4")
    assert frame_ids(load_video(path, 6)) == sample_indices(NUM_FRAMES, 6).tolist()


@pytest.mark.parametrize("content", [b"GIF89a" + bytes(range(256)) * 4, b"GIF89a\x10\x00", b""],
                         ids=["garbage after the header", "header cut short", "zero bytes"])
def test_corrupt_gif_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "tumblr_bad.gif"
    path.write_bytes(content)
    with pytest.raises(VideoError, match="tumblr_bad.gif: ") as error:
        load_video(path, 8)
    assert "decord" not in str(error.value)  # a GIF goes to PyAV alone
    with pytest.raises(VideoError, match="tumblr_bad.gif: "):
        check_readable(path, 8)


def test_auto_falls_back_to_pyav_without_decord(mp4, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    assert frame_ids(load_video(mp4, 4)) == sample_indices(NUM_FRAMES, 4).tolist()
    with pytest.raises(VideoError, match="decord: not installed"):
        load_video(mp4, 4, backend="decord")


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
@pytest.mark.parametrize("kept", [0.5, 0.8, 0.95])
def test_truncated_video_is_an_error_naming_the_file(tmp_path, backend, kept):
    whole = write_video(tmp_path / "whole.mp4", faststart=True).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: int(len(whole) * kept)])
    with pytest.raises(VideoError, match="cut.mp4: unreadable video"):
        load_video(cut, 8, backend=backend)


def test_pyav_notices_frames_missing_from_the_end(tmp_path):
    whole = write_video(tmp_path / "whole.avi", codec="mpeg4").read_bytes()
    cut = tmp_path / "cut.avi"
    cut.write_bytes(whole[: int(len(whole) * 0.95)])  # the index still declares 20 frames
    with pytest.raises(VideoError, match=r"cut.avi: unreadable video \(pyav: declares 20 frames but only"):
        load_video(cut, 8, backend="pyav")


@pytest.mark.parametrize("backend", ["decord", "pyav", "auto"])
@pytest.mark.parametrize("suffix, codec", [(".mp4", "libx264"), (".avi", "mpeg4")])
def test_video_without_frames_is_an_error(tmp_path, backend, suffix, codec):
    path = write_video(tmp_path / f"empty{suffix}", num_frames=0, codec=codec)
    with pytest.raises(VideoError, match=f"empty{suffix}: unreadable video"):
        load_video(path, 8, backend=backend)
    if suffix == ".avi" and backend == "pyav":  # the stream exists but holds no frame
        with pytest.raises(VideoError, match="video has no frames"):
            load_video(path, 8, backend=backend)


def test_zero_byte_and_missing_files_are_errors(tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="zero.mp4: empty file"):
        load_video(tmp_path / "zero.mp4", 8)
    with pytest.raises(VideoError, match="absent.mp4: no such video"):
        load_video(tmp_path / "absent.mp4", 8)


def test_garbage_file_is_an_error(tmp_path):
    (tmp_path / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(VideoError, match="noise.mp4: unreadable video"):
        load_video(tmp_path / "noise.mp4", 8)


def test_unknown_backend_is_rejected(mp4, frame_folder):
    for source in (mp4, frame_folder):
        with pytest.raises(ValueError, match="unknown video backend"):
            load_video(source, 8, backend="opencv")


# --------------------------------------------------------------------------- frame folders and lists


def test_natural_sort():
    names = ["frame_10.jpg", "frame_2.jpg", "Frame_1.jpg", "frame_0.jpg", "frame_100.jpg", "frame_11.jpg"]
    assert sorted(names, key=natural_key) == ["frame_0.jpg", "Frame_1.jpg", "frame_2.jpg", "frame_10.jpg", "frame_11.jpg", "frame_100.jpg"]
    assert sorted(["v2_f10", "v10_f2", "v2_f9"], key=natural_key) == ["v2_f9", "v2_f10", "v10_f2"]


def test_frame_folder_is_read_in_natural_order(frame_folder):
    (frame_folder / "._frame_3.png").write_bytes(b"macOS resource fork")  # hidden: not a frame
    assert [p.name for p in list_frames(frame_folder)][:3] == ["frame_0.png", "frame_1.png", "frame_2.png"]
    frames = load_video(frame_folder, 12)
    assert frames.shape == (12, SIZE, SIZE, 3) and frames.dtype == np.uint8
    assert frame_ids(frames) == list(range(12))
    assert np.array_equal(frames[5], frame_image(5))  # png is lossless
    assert frame_ids(load_video(frame_folder, 4)) == sample_indices(12, 4).tolist()


def test_frame_list_keeps_the_given_order(frame_folder):
    paths = [frame_folder / f"frame_{i}.png" for i in (9, 3, 7, 1, 0)]
    assert frame_ids(load_video(paths, 5)) == [9, 3, 7, 1, 0]
    assert frame_ids(load_video([str(p) for p in paths], 3)) == [9, 7, 0]
    assert frame_ids(load_video(paths[:1], 3)) == [9, 9, 9]


def test_the_frame_cache_decodes_once_and_holds_no_more_than_its_budget(frame_folder, monkeypatch):
    assert np.array_equal(FrameCache(4)(frame_folder), load_video(frame_folder, 4))
    decoded = []
    def decode(source, n):
        decoded.append(source)
        return np.zeros((n, 2, 2, 3), np.uint8)

    monkeypatch.setattr(video, "load_video", decode)
    cache = FrameCache(num_frames=4, budget=2 * 4 * 2 * 2 * 3)  # room for two videos
    paths = [frame_folder / f"frame_{i}.png" for i in range(3)]
    for source in [frame_folder, paths, frame_folder, [str(p) for p in paths], frame_folder / "x"]:
        assert cache(source).shape == (4, 2, 2, 3)
    assert decoded == [frame_folder, paths, frame_folder / "x"]  # a list keys by its paths' names
    cache(frame_folder / "x")
    assert decoded[-1] == decoded[-2] == frame_folder / "x"  # past the budget: decoded anew


def test_empty_folder_and_empty_list_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no frames here")
    with pytest.raises(VideoError, match="empty: frame folder has no images"):
        load_video(tmp_path / "empty", 4)
    with pytest.raises(VideoError, match="empty list"):
        load_video([], 4)


def test_unreadable_or_missing_frame_names_the_file(frame_folder):
    (frame_folder / "frame_4.png").write_bytes(b"not a png")
    with pytest.raises(VideoError, match="frame_4.png: cannot read frame image"):
        load_video(frame_folder, 12)
    with pytest.raises(VideoError, match="frame_99.png: cannot read frame image"):
        load_video([frame_folder / "frame_0.png", frame_folder / "frame_99.png"], 2)


def test_truncated_jpeg_frame_is_an_error(frame_folder):
    jpg = frame_folder / "frame_0.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpg)
    jpg.write_bytes(jpg.read_bytes()[:600])
    with pytest.raises(VideoError, match="frame_0.jpg: cannot read frame image"):
        load_video([jpg], 1)


def test_frames_of_different_sizes_are_an_error(frame_folder):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(frame_folder / "frame_7.png")
    with pytest.raises(VideoError, match="frame_7.png: frame is 16x16"):
        load_video(frame_folder, 12)


# --------------------------------------------------------------------------- resolving names


def test_resolve_video_tries_name_then_extensions(tmp_path, frame_folder):
    root = tmp_path / "videos"
    root.mkdir()
    write_video(root / "v_abc.mkv", num_frames=3)
    (root / "v_abc.mp4").write_bytes(b"x")  # earlier extension in the list wins
    (root / "exact.avi").write_bytes(b"x")
    frame_folder.rename(root / "v_frames")
    assert resolve_video(root, "v_abc") == root / "v_abc.mp4"
    assert resolve_video(root, "exact.avi") == root / "exact.avi"
    assert resolve_video(root, "v_frames") == root / "v_frames"
    assert resolve_video(root, "sub/../v_abc.mkv") == root / "v_abc.mkv"
    tried = r"missing: video not found \(tried missing, v_missing, as given and with \.mp4, .*\.avi.*\.gif"
    with pytest.raises(VideoError, match=tried):
        resolve_video(root, "missing")


@pytest.mark.parametrize("name, files, found", [
    ("k3Jd9aQp0Zc", ["v_k3Jd9aQp0Zc.mp4"], "v_k3Jd9aQp0Zc.mp4"),  # ActivityNet-QA names the bare id
    ("k3Jd9aQp0Zc", ["v_k3Jd9aQp0Zc.webm", "other.mp4"], "v_k3Jd9aQp0Zc.webm"),
    ("split/k3Jd9aQp0Zc", ["split/v_k3Jd9aQp0Zc.mkv"], "split/v_k3Jd9aQp0Zc.mkv"),
    ("k3Jd9aQp0Zc", ["k3Jd9aQp0Zc.mkv", "v_k3Jd9aQp0Zc.mp4"], "k3Jd9aQp0Zc.mkv"),  # the name as given first
    ("v_k3Jd9aQp0Zc", ["v_k3Jd9aQp0Zc.mp4"], "v_k3Jd9aQp0Zc.mp4"),  # Video-ChatGPT's files carry it
    ("tumblr_abc", ["tumblr_abc.gif"], "tumblr_abc.gif"),
    ("-4wsuPCjDBc_5_15", ["-4wsuPCjDBc_5_15.avi"], "-4wsuPCjDBc_5_15.avi"),
    ("video7010", ["video7010.mp4"], "video7010.mp4"),
])
def test_resolve_video_knows_the_benchmarks_names(tmp_path, name, files, found):
    for file in files:
        (tmp_path / file).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / file).write_bytes(b"x")
    assert resolve_video(tmp_path, name) == tmp_path / found


def test_a_prefixed_name_is_not_prefixed_again(tmp_path):
    (tmp_path / "v_v_abc.mp4").write_bytes(b"x")
    with pytest.raises(VideoError, match=r"tried v_abc, as given"):
        resolve_video(tmp_path, "v_abc")


@pytest.mark.parametrize("name", ["../outside", "a/../../outside", "/etc/passwd", ".", ""])
def test_paths_cannot_leave_the_root(tmp_path, name):
    (tmp_path / "outside.mp4").write_bytes(b"x")
    (tmp_path / "v_outside.mp4").write_bytes(b"x")
    root = tmp_path / "videos"
    root.mkdir()
    with pytest.raises(VideoError):
        resolve_video(root, name)
    with pytest.raises(VideoError):
        safe_join(root, name)


def test_absolute_path_inside_the_root_is_allowed(tmp_path):
    assert safe_join(tmp_path, tmp_path / "a" / "b.png") == tmp_path / "a" / "b.png"
