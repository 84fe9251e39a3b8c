"""Load a video VLM by path or hub id, and turn release-format conversations into its inputs.

Every stage goes through these two functions, so the tiny embedded model, LLaVA-NeXT-Video-7B
(the paper's Vicuna lineage) and Qwen2.5-VL are loaded and prompted by one code path: the
checkpoint's own processor and chat template decide how a video and the turns become tokens.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    AutoProcessor,
    BatchFeature,
    BitsAndBytesConfig,
    PreTrainedModel,
    ProcessorMixin,
)

from vlm_rlaif import frame_pairs, video_chatgpt
from vlm_rlaif.config import LoraConfig
from vlm_rlaif.errors import InputError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RELEASE_PLACEHOLDER = "<image>"  # the VLM-RLAIF / LLaVA release marks the visual input this way
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
video_chatgpt.register()  # converted releases load by path like any other base
frame_pairs.register()


class ModelLoadError(InputError):
    """A model or processor that cannot be loaded; the message names the path or hub id."""


class ConversationError(InputError):
    """A conversation or video that cannot become model inputs; the message names its index."""


# --------------------------------------------------------------------------- loading


def _resolve(name_or_path: str | Path) -> str:
    """A local model folder, or a hub id; anything else is a clear error, not a hub lookup."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{path}: is a file, not a model folder")
        if not (path / "config.json").is_file():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise ModelLoadError(f"{path}: not a model folder (no config.json; it holds {found})")
        if not any(path.glob("*.safetensors")):
            raise ModelLoadError(f"{path}: no *.safetensors weights (pickled .bin weights are refused)")
        return str(path)
    if isinstance(name_or_path, str) and _HUB_ID.fullmatch(name_or_path):
        return name_or_path
    raise ModelLoadError(f"{name_or_path}: no such model folder, and not a hub id of the form 'org/name'")


def _quantization(compute_dtype: torch.dtype) -> BitsAndBytesConfig:
    """nf4 with double quantisation, as the released PPO code loads its frozen bases. Only the
    language model's layers: the vision side is small, and its projector may train in full."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelLoadError("load_in_4bit needs the bitsandbytes package (and a CUDA GPU); install it or set base.load_in_4bit: false")
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=[".*vision_tower", ".*multi_modal_projector", ".*visual", "lm_head"],  # LLaVA's and Qwen2.5-VL's
    )


def process_device_map() -> dict[str, torch.device] | None:
    """Where a model this process runs goes as it loads: its GPU (LOCAL_RANK's under a
    multi-process launch), or nowhere special (None: the CPU) on a machine without one."""
    if not torch.cuda.is_available():
        return None
    return {"": torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))}


def load_model_and_processor(
    name_or_path: str | Path,
    *,
    dtype: str = "float32",
    load_in_4bit: bool = False,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """(model, processor) for a llava_next_video, video_chatgpt_llava (a converted release) or
    qwen2_5_vl checkpoint, safetensors only.

    Custom modelling code is refused unless `trust_remote_code` is set; the transformers
    prompt that would otherwise ask on stdin never appears. A 4-bit model loads onto this
    process's GPU (`process_device_map`): quantised weights are not moved after loading.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"{name_or_path}: dtype {dtype!r} is not one of {list(DTYPES)}")
    kwargs: dict[str, Any] = {"dtype": DTYPES[dtype], "device_map": device_map}
    if load_in_4bit:
        kwargs["quantization_config"] = _quantization(DTYPES[dtype])
        kwargs["device_map"] = device_map or process_device_map()
    source = _resolve(name_or_path)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if "trust_remote_code" in str(e) and not trust_remote_code:
            raise ModelLoadError(
                f"{name_or_path}: needs its own modelling code; set trust_remote_code (base.trust_remote_code) only if you trust it"
            ) from None
        raise ModelLoadError(f"{name_or_path}: cannot read the model config: {e}") from None
    if hasattr(config, "mm_projector_type"):
        raise ModelLoadError(f"{name_or_path}: a checkpoint in the original LLaVA layout; convert it first (python -m vlm_rlaif.convert)")
    try:
        processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{name_or_path}: cannot load the processor (tokenizer, video processor): {e}") from None
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            source, config=config, use_safetensors=True, trust_remote_code=trust_remote_code, **kwargs
        )
    except (OSError, ValueError, SafetensorError) as e:
        raise ModelLoadError(f"{name_or_path}: cannot load a {config.model_type} image-text-to-text model: {e}") from None
    if load_in_4bit:
        _keep_4bit_layout(model)
    embedded = model.get_input_embeddings().num_embeddings
    if len(processor.tokenizer) > embedded:
        raise ModelLoadError(f"{name_or_path}: the tokenizer has {len(processor.tokenizer)} tokens but the model embeds {embedded}; "
                             "ids past the table would fail deep inside torch (a tokenizer from another model?)")
    return model, processor


