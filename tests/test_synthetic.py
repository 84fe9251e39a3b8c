"""The synthetic world: scenes, rendering, the files it writes, its CLI and its prompt files."""

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from vlm_rlaif import prompts
from vlm_rlaif.config import ConfigError, WorldConfig
from vlm_rlaif.evaluation import PROMPT_KINDS
from vlm_rlaif.synthetic.language import describe
from vlm_rlaif.synthetic.oracle import score_description
from vlm_rlaif.synthetic.render import render, shape_mask
from vlm_rlaif.synthetic.scene import (
    COLOURS, SHAPES, SIMILAR_COLOURS, Scene, SceneError, sample_scene,
)
from vlm_rlaif.synthetic.world import generate_world

TINY = WorldConfig(
    seed=3, num_sft_videos=6, num_rl_videos=2, num_eval_videos=2, num_frames=8, frame_size=32, judge_examples_per_video=4
)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    generate_world(TINY, out)
    return out


def load(world: Path, name: str):
    return json.loads((world / name).read_text())


def frame_paths(vid: str) -> list[str]:
    return [f"synthetic_8frames/{vid}/frame_{t:03d}.png" for t in range(8)]


def test_same_seed_writes_identical_bytes_and_another_seed_differs(world, tmp_path):
    generate_world(TINY, tmp_path / "again")
    assert tree(tmp_path / "again") == tree(world)
    generate_world(WorldConfig(**{**TINY.__dict__, "seed": 4}), tmp_path / "other")
    other = tree(tmp_path / "other")
    assert other.keys() == tree(world).keys()
    assert other["scenes.json"] != tree(world)["scenes.json"]
    assert other["videos/synthetic_8frames/syn_000000/frame_000.png"] != tree(world)["videos/synthetic_8frames/syn_000000/frame_000.png"]


def test_the_eval_split_alone_is_the_whole_world_s_eval_split(world, tmp_path):
    counts = generate_world(TINY, tmp_path / "eval", splits=("eval",))
    alone, whole = tree(tmp_path / "eval"), tree(world)
    assert counts["videos"] == {"eval": 2} and "SFT_short.json" not in alone and "RL_data.json" not in alone
    shared = [name for name in alone if name not in ("scenes.json", "world.json")]
    assert any(name.startswith("eval/") for name in shared) and all(alone[name] == whole[name] for name in shared)
    scenes = json.loads(alone["scenes.json"])
    assert scenes == {vid: s for vid, s in json.loads(whole["scenes.json"]).items() if vid in scenes} and len(scenes) == 2
    with pytest.raises(ValueError, match="splits: expected some of sft, rl, eval"):
        generate_world(TINY, tmp_path / "none", splits=("test",))


def test_files_follow_the_release_layout(world):
    info = load(world, "world.json")
    splits = info["splits"]
    assert [len(splits[s]) for s in ("sft", "rl", "eval")] == [6, 2, 2]
    assert len(set(splits["sft"]) | set(splits["rl"]) | set(splits["eval"])) == 10
    scenes = load(world, "scenes.json")
    assert sorted(scenes) == sorted(splits["sft"] + splits["rl"] + splits["eval"])
    for name in ("SFT_short.json", "SFT_long.json", "SFT_captions.json", "SFT_judge.json"):
        records = load(world, name)
        assert len(records) == info["counts"][name] > 0
        assert len({r["id"] for r in records}) == len(records)
        for r in records:
            assert set(r) == {"id", "src_data", "conversations", "images"} and r["src_data"] == "synthetic"
            human, gpt = r["conversations"]
            assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
            assert "<image>" not in human["value"][len("<image>") :]
            vid = r["images"][0].split("/")[1]
            assert vid in splits["sft"]
            assert all((world / "videos" / p).is_file() for p in r["images"])
            if name == "SFT_captions.json":
                assert 0 < len(r["images"]) < 8 and " ".join(r["images"]) in " ".join(frame_paths(vid))
            else:
                assert r["images"] == frame_paths(vid)
    rl = load(world, "RL_data.json")
    assert [r["uid"] for r in rl] == list(range(len(rl))) and all(set(r) == {"conversations", "images", "uid", "type"} for r in rl)
    assert [r["type"] for r in rl[::2]] == ["describe"] * len(splits["rl"]) and {r["type"] for r in rl} <= set(PROMPT_KINDS)
    assert {r["images"][0].split("/")[1] for r in rl} == set(splits["rl"])
    for name, keys in (
        ("eval/zeroshot_qa.json", {"video_name", "question_id", "question", "answer", "type"}),
        ("eval/generic_qa.json", {"video_name", "Q", "A"}),
        ("eval/temporal_qa.json", {"video_name", "Q", "A"}),
        ("eval/consistency_qa.json", {"video_name", "Q1", "Q2", "A"}),
    ):
        records = load(world, name)
        assert records and all(set(r) == keys and r["video_name"] in splits["eval"] for r in records)
    assert all(r["Q1"] != r["Q2"] for r in load(world, "eval/consistency_qa.json"))


