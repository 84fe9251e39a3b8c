"""Bad input, case by case: every one ends `python -m vlm_rlaif <stage>` with status 2 and one
line naming the file, record or key to fix, never a traceback from inside torch; skip mode
leaves bad records out and lists them in reports/; nothing already written is lost."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import av
import numpy as np
import pytest
import yaml
from PIL import Image

from vlm_rlaif import prepare
from vlm_rlaif.__main__ import main

from conftest import PARAMS, ROOT, make_project, stage_env, two_file_zeroshot

Edit = Callable[[Path], None]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    make_project(root)
    return root


def working_copy(source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the project `source` as the working directory: each case breaks its own."""
    root = tmp_path / "project"
    shutil.copytree(source, root)
    monkeypatch.chdir(root)
    return root


@pytest.fixture
def project(pristine, tmp_path, monkeypatch) -> Path:
    return working_copy(pristine, tmp_path, monkeypatch)


def run_stage(stage: str, capsys) -> tuple[int, str]:
    """(exit status, stderr) of `python -m vlm_rlaif <stage>`, in this process."""
    capsys.readouterr()
    status = main([stage, "--params", "params.yaml"])
    return status, capsys.readouterr().err


def assert_named_error(status: int, err: str, *named: str) -> None:
    """Status 2 and, as the last line (progress bars may come before), one error naming each of `named`."""
    assert status == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("python -m vlm_rlaif ") and ": error: " in last, err
    for name in named:
        assert name in last, f"{name!r} not in {last!r}"


# --------------------------------------------------------------------------- edits


def edit_json(relative: str, change: Callable[[list], object]) -> Edit:
    def edit(root: Path) -> None:
        path = root / relative
        rows = json.loads(path.read_text())
        change(rows)
        path.write_text(json.dumps(rows))
    return edit


def set_params(**sections: dict) -> Edit:
    def edit(root: Path) -> None:
        params = yaml.safe_load((root / "params.yaml").read_text())
        for name, values in sections.items():
            params[name] = {**params.get(name, {}), **values} if isinstance(values, dict) else values
        (root / "params.yaml").write_text(yaml.safe_dump(params))
    return edit


def first_frame(root: Path, relative: str = "data/RL_data.json", record: int = 0) -> Path:
    return root / "data/videos" / json.loads((root / relative).read_text())[record]["images"][0]


def eval_video(root: Path) -> Path:
    """The frame folder of the first generic-QA question's video."""
    name = json.loads((root / "data/eval/generic_qa.json").read_text())[0]["video_name"]
    return root / PARAMS["data"]["eval_video_root"] / name