def _keep_4bit_layout(model: PreTrainedModel) -> None:
    """On a CPU with AVX512-BF16, bitsandbytes repacks each 4-bit weight in place at its first
    forward under no_grad in eval mode, into a layout with no backward: a base that generates
    and then trains (PPO's rollouts, then its updates) would pass no gradient through it, and
    layers narrower than its 64-value block fail to repack. Every 4-bit weight keeps the
    layout that trains, on every machine."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def save_processor(source: str | Path, folder: str | Path) -> None:
    """Save the processor of model `source` into `folder` as loaded, not as a stage used it:
    padding a batch leaves its settings on the tokenizer, so a processor saved after training
    would differ from the one a run resumed past training saves. Custom processor code is
    refused, as in every stage after `base`: transformers would otherwise ask on stdin."""
    AutoProcessor.from_pretrained(_resolve(source), trust_remote_code=False).save_pretrained(folder)


# --------------------------------------------------------------------------- inputs


def add_lora(model: PreTrainedModel, lora: LoraConfig, modules_to_save: list[str] | None = None):
    """A fresh LoRA adapter on the language model's projections, the rest frozen except
    `modules_to_save` (trained in full). Only the language model's: the vision tower has
    layers of the same names, and leaving it untouched keeps video features computed once
    valid under any adapter."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False):  # QLoRA: norms and the layers left unquantised train-stable in float32
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    target = rf".*language_model.*\.({'|'.join(lora.target_modules)})"
    config = PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target, modules_to_save=modules_to_save,
    )
    return get_peft_model(model, config)


