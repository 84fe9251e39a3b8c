"""Release record formats: lossless round trips, and errors that say where the data is wrong."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from vlm_rlaif.data import (
    ConsistencyQA,
    GenericQA,
    PreferenceRecord,
    RecordError,
    Response,
    RLPrompt,
    SFTRecord,
    Turn,
    ZeroShotQA,
    answer_words,
    curriculum_split,
    read_consistency_qa,
    read_generic_qa,
    read_preferences,
    read_records,
    read_rl_prompts,
    read_sft,
    read_zeroshot_qa,
    write_records,
)
from vlm_rlaif.video import VideoError

FRAMES = [f"synthetic_16frames/v0/frame_{i:03d}.png" for i in range(3)]


def sft(i: int, answer: str = "A red circle moves left.", **extra) -> dict:
    return {
        "id": f"v{i}_q0",
        "src_data": "synthetic",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat moves in the video?"},
            {"from": "gpt", "value": answer},
            {"from": "human", "value": "And then?"},
            {"from": "gpt", "value": "It leaves the frame."},
        ],
        "images": FRAMES,
        **extra,
    }


def sft_video(i: int) -> dict:
    record = sft(i)
    del record["images"]
    record["video"] = f"clips/v{i}.mp4"
    return record


def preference(i: int, **extra) -> dict:
    return {
        "id": i,
        "conversations": [{"from": "human", "value": "<image>\nDescribe the video."}, {"from": "gpt", "value": ""}],
        "output_1": {"from": "llava", "value": "A blue square."},
        "output_2": {"value": "A green triangle turns red."},
        "preference": 2,
        "images": FRAMES,
        **extra,
    }


def rl_prompt(i: int) -> dict:
    return {
        "conversations": [{"from": "human", "value": "<image>\nWhat happens first?"}, {"from": "gpt", "value": "A circle enters."}],
        "images": FRAMES,
        "uid": i,
    }


SAMPLES = {
    SFTRecord: [sft(0), sft(1, flags=["long"]), sft_video(2)],
    PreferenceRecord: [preference(0), preference(1, context=["clip 1: a square", "clip 2: it turns"], p_order_ab=[0.2, 0.8], margin=0.55)],
    RLPrompt: [rl_prompt(0), rl_prompt(7)],
    ZeroShotQA: [
        {"video_name": "v0", "question_id": "v0_0", "question": "what color is the ball?", "answer": "red"},
        {"video_name": "msvd/vid1.avi", "question_id": 17, "question": "who sings?", "answer": "a man", "type": "who"},
    ],
    GenericQA: [{"video_name": "v_abc", "Q": "What happens?", "A": "A dog runs, then sits."}],
    ConsistencyQA: [{"video_name": "v_abc", "Q1": "What does the dog do?", "Q2": "Describe the dog's action.", "A": "It runs."}],
}
READERS = {
    SFTRecord: read_sft,
    PreferenceRecord: read_preferences,
    RLPrompt: read_rl_prompts,
    ZeroShotQA: read_zeroshot_qa,
    GenericQA: read_generic_qa,
    ConsistencyQA: read_consistency_qa,
}


def write_raw(path: Path, rows: list) -> Path:
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows, indent=1))
    return path


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", list(SAMPLES), ids=lambda k: k.__name__)
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_round_trip_is_lossless_and_byte_stable(tmp_path, kind, suffix):
    source = write_raw(tmp_path / f"source{suffix}", SAMPLES[kind])
    records, skipped = READERS[kind](source)
    assert skipped == [] and len(records) == len(SAMPLES[kind])
    assert all(isinstance(r, kind) for r in records)
    assert [r.to_dict() for r in records] == SAMPLES[kind]  # nothing lost, extra keys included

    first = tmp_path / f"first{suffix}"
    write_records(first, records)
    again = read_records(first, kind).records
    assert again == records
    second = tmp_path / f"second{suffix}"
    write_records(second, again)
    assert first.read_bytes() == second.read_bytes()
    if suffix == ".json":
        assert isinstance(json.loads(first.read_text()), list)
    else:
        assert len(first.read_text().splitlines()) == len(records)


def test_role_variant_reads_as_the_from_variant(tmp_path):
    with_role = copy.deepcopy(sft(0))
    for turn in with_role["conversations"]:
        turn["role"] = {"human": "user", "gpt": "assistant"}[turn.pop("from")]
    with_role["conversations"][2]["role"] = "human"
    path = write_raw(tmp_path / "role.json", [with_role, sft(0)])
    role_record, from_record = read_sft(path).records
    assert role_record == from_record
    assert role_record.to_dict()["conversations"][0] == {"from": "human", "value": "<image>\nWhat moves in the video?"}


def test_turn_extra_keys_survive():
    turn = Turn.from_dict({"from": "gpt", "value": "x", "weight": 0.5}, "f, record 0", "conversations[1]")
    assert turn == Turn("gpt", "x", {"weight": 0.5})
    assert turn.to_dict() == {"from": "gpt", "value": "x", "weight": 0.5}


def test_helpers_question_answer_media(tmp_path):
    record = SFTRecord.from_dict(sft(0), "f, record 0")
    assert record.question() == "What moves in the video?"
    assert record.answer() == "A red circle moves left.\nIt leaves the frame."
    assert answer_words(record) == 9
    assert record.media(tmp_path) == [tmp_path / p for p in FRAMES]
    video_record = SFTRecord.from_dict(sft_video(2), "f, record 2")
    assert video_record.media(tmp_path) == tmp_path / "clips" / "v2.mp4"

    pair = PreferenceRecord.from_dict(preference(0), "f, record 0")
    assert (pair.chosen, pair.rejected) == ("A green triangle turns red.", "A blue square.")
    pair.preference = 1
    assert pair.chosen == "A blue square."

    question = GenericQA.from_dict(SAMPLES[GenericQA][0], "f, record 0")
    (tmp_path / "v_abc.mp4").write_bytes(b"x")
    assert question.video_path(tmp_path) == tmp_path / "v_abc.mp4"


def test_records_built_in_code_write_the_release_format(tmp_path):
    pair = PreferenceRecord(
        conversations=[Turn("human", "<image>\nWhat happens?"), Turn("gpt", "")],
        images=FRAMES,
        output_1=Response("a"),
        output_2=Response("b"),
        preference=1,
        extra={"margin": 0.3},
    )
    write_records(tmp_path / "prefs.jsonl", [pair])
    assert json.loads((tmp_path / "prefs.jsonl").read_text()) == {
        "conversations": [{"from": "human", "value": "<image>\nWhat happens?"}, {"from": "gpt", "value": ""}],
        "images": FRAMES,
        "output_1": {"value": "a"},
        "output_2": {"value": "b"},
        "preference": 1,
        "margin": 0.3,
    }
    assert read_preferences(tmp_path / "prefs.jsonl").records == [pair]


# --------------------------------------------------------------------------- errors


def broken(base: dict, change) -> dict:
    record = copy.deepcopy(base)
    change(record)
    return record


BAD = [
    (RLPrompt, rl_prompt(0) | {"uid": "17"}, '"uid" must be an integer'),
    (RLPrompt, rl_prompt(0) | {"uid": True}, '"uid" must be an integer'),
    (RLPrompt, {k: v for k, v in rl_prompt(0).items() if k != "uid"}, 'missing "uid"'),
    (RLPrompt, broken(rl_prompt(0), lambda r: r["conversations"].reverse()), '"conversations[0]" must be a human turn'),
    (SFTRecord, sft(0) | {"id": None}, '"id" must be a string or an integer'),
    (SFTRecord, sft(0) | {"src_data": 3}, '"src_data" must be a string'),
    (SFTRecord, sft(0) | {"conversations": []}, '"conversations" must be a non-empty list'),
    (SFTRecord, sft(0) | {"conversations": "hi"}, '"conversations" must be a non-empty list'),
    (SFTRecord, broken(sft(0), lambda r: r["conversations"][1].update({"from": "bot"})), '"conversations[1].from" must be one of'),
    (SFTRecord, broken(sft(0), lambda r: r["conversations"][1].pop("from")), 'missing "conversations[1].from"'),
    (SFTRecord, broken(sft(0), lambda r: r["conversations"][2].update({"value": None})), '"conversations[2].value" must be a string'),
    (SFTRecord, broken(sft(0), lambda r: r["conversations"].__setitem__(3, "text")), '"conversations[3]" must be a JSON object'),
    (SFTRecord, broken(sft(0), lambda r: r["conversations"].pop()), '"conversations" must end with a gpt turn'),
    (SFTRecord, broken(sft(0), lambda r: r["conversations"][2].update({"from": "gpt"})), '"conversations[2]" must be a human turn'),
    (SFTRecord, {k: v for k, v in sft(0).items() if k != "images"}, 'exactly one of "images"'),
    (SFTRecord, sft(0) | {"video": "a.mp4"}, 'exactly one of "images"'),
    (SFTRecord, sft(0) | {"images": []}, '"images" must be a non-empty list'),
    (SFTRecord, sft(0) | {"images": ["a.jpg", 5]}, '"images[1]" must be a non-empty path'),
    (SFTRecord, sft(0) | {"images": ["a.jpg", "../../secret.jpg"]}, '"images[1]" = \'../../secret.jpg\' must be a path inside'),
    (SFTRecord, sft(0) | {"images": ["/etc/passwd"]}, '"images[0]" = \'/etc/passwd\' must be a path inside'),
    (SFTRecord, sft_video(0) | {"video": "a/../../b.mp4"}, '"video" = \'a/../../b.mp4\' must be a path inside'),
    (SFTRecord, ["not", "an", "object"], "record must be a JSON object"),
    (PreferenceRecord, preference(0) | {"preference": 0}, '"preference" must be 1 or 2'),
    (PreferenceRecord, preference(0) | {"preference": "1"}, '"preference" must be 1 or 2'),
    (PreferenceRecord, preference(0) | {"output_2": "text"}, '"output_2" must be a JSON object'),
    (PreferenceRecord, preference(0) | {"output_1": {"text": "x"}}, 'missing "output_1.value"'),
    (PreferenceRecord, {k: v for k, v in preference(0).items() if k != "output_2"}, 'missing "output_2"'),
    (PreferenceRecord, broken(preference(0), lambda r: r["conversations"].pop()), '"conversations" must end with a gpt turn'),
    (ZeroShotQA, SAMPLES[ZeroShotQA][0] | {"question_id": 1.5}, '"question_id" must be a string or an integer'),
    (ZeroShotQA, SAMPLES[ZeroShotQA][0] | {"answer": ["red"]}, '"answer" must be a string'),
    (ZeroShotQA, SAMPLES[ZeroShotQA][0] | {"video_name": "../v0"}, '"video_name" = \'../v0\' must be a path inside'),
    (GenericQA, {"video_name": "v", "Q": "q?"}, 'missing "A"'),
    (GenericQA, {"video_name": "", "Q": "q?", "A": "a"}, '"video_name" must be a non-empty path'),
    (ConsistencyQA, {"video_name": "v", "Q1": "q?", "Q2": 2, "A": "a"}, '"Q2" must be a string'),
]


@pytest.mark.parametrize("kind, bad, message", BAD, ids=[m for _, _, m in BAD])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_bad_record_error_names_file_record_and_field(tmp_path, kind, bad, message, suffix):
    path = write_raw(tmp_path / f"RL_data{suffix}", [SAMPLES[kind][0], bad, SAMPLES[kind][0]])
    where = f"{path}, record 1: " if suffix == ".json" else f"{path}, line 2: "
    with pytest.raises(RecordError) as error:
        read_records(path, kind)
    assert str(error.value).startswith(where)
    assert message in str(error.value)

    records, skipped = read_records(path, kind, on_bad_record="skip")
    assert len(records) == 2
    assert [index for index, _ in skipped] == [1] and skipped[0][1] == str(error.value)


def test_skip_mode_steps_over_invalid_json_lines(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps(rl_prompt(0)) + "\n\n{broken\n" + json.dumps(rl_prompt(1) | {"uid": "x"}) + "\n" + json.dumps(rl_prompt(2)) + "\n")
    with pytest.raises(RecordError, match=r"prompts.jsonl, line 3: invalid JSON"):
        read_rl_prompts(path)
    records, skipped = read_rl_prompts(path, on_bad_record="skip")
    assert [r.uid for r in records] == [0, 2]
    assert [i for i, _ in skipped] == [1, 2]
    assert "line 3: invalid JSON" in skipped[0][1] and 'line 4: "uid" must be an integer' in skipped[1][1]


def test_whole_file_errors_name_the_file(tmp_path):
    (tmp_path / "object.json").write_text('{"id": 1}')
    with pytest.raises(RecordError, match=r"object.json: expected a JSON list"):
        read_sft(tmp_path / "object.json")
    (tmp_path / "broken.json").write_text('[{"id": 1},')
    with pytest.raises(RecordError, match=r"broken.json: invalid JSON"):
        read_sft(tmp_path / "broken.json", on_bad_record="skip")
    with pytest.raises(FileNotFoundError, match="absent.json"):
        read_sft(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="on_bad_record"):
        read_sft(tmp_path / "object.json", on_bad_record="ignore")


# --------------------------------------------------------------------------- two-file zero-shot QA

# ActivityNet-QA as distributed: test_q.json names the video without "v_"; test_a.json, in
# another order, carries each answer and its type under the same question_id.
QUESTIONS = [
    {"video_name": "k3Jd9aQp0Zc", "question_id": "k3Jd9aQp0Zc_0", "question": "what is he doing"},
    {"video_name": "k3Jd9aQp0Zc", "question_id": "k3Jd9aQp0Zc_1", "question": "is he outdoors"},
    {"video_name": "Zx8zlbyL0l4", "question_id": 7, "question": "what color is the dog"},
]
ANSWERS = [
    {"answer": "brown", "type": 4, "question_id": 7},
    {"answer": "yes", "type": 3, "question_id": "k3Jd9aQp0Zc_1"},
    {"answer": "surfing", "type": 0, "question_id": "k3Jd9aQp0Zc_0"},
]
ANSWER_OF = {a["question_id"]: a["answer"] for a in ANSWERS}


def two_files(tmp_path: Path, questions: list, answers: list, suffix: str = ".json") -> tuple:
    q_path = write_raw(tmp_path / f"test_q{suffix}", questions)
    return q_path, write_raw(tmp_path / f"test_a{suffix}", answers)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_two_file_form_joins_answers_by_question_id_not_position(tmp_path, suffix):
    questions, answers = two_files(tmp_path, QUESTIONS, ANSWERS, suffix)
    records, skipped = read_zeroshot_qa(questions, answers=answers)
    assert skipped == []
    assert [r.question_id for r in records] == ["k3Jd9aQp0Zc_0", "k3Jd9aQp0Zc_1", 7]
    assert [r.answer for r in records] == ["surfing", "yes", "brown"]
    assert records[2].to_dict() == {"video_name": "Zx8zlbyL0l4", "question_id": 7,
                                    "question": "what color is the dog", "answer": "brown",
                                    "type": 4}
    merged = write_raw(tmp_path / "merged.json", [r.to_dict() for r in records])
    assert read_zeroshot_qa(merged).records == records  # as prepare writes it: the merged form


def test_answers_file_answer_wins_over_one_in_the_question(tmp_path):
    questions, answers = two_files(tmp_path, [QUESTIONS[2] | {"answer": "stale"}], ANSWERS[:1])
    assert read_zeroshot_qa(questions, answers=answers).records[0].answer == "brown"


# (case, questions, answers, file and record named, message)
UNMATCHED = [
    ("question without an answer", QUESTIONS, ANSWERS[:2], "test_q", 0,
     "question_id 'k3Jd9aQp0Zc_0' has no answer in {answers}"),
    ("answer without a question", QUESTIONS[1:], ANSWERS, "test_a", 2,
     "question_id 'k3Jd9aQp0Zc_0' has no question in {questions}"),
    ("answer id of another type", QUESTIONS[2:], [ANSWERS[0] | {"question_id": "7"}], "test_q", 0,
     "question_id 7 has no answer in {answers}"),
    ("question asked twice", QUESTIONS + QUESTIONS[2:], ANSWERS, "test_q", 3,
     "question_id 7 is asked already by {questions}, record 2"),
    ("answer given twice", QUESTIONS, ANSWERS + ANSWERS[:1], "test_a", 3,
     "question_id 7 is answered already by {answers}, record 0"),
    ("answer without question_id", QUESTIONS, [{"answer": "x"}] + ANSWERS, "test_a", 0,
     'missing "question_id"'),
    ("answer that is not text", QUESTIONS, [ANSWERS[0] | {"answer": 3}] + ANSWERS[1:], "test_a", 0,
     '"answer" must be a string, got 3'),
]


@pytest.mark.parametrize("case", UNMATCHED, ids=[case[0] for case in UNMATCHED])
def test_two_file_form_names_each_unmatched_record(tmp_path, case):
    _, questions, answers, file, record, message = case
    q_path, a_path = two_files(tmp_path, questions, answers)
    named = message.format(questions=q_path, answers=a_path)
    expected = f"{tmp_path / file}.json, record {record}: {named}"
    with pytest.raises(RecordError) as error:
        read_zeroshot_qa(q_path, answers=a_path)
    assert str(error.value) == expected

    records, skipped = read_zeroshot_qa(q_path, answers=a_path, on_bad_record="skip")
    assert expected in [message for _, message in skipped]
    assert all(r.answer == ANSWER_OF[r.question_id] for r in records)


def test_skip_mode_leaves_out_unanswered_questions_by_their_index(tmp_path):
    answers = ANSWERS[:1] + [{"answer": "no", "question_id": "gone"}]
    q_path, a_path = two_files(tmp_path, QUESTIONS, answers)
    records, skipped = read_zeroshot_qa(q_path, answers=a_path, on_bad_record="skip")
    assert [r.question_id for r in records] == [7]
    assert [index for index, _ in skipped] == [0, 1, 3]  # both questions, then the extra answer
    assert "test_a.json, record 1: question_id 'gone' has no question" in skipped[2][1]


def test_media_of_a_record_built_in_code_cannot_leave_the_root(tmp_path):
    record = RLPrompt(conversations=[Turn("human", "<image>\nq")], images=["../../outside.png"], uid=1)
    with pytest.raises(VideoError, match="leaves the video root"):
        record.media(tmp_path)


# --------------------------------------------------------------------------- curriculum


def by_length(lengths: list[int]) -> list[SFTRecord]:
    return [SFTRecord.from_dict(sft(i) | {"conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": " ".join(["w"] * n)}]}, f"r{i}") for i, n in enumerate(lengths)]


def test_curriculum_split_with_threshold_keeps_order():
    records = by_length([3, 40, 5, 12, 1, 12])
    easy, hard, threshold = curriculum_split(records, threshold_words=12)
    assert threshold == 12
    assert [answer_words(r) for r in easy] == [3, 5, 12, 1, 12]
    assert [answer_words(r) for r in hard] == [40]


def test_curriculum_split_counts_every_gpt_turn():
    two_turns = SFTRecord.from_dict(sft(0, answer="one two three"), "r")  # plus "It leaves the frame."
    easy, hard, _ = curriculum_split([two_turns], threshold_words=6)
    assert (easy, hard) == ([], [two_turns])


def test_curriculum_split_with_quantile():
    lengths = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3
    easy, hard, threshold = curriculum_split(by_length(lengths), quantile=0.7)
    assert threshold == 7
    assert len(easy) == 21 and len(hard) == 9
    assert max(answer_words(r) for r in easy) < min(answer_words(r) for r in hard)
    _, hard, threshold = curriculum_split(by_length(lengths), quantile=1.0)
    assert threshold == 10 and hard == []
    easy, hard, threshold = curriculum_split(by_length([2, 2, 2, 2, 9]), quantile=0.5)
    assert threshold == 2 and len(easy) == 4 and len(hard) == 1  # ties stay together


@pytest.mark.parametrize("kwargs", [{}, {"threshold_words": 5, "quantile": 0.5}, {"quantile": 0.0}, {"quantile": 1.5}])
def test_curriculum_split_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        curriculum_split(by_length([1, 2]), **kwargs)