def write_mp4(path: Path, frames: int = 8, size: int = 32) -> bytes:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=8)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            image = np.full((size, size, 3), 20 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path.read_bytes()


def eval_video_file(content: Callable[[Path], bytes], suffix: str = ".mp4") -> Edit:
    """Replace the first eval video's frame folder by a <name><suffix> holding `content(path)`."""
    def edit(root: Path) -> None:
        folder = eval_video(root)
        shutil.rmtree(folder)
        path = folder.with_name(folder.name + suffix)
        data = content(path)
        path.write_bytes(data)
    return edit


def answers_edit(change: Callable[[list], object]) -> Edit:
    """The zero-shot set in two files, joined by question_id, its answers changed by `change`."""
    return lambda root: two_file_zeroshot(root, change)


def truncated_mp4(path: Path) -> bytes:
    data = write_mp4(path)
    return data[: len(data) // 3]


def audio_only(path: Path) -> bytes:
    """A valid container whose only stream is sound: no codec here decodes a picture from it."""
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        samples = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        samples.sample_rate = 8000
        for packet in [*stream.encode(samples), *stream.encode()]:
            container.mux(packet)
    return path.read_bytes()


def frame_edit(change: Callable[[Path], None]) -> Edit:
    return lambda root: change(first_frame(root))


def other_size(path: Path) -> None:
    Image.new("RGB", (16, 24)).save(path)


# (case, edit, what the error must name)
PREPARE_CASES = [
    ("zero-byte frame", frame_edit(lambda p: p.write_bytes(b"")), ["data/RL_data.json, record 0", "frame_000.png"]),
    ("truncated frame", frame_edit(lambda p: p.write_bytes(p.read_bytes()[:40])), ["data/RL_data.json, record 0", "frame_000.png"]),
    ("frame of another size", frame_edit(other_size), ["data/RL_data.json, record 0", "frame_000.png", "16x24"]),
    ("missing frame", frame_edit(Path.unlink), ["data/RL_data.json, record 0", "video not found", "frame_000.png"]),
    ("empty frame folder", lambda root: [p.unlink() for p in eval_video(root).iterdir()], ["qa.json, record 0", "no images"]),
    ("zero-byte video file", eval_video_file(lambda p: b""), ["qa.json, record 0", ".mp4", "empty file"]),
    ("truncated video file", eval_video_file(truncated_mp4), ["qa.json, record 0", ".mp4"]),
    ("video file without a picture stream", eval_video_file(audio_only), ["qa.json, record 0", ".mp4"]),
    ("not a video at all", eval_video_file(lambda p: b"GIF89a" + bytes(range(256)) * 4), ["qa.json, record 0", ".mp4"]),
    ("unreadable GIF", eval_video_file(lambda p: b"GIF89a" + bytes(range(256)) * 4, ".gif"),
     ["qa.json, record 0", ".gif", "unreadable video"]),
    ("answer for an unknown question_id",
     answers_edit(lambda a: a[-1].update(question_id="nobody")),
     ["data/eval/test_q.json, record 0", "has no answer in data/eval/test_a.json"]),
    ("answer to no question",
     answers_edit(lambda a: a.append({"answer": "red", "question_id": "nobody"})),
     ["data/eval/test_a.json, record", "'nobody' has no question in data/eval/test_q.json"]),
    ("unknown key of a zero-shot set",
     set_params(data={"zeroshot_qa_files": {"msvd": {"questions": "q.json", "video": "v"}}}),
     ["params.yaml", "data.zeroshot_qa_files.msvd.video: unknown key"]),
    ("file cut off mid-JSON", lambda root: (root / "data/SFT_long.json").write_text((root / "data/SFT_long.json").read_text()[:300]),
     ["data/SFT_long.json"]),
    ("an object, not a list", lambda root: (root / "data/RL_data.json").write_text('{"conversations": []}'), ["data/RL_data.json", "list"]),
    ("missing field", edit_json("data/RL_data.json", lambda rows: rows[1].pop("uid")), ["data/RL_data.json, record 1", '"uid"']),
    ("wrong-typed field", edit_json("data/SFT_long.json", lambda rows: rows[2]["conversations"][1].update(value=5)),
     ["data/SFT_long.json, record 2", '"conversations[1].value"']),
    ("placeholder in the answer", edit_json("data/SFT_short.json", lambda rows: rows[3]["conversations"][1].update(value="<image> red")),
     ["data/SFT_short.json, record 3", "<image>"]),
    ("no placeholder", edit_json("data/SFT_short.json", lambda rows: rows[0]["conversations"][0].update(value="What colour?")),
     ["data/SFT_short.json, record 0", "<image>"]),
    ("question without a video name", edit_json("data/eval/zeroshot_qa.json", lambda rows: rows[1].pop("video_name")),
     ["zeroshot_qa.json, record 1", '"video_name"']),
    ("empty RL split", lambda root: (root / "data/RL_data.json").write_text("[]"), ["data/RL_data.json", "no usable records"]),
    ("empty SFT splits", lambda root: [(root / f"data/{n}").write_text("[]") for n in ("SFT_short.json", "SFT_long.json")],
     ["SFT_short.json, SFT_long.json", "no SFT records"]),
    ("preference of 3", lambda root: write_preferences(root, preference=3), ["data/prefs.json, record 0", '"preference"', "1 or 2"]),
    ("preference as text", lambda root: write_preferences(root, preference="1"), ["data/prefs.json, record 0", '"preference"']),
    ("unknown params key", set_params(sft={"learning_rat": 0.1}), ["sft.learning_rat"]),
    ("negative size", set_params(sft={"batch_size": -4}), ["sft.batch_size"]),
    ("wrong-typed param", set_params(seed="zero"), ["seed"]),
    ("unknown bad-record policy", set_params(data={"on_bad_record": "ignore"}), ["data.on_bad_record"]),
    ("unparsable params", lambda root: (root / "params.yaml").write_text("seed: [1,\n"), ["params.yaml"]),
    ("data of another world", set_params(world={"difficulty": 0.9}), ["world.difficulty", "make data"]),
]


def write_preferences(root: Path, preference: object) -> None:
    """A preference file in the release format (data.preference_file) with one bad value."""
    rows = json.loads((root / "data/RL_data.json").read_text())
    pairs = [{**r, "output_1": {"value": "A red circle."}, "output_2": {"value": "Nothing."}, "preference": 1} for r in rows]
    pairs[0]["preference"] = preference
    (root / "data/prefs.json").write_text(json.dumps(pairs))
    set_params(data={"preference_file": "prefs.json"})(root)


@pytest.mark.parametrize("edit, named", [case[1:] for case in PREPARE_CASES], ids=[case[0] for case in PREPARE_CASES])
def test_bad_input_stops_prepare_with_one_line_naming_it_and_keeps_the_last_good_output(project, capsys, edit, named):
    assert run_stage("prepare", capsys)[0] == 0
    before = {p: p.read_bytes() for p in sorted(prepare.OUT.rglob("*")) if p.is_file()}
    edit(project)
    assert_named_error(*run_stage("prepare", capsys), *named)
    after = {p: p.read_bytes() for p in sorted(prepare.OUT.rglob("*")) if p.is_file()}
    assert after == before  # the stage writes nothing until every input has been read


def records_using(root: Path, frame: Path, video_name: str) -> set[str]:
    """"<file>, record <i>" of every record whose video is `frame`'s or whose video_name is `video_name`."""
    folder = frame.parent.relative_to(root / "data/videos").as_posix()
    found = set()
    for path in sorted((root / "data").rglob("*.json")):
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            continue
        for i, row in enumerate(rows):
            if any(Path(image).parent.as_posix() == folder for image in row.get("images", [])) or row.get("video_name") == video_name:
                found.add(f"{path.relative_to(root).as_posix()}, record {i}")
    return found


def test_skip_mode_leaves_bad_records_out_and_lists_each_in_reports(project, capsys):
    frame, video_name = first_frame(project), eval_video(project).name
    expected = records_using(project, frame, video_name) | {"data/RL_data.json, record 1"}
    for edit in (edit_json("data/RL_data.json", lambda rows: rows[1].pop("uid")), frame_edit(lambda p: p.write_bytes(b"")),
                 eval_video_file(truncated_mp4), set_params(data={"on_bad_record": "skip"})):
        edit(project)
    status, err = run_stage("prepare", capsys)
    assert status == 0, err
    skipped = json.loads(prepare.SKIPPED.read_text())
    assert {message.split(": ", 1)[0] for message in skipped} == expected
    assert any("RL_data.json, record 1" in s and '"uid"' in s for s in skipped)
    assert all(frame.name in s or ".mp4" in s for s in skipped if "RL_data.json, record 1:" not in s)
    manifest = json.loads((prepare.OUT / "manifest.json").read_text())
    assert manifest["skipped_records"] == len(expected)
    questions = json.loads((prepare.OUT / "eval/generic_qa.json").read_text())
    assert questions and video_name not in {q["video_name"] for q in questions}
    kept = json.loads((prepare.OUT / "rl_prompts.json").read_text())
    assert kept and all(frame.parent.name not in r["images"][0] for r in kept)


def test_skip_mode_still_stops_when_a_split_is_left_empty(project, capsys):
    edit_json("data/RL_data.json", lambda rows: [r.pop("uid") for r in rows])(project)
    set_params(data={"on_bad_record": "skip"})(project)
    assert_named_error(*run_stage("prepare", capsys), "data/RL_data.json: no usable records", "all 4 skipped", "record 0")


# --------------------------------------------------------------------------- models


@pytest.fixture(scope="module")
def built_base(pristine, tmp_path_factory) -> Path:
    """The pristine project with prepare and base run, through the command line."""
    root = tmp_path_factory.mktemp("with_base") / "project"
    shutil.copytree(pristine, root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        assert main(["prepare"]) == 0 and main(["base"]) == 0
    return root


@pytest.fixture
def with_base(built_base, tmp_path, monkeypatch) -> Path:
    return working_copy(built_base, tmp_path, monkeypatch)


def truncate_weights(root: Path) -> None:
    path = root / "artifacts/base/model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])


def grow_tokenizer(root: Path) -> None:
    """A tokenizer with more tokens than the model's embedding table (one from another model)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "artifacts/base")
    tokenizer.add_tokens([f"extra_{i}" for i in range(600)])
    tokenizer.save_pretrained(root / "artifacts/base")


MODEL_CASES = [
    ("truncated weights", truncate_weights, ["artifacts/base", "cannot load"]),
    ("tokenizer from another model", grow_tokenizer, ["artifacts/base", "embeds"]),
    ("no base model", lambda root: shutil.rmtree(root / "artifacts/base"), ["artifacts/base"]),
    ("no prepared data", lambda root: shutil.rmtree(root / "artifacts/prepare"), ["artifacts/prepare"]),
    ("base model that is neither a folder nor a hub id", set_params(base={"model": "no_such_model"}), ["no_such_model"]),
]


@pytest.mark.parametrize("edit, named", [case[1:] for case in MODEL_CASES], ids=[case[0] for case in MODEL_CASES])
def test_a_bad_model_folder_stops_training_with_one_line_naming_it(with_base, capsys, edit, named):
    edit(with_base)
    stage = "base" if "no_such_model" in named else "sft"
    assert_named_error(*run_stage(stage, capsys), *named)
    assert not (with_base / "artifacts/sft").exists()


@pytest.mark.parametrize("stage, missing", [("preferences", "artifacts/sft"), ("reward_model", "artifacts/preferences"),
                                            ("ppo", "artifacts/reward_model"), ("evaluate", "artifacts/sft")])
def test_a_stage_run_before_its_inputs_exist_names_what_is_missing(with_base, capsys, stage, missing):
    assert_named_error(*run_stage(stage, capsys), missing)


# --------------------------------------------------------------------------- as a process


def test_the_exit_status_and_message_reach_the_shell(project):
    edit_json("data/RL_data.json", lambda rows: rows[2].update(uid="two"))(project)
    done = subprocess.run([sys.executable, "-m", "vlm_rlaif", "prepare"], cwd=project, env=stage_env(), capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("python -m vlm_rlaif prepare: error: data/RL_data.json, record 2")


def test_under_dvc_the_stage_notebook_fails_showing_the_named_error(project):
    edit_json("data/RL_data.json", lambda rows: rows[2].update(uid="two"))(project)
    done = subprocess.run([sys.executable, "-m", "papermill", str(ROOT / "notebooks/01_prepare.ipynb"), "out.ipynb", "-f", "params.yaml", "--cwd", str(project)],
                          cwd=project, env=stage_env(), capture_output=True, text=True)
    assert done.returncode != 0
    assert "RecordError" in done.stderr and "data/RL_data.json, record 2" in done.stderr
    assert not prepare.OUT.exists()
