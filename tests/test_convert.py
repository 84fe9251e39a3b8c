"""The released-checkpoint converter on tiny synthetic checkpoints in the original LLaVA layout:
the converted model must compute what the original would (CLIP layer -2 without CLS, the
two-layer GELU projector, Video-ChatGPT pooling, Vicuna), load through the package's one
loading path, and generate; a checkpoint it cannot convert is named with the reason."""

import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from vlm_rlaif import generation, modeling
from vlm_rlaif.convert import ConversionError, convert, main
from vlm_rlaif.tiny import BOS, EOS, UNK, train_tokenizer
from vlm_rlaif.video_chatgpt import pool_spatio_temporal

WORDS = "a red ball rolls left while the blue square waits near the top of the frame then fades out slowly".split()
SIDE, PATCH, VISION_WIDTH, WIDTH = 32, 8, 16, 32
ROPE_THETA = 20000.0  # not Llama's default: the converted model must carry it over
CHECKS = {"mm_projector_type": "mlp2x_gelu", "mm_use_im_start_end": False, "mm_vision_select_feature": "patch"}


def original_checkpoint(folder, shard_format="safetensors"):
    """A LlavaLlamaForCausalLM-layout folder: Vicuna-style Llama weights under model.* and lm_head,
    the projector as model.mm_projector.{0,2}, mm_* settings, a tokenizer without media tokens."""
    folder.mkdir()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer([" ".join(WORDS)] * 4, 300, [UNK, BOS, EOS]), bos_token=BOS, eos_token=EOS, unk_token=UNK
    )
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False, rope_theta=ROPE_THETA)
    llama = LlamaForCausalLM(text)
    weights = dict(llama.state_dict())
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)  # as older Llama checkpoints carry it
    for index, shape in ((0, (WIDTH, VISION_WIDTH)), (2, (WIDTH, WIDTH))):
        weights[f"model.mm_projector.{index}.weight"] = torch.randn(shape) / shape[1] ** 0.5
        weights[f"model.mm_projector.{index}.bias"] = torch.randn(shape[0]) * 0.1
    names = sorted(weights)
    halves = (names[: len(names) // 2], names[len(names) // 2 :])
    for i, half in enumerate(halves, 1):
        shard = {k: weights[k].contiguous() for k in half}
        if shard_format == "safetensors":
            save_file(shard, folder / f"model-0000{i}-of-00002.safetensors")
        else:
            torch.save(shard, folder / f"pytorch_model-0000{i}-of-00002.bin")
    legacy = {k: v for k, v in text.to_dict().items() if k != "rope_parameters"} | {"rope_theta": ROPE_THETA, "rope_scaling": None}
    config = {**legacy, "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "mm_hidden_size": VISION_WIDTH,
              "mm_vision_select_layer": -2, "mm_vision_tower": "openai/clip-vit-large-patch14-336", **CHECKS}
    (folder / "config.json").write_text(json.dumps(config))
    return llama, weights


def clip_folder(folder):
    """A CLIP model folder as openai/clip-vit-large-patch14-336 is laid out: both towers."""
    torch.manual_seed(1)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 64,
                     "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1},
        vision_config={"hidden_size": VISION_WIDTH, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                       "image_size": SIDE, "patch_size": PATCH},
    )
    clip = CLIPModel(config)
    clip.save_pretrained(folder)
    return clip


@pytest.fixture(scope="module", params=["safetensors", "bin"])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"release-{request.param}")
    llama, weights = original_checkpoint(root / "checkpoint", request.param)
    clip = clip_folder(root / "clip")
    out = convert(root / "checkpoint", root / "converted", root / "clip", system="A test chat.")
    return root, llama, weights, clip, out


def video(frames=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (frames, 40, 48, 3), dtype=np.uint8)


ASK = [{"from": "human", "value": "<image>\nwhat moves"}]


