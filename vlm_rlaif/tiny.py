"""The embedded default's base VLM: a tiny but real LLaVA-NeXT-Video, built offline.

Nothing here is downloaded. A byte-level BPE tokenizer is trained on the synthetic world's
texts, a small CLIP vision tower and a small Llama are initialised from a seed, and the
result is saved with `save_pretrained`, so every later stage loads it by path exactly like
`llava-hf/LLaVA-NeXT-Video-7B-hf` (see `vlm_rlaif.modeling.load_model_and_processor`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextImageProcessor,
    LlavaNextVideoConfig,
    LlavaNextVideoForConditionalGeneration,
    LlavaNextVideoProcessor,
    LlavaNextVideoVideoProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vlm_rlaif.config import TinyModelConfig
from vlm_rlaif.frame_pairs import FramePairsConfig, FramePairsForConditionalGeneration
from vlm_rlaif.io import atomic_dir

PixelStats = tuple[Sequence[float], Sequence[float]]

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
IMAGE_TOKEN, VIDEO_TOKEN = "<image>", "<video>"
SPECIAL_TOKENS = [UNK, BOS, EOS, PAD, IMAGE_TOKEN, VIDEO_TOKEN]
# LLaVA-NeXT-Video pools each frame 2x2; its processor always counts patches // 4 tokens a frame.
SPATIAL_POOL_STRIDE = 2

# Vicuna v1 layout: "<s>USER: <video>\n{question} ASSISTANT: {answer}</s>USER: ...".
# The answer and its "</s>" belong to the assistant (the model learns to stop); the
# {% generation %} markers let `apply_chat_template(return_assistant_tokens_mask=True)` see that too.
_TURNS = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}"
    "{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}"
    "{% set parts = message['content'] %}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT:' }}{% generation %}"
    "{% for part in parts if part['type'] == 'text' %}{{ ' ' + part['text'] }}{% endfor %}"
    "{{ eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ 'USER: ' if message['role'] == 'user' else '' }}"
    "{% for part in parts %}"
    "{% if part['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif part['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def vicuna_template(system: str = "") -> str:
    """The Vicuna v1 chat template, opening with `system` (and a space) when one is given:
    the released VLM-RLAIF models were trained behind a system line, the tiny model without."""
    opening = "{{ bos_token }}" + ("{{ " + json.dumps(system + " ") + " }}" if system else "")
    return opening + _TURNS


CHAT_TEMPLATE = vicuna_template()
ROLE_MARKERS = "USER: ASSISTANT:"


def with_role_markers(corpus: Iterable[str]) -> Iterator[str]:
    """The corpus, each text followed by the chat template's role markers: the markers are in
    every turn the model reads, and a tokenizer that never saw them spells "ASSISTANT:" a
    letter at a time (ten tokens a turn, more than most questions)."""
    for text in corpus:
        yield text
        yield ROLE_MARKERS


def train_tokenizer(corpus: Iterable[str], vocab_size: int, special_tokens: list[str]) -> Tokenizer:
    """Byte-level BPE: every byte is in the base alphabet, so any text encodes and decodes back."""
    texts = [t for t in corpus if t]
    if not texts:
        raise ValueError("tokenizer corpus is empty: pass the world's texts and prompt files")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise ValueError(f"vocab_size {vocab_size} is below the byte alphabet + specials ({len(alphabet) + len(special_tokens)})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special_tokens, initial_alphabet=alphabet, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def build_processor(
    cfg: TinyModelConfig, corpus: Iterable[str], pixel_stats: PixelStats = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
) -> LlavaNextVideoProcessor:
    """Tokenizer + video/image processors sized so `<video>` expands to the model's token count.

    `pixel_stats` is the (mean, std) per channel the frames are normalised with. A vision
    tower trained from scratch needs them from its own data: with CLIP's constants the
    world's dark backgrounds become one large shared input, every visual token comes out
    nearly parallel (cosine > 0.97), and the language model cannot learn to read them.
    """
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(with_role_markers(corpus), cfg.vocab_size, SPECIAL_TOKENS),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "video_token": VIDEO_TOKEN},
        clean_up_tokenization_spaces=False,
        model_max_length=cfg.max_position_embeddings,
    )
    square = {"height": cfg.image_size, "width": cfg.image_size}
    clip = dict(image_mean=list(pixel_stats[0]), image_std=list(pixel_stats[1]))
    video_processor = LlavaNextVideoVideoProcessor(
        size={"shortest_edge": cfg.image_size}, crop_size=square, do_sample_frames=False, **clip
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size=square,
        image_grid_pinpoints=[[cfg.image_size, cfg.image_size]],
        **clip,
    )
    return LlavaNextVideoProcessor(
        video_processor=video_processor,
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, dropped again by the "default" strategy
    )


def build_config(cfg: TinyModelConfig, tokenizer: PreTrainedTokenizerFast) -> LlavaNextVideoConfig:
    """LLaVA-NeXT-Video wiring at toy width: CLIP features from `vision_feature_layer` (the
    7B model reads layer -2 of 24; a tower of two or three layers needs all of them), CLS
    dropped, 2x2 pooling."""
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=4 * cfg.vision_hidden_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden_size,
        num_channels=6 if cfg.frame_pairs else 3,  # each frame beside the next
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.text_hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    patches = (cfg.image_size // cfg.patch_size) ** 2
    return (FramePairsConfig if cfg.frame_pairs else LlavaNextVideoConfig)(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids(VIDEO_TOKEN),
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy="default",
        spatial_pool_mode="average",
        spatial_pool_stride=SPATIAL_POOL_STRIDE,
        image_grid_pinpoints=[[cfg.image_size, cfg.image_size]],
        image_seq_length=patches,
        video_seq_length=patches // SPATIAL_POOL_STRIDE**2,
        tie_word_embeddings=False,
    )


def build_tiny(
    cfg: TinyModelConfig, corpus: Iterable[str], seed: int, pixel_stats: PixelStats = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
) -> tuple[LlavaNextVideoForConditionalGeneration, LlavaNextVideoProcessor]:
    """Train the tokenizer and initialise the model from `seed` (in memory)."""
    processor = build_processor(cfg, corpus, pixel_stats)
    config = build_config(cfg, processor.tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if cfg.frame_pairs:
            model = FramePairsForConditionalGeneration(config)
        else:
            model = LlavaNextVideoForConditionalGeneration(config)
    return model, processor


def save(model, processor, out_dir: Path) -> Path:
    """save_pretrained of both into `out_dir`, which appears complete or not at all (written
    to a temp folder beside it and renamed), so a killed build never looks like a model."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_dir


def build_tiny_model(
    cfg: TinyModelConfig, corpus: Iterable[str], out_dir: Path, seed: int,
    pixel_stats: PixelStats = (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
) -> Path:
    """An untrained tiny model, saved into `out_dir`."""
    return save(*build_tiny(cfg, corpus, seed, pixel_stats), out_dir)
