"""Oracle evaluation: references score perfectly, known mistakes cost exactly what they should,
and a real tiny model answers every question of a tiny world."""

import json
from collections import Counter

import numpy as np
import pytest

from vlm_rlaif.config import TinyModelConfig, WorldConfig
from vlm_rlaif.data import GenericQA, ZeroShotQA, read_generic_qa, read_zeroshot_qa
from vlm_rlaif.evaluation import (
    TEMPORAL_KINDS,
    EvaluationError,
    answer_questions,
    oracle_description_scores,
    oracle_preference,
    blind_answers,
    oracle_short_accuracy,
)
from vlm_rlaif.modeling import load_model_and_processor
from vlm_rlaif.synthetic.language import asks, describe
from vlm_rlaif.synthetic.scene import Event, Scene, SceneObject
from vlm_rlaif.synthetic.world import generate_world
from vlm_rlaif.tiny import build_tiny_model
from vlm_rlaif.video import VideoError

TINY = TinyModelConfig(
    image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=1, vision_heads=2, text_hidden_size=32,
    text_layers=2, text_heads=2, intermediate_size=64, vocab_size=400, max_position_embeddings=512,
)
WORLD = WorldConfig(seed=3, num_sft_videos=1, num_rl_videos=1, num_eval_videos=3, num_frames=8, frame_size=32, eval_questions_per_video=3)


def hand_scene() -> Scene:
    """A red circle moving right turns green at frame 6; a blue square, still, enters at frame 10."""
    circle = SceneObject("red", "circle", "right", 12, [215, 40, 40], [[10 + 2 * t, 20] for t in range(16)])
    square = SceneObject("blue", "square", "still", 12, [45, 85, 225], [[40, 45] for _ in range(16)])
    events = [Event("changes_colour", "circle", 6, "green", [40, 170, 60]), Event("enters", "square", 10)]
    return Scene("hand", 16, 64, 0.5, [20, 20, 20], 0.0, [], 0, [circle, square], events)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world") / "data"
    generate_world(WORLD, root)
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, world):
    corpus = [r["Q"] + " " + r["A"] for r in json.loads((world / "eval" / "generic_qa.json").read_text())] * 5
    return load_model_and_processor(build_tiny_model(TINY, corpus, tmp_path_factory.mktemp("base") / "model", seed=0))


def test_short_accuracy_counts_exactly_the_wrong_answers_overall_and_per_type():
    scene = hand_scene()
    options = asks(scene, np.random.default_rng(0))
    questions = [
        ZeroShotQA(video_name="hand", question_id=i, question=a.phrasings[0], answer=a.answer, extra={"type": a.type})
        for i, a in enumerate(options)
    ]
    scenes = {"hand": scene.to_dict()}
    perfect = oracle_short_accuracy(scenes, questions, [a.answer for a in options])
    assert perfect["accuracy"] == 1.0 and perfect["count"] == len(options) >= 8
    assert set(perfect["by_type"]) == {a.type for a in options}
    assert all(t["accuracy"] == 1.0 for t in perfect["by_type"].values())

    answers = [options[0].wrong, options[1].wrong] + [f"It is: {a.answer.lower()}" for a in options[2:]]
    scored = oracle_short_accuracy(scenes, questions, answers)
    assert scored["correct"] == len(options) - 2 and scored["accuracy"] == (len(options) - 2) / len(options)
    assert [t for t, s in scored["by_type"].items() if s["accuracy"] < 1] == sorted([options[0].type, options[1].type])

    untyped = [ZeroShotQA(video_name="hand", question_id=0, question=options[0].phrasings[0], answer=options[0].answer)]
    assert oracle_short_accuracy(scenes, untyped, [options[0].answer])["by_type"] == {}


def test_description_scores_of_a_reference_and_of_known_mistakes():
    scene = hand_scene()
    reference = describe(scene).text()
    assert reference == (
        "The video shows two objects. A red circle moves from left to right. A blue square stays still. "
        "First, the red circle turns green. Then the blue square enters."
    )
    question = GenericQA(video_name="hand", question="Can you describe everything that happens in this video?", answer=reference)
    scenes = {"hand": scene}
    assert oracle_description_scores(scenes, [question], [reference]) == {
        "precision": 1.0, "recall": 1.0, "f1": 1.0, "hallucinated_per_answer": 0.0, "perfect": 1.0, "count": 1,
    }
    # 10 facts: count, 3 per object, 2 events, 1 order. A wrong motion is 1 false and 1 missed fact.
    wrong_motion = reference.replace("moves from left to right", "moves from right to left")
    scores = oracle_description_scores(scenes, [question, question], [reference, wrong_motion])
    assert scores["precision"] == pytest.approx((1 + 0.9) / 2) and scores["recall"] == pytest.approx((1 + 0.9) / 2)
    assert scores["hallucinated_per_answer"] == 0.5 and scores["perfect"] == 0.5 and scores["count"] == 2

    events = "First, the red circle turns green. Then the blue square enters."
    swapped = "First, the blue square enters. Then the red circle turns green."
    temporal = oracle_description_scores(scenes, [question, question], [events, swapped], kinds=TEMPORAL_KINDS)
    assert temporal["recall"] == pytest.approx((1 + 2 / 3) / 2) and temporal["hallucinated_per_answer"] == 0.5
    # scored on every kind, the events name both objects but miss the count and both motions
    assert oracle_description_scores(scenes, [question], [events])["recall"] == pytest.approx(7 / 10)


