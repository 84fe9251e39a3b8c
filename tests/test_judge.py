"""The judge: label read-out from logits, order-swap averaging, filtering, on a real tiny VLM."""

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_rlaif import prompts
from vlm_rlaif.collate import IGNORE_INDEX, VideoConversationCollator
from vlm_rlaif.data import SFTRecord, Turn
from vlm_rlaif.generation import encode_videos
from vlm_rlaif.judge import (JudgeError, Verdict, answer_likelihoods, judge_pairs, label_probabilities, label_token_ids,
                             likelihood_pairs, likelihood_verdict, read_judge, select)
from vlm_rlaif.modeling import build_inputs, load_model_and_processor

FRAMES = 4
QUESTION = "What colour is the triangle?"
ANSWERS = ["Green.", "The video shows two objects. A red circle moves from left to right."]


def videos(n: int) -> list[np.ndarray]:
    return [np.random.default_rng(10 + i).integers(0, 256, (FRAMES, 32, 32, 3), dtype=np.uint8) for i in range(n)]


def test_label_probabilities_read_the_two_labels_only():
    logits = torch.full((2, 6), -5.0)
    logits[0, 2], logits[0, 4] = 2.0, 0.0  # A likely
    logits[1, 2], logits[1, 4], logits[1, 0] = 0.0, 0.0, 10.0  # even between labels, mass elsewhere
    p_a, mass = label_probabilities(logits, (2, 4))
    assert p_a[0].item() == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item())
    assert p_a[1].item() == pytest.approx(0.5)
    full = torch.softmax(logits, -1)
    assert mass.tolist() == pytest.approx((full[:, 2] + full[:, 4]).tolist())
    assert mass[1] < 0.01 < 0.9 < mass[0]


def test_label_tokens_are_the_ones_sft_trains_on_judge_examples(tiny_vlm, tmp_path):
    _, processor = tiny_vlm
    labels = label_token_ids(processor)
    assert labels[0] != labels[1]
    folder = tmp_path / "v"
    folder.mkdir()
    for t, frame in enumerate(videos(1)[0]):
        Image.fromarray(frame).save(folder / f"{t}.png")
    images = [f"v/{t}.png" for t in range(FRAMES)]
    collate = VideoConversationCollator(processor, tmp_path, FRAMES, 512)
    for label, token in zip(prompts.JUDGE_LABELS, labels):
        record = SFTRecord(id=0, conversations=[Turn("human", "<image>\n" + prompts.judge_prompt(QUESTION, *ANSWERS)), Turn("gpt", label)], images=images)
        batch = collate([record])
        trained = batch["labels"][0][batch["labels"][0] != IGNORE_INDEX]
        assert trained[0].item() == token  # the reply's first trained token is the label token


def test_label_tokens_need_distinct_labels(tiny_vlm, monkeypatch):
    monkeypatch.setattr(prompts, "JUDGE_LABELS", ("A", "A"))
    with pytest.raises(JudgeError, match="same token"):
        label_token_ids(tiny_vlm[1])


def test_read_judge_matches_a_full_forward_pass_in_any_batch_and_with_features(tiny_vlm):
    model, processor = tiny_vlm
    vids = videos(3)
    texts = [prompts.judge_prompt(QUESTION, ANSWERS[i % 2], ANSWERS[1 - i % 2]) for i in range(3)]
    p_a, mass = read_judge(model, processor, vids, texts, batch_size=3)
    conversations = [[{"from": "human", "value": f"<image>\n{t}"}] for t in texts]
    with torch.no_grad():
        logits = model(**build_inputs(processor, vids, conversations, add_generation_prompt=True)).logits[:, -1]
    want_a, want_mass = label_probabilities(logits, label_token_ids(processor))
    assert p_a == pytest.approx(want_a.tolist(), abs=1e-5) and mass == pytest.approx(want_mass.tolist(), abs=1e-5)
    assert read_judge(model, processor, vids, texts, batch_size=1)[0] == pytest.approx(p_a, abs=1e-5)
    features = encode_videos(model, build_inputs(processor, vids, conversations, add_generation_prompt=True))
    assert read_judge(model, processor, vids, texts, features=features)[0] == pytest.approx(p_a, abs=1e-5)
    with pytest.raises(JudgeError, match="3 videos, 2 prompts"):
        read_judge(model, processor, vids, texts[:2])


def test_swapping_the_responses_mirrors_the_averaged_preference(tiny_vlm):
    model, processor = tiny_vlm
    vids = videos(2)
    contexts = [None, prompts.format_context(["A red circle enters.", "It stays still."])]
    forward = judge_pairs(model, processor, vids, [QUESTION] * 2, [ANSWERS[0]] * 2, [ANSWERS[1]] * 2, contexts)
    backward = judge_pairs(model, processor, vids, [QUESTION] * 2, [ANSWERS[1]] * 2, [ANSWERS[0]] * 2, contexts)
    for f, b in zip(forward, backward):
        assert f.first_as_a == pytest.approx(b.first_as_b, abs=1e-5) and f.first_as_b == pytest.approx(b.first_as_a, abs=1e-5)
        assert f.preference + b.preference == pytest.approx(1.0, abs=1e-5) and f.consistent == b.consistent
        assert 0 < f.label_mass <= 1
    assert forward[0].first_as_a != pytest.approx(forward[1].first_as_a, abs=1e-6)  # the context reaches the judge


