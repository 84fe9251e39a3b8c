"""`prepare` on the benchmarks as users download them, laid out where the paper profile
(params/paper.yaml) points: two-file zero-shot QA sets, each with its own video folder in its
own convention (MSVD's .avi, MSR-VTT's video<N>.mp4, TGIF's GIFs, ActivityNet's v_<id> named
by the bare id), and Video-ChatGPT's benchmark. Tiny videos are written here; no network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from vlm_rlaif import prepare
from vlm_rlaif.__main__ import main
from vlm_rlaif.config import ZeroShotFiles, load_params
from vlm_rlaif.video import resolve_video

from conftest import PARAMS, ROOT, make_project, two_file_zeroshot
from test_video import write_gif, write_video

EVAL_KEYS = ("zeroshot_qa_files", "generic_qa_file", "temporal_qa_file", "consistency_qa_file",
             "eval_video_root")

# Per set: (video_name in its questions, the file that name finds in the set's video folder).
VIDEOS = {
    "msvd": [("-4wsuPCjDBc_5_15", "-4wsuPCjDBc_5_15.avi"),
             ("zv2RIbUsnSw_159_165", "zv2RIbUsnSw_159_165.avi")],
    "msrvtt": [("video7010", "video7010.mp4"), ("video7011", "video7011.mp4")],
    "tgif": [("tumblr_nk172bbdPI1u1lr18o1_250", "tumblr_nk172bbdPI1u1lr18o1_250.gif"),
             ("tumblr_nb7nnbhAbp1rfk0eco1_400", "tumblr_nb7nnbhAbp1rfk0eco1_400.gif")],
    "activitynet": [("k3Jd9aQp0Zc", "v_k3Jd9aQp0Zc.mp4"), ("Zx8zlbyL0l4", "v_Zx8zlbyL0l4.mkv"),
                    ("sJFgo9H6zNo", "v_sJFgo9H6zNo.webm")],
}
BENCHMARK_VIDEOS = [("v_1QIUV7WYKXg", "v_1QIUV7WYKXg.mp4"), ("v_aJRsvGsrCf8", "v_aJRsvGsrCf8.mkv")]
CODECS = {".avi": "mpeg4", ".mp4": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9"}


def write_clip(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gif":
        write_gif(path, num_frames=6)
    else:
        write_video(path, num_frames=6, codec=CODECS[path.suffix])


def zeroshot_set(root: Path, name: str, files: ZeroShotFiles) -> dict:
    """A set's test_q.json and test_a.json (answers reversed: the join is by question_id) and its
    videos; returns the answer of each question_id."""
    questions, answers = [], []
    for i, (video_name, file) in enumerate(VIDEOS[name]):
        write_clip(root / files.videos / file)
        for k in range(2):
            question_id = f"{video_name}_{k}" if name == "activitynet" else 100 * i + k
            questions.append({"video_name": video_name, "question_id": question_id,
                              "question": f"what is {k}?"})
            answers.append({"answer": f"{name} {video_name} {k}", "type": k,
                            "question_id": question_id})
    (root / "data" / files.questions).parent.mkdir(parents=True, exist_ok=True)
    (root / "data" / files.questions).write_text(json.dumps(questions))
    (root / "data" / files.answers).write_text(json.dumps(answers[::-1]))
    return {a["question_id"]: a["answer"] for a in answers}


def benchmark_sets(root: Path, sets: dict) -> None:
    """Video-ChatGPT's three files and its videos (named with the v_ they carry)."""
    for _, file in BENCHMARK_VIDEOS:
        write_clip(root / sets["generic"].videos / file)
    names = [video_name for video_name, _ in BENCHMARK_VIDEOS]
    rows = {
        "generic": [{"video_name": n, "Q": "What happens?", "A": f"{n} runs."} for n in names],
        "temporal": [{"video_name": n, "Q": "What is first?", "A": f"{n} first."} for n in names],
        "consistency": [{"video_name": n, "Q1": "Who?", "Q2": "Which?", "A": n} for n in names],
    }
    for name, file in sets.items():
        (root / "data" / file.path).parent.mkdir(parents=True, exist_ok=True)
        (root / "data" / file.path).write_text(json.dumps(rows[name]))


@pytest.fixture
def distributed(tmp_path, monkeypatch) -> tuple[Path, dict]:
    """A tiny project whose evaluation sets are laid out as params/paper.yaml expects them;
    returns it and each zero-shot set's answer by question_id."""
    paper = yaml.safe_load((ROOT / "params" / "paper.yaml").read_text())["data"]
    evaluation_sets = {key: paper[key] for key in EVAL_KEYS}
    make_project(tmp_path, {**PARAMS, "data": {**PARAMS["data"], **evaluation_sets}})
    monkeypatch.chdir(tmp_path)
    data = load_params("params.yaml").data
    sets = data.zeroshot_sets()
    expected = {name: zeroshot_set(tmp_path, name, files) for name, files in sets.items()}
    benchmark_sets(tmp_path, data.benchmark_sets())
    return tmp_path, expected


def test_prepare_reads_each_benchmark_as_distributed_with_the_right_answers(distributed, capsys):
    root, expected = distributed
    assert main(["prepare", "--params", "params.yaml"]) == 0, capsys.readouterr().err
    data = load_params("params.yaml").data
    assert data.check_media == "decode"  # prepare decoded every video: GIF, avi, mp4, mkv, webm
    for name, answers in expected.items():
        rows = json.loads((prepare.OUT / f"eval/zeroshot_{name}.json").read_text())
        assert {row["question_id"]: row["answer"] for row in rows} == answers
        assert len(rows) == len(answers)
        folder = root / data.eval_videos(f"zeroshot/{name}")
        found = {resolve_video(folder, row["video_name"]).name for row in rows}
        assert found == {file for _, file in VIDEOS[name]}
    for name in ("generic", "temporal", "consistency"):
        rows = json.loads((prepare.OUT / f"eval/{name}_qa.json").read_text())
        assert [row["video_name"] for row in rows] == [name for name, _ in BENCHMARK_VIDEOS]
    manifest = json.loads((prepare.OUT / "manifest.json").read_text())
    assert manifest["records"]["eval/zeroshot_activitynet"] == 6
    assert manifest["skipped_records"] == 0


def test_an_activitynet_video_missing_is_named_with_every_name_tried(distributed, capsys):
    root, _ = distributed
    folder = root / load_params("params.yaml").data.eval_videos("zeroshot/activitynet")
    (folder / "v_Zx8zlbyL0l4.mkv").unlink()
    assert main(["prepare", "--params", "params.yaml"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "Activitynet_Zero_Shot_QA/test_q.json, record 2: " in last
    tried = "(tried Zx8zlbyL0l4, v_Zx8zlbyL0l4, as given and with .mp4"
    assert f"all_test/Zx8zlbyL0l4: video not found {tried}" in last


def test_the_two_file_form_prepares_exactly_what_the_merged_form_does(project):
    prepare.run(load_params("params.yaml"))
    merged = {p.relative_to(prepare.OUT): p.read_bytes() for p in sorted(prepare.OUT.rglob("*")) if p.is_file()}
    two_file_zeroshot(project)
    prepare.run(load_params("params.yaml"))
    split = {p.relative_to(prepare.OUT): p.read_bytes() for p in sorted(prepare.OUT.rglob("*")) if p.is_file()}
    assert split == merged
