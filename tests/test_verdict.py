"""The claim's test on constructed answer sets scored by the real oracle: a real gain is found,
a shuffled one is not, a gain from one seed alone is not, and saying less is not better."""

import numpy as np
import pytest

from vlm_rlaif import verdict
from vlm_rlaif.synthetic.language import corrupt, describe
from vlm_rlaif.synthetic.oracle import score_description
from vlm_rlaif.synthetic.scene import sample_scene

SEEDS, QUESTIONS = 3, 60
LEVEL, RESAMPLES = 0.95, 4000


@pytest.fixture(scope="module")
def scenes():
    return [
        sample_scene(np.random.default_rng([11, i]), f"v{i}", 16, 64, 3, 0.5)
        for i in range(QUESTIONS)
    ]


def wrong(scene, k: int, rng) -> str:
    """The scene's description with k of its facts made false."""
    return corrupt(scene, describe(scene), k, rng).description.text()


def measured(scenes, answers_by_seed) -> dict[int, dict]:
    return {
        seed: verdict.answer_measures(
            [score_description(s, a) for s, a in zip(scenes, answers)], answers
        )
        for seed, answers in answers_by_seed.items()
    }


def answer_sets(scenes, make, seed: int) -> dict[int, list[str]]:
    return {
        s: [make(scene, np.random.default_rng([seed, s, q])) for q, scene in enumerate(scenes)]
        for s in range(SEEDS)
    }


def test_a_model_that_states_fewer_false_facts_beats_one_that_states_more(scenes):
    sft = measured(scenes, answer_sets(scenes, lambda scene, rng: wrong(scene, 2, rng), 0))
    rlaif = measured(
        scenes,
        answer_sets(scenes, lambda scene, rng: wrong(scene, int(rng.integers(0, 2)), rng), 1),
    )
    out = verdict.verdict(sft, rlaif, level=LEVEL, resamples=RESAMPLES)
    precision = out["measures"]["precision"]
    assert out["met"] and precision["interval"][0] > 0 and precision["gain"] > 0.05
    assert out["measures"]["hallucinated"]["gain"] < 0 and out["measures"]["f1"]["gain"] > 0
    assert (out["seeds"], out["questions"]) == (SEEDS, QUESTIONS)


def test_the_same_answers_shuffled_between_the_models_show_no_gain(scenes):
    pool = [
        answer_sets(scenes, lambda scene, rng: wrong(scene, 2, rng), 0),
        answer_sets(scenes, lambda scene, rng: wrong(scene, int(rng.integers(0, 2)), rng), 1),
    ]
    met = 0
    for trial in range(10):
        rng = np.random.default_rng([99, trial])
        sides = {
            s: rng.integers(0, 2, QUESTIONS) for s in range(SEEDS)
        }  # which pool each model's answer comes from
        sft = {s: [pool[side][s][q] for q, side in enumerate(sides[s])] for s in range(SEEDS)}
        rlaif = {s: [pool[1 - side][s][q] for q, side in enumerate(sides[s])] for s in range(SEEDS)}
        met += verdict.verdict(
            measured(scenes, sft), measured(scenes, rlaif), level=LEVEL, resamples=RESAMPLES
        )["met"]
    assert met <= 1  # a 95% interval above zero by chance: about one shuffle in forty


def test_a_shorter_answer_that_drops_true_facts_is_not_better(scenes):
    sft = answer_sets(scenes, lambda scene, rng: wrong(scene, 1, rng), 0)
    # the count and the first object only: every fact true, most left out
    brief = {
        s: [". ".join(describe(scene).text().split(". ")[:2]) + "." for scene in scenes]
        for s in range(SEEDS)
    }
    out = verdict.verdict(
        measured(scenes, sft), measured(scenes, brief), level=LEVEL, resamples=RESAMPLES
    )
    assert out["measures"]["words"]["gain"] < 0 and out["measures"]["recall"]["gain"] < 0
    assert out["measures"]["precision"]["interval"][0] > 0  # fewer facts, so fewer false ones
    assert not out["met"] and "saying less" in out["reason"]


def test_a_gain_that_one_seed_alone_shows_is_not_a_gain():
    """Questions alone would call this sure; resampling the PPO runs as well does not."""
    differences = np.zeros((SEEDS, QUESTIONS))
    differences[0] = 0.3
    means = verdict.bootstrap_means(differences, RESAMPLES, np.random.default_rng(0))
    assert np.quantile(means, (1 - LEVEL) / 2) <= 0 < means.mean()
    spread_over_questions = np.quantile(
        verdict.bootstrap_means(differences[None, 0], RESAMPLES, np.random.default_rng(0)), 0.025
    )
    assert spread_over_questions == pytest.approx(0.3)


def test_answers_that_do_not_pair_are_refused(scenes):
    sft = measured(scenes[:2], {0: ["A red circle.", "A blue square."]})
    with pytest.raises(ValueError, match="no seed answered by both models"):
        verdict.paired(sft, {1: sft[0]})
    with pytest.raises(ValueError, match="SFT answered 2 questions a seed, RLAIF 1"):
        verdict.paired(sft, {0: {k: v[:1] for k, v in sft[0].items()}})


def test_accuracy_at_chance_is_a_coin_inside_the_wilson_interval():
    assert verdict.at_chance(50, 100) and verdict.at_chance(59, 100) and verdict.at_chance(41, 100)
    assert not verdict.at_chance(60, 100) and not verdict.at_chance(40, 100)  # Wilson: [0.502, 0.691]
    assert verdict.at_chance(7, 10) and not verdict.at_chance(70, 100)  # the same rate, ten times the pairs
    assert verdict.at_chance(0, 0) is None


def test_accuracy_against_truth_leaves_out_rows_with_none_and_flags_a_coin():
    picks = {i: 1 for i in range(12)}
    truth = {i: 1 if i < 9 else 2 for i in range(10)} | {10: None}  # row 11 has no truth at all
    measured = verdict.accuracy_against(picks, truth, rows=range(12))
    assert measured == {"accuracy": 0.9, "pairs": 10, "at_chance": False}
    assert verdict.accuracy_against(picks, truth, rows=[8, 9])["at_chance"] is True  # 1 of 2
    assert verdict.accuracy_against(picks, truth, rows=[10, 11]) == {"accuracy": None, "pairs": 0, "at_chance": None}
