"""Convert a released VLM-RLAIF checkpoint (original LLaVA layout) into a model this package loads.

The SNUMPR checkpoints (PAPER.md) are saved the way the LLaVA code base saves a
LlavaLlamaForCausalLM: Vicuna's weights under `model.*` and `lm_head`, the projector under
`model.mm_projector.{0,2}`, the `mm_*` settings in config.json, and usually no vision tower
(LLaVA loads CLIP ViT-L/14-336 from its own folder). `convert` maps all of it onto a
`video_chatgpt_llava` model (vlm_rlaif.video_chatgpt), adds the `<image>` and `<video>`
tokens the processor expands, and saves a folder `modeling.load_model_and_processor` loads,
so the published models can be evaluated (evaluate.released) or tuned further like any base.
The LoRA releases (a PEFT adapter and the LLaVA weights trained beside it) are merged into
the full checkpoint they were trained from (`--base`), as the release's loader does.

    python -m vlm_rlaif.convert CHECKPOINT OUT --vision-tower CLIP_FOLDER [--base FULL_CHECKPOINT] [--system TEXT]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlavaNextImageProcessor,
    LlavaNextVideoVideoProcessor,
    PreTrainedTokenizerBase,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vlm_rlaif.errors import InputError
from vlm_rlaif.io import atomic_dir
from vlm_rlaif.modeling import DTYPES
from vlm_rlaif.tiny import IMAGE_TOKEN, VIDEO_TOKEN, vicuna_template
from vlm_rlaif.video_chatgpt import (
    VideoChatGPTLlavaConfig,
    VideoChatGPTLlavaForConditionalGeneration,
    VideoChatGPTLlavaProcessor,
)

# original name prefix -> ours; the first that matches a key renames it
CHECKPOINT_KEYS = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),  # a tower tuned with the model
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
CLIP_KEYS = (("vision_model.", "model.vision_tower."),)
CLIP_UNUSED = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")
ROTARY_BUFFER = "rotary_emb.inv_freq"  # older Llama checkpoints saved it; it is recomputed
LLAMA_SETTINGS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "rms_norm_eps", "max_position_embeddings", "rope_theta", "rope_scaling", "rope_parameters", "hidden_act",
                  "vocab_size", "attention_bias")
SELECT_FEATURE = {"patch": "default", "cls_patch": "full"}  # LLaVA's mm_vision_select_feature -> transformers' strategy
ASPECTS = ("pad", "crop")  # how a non-square frame becomes square: LLaVA's "pad", or the CLIP processor's centre crop


class ConversionError(InputError):
    """A checkpoint that is not in the layout `convert` reads; the message names the file and key."""


# --------------------------------------------------------------------------- reading


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder: its safetensors shards, else its .bin shards."""
    shards = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not shards:
        raise ConversionError(f"{folder}: no *.safetensors or *.bin weights")
    return read_shards(shards)


