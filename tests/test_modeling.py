"""Loading by path and building batched video inputs, for both supported families."""

from __future__ import annotations

import copy
import importlib.util
import json

import numpy as np
import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

from vlm_rlaif.config import TinyModelConfig
from vlm_rlaif.modeling import (
    ConversationError, ModelLoadError, _render, build_inputs, load_model_and_processor,
)
from vlm_rlaif.tiny import build_tiny_model, train_tokenizer

CORPUS = [
    "A red circle enters from the left, then a blue square leaves.",
    "What colour is the triangle? It is green.",
    "Describe the video in detail.",
] * 20

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SHORT = [{"from": "human", "value": "<image>\nWhat moves?"}]
LONG = [
    {"from": "human", "value": "Describe the video in detail, first to last.\n<image>"},
    {"from": "gpt", "value": "A red circle enters."},
    {"from": "human", "value": "And then?"},
]


def frames(seed: int, height: int = 64, width: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (8, height, width, 3), dtype=np.uint8)


def build_tiny_qwen(out_dir):
    """A random Qwen2.5-VL at toy width with an offline tokenizer carrying the Qwen special tokens."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(CORPUS, 320, QWEN_SPECIALS),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    sizes = dict(size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64}, patch_size=8, merge_size=2, temporal_patch_size=2)
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**sizes),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(cap_pixels_per_frame=False, **sizes),
        chat_template=QWEN_TEMPLATE,
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=8,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=32,
            out_hidden_size=64,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def masked_runs(tokenizer, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The decoded text of each contiguous stretch of masked tokens, outer whitespace dropped."""
    edges = torch.diff(torch.cat([torch.tensor([0]), mask, torch.tensor([0])])).tolist()
    starts = [i for i, e in enumerate(edges) if e == 1]
    ends = [i for i, e in enumerate(edges) if e == -1]
    return [tokenizer.decode(ids[a:b]).strip() for a, b in zip(starts, ends)]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    path = build_tiny_model(TinyModelConfig(), CORPUS, tmp_path_factory.mktemp("llava") / "model", seed=0)
    return load_model_and_processor(path)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return load_model_and_processor(build_tiny_qwen(tmp_path_factory.mktemp("qwen") / "model"))


@pytest.fixture(params=["llava", "qwen"])
def family(request):
    return request.getfixturevalue(request.param)


def test_loads_the_right_family_by_path(llava, qwen):
    assert llava[0].config.model_type == "llava_next_video"
    assert qwen[0].config.model_type == "qwen2_5_vl"
    assert type(qwen[1]).__name__ == "Qwen2_5_VLProcessor"
    assert all(p.dtype == torch.float32 for p in llava[0].parameters())


def test_generation_prompts_are_left_padded_and_score_as_if_alone(family):
    model, processor = family
    videos, conversations = [frames(0), frames(1)], [SHORT, LONG]
    batch = build_inputs(processor, videos, conversations, add_generation_prompt=True)
    lengths = batch["attention_mask"].sum(dim=1)
    assert lengths[0] < lengths[1]
    assert batch["attention_mask"][:, -1].tolist() == [1, 1] and batch["attention_mask"][0, 0] == 0
    with torch.no_grad():
        logits = model(**batch).logits
        alone = model(**build_inputs(processor, videos[:1], conversations[:1], add_generation_prompt=True)).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], model.config.text_config.vocab_size)
    torch.testing.assert_close(logits[0, -1], alone[0, -1], atol=1e-4, rtol=1e-4)


def test_generate_returns_new_tokens(family):
    model, processor = family
    batch = build_inputs(processor, [frames(0), frames(1, 48, 64)], [SHORT, LONG], add_generation_prompt=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    prompt = batch["input_ids"].shape[1]
    assert out.shape[0] == 2 and prompt < out.shape[1] <= prompt + 4
    assert torch.equal(out[:, :prompt], batch["input_ids"])
    assert int(out[:, prompt:].max()) < model.config.text_config.vocab_size


def test_video_tokens_match_the_features_the_model_consumes(family):
    model, processor = family
    batch = build_inputs(processor, [frames(0), frames(1, 48, 64)], [SHORT, LONG], add_generation_prompt=True)
    per_video = (batch["input_ids"] == model.config.video_token_id).sum(dim=1).tolist()
    visual = {k: batch[k] for k in ("pixel_values_videos", "video_grid_thw") if k in batch}
    with torch.no_grad():
        features = model.get_video_features(**visual).pooler_output
    assert per_video == [len(f) for f in features]
    assert per_video[0] > 0


def test_assistant_masks_cover_each_reply_and_its_end_marker(family):
    model, processor = family
    tokenizer = processor.tokenizer
    conversations = [
        SHORT + [{"from": "gpt", "value": "A circle."}],
        LONG + [{"from": "gpt", "value": "A blue square leaves the frame."}],
    ]
    batch = build_inputs(processor, [frames(0), frames(1)], conversations, add_generation_prompt=False, assistant_masks=True)
    masks = batch.pop("assistant_masks")
    assert masks.shape == batch["input_ids"].shape
    assert batch["attention_mask"][:, 0].tolist() == [1, 1]  # training batches pad on the right
    assert not masks[batch["input_ids"] == model.config.video_token_id].any()
    assert not masks[batch["attention_mask"] == 0].any()
    eos = tokenizer.eos_token
    assert masked_runs(tokenizer, batch["input_ids"][0], masks[0]) == ["A circle." + eos]
    assert masked_runs(tokenizer, batch["input_ids"][1], masks[1]) == ["A red circle enters." + eos, "A blue square leaves the frame." + eos]
    with torch.no_grad():
        assert model(**batch).logits.shape[:2] == batch["input_ids"].shape


def test_a_remembered_rendering_is_the_templates_own_and_follows_a_changed_template(llava):
    _, processor = llava
    asked = [{"type": "video"}, {"type": "text", "text": "What moves?"}]
    messages = [{"role": "user", "content": asked}]
    fresh = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert _render(processor, messages, True) == _render(processor, messages, True) == fresh
    other = copy.copy(processor)
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}]{% endfor %}"
    assert _render(other, messages, True) == "[user]" != fresh