def test_judge_examples_are_balanced_and_label_the_better_response(world):
    records = load(world, "SFT_judge.json")
    layouts = Counter(("Clip 1: " in r["conversations"][0]["value"], r["conversations"][1]["value"]) for r in records)
    assert layouts == {(True, "A"): 6, (True, "B"): 6, (False, "A"): 6, (False, "B"): 6}
    scenes = load(world, "scenes.json")
    checked = 0
    for r in records:
        prompt = r["conversations"][0]["value"]
        a, b = re.search(r"Response A: (.*)\n\nResponse B: (.*)\n\n", prompt).groups()
        if "describ" not in prompt.lower():
            continue
        scene = scenes[r["images"][0].split("/")[1]]
        f1 = {label: score_description(scene, text).f1 for label, text in (("A", a), ("B", b))}
        assert f1[r["conversations"][1]["value"]] > f1[{"A": "B", "B": "A"}[r["conversations"][1]["value"]]]
        checked += 1
    assert checked > 10


def test_difficulty_moves_the_distribution():
    def stats(difficulty: float) -> dict[str, float]:
        scenes = [sample_scene(np.random.default_rng([0, i]), f"v{i}", 16, 64, 3, difficulty) for i in range(150)]
        return {
            "objects": np.mean([len(s.objects) for s in scenes]),
            "events": np.mean([len(s.events) for s in scenes]),
            "size": np.mean([o.size for s in scenes for o in s.objects]),
            "noise": np.mean([s.noise for s in scenes]),
            "similar": np.mean([any(frozenset((a.colour, b.colour)) in SIMILAR_COLOURS for a in s.objects for b in s.objects) for s in scenes]),
        }

    easy, hard = stats(0.0), stats(1.0)
    assert hard["objects"] > easy["objects"] + 0.8
    assert hard["events"] > easy["events"] + 0.8
    assert hard["size"] < easy["size"] - 3
    assert easy["noise"] == 0 < hard["noise"]
    assert hard["similar"] > easy["similar"]
    lengths = [len(describe(sample_scene(np.random.default_rng(i), "v", 16, 64, 3, i % 2)).text().split()) for i in range(100)]
    assert 18 <= min(lengths) and max(lengths) <= 80


def test_render_draws_each_object_in_its_colour_where_the_scene_says():
    for i in range(30):
        scene = sample_scene(np.random.default_rng([1, i]), f"v{i}", 16, 64, 3, 1.0)
        frames = render(scene)
        assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
        for obj in scene.objects:
            mask = shape_mask(obj.shape, obj.size)
            for t in range(16):
                x, y = obj.box(t)
                colour = scene.rgb_at(obj, t)
                exact = (frames[t] == colour).all(axis=-1)
                if scene.visible(obj, t):
                    # the object's pixels have its colour, and no other pixel has it
                    assert exact[y : y + obj.size, x : x + obj.size][mask].all()
                    assert exact.sum() == mask.sum()
                else:
                    assert not exact.any()
    assert np.array_equal(render(scene), frames)


