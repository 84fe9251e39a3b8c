"""The preferences stage: responses A and B on a real tiny VLM, the stage's shards and
output format, and its measured quality against the oracle."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from vlm_rlaif.config import load_params
from vlm_rlaif.data import RLPrompt, read_preferences, write_records
from vlm_rlaif.generation import encode_videos
from vlm_rlaif.judge import Verdict
from vlm_rlaif.modeling import build_inputs
from vlm_rlaif.preferences import OUT, feedback_quality, preference_record, run, sample_pairs, shard_prompts
from vlm_rlaif.synthetic.language import clip_ranges, describe
from vlm_rlaif.synthetic.scene import Scene

from conftest import PREFERENCES


def prompts(n: int) -> tuple[list[np.ndarray], list[list[dict]]]:
    videos = [np.random.default_rng(20 + i).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for i in range(n)]
    return videos, [[{"from": "human", "value": "<image>\nDescribe the video in detail."}] for _ in range(n)]


def test_equal_pairs_are_drawn_again_then_dropped_and_counted(tiny_vlm):
    model, processor = tiny_vlm
    videos, conversations = prompts(3)
    torch.manual_seed(0)
    # nearly greedy: both draws of a pair agree, every redraw too
    same = sample_pairs(model, processor, videos, conversations, temperature=1e-4, top_p=1.0, max_new_tokens=4, max_resample=2)
    assert same.responses == [None, None, None] and same.resampled == 6
    torch.manual_seed(0)
    varied = sample_pairs(model, processor, videos, conversations, temperature=2.0, top_p=1.0, max_new_tokens=8, max_resample=2)
    kept = [pair for pair in varied.responses if pair is not None]
    assert kept and all(a.strip() != b.strip() for a, b in kept)
    assert varied.resampled <= 6


def test_precomputed_features_serve_every_draw_without_the_vision_tower(tiny_vlm):
    model, processor = tiny_vlm
    videos, conversations = prompts(2)
    features = encode_videos(model, build_inputs(processor, videos, conversations, add_generation_prompt=True))
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    try:
        torch.manual_seed(1)
        with_features = sample_pairs(model, processor, videos, conversations, temperature=1e-4, top_p=1.0,
                                     max_new_tokens=4, max_resample=1, features=features)
    finally:
        hook.remove()
    assert calls == [] and with_features.resampled == 2
    torch.manual_seed(1)
    plain = sample_pairs(model, processor, videos, conversations, temperature=1e-4, top_p=1.0, max_new_tokens=4, max_resample=1)
    assert plain.responses == with_features.responses


# --------------------------------------------------------------------------- the stage

STAGE = PREFERENCES


def rl_prompt(uid: int, video: str) -> RLPrompt:
    turns = [{"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": "Nothing."}]
    return RLPrompt.from_dict({"conversations": turns, "images": [f"{video}/frame_000.png"], "uid": uid}, "test")


def test_a_videos_prompts_share_one_shard_so_it_is_encoded_once():
    asked = [rl_prompt(0, "v1"), rl_prompt(1, "v1"), rl_prompt(2, "v2"), rl_prompt(3, "v3"), rl_prompt(4, "v2"), rl_prompt(5, "v3")]
    assert shard_prompts(asked, 3) == [[0, 1], [2, 4], [3, 5]]
    assert shard_prompts(asked, 4) == [[0, 1, 2, 4], [3, 5]]
    assert shard_prompts(asked, 1) == [[0, 1], [2, 4], [3, 5]]  # a video's prompts are never split


def stage_params(**overrides):
    return load_params("params.yaml", overrides={"preferences": STAGE | overrides})


def test_the_stage_judges_every_prompt_and_writes_the_reward_models_format(built, monkeypatch):
    monkeypatch.chdir(built)
    counts = run(stage_params(pairs_per_prompt=2), model_dir=Path("artifacts/base"), progress=False)
    judged = json.loads((OUT / "judged.json").read_text())
    assert counts["prompts"] == 4 and counts["pairs"] == len(judged) == 8
    assert counts["kept"] + sum(counts["dropped"].values()) == 8
    assert counts["prompts_kept"] == len({r["uid"] for r in judged if r["dropped"] is None})
    # each prompt's two pairs side by side, drawn apart
    pairs = [(r["uid"], r["pair"]) for r in judged]
    assert pairs == [(r["uid"], k) for r in judged[::2] for k in (0, 1)]
    assert any(a["output_1"] != b["output_1"] for a, b in zip(judged[::2], judged[1::2]))
    assert any(r["judge"] for r in judged)
    for r in judged:
        if r["dropped"] == "identical":
            assert r["judge"] is None and r["output_1"] == r["output_2"]
            continue
        assert set(r["judge"]) == {"context", "no_context"} and len(r["context"]) == 3
        verdict = Verdict(**r["judge"]["context"])  # the context judge decides; the other is the ablation
        assert r["preference"] == verdict.winner and r["margin"] == pytest.approx(verdict.margin)
        assert (r["dropped"] == "inconsistent") == (not verdict.consistent)
    assert read_preferences(OUT / "preferences.json").records == [preference_record(r) for r in judged if r["dropped"] is None]


def test_judged_pairs_round_trip_through_the_reward_models_loader(built, monkeypatch):
    monkeypatch.chdir(built)
    run(stage_params(), model_dir=Path("artifacts/base"), out=Path("round/out"), shards=Path("round/shards"), progress=False)
    judged = [r for r in json.loads(Path("round/out/judged.json").read_text()) if r["judge"]]
    assert judged
    pairs = [preference_record(r) for r in judged]
    write_records("round/pairs.json", pairs)
    loaded = read_preferences("round/pairs.json").records
    assert loaded == pairs
    for record, source in zip(loaded, judged):
        assert record.conversations[0].value == source["conversations"][0]["value"]
        assert record.conversations[-1].value == ""  # the slot the outputs fill; the reference answer stays out
        assert record.chosen == source[f"output_{source['preference']}"]["value"]
        assert record.rejected == source[f"output_{3 - source['preference']}"]["value"]
        assert record.extra["judge"] == source["judge"] and record.extra["context"] == source["context"]
        assert record.extra["margin"] == source["margin"] and "description" not in record.extra


def test_a_rerun_skips_finished_shards_and_a_resumed_run_matches_an_uninterrupted_one(built, monkeypatch):
    monkeypatch.chdir(built)
    params = stage_params()
    places = {"model_dir": Path("artifacts/base"), "out": Path("resume/out"), "shards": Path("resume/shards"), "progress": False}
    run(params, **places)
    shards = sorted(Path("resume/shards").glob("shard_*.json"))
    assert len(shards) == 2
    whole = [s.read_bytes() for s in shards]
    first_written = shards[0].stat().st_mtime_ns
    shards[1].unlink()  # killed while on the second shard
    run(params, **places)
    assert shards[0].stat().st_mtime_ns == first_written  # finished shard skipped
    assert [s.read_bytes() for s in shards] == whole  # the redone shard draws as it did the first time

    run(stage_params(min_margin=0.5), **places)  # another run: its shards start afresh
    assert shards[0].stat().st_mtime_ns != first_written


def test_feedback_quality_measures_each_judge_against_the_oracle(built):
    scenes = json.loads((built / "data" / "scenes.json").read_text())
    asked = json.loads((built / "data" / "RL_data.json").read_text())
    right, sure = {"first_as_a": 0.9, "first_as_b": 0.2, "label_mass": 1.0}, {"first_as_a": 0.2, "first_as_b": 0.9, "label_mass": 0.5}
    judged = []
    for i, prompt in enumerate(asked):
        scene = Scene.from_dict(scenes[prompt["images"][0].split("/")[1]])
        reference = prompt["conversations"][1]["value"]
        judge = {"context": right, "no_context": sure if i else {"first_as_a": 0.9, "first_as_b": 0.9, "label_mass": 1.0}}
        judged.append(prompt | {
            "output_1": {"value": reference}, "output_2": {"value": "Nothing."}, "judge": judge,
            "context": [describe(scene, span).text() for span in clip_ranges(scene.num_frames, 3)],
            "description": describe(scene).text(),
        })
    quality = feedback_quality(judged, scenes, num_clips=3, min_margin=0.0)
    n = len(judged)
    assert quality["oracle"] == {"pairs": n, "ties": 0, "first_better": 1.0}  # the reference beats "Nothing." every time
    context, blind = quality["judges"]["context"], quality["judges"]["no_context"]
    assert context["agreement"] == context["agreement_kept"] == 1.0 and context["consistency"] == context["kept_fraction"] == 1.0
    assert blind["agreement"] == 0.0 and blind["consistency"] == (n - 1) / n and blind["agreement_kept"] == 0.0
    assert context["pairs_kept"] == n and blind["pairs_kept"] == n - 1
    assert blind["label_mass"] == pytest.approx((1.0 + 0.5 * (n - 1)) / n)
    assert sum(kind["pairs"] for kind in context["by_kind"].values()) == n
    assert quality["captions"]["clip"] == {"precision": 1.0, "f1": 1.0, "count": 3 * len({r["images"][0] for r in judged})}
    assert quality["captions"]["video"]["f1"] == 1.0
    assert feedback_quality(judged, None, num_clips=3, min_margin=0.0)["judges"]["context"]["agreement"] is None
