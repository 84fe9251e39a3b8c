"""The reward model: its loss, where its head reads, saving and loading, the held-out split,
and the stage (training, resume, rewards of every judged pair, measured quality)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from vlm_rlaif import prompts, reward_model as rm
from vlm_rlaif.config import LoraConfig, load_params
from vlm_rlaif.data import PreferenceRecord, write_records
from vlm_rlaif.modeling import add_lora, build_inputs, load_model_and_processor
from vlm_rlaif.preferences import preference_record
from vlm_rlaif.tiny import build_tiny_model

from conftest import TINY_CORPUS, TINY_VLM, hand_judged, resumed_step

LORA = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    return build_tiny_model(TINY_VLM, TINY_CORPUS, tmp_path_factory.mktemp("rm") / "model", seed=0)


def _reward_model(path: Path, seed: int = 0, reading: str = "head"):
    """A fresh reward model on the tiny VLM, its adapter moved off the identity so it counts."""
    model, processor = load_model_and_processor(path)
    backbone = add_lora(model, LORA)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return rm.RewardModel(backbone, reading=reading, scale=10.0), processor


def _videos(n: int) -> list[np.ndarray]:
    return [np.random.default_rng(40 + i).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for i in range(n)]


def test_loss_on_hand_computed_numbers():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # -log sigmoid(1) and -log sigmoid(-1), averaged; then 0.1 * |mean of (3, 1)|
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2 + 0.1 * 2.0
    assert rm.preference_loss(chosen, rejected, 0.1).item() == pytest.approx(expected, rel=1e-6)
    assert rm.preference_loss(chosen, rejected, 0.0).item() == pytest.approx(expected - 0.2, rel=1e-6)
    # the gradient raises the chosen reward and lowers the rejected one
    c, r = torch.tensor([0.5], requires_grad=True), torch.tensor([0.5], requires_grad=True)
    rm.preference_loss(c, r, 0.0).backward()
    assert c.grad.item() == pytest.approx(-0.5) and r.grad.item() == pytest.approx(0.5)


def test_last_token_index_with_either_padding():
    assert rm.last_token_index(torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])).tolist() == [2, 4]
    assert rm.last_token_index(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])).tolist() == [4, 4]


def _ask(question: str) -> list[dict]:
    return [{"from": "human", "value": f"<image>\n{question}"}]


def test_the_head_reads_the_last_real_token_with_left_or_right_padding(tiny_path):
    reward_model, processor = _reward_model(tiny_path)
    videos = _videos(2)
    asked = [_ask("What colour?"), _ask("Describe the video.")]
    responses = ["Green.", "A red circle moves from left to right, then a blue square enters."]
    alone = [rm.score(reward_model, processor, [v], [p], [r])[0].item() for v, p, r in zip(videos, asked, responses)]
    assert abs(alone[0] - alone[1]) > 1e-3  # different inputs, different rewards: the comparison below can fail
    rows = [rm.reward_conversation(p, r) for p, r in zip(asked, responses)]
    for side in ("left", "right"):
        inputs = build_inputs(processor, videos, rows, add_generation_prompt=False, padding_side=side)
        assert (inputs["attention_mask"] == 0).any()  # the short row really is padded
        with torch.no_grad():
            assert reward_model(**inputs).tolist() == pytest.approx(alone, abs=1e-5)
    # the scored token is the instruction's last: the same response without the instruction scores otherwise
    inputs = build_inputs(processor, videos[:1], [rows[0][:2]], add_generation_prompt=False)
    with torch.no_grad():
        assert reward_model(**inputs).item() != pytest.approx(alone[0], abs=1e-4)


def test_the_response_is_the_last_assistant_turn():
    masks = torch.tensor([[0, 1, 1, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0, 0], [0] * 8])
    assert rm.response_mask(masks).int().tolist() == [
        [0, 0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0]]


def test_the_likelihood_reading_is_the_responses_log_ratio_against_the_frozen_base(tiny_path):
    reward_model, processor = _reward_model(tiny_path, reading="likelihood")
    videos = _videos(2)
    earlier = [*_ask("What happens?"), {"from": "gpt", "value": "A circle moves."},
               {"from": "human", "value": "And then?"}]
    asked = [earlier, _ask("What colour?")]
    responses = ["A red square enters from the left.", "Green."]
    rewards = rm.score(reward_model, processor, videos, asked, responses, batch_size=2)
    rows = [rm.reward_conversation(p, r) for p, r in zip(asked, responses)]
    inputs = build_inputs(processor, videos, rows, add_generation_prompt=False,
                          assistant_masks=True)
    turns = inputs.pop("assistant_masks")
    mask = rm.response_mask(turns)[:, 1:].float()
    assert turns[0].sum() > mask[0].sum() > 0  # the earlier answer is not scored

    def mean_logprob() -> torch.Tensor:
        logits = reward_model.backbone(**inputs).logits[:, :-1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, inputs["input_ids"][:, 1:, None])[..., 0]
        return (logp * mask).sum(1) / mask.sum(1)

    with torch.no_grad():
        tuned = mean_logprob()
        with reward_model.backbone.disable_adapter():
            base = mean_logprob()
    assert (tuned - base).abs().min() > 1e-3  # the adapter counts: zero rewards would pass anything
    torch.testing.assert_close(rewards, 10.0 * (tuned - base), rtol=1e-4, atol=1e-4)
    alone = torch.cat([rm.score(reward_model, processor, [v], [p], [r])
                       for v, p, r in zip(videos, asked, responses)])
    torch.testing.assert_close(alone, rewards, rtol=1e-4, atol=1e-4)  # padding changes nothing


def test_save_and_load_give_identical_rewards(tiny_path, tmp_path):
    reward_model, processor = _reward_model(tiny_path, seed=3)
    with torch.no_grad():
        reward_model.head.bias.fill_(0.25)
    videos = _videos(3)
    rows = dict(prompts=[_ask("What colour?")] * 3, responses=["Green.", "Red.", "Green."],
                contexts=[None, None, ["A green circle.", "It stays."]])
    before = rm.score(reward_model, processor, videos, **rows, batch_size=2)
    assert before[0] != before[2]  # the context in the instruction is read
    rm.save_reward_model(reward_model, tmp_path / "rm", base=tiny_path)
    assert {p.name for p in (tmp_path / "rm").iterdir()} == {rm.ADAPTER_DIR, rm.HEAD_FILE, rm.CONFIG_FILE}
    assert not any("vision_tower" in k or "lora" not in k for k in load_file(tmp_path / "rm" / rm.ADAPTER_DIR / "adapter_model.safetensors"))
    loaded, loaded_processor = rm.load_reward_model(tmp_path / "rm")
    after = rm.score(loaded, loaded_processor, videos, **rows, batch_size=3)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    with pytest.raises(FileNotFoundError, match="not a saved reward model"):
        rm.load_reward_model(tmp_path)
    with pytest.raises(ValueError, match="score: 3 videos, 3 prompts, 2 responses"):
        rm.score(loaded, loaded_processor, videos, rows["prompts"], rows["responses"][:2])


def test_the_reward_models_input_is_prompt_response_instruction_with_the_context_only_when_asked():
    two_turns = [*_ask("What happens?"), {"from": "gpt", "value": "A circle moves."}, {"from": "human", "value": "And then?"}]
    plain = rm.reward_conversation(two_turns, "It leaves.")
    with_context = rm.reward_conversation(_ask("What happens?"), "It leaves.", ["A red circle.", "It leaves."])
    assert [t["from"] for t in plain] == ["human", "gpt", "human", "gpt", "human"] and plain[3]["value"] == "It leaves."
    assert plain[-1]["value"] == prompts.reward_instruction() and "Clip" not in plain[-1]["value"]
    assert "Clip 1: A red circle.\nClip 2: It leaves." in with_context[-1]["value"]
    assert with_context[-1]["value"].startswith(plain[-1]["value"])
    with pytest.raises(ValueError, match="the prompt must end with a human turn"):
        rm.reward_conversation(two_turns[:2], "It leaves.")


def test_held_out_split_is_a_share_or_a_count_and_never_empties_training():
    records = list(range(40))
    train, held = rm.split_heldout(records, 0.1, seed=0)
    assert len(held) == 4 and sorted(train + held) == records
    assert rm.split_heldout(records, 0.1, seed=0) == (train, held)
    assert len(rm.split_heldout(records, 7, seed=0)[1]) == 7
    assert len(rm.split_heldout(records, 0.001, seed=0)[1]) == 1
    with pytest.raises(ValueError, match="reward_model.heldout 40: 40 preference pairs leave nothing"):
        rm.split_heldout(records, 40, seed=0)
    with pytest.raises(ValueError, match="reward_model.heldout 2.5: from 1 up it is a count"):
        rm.split_heldout(records, 2.5, seed=0)
    # three pairs per prompt: a prompt's pairs stay together, the count met by whole prompts
    train, held = rm.split_heldout(records, 0.25, seed=1, prompt=lambda r: r // 3)
    assert len(held) in (12, 13, 14) and sorted(train + held) == records
    assert not {r // 3 for r in train} & {r // 3 for r in held}
    with pytest.raises(ValueError, match="40 preference pairs of 2 prompts leave nothing"):
        rm.split_heldout(records, 21, seed=0, prompt=lambda r: r // 20)


# --------------------------------------------------------------------------- the stage

STAGE = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}, "learning_rate": 1.0e-3,
         "epochs": 3.0, "batch_size": 1, "heldout": 1, "save_steps": 2, "max_length": 512}


@pytest.fixture
def staged(built, monkeypatch, tmp_path):
    """The built tiny project with AI preferences written, the base standing in for the SFT model."""
    monkeypatch.chdir(built)
    prefs = tmp_path / "preferences"
    judged = hand_judged(built)
    prefs.mkdir()
    (prefs / "judged.json").write_text(json.dumps(judged))
    write_records(prefs / "preferences.json", [preference_record(r) for r in judged if r["dropped"] is None])
    params = load_params("params.yaml", overrides={"reward_model": STAGE})
    return params, prefs, judged


def test_the_stage_trains_saves_and_scores_every_judged_pair(staged, tmp_path):
    params, prefs, judged = staged
    out = tmp_path / "rm"
    rewards = rm.run(params, preferences=prefs, policy=Path("artifacts/base"), out=out, progress=False)
    split = json.loads((out / "split.json").read_text())
    assert len(split["heldout"]) == 1 and len(split["train"]) == len(judged) - 2
    kept = {rm.pair_key(r) for r in judged if r["dropped"] is None}
    assert set(split["train"] + split["heldout"]) == kept
    assert split["total_steps"] == 3 * (len(judged) - 2)  # three epochs of batch 1
    saved = json.loads((out / "rewards.json").read_text())
    assert saved["uids"] == [r["uid"] for r in judged] and np.allclose(saved["rewards"], rewards, atol=1e-6)
    assert rewards.shape == (len(judged), 2)
    reward_model, processor = rm.load_reward_model(out)
    assert reward_model.backbone.peft_config["default"].r == 4
    scenes = json.loads(Path("data/scenes.json").read_text())
    quality = rm.reward_quality(judged, rewards, split, scenes)
    assert quality["pairs"] == {"train": len(judged) - 2, "heldout": 1, "unkept": 1}
    assert quality["heldout"]["ai"]["pairs"] == 1 and quality["unkept"]["judge"]["pairs"] == 1
    # the hand-made labels are the oracle's; two pairs cannot tell a sure ranker from a coin
    assert quality["oracle"]["judge"] == {"accuracy": 1.0, "pairs": 2, "at_chance": True}


def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_same_model(staged, tmp_path, capsys):
    params, prefs, _ = staged
    places = {"preferences": prefs, "policy": Path("artifacts/base")}
    rm.train(params, **places, out=tmp_path / "whole", checkpoints=tmp_path / "ckpt_whole")
    rm.train(params, **places, out=tmp_path / "first", checkpoints=tmp_path / "ckpt")
    last = max((tmp_path / "ckpt").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    shutil.rmtree(last)  # killed before its final checkpoint: the one before it remains
    assert not (tmp_path / "ckpt" / last.name).exists() and list((tmp_path / "ckpt").glob("checkpoint-*"))
    rm.train(params, **places, out=tmp_path / "resumed", checkpoints=tmp_path / "ckpt")
    assert resumed_step(capsys.readouterr().err) < int(last.name.split("-")[1])
    for name in (rm.HEAD_FILE, f"{rm.ADAPTER_DIR}/adapter_model.safetensors"):
        whole, resumed = load_file(tmp_path / "whole" / name), load_file(tmp_path / "resumed" / name)
        for key in whole:
            torch.testing.assert_close(resumed[key], whole[key], rtol=1e-4, atol=1e-6, msg=key)
    checkpoint = sorted((tmp_path / "ckpt").glob("checkpoint-*"))[0]
    assert not list(checkpoint.glob("model*.safetensors"))  # the frozen base is never copied into a checkpoint


def test_the_collator_reads_every_prompt_turn_and_puts_the_chosen_rows_first(built, monkeypatch, tiny_path):
    monkeypatch.chdir(built)
    params = load_params("params.yaml", overrides={"reward_model": STAGE})
    images = json.loads(Path("data/RL_data.json").read_text())[0]["images"]
    turns = [{"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": "Red."},
             {"from": "human", "value": "And its shape?"}, {"from": "gpt", "value": ""}]
    record = PreferenceRecord.from_dict({"conversations": turns, "images": images, "output_1": {"value": "A circle."},
                                         "output_2": {"value": "A square."}, "preference": 2}, "test")
    processor = load_model_and_processor(tiny_path)[1]
    batch = rm.PairCollator(processor, params.data.video_root, params.data.num_frames, params.reward_model)([record])
    chosen, rejected = (processor.tokenizer.decode(row[mask.bool()]) for row, mask in zip(batch["input_ids"], batch["attention_mask"]))
    for text, response in ((chosen, "A square."), (rejected, "A circle.")):
        assert "Red." in text and "And its shape?" in text and response in text
        assert text.index("And its shape?") < text.index(response) < text.index(prompts.reward_instruction()[:20])


def test_too_long_pairs_and_missing_context_are_named(staged, tmp_path):
    params, prefs, _ = staged
    places = {"preferences": prefs, "policy": Path("artifacts/base")}
    short = load_params("params.yaml", overrides={"reward_model": STAGE | {"max_length": 20}})
    with pytest.raises(ValueError, match=r"preference pairs \(uids .*\): .* exceed reward_model.max_length 20"):
        rm.train(short, **places, out=tmp_path / "a", checkpoints=tmp_path / "ca")
    pairs = json.loads((prefs / "preferences.json").read_text())
    (prefs / "preferences.json").write_text(json.dumps([{k: v for k, v in p.items() if k != "context"} for p in pairs]))
    with_context = load_params("params.yaml", overrides={"reward_model": STAGE | {"context_in_instruction": True}})
    with pytest.raises(ValueError, match=r"preference pair uid \d+: reward_model.context_in_instruction is set"):
        rm.train(with_context, **places, out=tmp_path / "b", checkpoints=tmp_path / "cb")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_reward_quality_counts_against_the_oracle(built):
    scenes = json.loads((built / "data" / "scenes.json").read_text())
    judged = hand_judged(built)
    n = len(judged)
    right = np.array([[1.0, 0.0] if r["preference"] == 1 else [0.0, 1.0] for r in judged])
    judged[1] |= {"uid": judged[0]["uid"], "pair": 1}  # two pairs of one prompt are counted apart
    split = {"train": [rm.pair_key(judged[0])], "heldout": [rm.pair_key(judged[1])]}
    good = rm.reward_quality(judged, right, split, scenes)
    assert good["pairs"] == {"train": 1, "heldout": 1, "unkept": n - 2}
    assert good["heldout"]["ai"]["accuracy"] == good["heldout"]["oracle"]["accuracy"] == 1.0
    assert good["oracle"]["reward_model"] == {"accuracy": 1.0, "pairs": n - 1, "at_chance": True}  # few pairs
    assert good["oracle"]["reward_correlation"] > 0.5 and good["oracle"]["margin_correlation"] > 0.5
    offsets = {uid: 10.0 * k for k, uid in enumerate(sorted({str(r["uid"]) for r in judged}))}
    shifted = right + np.array([[offsets[str(r["uid"])]] * 2 for r in judged])  # per prompt
    moved = rm.reward_quality(judged, shifted, split, scenes)["oracle"]
    within = good["oracle"]["within_prompt_correlation"]
    assert within > 0.5 and moved["within_prompt_correlation"] == pytest.approx(within)
    assert moved["reward_correlation"] < good["oracle"]["reward_correlation"] - 0.2
    flipped = rm.reward_quality(judged, right[:, ::-1], split, scenes)
    assert flipped["oracle"]["reward_model"]["accuracy"] == 0.0 and flipped["unkept"]["judge"]["accuracy"] == 0.0
    assert flipped["oracle"]["judge"]["accuracy"] == 1.0  # the judge's own agreement does not depend on the rewards
    blind = rm.reward_quality(judged, right, split, None)
    assert "oracle" not in blind and blind["rewards"]["mean"] == pytest.approx(0.5)


def test_the_reward_model_can_sit_on_another_base_than_the_policy(staged, tmp_path):
    params, prefs, _ = staged
    other = tmp_path / "larger_sft"
    shutil.copytree("artifacts/base", other)
    on_other = load_params("params.yaml", overrides={"reward_model": STAGE | {"base": str(other), "epochs": 1.0}})
    out = rm.train(on_other, preferences=prefs, policy=Path("does/not/exist"), out=tmp_path / "rm", checkpoints=tmp_path / "ckpt")
    assert json.loads((out / rm.CONFIG_FILE).read_text())["base"] == str(other)
    assert rm.load_reward_model(out)[0].backbone.peft_config["default"].base_model_name_or_path == str(other)


@pytest.mark.parametrize("reading", rm.READINGS)
def test_the_reward_model_learns_a_preference_it_then_applies_to_pairs_it_did_not_train_on(
        built, monkeypatch, tmp_path, reading):
    """Every answer of the tiny world's SFT data against itself in capitals, the plain one
    preferred: a rule the untrained base's tokens can carry. Held-out pairs go from chance
    to ranked, whichever way the reward is read."""
    monkeypatch.chdir(built)
    records = [r for name in ("SFT_short.json", "SFT_long.json")
               for r in json.loads((Path("data") / name).read_text())]
    judged = []
    for uid, r in enumerate(records):
        answer = r["conversations"][1]["value"]
        outputs = [answer, answer.upper()] if uid % 2 else [answer.upper(), answer]
        judged.append({"conversations": r["conversations"][:2], "images": r["images"], "uid": uid,
                       "output_1": {"value": outputs[0]}, "output_2": {"value": outputs[1]},
                       "preference": 2 - uid % 2, "margin": 1.0, "dropped": None, "context": [],
                       "judge": {}})
    prefs = tmp_path / "preferences"
    prefs.mkdir()
    (prefs / "judged.json").write_text(json.dumps(judged))
    write_records(prefs / "preferences.json", [preference_record(r) for r in judged])
    settings = STAGE | {"heldout": 0.4, "min_pairs": 1, "epochs": 4.0, "reading": reading}
    params = load_params("params.yaml", overrides={"reward_model": settings})
    out = rm.train(params, preferences=prefs, policy=Path("artifacts/base"), out=tmp_path / "rm",
                   checkpoints=tmp_path / "ckpt")
    held = set(json.loads((out / "split.json").read_text())["heldout"])
    rows = [r for r in judged if rm.pair_key(r) in held]
    assert len(rows) >= 6

    def accuracy(reward_model, processor) -> float:
        rewards = rm.reward_pairs(reward_model, processor, rows, video_root=params.data.video_root,
                                  num_frames=params.data.num_frames, context_in_instruction=False)
        right = [(a > b) == (r["preference"] == 1) for (a, b), r in zip(rewards, rows)]
        return float(np.mean(right))

    base, processor = load_model_and_processor("artifacts/base")
    torch.manual_seed(params.seed)
    fresh = rm.RewardModel(add_lora(base, params.reward_model.lora), reading=reading)
    before = accuracy(fresh, processor)
    after = accuracy(*rm.load_reward_model(out))
    assert before <= 0.75 and after >= 0.85, (before, after)  # 7 held-out pairs: one may miss
