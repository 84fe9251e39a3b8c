"""The paper profiles (params/paper*.yaml) run every stage, as the notebooks call them, on a
tiny stand-in of the profile's architecture: the profile's settings throughout (LoRA with a
trained projector, gradient checkpointing, the released-data layout, the nf4 reward model on
its own base, policy initialisation, an LLM judge), only the sizes shrunk to seconds."""

import json
import shutil
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from vlm_rlaif import base, evaluate, ppo, preferences, prepare, reward_model, sft
from vlm_rlaif.config import DataConfig, from_dict, load_params
from vlm_rlaif.data import write_records
from vlm_rlaif.preferences import preference_record
from vlm_rlaif.tiny import build_tiny_model

from conftest import PARAMS, ROOT, TINY_VLM, hand_judged, make_project, serving, split_qa
from test_evaluate import JudgeServer
from test_modeling import build_tiny_qwen

# What takes a 7B model hours, cut to what a tiny one does in seconds; every other setting is the profile's.
SHRUNK = {
    "sft": {"batch_size": 2, "grad_accum": 1, "num_processes": 1},
    "preferences": {"num_prompts": 2, "max_new_tokens": 6, "caption_max_new_tokens": 4, "batch_size": 2, "shard_size": 2,
                    "num_processes": 1},
    "reward_model": {"heldout": 1, "batch_size": 1, "num_processes": 1, "min_pairs": 1},
    "ppo": {"num_prompts": 2, "rollout_batch_size": 2, "step_batch_size": 2, "max_new_tokens": 6, "policy_init_batch_size": 2,
            "num_processes": 1},
    "evaluate": {"max_new_tokens": 6, "num_samples": 2, "batch_size": 2},
}


def stand_in(profile: dict, policy: Path, reward: Path, judge_url: str) -> dict:
    """`profile` with the tiny stand-ins for its models, its judge behind `judge_url`, its sizes shrunk."""
    out = {**profile, "world": PARAMS["world"]}  # the world only writes the stand-in data
    out["base"] = {**profile["base"], "model": str(policy)}
    for section, sizes in SHRUNK.items():
        out[section] = {**profile[section], **sizes}
    out["reward_model"]["base"] = str(reward)
    # A random stand-in's verdicts flip with the answers' order, leaving no pair of its own: the release's pairs train the reward model.
    out["reward_model"]["preferences"] = "released"
    out["evaluate"]["judge"] = {**profile["evaluate"]["judge"], "base_url": judge_url, "api_key_env": "NO_SUCH_KEY"}
    return out


def release_layout(root: Path, data: dict) -> None:
    """The synthetic world's files under the names of the paper's release (PAPER.md) and of the
    benchmarks as distributed: each zero-shot set in two files, each set's video folder a link
    to the world's videos."""
    d = root / "data"
    shutil.copy(d / "SFT_short.json", d / data["policy_init_file"])
    judged = [r for r in hand_judged(root) if r["dropped"] is None]
    write_records(d / data["preference_file"], [preference_record(r) for r in judged])
    sets = from_dict(DataConfig, data, "data")
    for files in sets.zeroshot_sets().values():
        split_qa(d / "eval/zeroshot_qa.json", d / files.questions, d / files.answers)
    for name, file in sets.benchmark_sets().items():
        (d / file.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(d / f"eval/{name}_qa.json", d / file.path)
    folders = [files.videos for files in sets.zeroshot_sets().values()]
    folders += [file.videos for file in sets.benchmark_sets().values()]
    for folder in map(root.joinpath, sorted(set(folders))):
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.symlink_to(d / "videos/synthetic_8frames", target_is_directory=True)


@pytest.fixture(scope="module")
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeServer)
    server.requests = 0
    for running in serving(server):
        yield f"http://127.0.0.1:{running.server_address[1]}/v1"


def world_text(root: Path) -> list[str]:
    """Every turn of the stand-in data: what a stand-in's tokenizer learns."""
    names = ["SFT_short.json", "SFT_long.json", "RL_data.json"]
    return [turn["value"] for name in names for record in json.loads((root / "data" / name).read_text()) for turn in record["conversations"]]


# The architecture of each profile's models: LLaVA-NeXT-Video on a Llama (Vicuna's) language model, and Qwen2.5-VL.
STAND_INS = {"paper.yaml": lambda out, corpus: build_tiny_model(TINY_VLM, corpus, out, seed=0),
             "paper_qwen.yaml": lambda out, corpus: build_tiny_qwen(out)}


@pytest.mark.parametrize("profile", STAND_INS)
def test_every_stage_runs_under_the_paper_profile_on_a_tiny_stand_in(profile, tmp_path, monkeypatch, judge_url):
    settings = yaml.safe_load((ROOT / "params" / profile).read_text())
    root, models = tmp_path / "project", {name: tmp_path / name for name in ("policy_base", "reward_base")}
    params_dict = stand_in(settings, models["policy_base"], models["reward_base"], judge_url)
    make_project(root, params_dict)
    release_layout(root, settings["data"])
    for folder in models.values():
        STAND_INS[profile](folder, world_text(root))
    monkeypatch.chdir(root)
    params = load_params("params.yaml")
    assert params.reward_model.load_in_4bit and params.sft.gradient_checkpointing and params.ppo.policy_init

    prepare.run(params)
    base.materialise(params)
    sft.run(params)
    preferences.run(params, progress=False)
    reward_model.run(params, progress=False)
    ppo.run(params)
    metrics = evaluate.run(params, progress=False)

    assert set(metrics["models"]) == {"base", "sft", "rlaif"}
    assert json.loads((root / "artifacts/sft/curriculum.json").read_text())["total_steps"] > 0
    assert json.loads((root / reward_model.OUT / "reward_model.json").read_text())["base"] == str(params_dict["reward_model"]["base"])
    assert len(json.loads((root / ppo.OUT / "seed-0" / ppo.LOG_FILE).read_text())) == 1


# The published shapes of each profile's policy: frame side, patch side, tokens pooled into one, context length.
VISION = {"paper.yaml": (336, 14, 4, 4096),       # LLaVA-NeXT-Video-7B: CLIP ViT-L/14-336, 2x2 average pooling, Vicuna's context
          "paper_qwen.yaml": (336, 14, 8, 32768)}  # Qwen2.5-VL-7B: 2x2 patches merged, 2 frames a temporal patch (frames read at 336 px)


@pytest.mark.parametrize("profile", VISION)
def test_the_paper_profiles_videos_fit_their_models_context_with_room_for_the_conversation(profile):
    params = load_params(ROOT / "params" / profile)
    side, patch, pooled, context = VISION[profile]
    visual = params.data.num_frames * (side // patch) ** 2 // pooled
    longest = params.ppo.query_length + params.ppo.max_new_tokens  # a rollout: question and answer beside the video
    assert visual + longest <= params.sft.max_length <= context, (visual, longest, params.sft.max_length)
    assert params.reward_model.max_length >= visual + longest

