"""The `prepare` and `base` stages: package functions, and their notebooks under papermill."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from vlm_rlaif import base, data as records, prepare
from vlm_rlaif.config import ConfigError, load_params
from vlm_rlaif.modeling import build_inputs, load_model_and_processor
from vlm_rlaif.video import load_video

from conftest import PARAMS


def _edit_json(path: Path, edit) -> None:
    rows = json.loads(path.read_text())
    edit(rows)
    path.write_text(json.dumps(rows))


def test_prepare_writes_validated_sets_and_the_curriculum_split(project):
    params = load_params("params.yaml")
    prepared = prepare.run(params)
    easy = records.read_sft(prepare.OUT / "sft_easy.json").records
    hard = records.read_sft(prepare.OUT / "sft_hard.json").records
    assert len(easy) == 6 * 2 and len(hard) == 6  # short QA easy, one description per video hard
    assert all(records.answer_words(r) <= 10 < records.answer_words(h) for r in easy for h in hard)
    assert prepared.counts["rl_prompts"] == 4 and prepared.counts["eval/zeroshot_synthetic"] == 4
    manifest = json.loads((prepare.OUT / "manifest.json").read_text())
    assert manifest["curriculum"]["threshold_words"] == 10 and manifest["skipped_records"] == 0
    assert set(json.loads((prepare.OUT / "scenes.json").read_text())) == set(
        json.loads((project / "data" / "scenes.json").read_text())
    )


def test_prepare_refuses_data_from_another_world(project):
    (project / "params.yaml").write_text(yaml.safe_dump({**PARAMS, "world": {**PARAMS["world"], "difficulty": 0.9}}))
    with pytest.raises(ConfigError, match=r"world\.difficulty.*make data"):
        prepare.run(load_params("params.yaml"))
    assert not prepare.OUT.exists()


def test_missing_video_names_file_and_record_or_is_skipped(project):
    long_file = project / "data" / "SFT_long.json"
    _edit_json(long_file, lambda rows: rows[3].update(images=["synthetic_8frames/nope/frame_000.png"]))
    with pytest.raises(records.RecordError, match=r"data/SFT_long\.json, record 3: video not found: .*nope"):
        prepare.run(load_params("params.yaml"))

    skip = {**PARAMS, "data": {**PARAMS["data"], "on_bad_record": "skip"}}
    (project / "params.yaml").write_text(yaml.safe_dump(skip))

    def break_two(rows):
        rows[1].pop("uid")
        rows[2]["images"][0] = "synthetic_8frames/gone.png"

    _edit_json(project / "data" / "RL_data.json", break_two)
    prepared = prepare.run(load_params("params.yaml"))
    skipped = json.loads(prepare.SKIPPED.read_text())
    assert len(skipped) == 3 and prepared.counts["sft_hard"] == 5 and prepared.counts["rl_prompts"] == 2
    assert any("RL_data.json, record 1" in s and '"uid"' in s for s in skipped)
    assert any("RL_data.json, record 2: video not found" in s and "gone.png" in s for s in skipped)


def test_base_builds_a_model_that_later_stages_load_by_path(project):
    params = load_params("params.yaml")
    prepare.run(params)
    path = base.materialise(params, prepare.OUT)
    model, processor = load_model_and_processor(path)
    record = records.read_sft(prepare.OUT / "sft_hard.json").records[0]
    corpus = list(base.corpus(prepare.OUT))
    assert record.answer() in corpus and any("{response_a}" in text for text in corpus)  # data and prompt files
    frames = load_video(record.media(params.data.video_root), params.data.num_frames)
    inputs = build_inputs(processor, [frames], [record.conversations[:1]], add_generation_prompt=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4
    again = base.materialise(params, prepare.OUT, project / "again")
    assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


def test_the_tokenizer_learns_what_the_video_supports_not_the_writers_addition(project):
    prepare.run(load_params("params.yaml"))
    grounded = records.read_sft(prepare.OUT / "sft_hard.json").records[0].answer()

    def add_to_first(rows):
        rows[0]["grounded"] = grounded
        rows[0]["conversations"][-1]["value"] = grounded + " A zebra hums."

    _edit_json(prepare.OUT / "sft_hard.json", add_to_first)
    corpus = list(base.corpus(prepare.OUT))
    assert grounded in corpus and not any("zebra" in text for text in corpus)


def test_tiny_base_learns_to_read_colours_from_pixels(built):
    """The base normalises frames with the world's pixel statistics; with CLIP's constants
    every visual token comes out nearly parallel and this loss stays at chance (ln 4 / 3)."""
    model, processor = load_model_and_processor(built / "artifacts/base")
    stats = base.pixel_statistics(built / "artifacts/prepare", built / "data/videos", num_frames=4)
    assert list(processor.video_processor.image_mean) == stats[0] and list(processor.video_processor.image_std) == stats[1]
    colours = {"Red.": (220, 30, 30), "Green.": (30, 200, 30), "Blue.": (30, 30, 220), "Yellow.": (230, 220, 30)}
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(200):
        videos, conversations = [], []
        for answer in rng.choice(list(colours), 8):
            frames = np.full((4, 32, 32, 3), 30, np.uint8)
            x, y = rng.integers(0, 22, 2)
            frames[:, y : y + 10, x : x + 10] = colours[answer]
            videos.append(frames)
            conversations.append([{"from": "human", "value": "<image>\nWhat colour is the object?"}, {"from": "gpt", "value": answer}])
        batch = build_inputs(processor, videos, conversations, add_generation_prompt=False, assistant_masks=True)
        mask = batch.pop("assistant_masks").bool()
        loss = model(**batch, labels=batch["input_ids"].masked_fill(~mask, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-10:]) < 0.3  # an answer blind to the pixels scores ln(4) / 3 = 0.46 here