def read_shards(shards: list[Path]) -> dict[str, torch.Tensor]:
    """The tensors of weight files; pickled .bin files are read with weights_only (plain
    tensors only; nothing else in the file is executed)."""
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        try:
            if shard.suffix == ".safetensors":
                with safe_open(shard, "pt") as f:
                    weights.update({k: f.get_tensor(k) for k in f.keys()})
            else:
                weights.update(torch.load(shard, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:  # a truncated or foreign file: name it, whatever the reader raised
            raise ConversionError(f"{shard}: cannot read its tensors: {e}") from None
    return weights


def read_config(folder: Path) -> dict:
    """The checkpoint's config.json, checked for the settings the conversion supports."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{path}: does not exist; CHECKPOINT must be a LLaVA model folder")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON: {e}") from None
    missing = [k for k in ("mm_hidden_size", "hidden_size", "num_hidden_layers", "vocab_size") if k not in config]
    if missing:
        raise ConversionError(f"{path}: missing {missing}; not a LLaVA checkpoint (LlavaLlamaForCausalLM)")
    checks = {
        "mm_projector_type": (config.get("mm_projector_type", "linear"), "mlp2x_gelu"),
        "mm_use_im_start_end": (config.get("mm_use_im_start_end", False), False),
    }
    for key, (found, supported) in checks.items():
        if found != supported:
            raise ConversionError(f"{path}: {key} is {found!r}; only {supported!r} (the released models') converts")
    if config.get("mm_vision_select_feature", "patch") not in SELECT_FEATURE:
        raise ConversionError(f"{path}: mm_vision_select_feature {config['mm_vision_select_feature']!r} is not one of {list(SELECT_FEATURE)}")
    return config


def read_vision(folder: Path) -> tuple[object, dict[str, torch.Tensor]]:
    """(CLIP vision config, its weights renamed ours) from a CLIP model folder in transformers'
    layout, such as openai/clip-vit-large-patch14-336; the text half, if present, is dropped."""
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{folder}: cannot read the vision tower's config: {e}") from None
    config = getattr(config, "vision_config", config)
    if config.model_type != "clip_vision_model":
        raise ConversionError(f"{folder}: a {config.model_type} model, not a CLIP vision tower")
    weights = {k: v for k, v in read_weights(folder).items() if not k.startswith(CLIP_UNUSED)}
    return config, rename(weights, CLIP_KEYS, folder)


def rename(weights: dict[str, torch.Tensor], prefixes: tuple[tuple[str, str], ...], source: Path) -> dict[str, torch.Tensor]:
    """`weights` under our names; a key no prefix matches is an error that names it."""
    out = {}
    for key, tensor in weights.items():
        if key.endswith(ROTARY_BUFFER):
            continue
        new = next((ours + key[len(theirs):] for theirs, ours in prefixes if key.startswith(theirs)), None)
        if new is None:
            raise ConversionError(f"{source}: unexpected weight {key!r} (not LLaVA's or CLIP's layout)")
        out[new] = tensor
    return out


def merge_adapter(weights: dict[str, torch.Tensor], adapter: Path) -> None:
    """Fold a released LoRA folder into the full checkpoint's `weights` (original names, in
    place): the weights trained beside the adapter (non_lora_trainables.bin: the projector)
    replace theirs, then each adapted weight W becomes W + (alpha / r) B A, PEFT's merge."""
    settings = _adapter_settings(adapter / "adapter_config.json")
    found = [f for f in (adapter / "adapter_model.safetensors", adapter / "adapter_model.bin") if f.is_file()]
    if not found:
        raise ConversionError(f"{adapter}: no adapter_model.safetensors or adapter_model.bin")
    source, tensors = found[0], read_shards(found[:1])
    trainables = adapter / "non_lora_trainables.bin"
    replacing = [(trainables, k, v) for k, v in (read_shards([trainables]) if trainables.is_file() else {}).items()]
    replacing += [(source, k, v) for k, v in tensors.items() if ".lora_" not in k]  # PEFT's modules_to_save
    for file, key, tensor in replacing:
        name = key.removeprefix("base_model.model.")
        if name not in weights or weights[name].shape != tensor.shape:
            raise ConversionError(f"{file}: {key} of shape {tuple(tensor.shape)} replaces no weight of the base checkpoint")
        weights[name] = tensor
    scale = settings["lora_alpha"] / (settings["r"] ** 0.5 if settings.get("use_rslora") else settings["r"])
    for key in sorted(k for k in tensors if ".lora_" in k):
        if ".lora_A." not in key:
            if ".lora_B." in key and key.replace(".lora_B.", ".lora_A.") in tensors:
                continue
            raise ConversionError(f"{source}: {key} is not half of a lora_A/lora_B pair, the only LoRA tensors this merge reads")
        down, up = tensors[key], tensors.get(key.replace(".lora_A.", ".lora_B."))
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0] + ".weight"
        if up is None:
            raise ConversionError(f"{source}: {key} has no lora_B beside it")
        if name not in weights or weights[name].shape != (up.shape[0], down.shape[1]):
            raise ConversionError(f"{source}: {key} adapts no weight of the base checkpoint ({name} of shape {(up.shape[0], down.shape[1])})")
        weights[name] = (weights[name].float() + scale * (up.float() @ down.float())).to(weights[name].dtype)