def test_release_role_key_is_accepted(llava):
    _, processor = llava
    as_role = [{"role": "human", "value": "<image>\nWhat moves?"}]
    a = build_inputs(processor, [frames(0)], [as_role], add_generation_prompt=True)
    b = build_inputs(processor, [frames(0)], [SHORT], add_generation_prompt=True)
    assert torch.equal(a["input_ids"], b["input_ids"])


@pytest.mark.parametrize(
    "videos, conversations, message",
    [
        ([frames(0)], [[{"from": "human", "value": "no placeholder"}]], "conversation 0, turn 0: needs exactly one <image>"),
        ([frames(0)], [[{"from": "gpt", "value": "<image>\nhi"}]], "conversation 0, turn 0: the first turn"),
        ([frames(0)], [SHORT + [{"from": "gpt", "value": "<image> again"}]], "conversation 0, turn 1: <image> may only"),
        ([frames(0)], [SHORT + [{"from": "bot", "value": "x"}]], "conversation 0, turn 1: 'from' is 'bot'"),
        ([frames(0)], [SHORT + [{"from": "gpt", "value": None}]], "conversation 0, turn 1: 'value' must be a string"),
        ([frames(0), frames(1)], [SHORT, []], "conversation 1: expected a non-empty list"),
        ([frames(0).astype(np.float32)], [SHORT], r"video 0: expected uint8 frames \[T, H, W, 3\], got float32"),
        ([frames(0)[..., :1]], [SHORT], "video 0: expected uint8 frames"),
        ([frames(0)], [SHORT, SHORT], "1 videos for 2 conversations"),
        ([frames(0), frames(1)[:6]], [SHORT, SHORT], r"rejected the batch \(video shapes \[\(8, 64, 64, 3\), \(6, 64, 64, 3\)\]\)"),
        ([frames(0)], [SHORT + [{"from": "gpt", "value": "a <video> b"}]], "conversation 0, turn 1: text contains the processor's placeholder '<video>'"),
    ],
)
def test_bad_conversations_name_the_record(llava, videos, conversations, message):
    with pytest.raises(ConversationError, match=message):
        build_inputs(llava[1], videos, conversations, add_generation_prompt=True)


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model folder"):
        load_model_and_processor(tmp_path / "missing")


def test_folder_without_a_model_is_a_clear_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelLoadError, match=r"not a model folder \(no config.json; it holds \['notes.txt'\]\)"):
        load_model_and_processor(tmp_path)


def test_pickled_weights_are_refused(tmp_path):
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").rename(tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="no \\*.safetensors weights"):
        load_model_and_processor(tmp_path)


def test_text_only_model_is_not_an_image_text_to_text_model(tmp_path, llava):
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    llava[1].save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="cannot load a llama image-text-to-text model"):
        load_model_and_processor(tmp_path)


def test_custom_code_needs_trust_remote_code(tmp_path):
    config = {
        "model_type": "homemade_vlm",
        "auto_map": {"AutoConfig": "configuration_homemade.HomemadeConfig"},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "configuration_homemade.py").write_text("raise SystemExit('custom code must not run')\n")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match="set trust_remote_code"):
        load_model_and_processor(tmp_path)


def test_bad_dtype_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="dtype 'float8'"):
        load_model_and_processor(tmp_path, dtype="float8")


def test_4bit_without_bitsandbytes_is_a_clear_error(tmp_path, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="load_in_4bit needs the bitsandbytes package"):
        load_model_and_processor(tmp_path, load_in_4bit=True)


def test_a_4bit_base_trains_the_same_after_a_no_grad_pass(tmp_path):
    """PPO's bases generate (eval, no_grad), then train. On a CPU with AVX512-BF16 (this
    project's machines among them) bitsandbytes would repack the 4-bit weights for inference
    at that first pass, and no gradient would flow through them afterwards."""
    from vlm_rlaif.config import LoraConfig
    from vlm_rlaif.modeling import add_lora

    path = build_tiny_model(TinyModelConfig(), CORPUS, tmp_path / "model", seed=0)
    video = np.random.default_rng(0).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    conversation = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "It is red."}]

    def adapter_grads(no_grad_pass_first: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model, processor = load_model_and_processor(path, load_in_4bit=True)
        model = add_lora(model, LoraConfig(r=4, alpha=8))
        batch = build_inputs(processor, [video], [conversation], add_generation_prompt=False)
        if no_grad_pass_first:
            model.eval()
            with torch.no_grad():
                model(**batch)
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    fresh, after = adapter_grads(False), adapter_grads(True)
    assert fresh.keys() == after.keys() and any("layers.0." in n for n in fresh)
    for name in fresh:
        torch.testing.assert_close(after[name], fresh[name], msg=name)
