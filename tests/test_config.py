"""Params validation: both profiles load; every bad key, type or value is named."""

import dataclasses
from pathlib import Path

import pytest
import yaml

from vlm_rlaif.config import ConfigError, Params, WorldConfig, load_params

ROOT = Path(__file__).resolve().parents[1]


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def test_embedded_default_validates():
    p = load_params(ROOT / "params.yaml")
    assert p.world is not None and p.world.num_frames >= p.data.num_frames
    assert p.base.model == "tiny" and p.base.family == "llava_next_video"


def test_paper_profile_carries_the_official_hyperparameters():
    p = load_params(ROOT / "params" / "paper.yaml")
    assert p.world is None
    assert p.base.model == "llava-hf/LLaVA-NeXT-Video-7B-hf"
    assert p.data.num_frames == 16  # 50 in the paper, with its own pooling (params/paper.yaml)
    assert (p.sft.lora.r, p.sft.lora.alpha, p.sft.learning_rate) == (32, 32, 1e-4)
    rm = p.reward_model
    assert (rm.lora.r, rm.lora.alpha, rm.learning_rate, rm.centering_coef, rm.heldout) == (64, 16, 2e-5, 1e-3, 500)
    ppo = p.ppo
    assert (ppo.learning_rate, ppo.rollout_batch_size, ppo.step_batch_size, ppo.ppo_epochs) == (3e-5, 256, 128, 2)
    assert (ppo.clip_range, ppo.value_clip, ppo.vf_coef, ppo.gamma, ppo.lam) == (0.2, 0.2, 0.1, 1.0, 1.0)
    assert (ppo.kl_coef, ppo.kl_estimator, ppo.max_new_tokens, ppo.reward_scale) == (0.1, "k1_clamped", 896, 10.0)
    assert (ppo.length_penalty, ppo.missing_eos_penalty, ppo.whiten_rewards) == (10.0, 8.0, False)
    assert p.preferences.num_clips == 3 and p.evaluate.temperature == 0.2


def _knobs(obj, prefix=""):
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        yield prefix + f.name
        if dataclasses.is_dataclass(value):
            yield from _knobs(value, prefix + f.name + ".")


def _keys(d, prefix=""):
    for k, v in d.items():
        yield prefix + k
        if isinstance(v, dict) and prefix + k not in ("data.zeroshot_qa_files",):
            yield from _keys(v, prefix + k + ".")


def test_params_yaml_spells_out_every_knob():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    missing = set(_knobs(Params(world=WorldConfig()))) - set(_keys(raw))
    assert not missing, f"params.yaml lacks {sorted(missing)}"