def _adapter_settings(path: Path) -> dict:
    """adapter_config.json, checked for the plain LoRA the releases use."""
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: cannot read it: {e}") from None
    if settings.get("peft_type", "LORA") != "LORA" or not isinstance(settings.get("r"), int) or "lora_alpha" not in settings:
        raise ConversionError(f"{path}: not a LoRA adapter config (peft_type LORA with r and lora_alpha)")
    for key in ("fan_in_fan_out", "use_dora", "rank_pattern", "alpha_pattern"):
        if settings.get(key):
            raise ConversionError(f"{path}: {key} is set; only plain LoRA (one r and alpha for every module) merges")
    return settings


# --------------------------------------------------------------------------- building


def media_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer with `<image>` and `<video>` added as special tokens (LLaVA
    splices features in by position and never had them); pad falls back to unk, as in LLaVA."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, ImportError) as e:
        raise ConversionError(f"{folder}: cannot load its tokenizer (a tokenizer.model needs the sentencepiece package): {e}") from None
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN, VIDEO_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def grown(table: torch.Tensor, rows: int) -> torch.Tensor:
    """`table` with rows appended up to `rows`, each the mean of the existing ones: the new
    tokens' embeddings are replaced by video features, and their output logits stay typical."""
    extra = rows - table.shape[0]
    return torch.cat([table, table.float().mean(0, keepdim=True).to(table.dtype).expand(extra, -1)]) if extra > 0 else table


