"""The oracle: the world's own words score perfectly, a corruption costs exactly the facts it
reports, and short answers match whatever their wording."""

import numpy as np
import pytest

from vlm_rlaif.synthetic.language import CORRUPTIONS, asks, clip_ranges, corrupt, describe, short_questions
from vlm_rlaif.synthetic.oracle import score_answer, score_description
from vlm_rlaif.synthetic.scene import Event, Scene, SceneObject, sample_scene


def scenes(count: int, seed: int = 0) -> list[Scene]:
    return [
        sample_scene(np.random.default_rng([seed, i]), f"v{i}", 16, 64, 3, difficulty)
        for i in range(count)
        for difficulty in (0.0, 0.5, 1.0)
    ]


def two_object_scene() -> Scene:
    """A red circle moving right turns green at frame 6; a blue square, still, enters at frame 10."""
    circle = SceneObject("red", "circle", "right", 12, [215, 40, 40], [[10 + 2 * t, 20] for t in range(16)])
    square = SceneObject("blue", "square", "still", 12, [45, 85, 225], [[40, 45] for _ in range(16)])
    events = [Event("changes_colour", "circle", 6, "green", [40, 170, 60]), Event("enters", "square", 10)]
    return Scene("hand", 16, 64, 0.5, [20, 20, 20], 0.0, [], 0, [circle, square], events)


def perfect(score) -> bool:
    return score.precision == score.recall == score.f1 == 1.0 and not score.missed_facts and not score.hallucinated


def test_the_worlds_own_descriptions_score_perfectly():
    for scene in scenes(20):
        assert perfect(score_description(scene, describe(scene).text()))
        for frames in clip_ranges(16, 3) + [(0, 1), (7, 9), (15, 16)]:
            assert perfect(score_description(scene, describe(scene, frames).text(), frames=frames))


def test_corruptions_cost_exactly_the_facts_they_report():
    seen_ops = set()
    for i, scene in enumerate(scenes(20, seed=1)):
        rng = np.random.default_rng(i)
        truth = describe(scene)
        for k in (1, 2, 3):
            result = corrupt(scene, truth, k, rng)
            score = score_description(scene, result.description.text())
            assert len(result.ops) == k
            assert sorted(score.missed_facts + score.hallucinated) == result.changed
            assert len(score.true_facts) + len(score.missed_facts) == len(truth.facts())
            seen_ops |= set(result.ops)
        # corrupting a corrupted description keeps making it strictly worse
        worse, f1 = truth, 1.0
        for _ in range(3):
            worse = corrupt(scene, worse, 1, rng).description
            now = score_description(scene, worse.text()).f1
            assert now < f1
            f1 = now
    assert seen_ops == set(CORRUPTIONS)


def test_a_wrong_colour_costs_the_colour_fact_alone():
    scene = two_object_scene()
    text = describe(scene).text()
    assert text == (
        "The video shows two objects. A red circle moves from left to right. A blue square stays still. "
        "First, the red circle turns green. Then the blue square enters."
    )
    score = score_description(scene, text.replace("red circle", "purple circle"))
    assert score.missed_facts == ["circle colour red"]
    assert score.hallucinated == ["circle colour purple"]
    score = score_description(scene, text.replace("First, the red circle turns green. Then the blue square enters.", "First, the blue square enters. Then the red circle turns green."))
    assert score.missed_facts == ["circle changes colour before square enters"]
    assert score.hallucinated == ["square enters before circle changes colour"]


def test_clip_scoring_names_objects_by_their_colour_in_the_clip():
    scene = two_object_scene()
    assert describe(scene, (0, 8)).text() == (
        "The clip shows one object. A red circle moves from left to right. Later, the red circle turns green."
    )
    late = "The clip shows two objects. A green circle moves from left to right. A blue square stays still. Later, the blue square enters."
    assert perfect(score_description(scene, late, frames=(8, 16)))
    # the square is not in frames 0..8, so naming it there is a hallucination
    score = score_description(scene, "A red circle moves from left to right. A blue square stays still.", frames=(0, 8))
    assert score.hallucinated == ["extra blue square colour blue", "extra blue square motion still", "extra blue square shape square"]


def test_reading_survives_sloppy_and_repetitive_text():
    scene = two_object_scene()
    text = describe(scene).text()
    assert perfect(score_description(scene, text + " " + text))
    sloppy = "the video shows 2 objects, a red circle moving to the right and then a blue square that doesn't move; red circle becomes green then the blue square appears"
    assert perfect(score_description(scene, sloppy))
    partial = score_description(scene, "A red circle moves from left to right.")
    assert partial.precision == 1.0 and 0 < partial.recall < 1
    assert "square shape square" in partial.missed_facts


