"""The tiny LLaVA-NeXT-Video: built offline, saved like any checkpoint, deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor

from vlm_rlaif.config import BaseConfig, ConfigError, TinyModelConfig, from_dict
from vlm_rlaif.modeling import build_inputs, load_model_and_processor
from vlm_rlaif.tiny import SPECIAL_TOKENS, build_tiny_model, train_tokenizer

CORPUS = [
    "A red circle enters from the left, then a blue square leaves.",
    "What colour is the triangle? It is green.",
    "Describe the video in detail.",
    "First the yellow star moves up; then it changes colour to purple.",
] * 20


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(TinyModelConfig(), CORPUS, tmp_path_factory.mktemp("base") / "model", seed=0)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model_and_processor(tiny_dir)


def test_build_writes_a_safetensors_checkpoint_with_the_paper_wiring(tiny_dir, tiny):
    model, processor = tiny
    names = {p.name for p in tiny_dir.iterdir()}
    assert "model.safetensors" in names and "config.json" in names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    assert not any(p.name.endswith(".tmp") for p in tiny_dir.parent.iterdir())
    config = model.config
    assert config.model_type == "llava_next_video"
    assert config.vision_feature_layer == -1 and config.vision_feature_select_strategy == "default"
    assert config.vision_config.image_size == 64 and config.vision_config.patch_size == 8
    assert config.text_config.vocab_size == len(processor.tokenizer)
    assert processor.video_processor.crop_size["height"] == 64


def test_video_expands_to_exactly_the_features_the_model_consumes(tiny):
    model, processor = tiny
    videos = [np.random.default_rng(i).integers(0, 256, (8, 64, 64, 3), dtype=np.uint8) for i in range(2)]
    conversations = [[{"from": "human", "value": "<image>\nWhat moves?"}], [{"from": "human", "value": "<image>\nDescribe it."}]]
    batch = build_inputs(processor, videos, conversations, add_generation_prompt=True)
    per_video = (batch["input_ids"] == model.config.video_token_id).sum(dim=1)
    assert per_video.tolist() == [8 * 16, 8 * 16]  # (64/8)^2 patches, 2x2 pooled -> 16 per frame
    with torch.no_grad():
        features = model.get_video_features(pixel_values_videos=batch["pixel_values_videos"]).pooler_output
        out = model(**batch)
    assert features.shape[:2] == (2, 8 * 16)
    assert out.video_hidden_states.numel() == int(per_video.sum()) * model.config.text_config.hidden_size


def test_build_is_deterministic_for_a_seed(tmp_path, tiny_dir):
    again = build_tiny_model(TinyModelConfig(), CORPUS, tmp_path / "again", seed=0)
    other = build_tiny_model(TinyModelConfig(), CORPUS, tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny_dir / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_rebuild_replaces_the_folder_whole(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("left from an earlier build")
    build_tiny_model(TinyModelConfig(), CORPUS, out, seed=0)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "text",
    [
        "A red circle enters from the left.",
        "unseen words: zebra quixotic, 42 x 7 = 294 ; tabs\tand  double  spaces\n\nnew lines ",
        "  leading and trailing spaces  ",
        "Ünïcödé: 日本語, emoji 🎥, accents café — dashes",
        "punctuation , . ? ! ' \" ( ) [ ] { } < > / \\ | ~",
    ],
)
def test_tokenizer_round_trips_arbitrary_text(tiny_dir, text):
    tokenizer = AutoProcessor.from_pretrained(tiny_dir).tokenizer
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_has_the_family_special_tokens(tiny):
    _, processor = tiny
    tokenizer = processor.tokenizer
    for token in SPECIAL_TOKENS:
        assert tokenizer.convert_tokens_to_ids(token) != tokenizer.unk_token_id or token == "<unk>"
        assert tokenizer(token, add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids(token)]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    # the chat template's role markers are words of the vocabulary, not spelled out letter by letter
    assert len(tokenizer.tokenize("USER: ASSISTANT:")) == 4


def test_chat_template_renders_vicuna_v1(tiny):
    _, processor = tiny
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What moves?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "Then?"}]},
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s>USER: <video>\nWhat moves? ASSISTANT: A red circle.</s>USER: Then? ASSISTANT:"


def test_train_tokenizer_rejects_empty_corpus_and_tiny_vocab():
    with pytest.raises(ValueError, match="corpus is empty"):
        train_tokenizer([], 400, SPECIAL_TOKENS)
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(CORPUS, 100, SPECIAL_TOKENS)


@pytest.mark.parametrize(
    "section, values, key",
    [
        (TinyModelConfig, {"image_size": 60}, "tiny.image_size"),
        (TinyModelConfig, {"image_size": 24}, "tiny.image_size"),
        (BaseConfig, {"family": "qwen2_5_vl"}, "tiny.family"),
    ],
)
def test_config_rejects_tiny_dimensions_the_processor_cannot_match(section, values, key):
    with pytest.raises(ConfigError, match=key):
        from_dict(section, values, "tiny")
