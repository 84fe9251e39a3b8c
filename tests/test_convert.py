"""The released-checkpoint converter on tiny synthetic checkpoints in the original LLaVA layout:
the converted model must compute what the original would (CLIP layer -2 without CLS, the
two-layer GELU projector, Video-ChatGPT pooling, Vicuna), load through the package's one
loading path, and generate; a checkpoint it cannot convert is named with the reason."""

import copy
import json
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
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
    computes_like_the_original(out, llama, weights, clip)


def computes_like_the_original(out, llama, weights, clip):
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


def test_frames_are_padded_square_in_clips_mean_colour_unless_cropping_is_asked(converted, tmp_path):
    root, *_, out = converted
    _, processor = modeling.load_model_and_processor(out)
    frames = video()  # 40 x 48: four rows of the mean colour above and below once padded
    padded = np.empty((3, 48, 48, 3), dtype=np.uint8)
    padded[...] = [122, 116, 104]  # int(255 * OpenAI CLIP's mean)
    padded[:, 4:44] = frames
    pixels = modeling.build_inputs(processor, [frames], [ASK], add_generation_prompt=True)["pixel_values_videos"]
    assert torch.equal(pixels, processor.video_processor(videos=[padded], return_tensors="pt")["pixel_values_videos"])
    cropping = convert(root / "checkpoint", tmp_path / "crop", root / "clip", system="A test chat.", aspect="crop")
    _, processor = modeling.load_model_and_processor(cropping)
    pixels = modeling.build_inputs(processor, [frames], [ASK], add_generation_prompt=True)["pixel_values_videos"]
    assert torch.equal(pixels, processor.video_processor(videos=[frames], return_tensors="pt")["pixel_values_videos"])


def lora_release(folder, checkpoint, llama, weights):
    """A LoRA release as the LLaVA code saves one: a PEFT adapter on every projection of the
    language model (B not zero: a trained one), the projector retrained beside it in
    non_lora_trainables.bin, and the model's config.json. Returns the merged Llama and the
    full checkpoint's weights with that projector."""
    torch.manual_seed(2)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                      init_lora_weights=False)
    peft = get_peft_model(copy.deepcopy(llama), lora)
    peft.save_pretrained(folder)
    projector = {f"base_model.model.model.mm_projector.{i}.weight": torch.randn_like(weights[f"model.mm_projector.{i}.weight"]) for i in (0, 2)}
    torch.save(projector, folder / "non_lora_trainables.bin")
    shutil.copy(checkpoint / "config.json", folder / "config.json")
    return peft.merge_and_unload(), weights | {k.removeprefix("base_model.model."): v for k, v in projector.items()}


def test_a_lora_release_merged_into_its_base_computes_what_the_merged_original_does(converted, tmp_path):
    root, llama, weights, clip, _ = converted
    merged, trained = lora_release(tmp_path / "lora", root / "checkpoint", llama, weights)
    out = convert(tmp_path / "lora", tmp_path / "converted", root / "clip", base=root / "checkpoint", system="A test chat.")
    computes_like_the_original(out, merged, trained, clip)


@pytest.mark.parametrize("break_it, message", [
    (lambda lora: _edit_json(lora / "adapter_config.json", use_dora=True), "use_dora is set"),
    (lambda lora: _edit_json(lora / "adapter_config.json", peft_type="IA3"), "not a LoRA adapter config"),
    (lambda lora: (lora / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors or adapter_model.bin"),
    (lambda lora: torch.save({"base_model.model.model.mm_projector.9.weight": torch.zeros(2)}, lora / "non_lora_trainables.bin"),
     "base_model.model.model.mm_projector.9.weight of shape (2,) replaces no weight"),
    (lambda lora: _edit_adapter(lora, lambda t: {k.replace("q_proj", "w_proj"): v for k, v in t.items()}), "adapts no weight"),
    (lambda lora: _edit_adapter(lora, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj.lora_B" not in k}),
     "layers.1.mlp.up_proj.lora_A.weight has no lora_B"),
    (lambda lora: _edit_adapter(lora, lambda t: t | {"base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}),
     "embed_tokens.lora_embedding_A is not half of a lora_A/lora_B pair"),
])
def test_a_lora_release_that_cannot_merge_is_named_and_nothing_is_written(converted, tmp_path, break_it, message):
    root, llama, weights, *_ = converted
    lora_release(tmp_path / "lora", root / "checkpoint", llama, weights)
    break_it(tmp_path / "lora")
    with pytest.raises(ConversionError, match=re.escape(message)):
        convert(tmp_path / "lora", tmp_path / "out", root / "clip", base=root / "checkpoint")
    assert not (tmp_path / "out").exists()


def test_a_lora_release_needs_its_base_and_a_full_checkpoint_takes_none(converted, tmp_path):
    root, llama, weights, *_ = converted
    lora_release(tmp_path / "lora", root / "checkpoint", llama, weights)
    with pytest.raises(ConversionError, match="a LoRA adapter; name the full checkpoint it was trained from"):
        convert(tmp_path / "lora", tmp_path / "out", root / "clip")
    with pytest.raises(ConversionError, match="base is only for LoRA releases"):
        convert(root / "checkpoint", tmp_path / "out", root / "clip", base=tmp_path / "lora")


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
    _edit_json(folder / "config.json", **changes)


def _edit_json(path, **changes):
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


def _edit_adapter(folder, change):
    from safetensors.torch import load_file

    path = folder / "adapter_model.safetensors"
    save_file(change(load_file(path)), path)


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