def test_scene_records_round_trip_and_bad_ones_name_the_key():
    scene = sample_scene(np.random.default_rng(5), "syn_000005", 16, 64, 3, 1.0)
    record = json.loads(json.dumps(scene.to_dict()))
    assert Scene.from_dict(record) == scene
    record["objects"][0]["colour"] = "pink"
    with pytest.raises(SceneError, match=r"scene syn_000005: objects\[0\]\.colour: 'pink' is not one of"):
        Scene.from_dict(record)
    record["objects"][0]["colour"] = "red"
    del record["render_seed"]
    with pytest.raises(SceneError, match="render_seed: missing"):
        Scene.from_dict(record, where="scenes.json")


def test_world_config_is_validated():
    with pytest.raises(ConfigError, match="world.num_clips"):
        generate_world(WorldConfig(num_frames=4, num_clips=5), Path("unused"))


def test_cli_writes_the_world_and_names_a_bad_key(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("world:\n  num_sft_videos: 2\n  num_rl_videos: 1\n  num_eval_videos: 1\n  num_frames: 4\n  frame_size: 16\n")
    command = [sys.executable, "-m", "vlm_rlaif.synthetic", "--params", str(params), "--out", str(tmp_path / "data")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert load(tmp_path / "data", "world.json")["counts"]["videos"] == {"sft": 2, "rl": 1, "eval": 1}
    params.write_text("world:\n  num_sft_videos: 2\n  colours: 3\n")
    failed = subprocess.run(command, capture_output=True, text=True)
    assert failed.returncode == 2 and "world.colours: unknown key" in failed.stderr


def test_prompt_files():
    assert prompts.describe_instruction() == prompts.variants("describe")[0] and len(prompts.variants("describe")) >= 2
    assert prompts.caption_instruction(1) != prompts.caption_instruction(0)
    context = prompts.format_context(["One.", "Two."])
    assert "Clip 1: One.\nClip 2: Two." in context
    with_context = prompts.judge_prompt("Q?", "first", "second", context)
    without = prompts.judge_prompt("Q?", "first", "second", None)
    assert with_context.endswith(without) and with_context.startswith(context)
    assert without.index("Response A: first") < without.index("Response B: second")
    assert prompts.JUDGE_LABELS == ("A", "B")
    with pytest.raises(prompts.PromptError, match="'nope.txt' not found"):
        prompts.load("nope")
    with pytest.raises(prompts.PromptError, match="variant 9"):
        prompts.describe_instruction(9)


def test_the_description_writer_adds_an_unseen_object_to_the_share_asked_and_nothing_else(tmp_path):
    cfg = WorldConfig(**{**TINY.__dict__, "num_sft_videos": 40, "annotator_additions": 0.5})
    generate_world(cfg, tmp_path / "added")
    generate_world(WorldConfig(**{**cfg.__dict__, "annotator_additions": 0.0}), tmp_path / "plain")
    added, plain = tree(tmp_path / "added"), tree(tmp_path / "plain")
    assert {k for k in added if added[k] != plain[k]} == {"SFT_long.json", "world.json"}
    scenes = load(tmp_path / "added", "scenes.json")
    written = load(tmp_path / "added", "SFT_long.json")
    with_addition = [r for r in written if "grounded" in r]
    assert 10 <= len(with_addition) <= 30
    for record in written:
        scene = Scene.from_dict(scenes[record["images"][0].split("/")[1]])
        text, truth = record["conversations"][1]["value"], describe(scene).text()
        assert record.get("grounded", text) == truth  # what the clip captions support: the truth
        if "grounded" in record:  # one object more, counted: its facts and the count are wrong
            score = score_description(scene, text)
            extra = [f for f in score.hallucinated if f.startswith("extra ")]
            assert len(extra) == 3 and len({f.rsplit(" ", 2)[0] for f in extra}) == 1
            assert score.hallucinated == sorted([f"{len(scene.objects) + 1} objects", *extra])
            # the writer's stock object: the first colour and shape the scene lacks, still
            colour = next(c for c in COLOURS if c not in scene.palette())
            shape = next(s for s in SHAPES if s not in {o.shape for o in scene.objects})
            assert f"extra {colour} {shape} motion still" in extra