def model_config(original: dict, vision, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> VideoChatGPTLlavaConfig:
    if original["mm_hidden_size"] != vision.hidden_size:
        raise ConversionError(f"config.json: mm_hidden_size {original['mm_hidden_size']} but the vision tower's width is {vision.hidden_size}")
    text = LlamaConfig(**{k: original[k] for k in LLAMA_SETTINGS if original.get(k) is not None})
    text.vocab_size = len(tokenizer)
    text.bos_token_id, text.eos_token_id, text.pad_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    patches = (vision.image_size // vision.patch_size) ** 2
    return VideoChatGPTLlavaConfig(
        vision_config=vision.to_dict(),
        text_config=text.to_dict(),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_layer=original.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy=SELECT_FEATURE[original.get("mm_vision_select_feature", "patch")],
        projector_hidden_act="gelu",
        image_grid_pinpoints=[[vision.image_size, vision.image_size]],
        image_seq_length=patches,
        video_seq_length=patches,
        tie_word_embeddings=False,
        dtype=dtype,
    )


def build_processor(tokenizer: PreTrainedTokenizerBase, vision, system: str, aspect: str) -> VideoChatGPTLlavaProcessor:
    """CLIP-336 preprocessing (shortest edge, centre crop, OpenAI's statistics; frames padded
    square first under `aspect` "pad") and Vicuna v1 turns."""
    side = vision.image_size
    square = {"height": side, "width": side}
    clip = dict(image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD))
    return VideoChatGPTLlavaProcessor(
        video_processor=LlavaNextVideoVideoProcessor(size={"shortest_edge": side}, crop_size=square, do_sample_frames=False, **clip),
        image_processor=LlavaNextImageProcessor(size={"shortest_edge": side}, crop_size=square, image_grid_pinpoints=[[side, side]], **clip),
        tokenizer=tokenizer,
        chat_template=vicuna_template(system),
        patch_size=vision.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        video_token=VIDEO_TOKEN,
        image_token=IMAGE_TOKEN,
        pad_to_square=aspect == "pad",
    )


def convert(checkpoint: str | Path, out: str | Path, vision_tower: str | Path, *, base: str | Path | None = None, system: str = "",
            dtype: str | None = None, aspect: str = "pad") -> Path:
    """Write the converted model and processor into `out` (complete or not at all).

    `vision_tower`: the CLIP folder the checkpoint was trained with (its config names it as
    mm_vision_tower); a tower inside the checkpoint replaces its weights. `base`: for a LoRA
    release, the full checkpoint it was trained from (its weights and tokenizer; the LoRA
    folder's config.json, when it has one, wins). `system`: the line the chat opens with.
    `dtype`: of the saved weights, by default the language model's. `aspect`: "pad" (frames
    padded square in CLIP's mean colour, as the release trained and evaluated) or "crop".
    """
    checkpoint, out, vision_tower = Path(checkpoint), Path(out), Path(vision_tower)
    if dtype is not None and dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    if aspect not in ASPECTS:
        raise ConversionError(f"aspect {aspect!r} is not one of {list(ASPECTS)}")
    is_adapter = (checkpoint / "adapter_config.json").is_file()
    if is_adapter and base is None:
        raise ConversionError(f"{checkpoint}: a LoRA adapter; name the full checkpoint it was trained from as base (--base)")
    if base is not None and not is_adapter:
        raise ConversionError(f"{checkpoint}: no adapter_config.json; base is only for LoRA releases")
    full = Path(base) if is_adapter else checkpoint
    original = read_config(checkpoint if (checkpoint / "config.json").is_file() else full)
    vision, weights = read_vision(vision_tower)
    released = read_weights(full)
    if is_adapter:
        merge_adapter(released, checkpoint)
    weights |= rename(released, CHECKPOINT_KEYS, full)
    del released  # `weights` now holds the only references, so the cast below frees each original
    embed = "model.language_model.embed_tokens.weight"
    if embed not in weights:
        raise ConversionError(f"{full}: no model.embed_tokens.weight; not a full LLaVA checkpoint")
    target = DTYPES[dtype] if dtype else weights[embed].dtype
    tokenizer = media_tokenizer(full)
    config = model_config(original, vision, tokenizer, target)
    for table in (embed, "lm_head.weight"):
        if table in weights:
            weights[table] = grown(weights[table], len(tokenizer))
    with torch.device("meta"):
        model = VideoChatGPTLlavaForConditionalGeneration(config)
    expected = model.state_dict()
    weights["model.image_newline"] = torch.zeros(config.text_config.hidden_size)  # images only; videos never use it
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{full}: weights do not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")
    for key, tensor in weights.items():
        if tensor.shape != expected[key].shape:
            raise ConversionError(f"{full}: {key} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[key].shape)}")
        weights[key] = tensor.to(target)  # one tensor at a time: the checkpoint is never held in two dtypes
    model.load_state_dict(weights, assign=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        build_processor(tokenizer, vision, system, aspect).save_pretrained(tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_rlaif.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a released checkpoint folder (e.g. SNUMPR/vlm_rlaif_video_llava_7b)")
    parser.add_argument("out", type=Path, help="the folder to write the converted model into")
    parser.add_argument("--vision-tower", type=Path, required=True, help="the CLIP folder (openai/clip-vit-large-patch14-336)")
    parser.add_argument("--base", type=Path, default=None,
                        help="for a LoRA release, the full checkpoint it was trained from (vlm_policy_init_7b_lora: vlm_sft_video_llava_7b)")
    parser.add_argument("--aspect", choices=ASPECTS, default="pad",
                        help="pad: frames padded square in CLIP's mean colour, as the release (default); crop: the centre square")
    parser.add_argument("--system", default="", help="the line every chat opens with (the release trained behind Vicuna v1's)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="of the saved weights (default: the checkpoint's)")
    args = parser.parse_args(argv)
    try:
        print(convert(args.checkpoint, args.out, args.vision_tower, base=args.base, system=args.system, dtype=args.dtype, aspect=args.aspect))
    except InputError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