def expected_features(clip, weights, pixels):
    """The release's video features computed by hand: CLIP layer -2 without CLS, the GELU MLP,
    then one token per frame (mean over space) and one per patch (mean over time)."""
    frames = pixels[0]
    hidden = clip.vision_model(frames, output_hidden_states=True).hidden_states[-2][:, 1:]
    w = lambda i: (weights[f"model.mm_projector.{i}.weight"], weights[f"model.mm_projector.{i}.bias"])
    projected = F.linear(F.gelu(F.linear(hidden, *w(0))), *w(2))
    return torch.cat([projected.mean(1), projected.mean(0)])


def test_the_converted_model_computes_what_the_original_does(converted):
    root, llama, weights, clip, out = converted
    model, processor = modeling.load_model_and_processor(out)
    assert type(model).__name__ == "VideoChatGPTLlavaForConditionalGeneration"
    assert model.config.text_config.rope_parameters["rope_theta"] == ROPE_THETA
    batch = modeling.build_inputs(processor, [video()], [ASK], add_generation_prompt=True)
    ids = batch["input_ids"][0]
    video_id = model.config.video_token_index
    patches = (SIDE // PATCH) ** 2
    assert (ids == video_id).sum() == 3 + patches  # T temporal + P spatial tokens
    text = processor.tokenizer.decode(ids[ids != video_id])
    assert text.startswith(f"{BOS}A test chat. USER: ") and text.endswith("what moves ASSISTANT:")
    with torch.no_grad():
        features = expected_features(clip, weights, batch["pixel_values_videos"])
        assert torch.allclose(model.get_video_features(batch["pixel_values_videos"]).pooler_output[0], features, atol=1e-5)
        embeds = llama.get_input_embeddings()(torch.where(ids == video_id, 0, ids))
        embeds[ids == video_id] = features
        reference = llama(inputs_embeds=embeds[None]).logits[0]
        ours = model(**batch).logits[0]
    original_vocab = llama.config.vocab_size
    assert ours.shape[-1] == original_vocab + 2  # <image>, <video>
    assert torch.allclose(ours[:, :original_vocab], reference, atol=1e-4)


def test_pooling_puts_frame_tokens_before_patch_tokens():
    features = torch.arange(2 * 3 * 4 * 1, dtype=torch.float32).reshape(2, 3, 4, 1)  # [B, T, P, D]
    pooled = pool_spatio_temporal(features)
    assert pooled.shape == (2, 3 + 4, 1)
    assert torch.equal(pooled[0, :3, 0], features[0].mean(1)[:, 0])  # frame t: mean of its patches
    assert torch.equal(pooled[0, 3:, 0], features[0].mean(0)[:, 0])  # patch p: mean over frames


def test_the_converted_model_generates_and_encodes_once(converted):
    *_, out = converted
    model, processor = modeling.load_model_and_processor(out)
    videos = [video(4, 0), video(4, 1)]
    features = generation.encode_video_list(model, processor, videos)
    assert [f.shape[0] for f in features] == [4 + 16, 4 + 16]
    kwargs = dict(max_new_tokens=4, temperature=0.0)
    fresh = generation.generate(model, processor, videos, [ASK, ASK], **kwargs)
    reused = generation.generate(model, processor, videos, [ASK, ASK], features=features, **kwargs)
    assert fresh == reused and all(isinstance(t, str) for group in fresh for t in group)


def test_the_cli_converts_and_names_what_it_cannot(tmp_path, capsys):
    original_checkpoint(tmp_path / "checkpoint")
    clip_folder(tmp_path / "clip")
    assert main([str(tmp_path / "checkpoint"), str(tmp_path / "out"), "--vision-tower", str(tmp_path / "clip"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "out2"), "--vision-tower", str(tmp_path / "clip")]) == 2
    assert "nowhere" in capsys.readouterr().err and not (tmp_path / "out2").exists()


@pytest.mark.parametrize("break_it, message", [
    (lambda c: (c / "adapter_config.json").write_text("{}"), "LoRA adapter"),
    (lambda c: _edit_config(c, mm_projector_type="linear"), "mm_projector_type is 'linear'"),
    (lambda c: _edit_config(c, mm_use_im_start_end=True), "mm_use_im_start_end"),
    (lambda c: _edit_config(c, mm_hidden_size=99), "mm_hidden_size 99"),
    (lambda c: (c / "config.json").write_text("{not json"), "not valid JSON"),
    (lambda c: _edit_weights(c, drop="model.mm_projector.2.bias"), "multi_modal_projector.linear_2.bias"),
    (lambda c: _edit_weights(c, add="model.extra_head.weight"), "'model.extra_head.weight'"),
    (lambda c: [p.unlink() for p in c.glob("*.safetensors")], "no *.safetensors or *.bin"),
    (lambda c: next(c.glob("*.safetensors")).write_bytes(b"truncated"), "cannot read its tensors"),
])
def test_a_checkpoint_that_cannot_convert_is_named_and_nothing_is_written(tmp_path, break_it, message):
    original_checkpoint(tmp_path / "checkpoint")
    clip_folder(tmp_path / "clip")
    break_it(tmp_path / "checkpoint")
    with pytest.raises(ConversionError, match=re.escape(message)):
        convert(tmp_path / "checkpoint", tmp_path / "out", tmp_path / "clip")
    assert not (tmp_path / "out").exists()


def test_a_vision_tower_that_is_not_clip_is_refused(tmp_path):
    original_checkpoint(tmp_path / "checkpoint")
    shutil.copytree(tmp_path / "checkpoint", tmp_path / "not-clip")
    (tmp_path / "not-clip" / "config.json").write_text(json.dumps(LlamaConfig(vocab_size=10).to_dict()))
    with pytest.raises(ConversionError, match="a llama model, not a CLIP vision tower"):
        convert(tmp_path / "checkpoint", tmp_path / "out", tmp_path / "not-clip")


def _edit_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _edit_weights(folder, drop=None, add=None):
    from safetensors.torch import load_file

    shard = sorted(folder.glob("*.safetensors"))[0]
    weights = load_file(shard)
    other = load_file(sorted(folder.glob("*.safetensors"))[1])
    if drop:
        weights.pop(drop, None)
        other.pop(drop, None)
        save_file(other, sorted(folder.glob("*.safetensors"))[1])
    if add:
        weights[add] = torch.zeros(2)
    save_file(weights, shard)


def test_loading_an_unconverted_release_says_to_convert_it(tmp_path):
    original_checkpoint(tmp_path / "checkpoint")
    with pytest.raises(modeling.ModelLoadError, match="original LLaVA layout; convert it first"):
        modeling.load_model_and_processor(tmp_path / "checkpoint")


def test_a_vision_tower_saved_in_the_checkpoint_replaces_the_clip_folders(tmp_path):
    """LLaVA saves the tower under model.vision_tower.vision_tower.* when it was tuned with the model."""
    original_checkpoint(tmp_path / "checkpoint")
    clip = clip_folder(tmp_path / "clip")
    tuned = {f"model.vision_tower.vision_tower.{k}": v + 1.0 for k, v in clip.state_dict().items() if k.startswith("vision_model.")}
    save_file({k: v.contiguous() for k, v in tuned.items()}, tmp_path / "checkpoint" / "tower.safetensors")
    model, _ = modeling.load_model_and_processor(convert(tmp_path / "checkpoint", tmp_path / "out", tmp_path / "clip"))
    ours = model.model.vision_tower.state_dict()
    prefix = "model.vision_tower.vision_tower.vision_model."
    assert ours.keys() == {k.removeprefix(prefix) for k in tuned}
    assert all(torch.equal(ours[k.removeprefix(prefix)], v) for k, v in tuned.items())
