"""The Video-ChatGPT benchmark and zero-shot QA: the oracle judge's grades on a generated world,
reading LLM judges' replies, and the averages of the paper's table."""

import pytest

from vlm_rlaif import io
from vlm_rlaif.benchmark import (
    DIMENSIONS, BenchmarkError, BenchmarkSets, OracleJudge, answer_sets, judge_answers, read_reply, summarise, _score,
)
from vlm_rlaif.config import load_params


@pytest.fixture(scope="module")
def world(built):
    sets = BenchmarkSets.load(built / "artifacts/prepare")
    return sets, OracleJudge(io.read_json(built / "artifacts/prepare/scenes.json"))


def test_the_sets_are_read_from_the_prepared_folder_and_cut_to_num_samples(built, tmp_path):
    sets = BenchmarkSets.load(built / "artifacts/prepare")
    assert sets.generic and sets.temporal and sets.consistency and list(sets.zeroshot) == ["synthetic"]
    assert list(sets.questions()) == ["generic", "temporal", "consistency", "zeroshot/synthetic"]
    one = BenchmarkSets.load(built / "artifacts/prepare", num_samples=1)
    assert all(len(records) == 1 for records in one.questions().values())
    with pytest.raises(BenchmarkError, match="generic_qa.json does not exist: run the prepare stage"):
        BenchmarkSets.load(tmp_path)


def test_the_oracle_gives_reference_answers_full_marks_and_wrong_ones_less(world):
    sets, oracle = world
    for question in sets.generic:
        grades = {d: oracle.grade(d, question, question.answer).score for d in ("correctness", "detail", "context")}
        assert grades == {"correctness": 5.0, "detail": 5.0, "context": 5.0}
        silent = oracle.grade("detail", question, "I do not know.")
        assert silent.score == 0.0 and silent.judge == "oracle"
    for question in sets.temporal:
        assert oracle.grade("temporal", question, question.answer).score == 5.0
    for question in sets.consistency:
        assert oracle.grade("consistency", question, [question.answer, question.answer]).score == 5.0
        wrong = "No." if question.answer.lower().startswith("yes") else "Yes."
        assert oracle.grade("consistency", question, [question.answer, wrong]).score == 0.0  # one phrasing wrong: inconsistent
    for question in sets.zeroshot["synthetic"]:
        verdict = oracle.match(question, question.answer)
        assert verdict.match is True and verdict.score == 5.0
    with pytest.raises(BenchmarkError, match="unknown dimension 'style'"):
        oracle.grade("style", sets.generic[0], "x")


def test_the_oracle_refuses_videos_it_has_no_scene_for(world):
    sets, _ = world
    with pytest.raises(BenchmarkError, match="has no scene record"):
        OracleJudge({}).grade("correctness", sets.generic[0], "A red circle.")


@pytest.mark.parametrize("reply, expected", [
    ('{"score": 4}', {"score": 4}),
    ("Sure. {'pred': 'yes', 'score': 3} Hope this helps.", {"pred": "yes", "score": 3}),
    ('{"score": 2.5, "why": "partly"}', {"score": 2.5, "why": "partly"}),
    ("score: 4", None),
    ("{not a dict at all}", None),
])
def test_judge_replies_are_read_as_json_or_python_literals(reply, expected):
    assert read_reply(reply) == expected


def test_scores_outside_zero_to_five_or_unreadable_count_as_unread():
    assert _score({"score": "4"}) == 4.0
    assert [_score(r) for r in ({"score": 6}, {"score": -1}, {"score": "high"}, {"score": True}, None)] == [None] * 5


def test_summaries_average_each_dimension_on_its_set_and_count_unread_grades(world):
    sets, oracle = world
    answers = {"generic": [q.answer for q in sets.generic], "temporal": ["Nothing happens."] * len(sets.temporal),
               "consistency": [[q.answer, q.answer] for q in sets.consistency],
               "zeroshot/synthetic": [q.answer for q in sets.zeroshot["synthetic"]]}
    judged = judge_answers(sets, answers, oracle)
    assert all(r["judge"] == "oracle" for records in judged.values() for r in records)
    assert judged["generic"][0]["prediction"] == sets.generic[0].answer and judged["generic"][0]["Q"] == sets.generic[0].question
    summary = summarise(judged)
    table = summary["video_chatgpt"]
    assert table["correctness"] == table["detail"] == table["consistency"] == 5.0
    assert table["mean"] == pytest.approx(sum(table[d] for d in DIMENSIONS) / 5)
    assert summary["zeroshot"]["synthetic"]["accuracy"] == 1.0 and summary["unread"] == 0 and summary["judges"] == ["oracle"]

    judged["generic"][0]["detail"] = None  # a reply the judge fumbled
    again = summarise(judged)
    assert again["unread"] == 1
    others = [r["detail"] for r in judged["generic"][1:]]
    assert again["video_chatgpt"]["detail"] == pytest.approx(sum(others) / len(others))

    with pytest.raises(BenchmarkError, match="set temporal: 0 answers"):
        judge_answers(sets, answers | {"temporal": []}, oracle)


def test_a_model_answers_every_set_and_a_pair_per_consistency_question(built, tiny_vlm, monkeypatch):
    monkeypatch.chdir(built)
    model, processor = tiny_vlm
    params = load_params("params.yaml")
    sets = BenchmarkSets.load("artifacts/prepare", num_samples=2)
    answers = answer_sets(model, processor, sets, video_root=params.data.eval_video_root, num_frames=params.data.num_frames,
                          max_new_tokens=4, temperature=0.0, batch_size=2)
    assert {k: len(v) for k, v in answers.items()} == {k: len(v) for k, v in sets.questions().items()}
    assert all(isinstance(pair, list) and len(pair) == 2 for pair in answers["consistency"])
    only = answer_sets(model, processor, sets, video_root=params.data.eval_video_root, num_frames=params.data.num_frames,
                       max_new_tokens=4, temperature=0.0, batch_size=2, only=["temporal"])
    assert only == {"temporal": answers["temporal"]}  # greedy: the same answers alone as among the others
    capped = answer_sets(model, processor, sets, video_root=params.data.eval_video_root,
                         num_frames=params.data.num_frames, max_new_tokens=4, temperature=0.0,
                         batch_size=2, zeroshot_max_new_tokens=1)
    zeroshot = [k for k in answers if k.startswith("zeroshot/")]
    assert zeroshot and all(capped[k] == answers[k] for k in answers if k not in zeroshot)

    def tokens(found: list[str]) -> int:
        return sum(len(processor.tokenizer(a)["input_ids"]) for a in found)

    assert all(tokens(capped[k]) < tokens(answers[k]) for k in zeroshot)  # the untrained never stop