def test_averaging_cancels_a_position_bias_and_selection_counts_what_it_drops():
    biased = Verdict(first_as_a=0.9, first_as_b=0.9, label_mass=1.0)  # always says A
    assert biased.preference == pytest.approx(0.5) and not biased.consistent and biased.margin == pytest.approx(0.0)
    sure = Verdict(first_as_a=0.8, first_as_b=0.3, label_mass=1.0)
    assert sure.preference == pytest.approx(0.75) and sure.consistent and sure.winner == 1 and sure.margin == pytest.approx(0.5)
    second = Verdict(first_as_a=0.45, first_as_b=0.6, label_mass=1.0)
    assert second.consistent and second.winner == 2 and second.margin == pytest.approx(0.15)
    kept, counts = select([biased, sure, second], min_margin=0.2)
    assert kept == [1] and counts == {"inconsistent": 1, "low_margin": 1}
    assert select([biased, sure, second], min_margin=0.0) == ([1, 2], {"inconsistent": 1, "low_margin": 0})
    # without the order filter the biased verdict stands on its averaged preference, margin 0
    assert select([biased, sure, second], min_margin=0.0, drop_inconsistent=False) == ([0, 1, 2], {"inconsistent": 0, "low_margin": 0})


def test_the_likelihood_reading_is_the_models_own_loss_in_no_order(tiny_vlm):
    model, processor = tiny_vlm
    vids = videos(3)
    scores = answer_likelihoods(model, processor, vids, [QUESTION] * 3, [ANSWERS[0], ANSWERS[1], ANSWERS[0]],
                                batch_size=2)
    for video, answer, score in zip(vids, [ANSWERS[0], ANSWERS[1], ANSWERS[0]], scores):
        conversation = [{"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer}]
        batch = build_inputs(processor, [video], [conversation], add_generation_prompt=False, assistant_masks=True)
        mask = batch.pop("assistant_masks").bool()
        with torch.no_grad():
            loss = model(**batch, labels=batch["input_ids"].masked_fill(~mask, IGNORE_INDEX)).loss
        assert score == pytest.approx(-loss.item(), abs=1e-4)  # the mean over the answer and its end of turn
    contexts = [None, prompts.format_context(["A green triangle stays still.", "It stays still."])]
    forward = likelihood_pairs(model, processor, vids[:2], [QUESTION] * 2, [ANSWERS[0]] * 2, [ANSWERS[1]] * 2, contexts)
    backward = likelihood_pairs(model, processor, vids[:2], [QUESTION] * 2, [ANSWERS[1]] * 2, [ANSWERS[0]] * 2, contexts)
    for f, b in zip(forward, backward):
        assert f.preference + b.preference == pytest.approx(1.0, abs=1e-5) and f.consistent and f.label_mass == 1.0
    assert forward[0].preference != pytest.approx(forward[1].preference, abs=1e-6)  # the context reaches the reading
    assert likelihood_verdict(-1.0, -2.0).winner == 1 and likelihood_verdict(-2.0, -1.0).winner == 2


def test_the_likelihood_judge_prefers_the_answer_a_model_that_sees_gives(built):
    """Taught to name an object's colour, the model's likelihood reading picks the right
    colour over a wrong one on videos it never saw; untaught, it cannot tell them apart."""
    model, processor = load_model_and_processor(built / "artifacts/base")
    colours = {"Red.": (220, 30, 30), "Green.": (30, 200, 30), "Blue.": (30, 30, 220), "Yellow.": (230, 220, 30)}
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[list[np.ndarray], list[str]]:
        frames, answers = [], []
        for answer in rng.choice(list(colours), n):
            video = np.full((4, 32, 32, 3), 30, np.uint8)
            x, y = rng.integers(0, 22, 2)
            video[:, y : y + 10, x : x + 10] = colours[answer]
            frames.append(video)
            answers.append(str(answer))
        return frames, answers

    def agreement() -> float:
        frames, right = draw(24)
        wrong = [list(colours)[(list(colours).index(a) + 1 + i % 3) % 4] for i, a in enumerate(right)]
        verdicts = likelihood_pairs(model, processor, frames, ["What colour is the object?"] * 24, right, wrong,
                                    [None] * 24, batch_size=8)
        return float(np.mean([v.winner == 1 for v in verdicts]))

    before = agreement()
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(200):
        frames, answers = draw(8)
        conversations = [[{"from": "human", "value": "<image>\nWhat colour is the object?"}, {"from": "gpt", "value": a}]
                         for a in answers]
        batch = build_inputs(processor, frames, conversations, add_generation_prompt=False, assistant_masks=True)
        mask = batch.pop("assistant_masks").bool()
        model(**batch, labels=batch["input_ids"].masked_fill(~mask, IGNORE_INDEX)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert agreement() >= 0.9 > before