def test_empty_text_and_empty_clip_edge_cases():
    scene = two_object_scene()
    nothing = score_description(scene, "")
    assert (nothing.precision, nothing.recall, nothing.f1) == (0.0, 0.0, 0.0)
    assert nothing.true_facts == [] and len(nothing.missed_facts) == len(describe(scene).facts())
    # a clip with no object in it: saying so is perfect, and so is saying nothing about objects
    empty_clip = Scene("late", 16, 64, 0.5, [0, 0, 0], 0.0, [], 0, [SceneObject("red", "circle", "still", 12, [215, 40, 40], [[20, 20]] * 16)], [Event("enters", "circle", 8)])
    assert perfect(score_description(empty_clip, "The clip shows no objects.", frames=(0, 8)))
    assert score_description(empty_clip, "A red circle stays still.", frames=(0, 8)).f1 == 0.0


def test_fact_kinds_restrict_scoring_to_the_events():
    scene = two_object_scene()
    events_only = describe(scene).event_text()
    assert perfect(score_description(scene, events_only, kinds=("event", "order")))
    assert score_description(scene, events_only).recall < 1


def test_short_answers_normalise():
    scene = two_object_scene()
    colour = {"question": "What colour is the circle at the start?", "answer": "Red."}
    assert all(score_answer(scene, colour, a) for a in ("red", "Red.", "It is red.", "RED!"))
    assert not any(score_answer(scene, colour, a) for a in ("Green.", "red or green", ""))
    turned = {"question": "What colour does the red circle turn?", "answer": "Green."}
    assert score_answer(scene, turned, "It turns from red to green.") and not score_answer(scene, turned, "Red.")
    motion = {"question": "How does the red circle move?", "answer": "Left to right."}
    assert all(score_answer(scene, motion, a) for a in ("left to right", "It moves to the right.", "Right."))
    assert not score_answer(scene, motion, "Right to left.") and not score_answer(scene, motion, "It stays still.")
    count = {"Q": "How many objects are in the video?", "A": "Two."}
    assert all(score_answer(scene, count, a) for a in ("two", "2", "There are two objects."))
    assert not score_answer(scene, count, "Three.")
    yes = {"question": "Does the red circle move?", "answer": "Yes."}
    assert score_answer(scene, yes, "yes, it does") and not score_answer(scene, yes, "No.")
    which = {"question": "Which object turns green?", "answer": "The red circle."}
    assert all(score_answer(scene, which, a) for a in ("the circle", "The red circle turns green.", "green circle"))
    assert not score_answer(scene, which, "The blue square.") and not score_answer(scene, which, "a blue circle")


def test_every_generated_question_accepts_its_answer_and_rejects_its_wrong_one():
    for i, scene in enumerate(scenes(15, seed=2)):
        for ask in asks(scene, np.random.default_rng(i)):
            for question in ask.phrasings:
                record = {"question": question, "answer": ask.answer}
                assert score_answer(scene, record, ask.answer), (question, ask.answer)
                assert not score_answer(scene, record, ask.wrong), (question, ask.wrong)


def test_many_short_questions_are_distinct_and_spread_over_kinds():
    for i, scene in enumerate(scenes(10, seed=4)):
        kinds = {ask.type for ask in asks(scene, np.random.default_rng(i))}
        few = short_questions(scene, np.random.default_rng(i), 3)
        assert len(few) == 3 and len({qa.type for qa in few}) == 3
        many = short_questions(scene, np.random.default_rng(i), 20)
        assert len({qa.question for qa in many}) == len(many) <= 20
        assert {qa.type for qa in many[: len(kinds)]} == kinds  # every kind once before any twice
        for qa in many:
            assert score_answer(scene, {"question": qa.question, "answer": qa.answer}, qa.answer)


def test_bad_input_gets_a_clear_error():
    scene = two_object_scene()
    with pytest.raises(ValueError, match=r"hand: frames \(5, 20\)"):
        score_description(scene, "text", frames=(5, 20))
    with pytest.raises(ValueError, match="'answer' \\(or 'A'\\)"):
        score_answer(scene, {"question": "What colour is the circle?"}, "red")
    with pytest.raises(ValueError, match="as a string"):
        score_description(scene, None)
    with pytest.raises(ValueError, match="unknown fact kinds"):
        score_description(scene, "text", kinds=("colours",))
    with pytest.raises(ValueError, match="scene hand: objects\\[0\\].motion"):
        record = scene.to_dict()
        record["objects"][0]["motion"] = "sideways"
        score_description(record, "text")