def _messages(conversation: list[dict], index: int, reserved: list[str]) -> list[dict]:
    """Release turns -> chat-template messages; the video goes first in the first user turn.

    LLaVA moves its placeholder to the front of the first human turn; doing the same keeps
    the layout identical whichever family's template renders it. Text must not spell the
    processor's own placeholders (`reserved`), which it would expand into visual slots.
    """
    if not isinstance(conversation, list) or not conversation:
        raise ConversationError(f"conversation {index}: expected a non-empty list of turns")
    messages = []
    for turn_index, turn in enumerate(conversation):
        where = f"conversation {index}, turn {turn_index}"
        if hasattr(turn, "to_dict"):  # a vlm_rlaif.data.Turn
            turn = turn.to_dict()
        if not isinstance(turn, dict):
            raise ConversationError(f"{where}: expected a mapping with 'from' and 'value'")
        speaker = turn.get("from", turn.get("role"))
        if speaker not in ROLES:
            raise ConversationError(f"{where}: 'from' is {speaker!r}, expected one of {sorted(ROLES)}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ConversationError(f"{where}: 'value' must be a string, got {type(value).__name__}")
        placeholders = value.count(RELEASE_PLACEHOLDER)
        if turn_index == 0:
            if ROLES[speaker] != "user":
                raise ConversationError(f"{where}: the first turn must come from 'human'")
            if placeholders != 1:
                raise ConversationError(f"{where}: needs exactly one {RELEASE_PLACEHOLDER} placeholder, found {placeholders}")
            text = value.replace(RELEASE_PLACEHOLDER, "").strip()
            _check_reserved(text, reserved, where)
            messages.append({"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]})
            continue
        if placeholders:
            raise ConversationError(f"{where}: {RELEASE_PLACEHOLDER} may only appear in the first human turn")
        _check_reserved(value, reserved, where)
        messages.append({"role": ROLES[speaker], "content": [{"type": "text", "text": value}]})
    return messages


def _check_reserved(text: str, reserved: list[str], where: str) -> None:
    for token in reserved:
        if token in text:
            raise ConversationError(f"{where}: text contains the processor's placeholder {token!r}")


def _check_frames(video: Any, index: int) -> np.ndarray:
    if not isinstance(video, np.ndarray) or video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        got = f"{video.dtype} {video.shape}" if isinstance(video, np.ndarray) else type(video).__name__
        raise ConversationError(f"video {index}: expected uint8 frames [T, H, W, 3], got {got}")
    if video.shape[0] == 0:
        raise ConversationError(f"video {index}: has no frames")
    return video


_RENDERED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # processor -> {key: text}
RENDER_CACHE = 2**16  # texts kept per processor


def _render(processor: ProcessorMixin, messages: list[dict], add_generation_prompt: bool) -> str:
    """The chat template's text, remembered: training renders every conversation, and each
    reply's prefixes, once per epoch, and the template engine dominates a batch's collation."""
    cache = _RENDERED.setdefault(processor, {})
    key = (processor.chat_template, json.dumps(messages), add_generation_prompt)
    if (text := cache.get(key)) is None:
        if len(cache) >= RENDER_CACHE:
            cache.clear()
        text = cache[key] = processor.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return text


def _assistant_spans(processor: ProcessorMixin, messages: list[dict], text: str, index: int) -> list[tuple[int, int]]:
    """Character spans of each assistant reply (with its end-of-turn marker) in `text`.

    A reply spans from the end of the prompt that asks for it (the history rendered with a
    generation prompt) to the end of the history that contains it; this holds for any
    template that renders a conversation's prefix as a prefix of the whole.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(processor, messages[:i], add_generation_prompt=True)
        upto = _render(processor, messages[: i + 1], add_generation_prompt=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise ConversationError(
                f"conversation {index}: the chat template does not render turn {i} as a prefix of the whole conversation,"
                " so assistant tokens cannot be located"
            )
        spans.append((len(prompt), len(upto)))
    return spans


def _token_mask(offsets: torch.Tensor, replacements: list[dict], spans: list[tuple[int, int]]) -> torch.Tensor:
    """1 for tokens overlapping an assistant span, after the processor expanded the video placeholder."""

    def expanded(char: int) -> int:
        return char + sum(
            (r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0])
            for r in replacements
            if r["span"][1] <= char
        )

    start, end = offsets[:, 0], offsets[:, 1]
    mask = torch.zeros(len(offsets), dtype=torch.long)
    for lo, hi in spans:
        lo, hi = expanded(lo), expanded(hi)
        mask |= ((end > start) & (start < hi) & (end > lo)).long()  # zero-width tokens (padding) never count
    return mask


def build_inputs(
    processor: ProcessorMixin,
    videos: list[np.ndarray],
    conversations: list[list[dict]],
    add_generation_prompt: bool,
    *,
    assistant_masks: bool = False,
    padding_side: str | None = None,
) -> BatchFeature:
    """Padded model inputs for a batch of (frames, release conversation) pairs.

    videos: uint8 frames [T, H, W, 3], one array per conversation. conversations: turns
    {"from": "human"|"gpt", "value": str} (or vlm_rlaif.data.Turn), the "<image>" placeholder
    in the first human turn.
    add_generation_prompt ends each prompt where the assistant's reply begins (generation,
    judging); without it the conversations are rendered whole (training, scoring).
    Padding is on the left for generation prompts, so every prompt ends at the last column,
    and on the right otherwise, unless `padding_side` says which.
    With `assistant_masks`, the result also holds "assistant_masks" [B, L] (1 on each assistant
    reply and its end-of-turn marker): a collator's loss mask, to pop before the forward pass.
    """
    if len(videos) != len(conversations):
        raise ConversationError(f"{len(videos)} videos for {len(conversations)} conversations")
    if not conversations:
        raise ConversationError("empty batch: no conversations")
    side = padding_side or ("left" if add_generation_prompt else "right")
    if side not in ("left", "right"):
        raise ConversationError(f"padding_side must be 'left' or 'right', got {side!r}")
    frames = [_check_frames(v, i) for i, v in enumerate(videos)]
    reserved = [t for t in (getattr(processor, "video_token", None), getattr(processor, "image_token", None)) if t]
    messages = [_messages(c, i, reserved) for i, c in enumerate(conversations)]
    texts = [_render(processor, m, add_generation_prompt) for m in messages]
    bos = processor.tokenizer.bos_token
    try:
        batch = processor(
            text=texts,
            videos=frames,
            padding=True,
            padding_side=side,
            # templates that write the BOS themselves must not get a second one
            add_special_tokens=not (bos and all(t.startswith(bos) for t in texts)),
            return_offsets_mapping=assistant_masks,
            return_text_replacement_offsets=assistant_masks,
            return_tensors="pt",
        )
    except ValueError as e:
        shapes = [tuple(f.shape) for f in frames]
        raise ConversationError(f"{type(processor).__name__} rejected the batch (video shapes {shapes}): {e}") from None
    if assistant_masks:
        offsets = batch.pop("offset_mapping")
        replacements = batch.pop("text_replacement_offsets")
        batch["assistant_masks"] = torch.stack(
            [
                _token_mask(offsets[i], replacements[i], _assistant_spans(processor, messages[i], texts[i], i))
                for i in range(len(texts))
            ]
        )
    return batch


def visual_token_ids(processor) -> list[int]:
    """The ids of the processor's visual placeholders, video and image, whichever it has."""
    names = [getattr(processor, name, None) for name in ("video_token", "image_token")]
    return sorted({processor.tokenizer.convert_tokens_to_ids(n) for n in names if n})
