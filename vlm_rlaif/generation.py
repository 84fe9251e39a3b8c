"""The project's one generation path: responses from a video VLM for a batch of prompts.

SFT evaluation, the two sampled responses and the clip captions of the preference stage, the
judge, PPO rollouts and benchmark answers all generate through `generate` (texts) or
`generate_sequences` (texts with their token ids and whether they stopped at EOS, which PPO
needs for its log-probs and its missing-EOS penalty).

Sampling draws from the model's own distribution shaped only by temperature and top_p: the
checkpoint's generation_config may carry top_k or a repetition penalty, and a PPO rollout
drawn from a distribution other than the policy's would make its log-probs off-policy.

Encoding each video once (DESIGN.md decision 8): transformers 5.23 encodes the pixels of a
`generate` call before it expands the prompts for num_return_sequences, so one call runs the
vision tower once per video. To reuse the features across calls (the judge after the two
samples, the PPO forward passes after a rollout), `encode_videos` computes them and
`with_features` hands them to `model(...)` or `model.generate(...)` in place of the pixels.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, ProcessorMixin
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlm_rlaif.data import PLACEHOLDER, Dialogue
from vlm_rlaif.modeling import ConversationError, build_inputs, visual_token_ids

PIXEL_KEYS = ("pixel_values_videos",)  # what precomputed features replace; grid sizes etc. stay


class GenerationError(ValueError):
    """Generation arguments that cannot work together; the message names the argument."""


@dataclass
class Generation:
    """One response: its text, its new token ids (with the EOS token when it ended on one,
    never padding), and whether it ended on EOS rather than at max_new_tokens."""

    text: str
    token_ids: torch.Tensor
    ended: bool


# --------------------------------------------------------------------------- encode once


def encode_videos(model: PreTrainedModel, inputs: Mapping) -> list[torch.Tensor]:
    """Projected vision features of the videos in `inputs` (from `build_inputs`), one
    [visual tokens, hidden] tensor per video.

    Only the projected features are kept: the vision tower's per-layer hidden states would
    cost far more memory than the features for a 50-frame video. Computed under no_grad
    rather than inference_mode, so a training forward pass may consume them.
    """
    encoder = model.get_video_features
    accepted = set(inspect.signature(encoder).parameters) - {"kwargs"}
    arguments = {k: v.to(model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items() if k in accepted}
    if not any(k in arguments for k in PIXEL_KEYS):
        raise GenerationError(f"encode_videos: inputs hold no video pixels (keys: {sorted(inputs)})")
    with torch.no_grad():
        pooled = encoder(**arguments, return_dict=True).pooler_output
    return list(pooled.unbind(0)) if isinstance(pooled, torch.Tensor) else list(pooled)


def with_features(inputs: Mapping, features: Sequence[torch.Tensor]) -> dict:
    """Keyword arguments for `model(...)` or `model.generate(...)` that carry precomputed video
    features instead of pixels. Build them anew for every call: `generate` expands the
    features' wrapper in place for num_return_sequences. Features stay valid only while the
    vision tower and projector do: a LoRA whose target names also match the vision tower's
    layers (q_proj, v_proj, ...) changes them with every adapter switch."""
    rows = inputs["input_ids"].shape[0]
    if len(features) != rows:
        raise GenerationError(f"with_features: {len(features)} video features for {rows} prompts")
    kwargs = {k: v for k, v in inputs.items() if k not in PIXEL_KEYS}
    kwargs["mm_encoder_outputs"] = {"video": BaseModelOutputWithPooling(pooler_output=list(features))}
    return kwargs


def distinct_media(prompts: Sequence[Dialogue], video_root: str | os.PathLike) -> tuple[list, list[int]]:
    """Each distinct video (a file, or a frame list) of `prompts` in first-seen order, and the
    index of each prompt's video in that list: a stage loads and encodes each video once and
    hands row i what belongs to video `video_of[i]`."""
    media: list = []
    video_of: list[int] = []
    seen: dict = {}
    for prompt in prompts:
        source = prompt.media(video_root)
        key = tuple(source) if isinstance(source, list) else source
        if key not in seen:
            seen[key] = len(media)
            media.append(source)
        video_of.append(seen[key])
    return media, video_of


def encode_video_list(model: PreTrainedModel, processor: ProcessorMixin, videos: Sequence[np.ndarray], batch_size: int = 8) -> list[torch.Tensor]:
    """`encode_videos` over a list of frame arrays, in batches: the features a stage computes
    once per video and hands to every later call on it."""
    asked = [{"from": "human", "value": PLACEHOLDER}]
    features: list[torch.Tensor] = []
    for start in range(0, len(videos), batch_size):
        batch = list(videos[start : start + batch_size])
        features.extend(encode_videos(model, build_inputs(processor, batch, [asked] * len(batch), add_generation_prompt=True)))
    return features


# --------------------------------------------------------------------------- generate


def eos_token_ids(model: PreTrainedModel, processor: ProcessorMixin) -> set[int]:
    """The tokens generation stops on: the checkpoint's generation_config, else the tokenizer's EOS."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = processor.tokenizer.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def _decoding(
    model: PreTrainedModel, processor: ProcessorMixin, eos: set[int], max_new_tokens: int, temperature: float, top_p: float, n: int
) -> dict:
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = processor.tokenizer.pad_token_id
    if pad is None and eos:
        pad = min(eos)
    # a sampled media placeholder would desync video tokens and features in the next forward pass
    suppress = visual_token_ids(processor)
    options = {"max_new_tokens": max_new_tokens, "num_return_sequences": n, "pad_token_id": pad, "repetition_penalty": 1.0,
               "suppress_tokens": suppress or None}
    if temperature == 0:
        return {**options, "do_sample": False}
    return {**options, "do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}


def _check_arguments(
    videos: Sequence, conversations: Sequence, features: Sequence | None, max_new_tokens: int, temperature: float, top_p: float, n: int, batch_size: int
) -> None:
    if len(videos) != len(conversations):
        raise GenerationError(f"{len(videos)} videos for {len(conversations)} conversations")
    if features is not None and len(features) != len(conversations):
        raise GenerationError(f"features: {len(features)} video features for {len(conversations)} conversations")
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")
    if n < 1:
        raise GenerationError(f"num_return_sequences must be >= 1, got {n}")
    if n > 1 and temperature == 0:
        raise GenerationError(f"num_return_sequences={n} with temperature 0: greedy decoding would return {n} identical copies")
    if batch_size < 1:
        raise GenerationError(f"batch_size must be >= 1, got {batch_size}")


def _split(new_tokens: torch.Tensor, eos: set[int], tokenizer) -> Generation:
    """Cut a row of new tokens after its first EOS; what follows is generate's padding."""
    ids = new_tokens.tolist()
    end = next((i for i, t in enumerate(ids) if t in eos), None)
    kept = new_tokens if end is None else new_tokens[: end + 1]
    return Generation(tokenizer.decode(kept.tolist(), skip_special_tokens=True).strip(), kept, end is not None)


def generate_sequences(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    videos: Sequence[np.ndarray],
    conversations: Sequence[list[dict]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    batch_size: int = 8,
    progress: bool = False,
    features: Sequence[torch.Tensor] | None = None,
) -> list[list[Generation]]:
    """num_return_sequences `Generation`s per (video, conversation), in input order.

    Prompts end where the assistant's reply begins and are left-padded in batches of
    `batch_size`. temperature 0 is greedy; otherwise samples with temperature and top_p,
    reproducibly under a fixed torch seed. `features` (from `encode_videos`, one per
    conversation) skip the vision tower. The model is left in the train/eval mode it had.
    """
    _check_arguments(videos, conversations, features, max_new_tokens, temperature, top_p, num_return_sequences, batch_size)
    eos = eos_token_ids(model, processor)
    options = _decoding(model, processor, eos, max_new_tokens, temperature, top_p, num_return_sequences)
    was_training = model.training
    model.eval()
    results: list[list[Generation]] = []
    bar = tqdm(total=len(conversations), desc="generate", unit="prompt", disable=not progress)
    try:
        for start in range(0, len(conversations), batch_size):
            stop = start + batch_size
            try:
                inputs = build_inputs(processor, list(videos[start:stop]), list(conversations[start:stop]), add_generation_prompt=True)
            except ConversationError as e:
                raise ConversationError(f"prompts {start}..{min(stop, len(conversations)) - 1}: {e}") from None
            inputs = inputs.to(model.device)
            kwargs = with_features(inputs, features[start:stop]) if features is not None else dict(inputs)
            with torch.inference_mode():
                out = model.generate(**kwargs, **options)
            # cloned outside inference mode, so PPO can feed the ids to a forward pass it backpropagates
            new_tokens = out[:, inputs["input_ids"].shape[1] :].clone().cpu()
            rows = [_split(row, eos, processor.tokenizer) for row in new_tokens]
            results.extend(rows[i : i + num_return_sequences] for i in range(0, len(rows), num_return_sequences))
            bar.update(inputs["input_ids"].shape[0])
    finally:
        bar.close()
        model.train(was_training)
    return results


def generate(*args: Any, **kwargs: Any) -> list[list[str]]:
    """num_return_sequences response texts per (video, conversation): `generate_sequences`
    (same arguments) without the token ids."""
    return [[g.text for g in group] for group in generate_sequences(*args, **kwargs)]