@pytest.mark.parametrize(
    "text, named",
    [
        ("ppo: {clip_rang: 0.2}", "ppo.clip_rang: unknown key"),
        ("base: {tiny: {layers: 2}}", "base.tiny.layers: unknown key"),
        ("bogus: 1", "bogus: unknown key"),
        ("sft: {batch_size: 2.5}", "sft.batch_size: expected an integer"),
        ("sft: {curriculum: 'yes'}", "sft.curriculum: expected true or false"),
        ("ppo: {clip_range: -0.1}", "ppo.clip_range: -0.1 must be > 0"),
        ("ppo: {gamma: 1.5}", "ppo.gamma: 1.5 must be <= 1"),
        ("world: {num_sft_videos: 0}", "world.num_sft_videos: 0 must be > 0"),
        ("base: {family: gpt2}", "base.family: 'gpt2' is not one of"),
        ("data: {sft_files: SFT_short.json}", "data.sft_files: expected a list"),
        ("data: {rl_file: null}", "data.rl_file: expected a string, got None"),
        ("data: {curriculum: {threshold_words: 20}}", "data.curriculum: set exactly one"),
        ("ppo: {rollout_batch_size: 10, step_batch_size: 4}", "ppo.step_batch_size: must divide"),
        ("ppo: {seeds: [0, 0]}", "ppo.seeds: expected distinct non-negative seeds"),
        ("ppo: {seeds: []}", "ppo.seeds: expected distinct"),
        ("evaluate: {judge: {kind: gpt}}", "evaluate.judge.kind: 'gpt' is not one of"),
        ("base: {tiny: {image_size: 60, patch_size: 8}}", "base.tiny.image_size"),
        ("sft: {lora: {r: 0}}", "sft.lora.r: 0 must be > 0"),
        ("data: {zeroshot_qa_files: {msvd: {questions: 3}}}",
         "data.zeroshot_qa_files.msvd.questions: expected a string"),
        ("data: {zeroshot_qa_files: {msvd: {answers: a.json}}}",
         "data.zeroshot_qa_files.msvd.questions: missing"),
        ("data: {zeroshot_qa_files: {msvd: {questions: q.json, answer: a.json}}}",
         "data.zeroshot_qa_files.msvd.answer: unknown key "
         "(known keys here: questions, answers, videos)"),
        ("data: {zeroshot_qa_files: {msvd: [q.json]}}",
         "data.zeroshot_qa_files.msvd: ['q.json'] matches none of"),
        ("data: {generic_qa_file: {path: g.json, video: v}}",
         "data.generic_qa_file.video: unknown key"),
        ("data: {consistency_qa_file: {videos: v}}", "data.consistency_qa_file.path: missing"),
        ("evaluate: {released: {theirs: {num_frames: 8}}}",
         "evaluate.released.theirs.path: missing"),
        ("- a\n- b", "expected a mapping"),
    ],
)
def test_bad_params_name_the_key(tmp_path, text, named):
    with pytest.raises(ConfigError) as e:
        load_params(_write(tmp_path, text))
    assert named in str(e.value)
    assert str(tmp_path / "p.yaml") in str(e.value)


def test_evaluation_sets_take_a_path_or_their_files_and_video_folder(tmp_path):
    data = load_params(_write(tmp_path, """
data:
  eval_video_root: data/eval
  zeroshot_qa_files:
    merged: eval/qa.json
    msvd:
      questions: eval/MSVD/test_q.json
      answers: eval/MSVD/test_a.json
      videos: data/eval/MSVD/videos
    tgif: {questions: eval/TGIF/test_q.json, answers: eval/TGIF/test_a.json}
  generic_qa_file: {path: eval/generic_qa.json, videos: data/eval/Test_Videos}
  temporal_qa_file: null
""")).data
    sets = data.zeroshot_sets()
    assert (sets["merged"].questions, sets["merged"].answers) == ("eval/qa.json", None)
    assert sets["msvd"].answers == "eval/MSVD/test_a.json"
    folders = [data.eval_videos(f"zeroshot/{name}") for name in sets]
    assert folders == ["data/eval", "data/eval/MSVD/videos", "data/eval"]
    assert list(data.benchmark_sets()) == ["generic", "consistency"]
    assert data.eval_videos("generic") == "data/eval/Test_Videos"
    assert data.eval_videos("consistency") == "data/eval"


@pytest.mark.parametrize("profile", ["paper.yaml", "paper_qwen.yaml"])
def test_paper_profiles_read_the_benchmarks_as_distributed(profile):
    data = load_params(ROOT / "params" / profile).data
    sets = data.zeroshot_sets()
    assert list(sets) == ["msvd", "msrvtt", "tgif", "activitynet"]
    assert all(files.questions.endswith("test_q.json") for files in sets.values())
    assert all(files.answers.endswith("test_a.json") for files in sets.values())
    assert len({data.eval_videos(f"zeroshot/{name}") for name in sets}) == 4  # a folder per set
    benchmark = {data.eval_videos(name) for name in ("generic", "temporal", "consistency")}
    assert benchmark == {"data/eval/Test_Videos"}


def test_missing_and_unparsable_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(_write(tmp_path, "a: [1, 2"))


def test_overrides_replace_sections_and_are_validated(tmp_path):
    path = _write(tmp_path, "seed: 3\nsft: {batch_size: 4}")
    p = load_params(path, overrides={"sft": {"batch_size": 2}, "seed": None})
    assert p.sft.batch_size == 2 and p.seed == 3
    with pytest.raises(ConfigError, match="sft.batch_size"):
        load_params(path, overrides={"sft": {"batch_size": "two"}})