def test_oracle_preference_follows_each_prompt_kinds_score():
    scene = hand_scene()
    reference = describe(scene).text()
    wrong_motion = reference.replace("moves from left to right", "moves from right to left")
    ask = "Describe this video in detail."
    assert oracle_preference(scene, "describe", ask, reference, reference, wrong_motion) == 1
    assert oracle_preference(scene, "generic", ask, reference, wrong_motion, reference) == 2
    assert oracle_preference(scene, "describe", ask, reference, wrong_motion, wrong_motion + " ") is None
    # a temporal question is scored on events and order: a wrong motion does not count there
    events = "First, the red circle turns green. Then the blue square enters."
    swapped = "First, the blue square enters. Then the red circle turns green."
    assert oracle_preference(scene, "temporal", "What happens first?", events, swapped, events) == 2
    assert oracle_preference(scene, "temporal", "What happens first?", events, wrong_motion, reference) is None
    question = "What colour is the square?"
    assert oracle_preference(scene, "short", question, "Blue.", "It is blue.", "Red.") == 1
    assert oracle_preference(scene, "short", question, "Blue.", "Green.", "Red.") is None
    with pytest.raises(EvaluationError, match="unknown prompt kind 'poem'"):
        oracle_preference(scene, "poem", question, "Blue.", "Blue.", "Red.")


def test_mismatched_inputs_name_the_question():
    question = GenericQA(video_name="elsewhere", question="What can you see?", answer="A red circle.")
    with pytest.raises(EvaluationError, match=r"question 0: no scene for video_name 'elsewhere'"):
        oracle_description_scores({"hand": hand_scene()}, [question], ["A red circle."])
    with pytest.raises(EvaluationError, match="1 answers for 2 questions"):
        oracle_short_accuracy({}, [question, question], ["Red."])
    with pytest.raises(EvaluationError, match="answer 0: expected a string"):
        oracle_description_scores({"elsewhere": hand_scene()}, [question], [None])


def test_the_worlds_own_references_score_perfectly(world):
    scenes = json.loads((world / "scenes.json").read_text())
    short = read_zeroshot_qa(world / "eval" / "zeroshot_qa.json").records
    assert oracle_short_accuracy(scenes, short, [q.answer for q in short])["accuracy"] == 1.0
    generic = read_generic_qa(world / "eval" / "generic_qa.json").records
    assert oracle_description_scores(scenes, generic, [q.answer for q in generic])["perfect"] == 1.0
    temporal = read_generic_qa(world / "eval" / "temporal_qa.json").records
    answers = [q.answer for q in temporal]
    assert oracle_description_scores(scenes, temporal, answers, kinds=TEMPORAL_KINDS)["perfect"] == 1.0
    assert oracle_description_scores(scenes, temporal, answers)["recall"] < 1.0  # they say nothing of motion


def test_the_blind_baseline_gives_each_type_its_most_often_right_reference(world):
    scenes = json.loads((world / "scenes.json").read_text())
    short = read_zeroshot_qa(world / "eval" / "zeroshot_qa.json").records
    blind = blind_answers(scenes, short)
    for kind in {q.extra["type"] for q in short}:
        members = [i for i, q in enumerate(short) if q.extra["type"] == kind]
        group = [short[i] for i in members]
        assert len({blind[i] for i in members}) == 1 and blind[members[0]] in {q.answer for q in group}
        right = oracle_short_accuracy(scenes, group, [blind[members[0]]] * len(group))["correct"]
        assert all(right >= oracle_short_accuracy(scenes, group, [q.answer] * len(group))["correct"] for q in group)
    counts = [
        ZeroShotQA(video_name=vid, question_id=vid, question="How many objects are in the video?",
                   answer=f"{len(scene['objects'])}.", extra={"type": "count"})
        for vid, scene in scenes.items()
    ]
    most = Counter(q.answer for q in counts).most_common(1)[0]
    assert len({q.answer for q in counts}) > 1 and blind_answers(scenes, counts) == [most[0]] * len(counts)
    assert oracle_short_accuracy(scenes, counts, blind_answers(scenes, counts))["accuracy"] == most[1] / len(counts)


def test_a_tiny_model_answers_every_question_of_a_tiny_world(world, tiny):
    model, processor = tiny
    video_root = world / "videos" / "synthetic_8frames"
    short = read_zeroshot_qa(world / "eval" / "zeroshot_qa.json").records
    answers = answer_questions(model, processor, short, video_root, 4, max_new_tokens=4, batch_size=4)
    assert len(answers) == len(short) == 9 and all(isinstance(a, str) for a in answers)
    assert answer_questions(model, processor, short, video_root, 4, max_new_tokens=4, batch_size=1) == answers
    scored = oracle_short_accuracy(json.loads((world / "scenes.json").read_text()), short, answers)
    assert scored["count"] == 9 and 0 <= scored["accuracy"] <= 1

    generic = read_generic_qa(world / "eval" / "generic_qa.json").records
    assert len(answer_questions(model, processor, generic, video_root, 4, max_new_tokens=3, batch_size=2)) == 3

    missing = [*short[:2], ZeroShotQA(video_name="syn_999999", question_id="x", question="What moves?", answer="Nothing.")]
    with pytest.raises(VideoError, match=r"question 2 \(video_name 'syn_999999'\)"):
        answer_questions(model, processor, missing, video_root, 4, max_new_tokens=2)
