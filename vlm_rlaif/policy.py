"""Policy, reference, value and reward model on one frozen base (DESIGN.md decision 7).

The SFT model is loaded once and frozen. LoRA adapters sit on its language model: the policy
(peft's "default" adapter, so the saved policy loads with plain `PeftModel.from_pretrained`),
the value model (a trainable copy of the reward model's adapter, PAPER.md: the value is
initialised from the reward model) and the reward model (its adapter, frozen). Each of the
last two has a linear head in float32: the value head reads every position's hidden state,
the reward head the last one. The reference policy is the base with the adapters disabled.
A reward model on another base (`reward_model.base`) is loaded as a second model; the value
model then starts from a fresh adapter and a zero head.

Adapters touch the language model only, so a video's features, computed once per rollout,
serve every one of them.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import ProcessorMixin

from vlm_rlaif import io, modeling
from vlm_rlaif.config import ConfigError, Params
from vlm_rlaif.generation import encode_video_list, with_features
from vlm_rlaif.logprobs import token_logprobs
from vlm_rlaif.modeling import build_inputs, load_model_and_processor
from vlm_rlaif.reward_model import (
    ADAPTER_DIR, CONFIG_FILE, HEAD_FILE, RewardModel, in_4bit, load_reward_model, reading_of, score,
)

POLICY, VALUE, REWARD = "default", "value", "reward"
TOKEN_TYPES = {"mm_token_type_ids", "token_type_ids"}  # per-token inputs beside the ids (Qwen2.5-VL: which are the video's)


class ValueHead(nn.Module):
    """The value model's read-out: a linear head whose output counts in units of `scale` around
    `shift`, so that Adam's steps on it move the value on the returns' scale, whatever that is."""

    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        self.register_buffer("scale", torch.ones(()))
        self.register_buffer("shift", torch.zeros(()))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1) * self.scale + self.shift

    @torch.no_grad()
    def calibrate(self, a: float, b: float, mean: float, std: float) -> None:
        """Say `a * value + b` from now on, counted in units of `std` around `mean`."""
        old_scale, old_shift = float(self.scale), float(self.shift)
        self.linear.weight.mul_(a * old_scale / std)
        self.linear.bias.mul_(a * old_scale / std).add_((a * old_shift + b - mean) / std)
        self.scale.fill_(std)
        self.shift.fill_(mean)


class Models:
    """The PPO models and the passes PPO makes through them."""

    def __init__(self, model, processor: ProcessorMixin, value_head: ValueHead,
                 reward_model: RewardModel,
                 reward_processor: ProcessorMixin, shared_reward: bool):
        self.model, self.processor, self.value_head = model, processor, value_head
        self.reward_model, self.reward_processor, self.shared_reward = reward_model, reward_processor, shared_reward

    @property
    def device(self) -> torch.device:
        return self.model.device

    def to(self, device: torch.device | str) -> Models:
        """Every model and head on `device` (the reward model's head and, on its own base, its backbone too)."""
        self.model.to(device)
        self.value_head.to(device)
        self.reward_model.to(device)
        return self

    @contextmanager
    def adapter(self, name: str | None) -> Iterator[None]:
        """Run the block with adapter `name` active, or with none (the reference) for None."""
        if name is None:
            with self.model.disable_adapter():
                yield
            return
        self.model.set_adapter(name)
        self._keep_trainable()
        try:
            yield
        finally:
            self.model.set_adapter(POLICY)
            self._keep_trainable()

    def _keep_trainable(self) -> None:
        """peft's set_adapter freezes every adapter but the active one; a frozen leaf gets no
        gradient even from a graph built before it was frozen, so the policy and the value
        adapters stay trainable whichever is active."""
        for p in self.trainable_parameters():
            p.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What PPO updates: the policy's and the value model's adapters, and the value head."""
        return self.policy_parameters() + self.value_parameters()

    def _adapter_parameters(self, name: str) -> list[nn.Parameter]:
        return [p for n, p in self.model.named_parameters() if "lora_" in n and f".{name}." in n]

    def policy_parameters(self) -> list[nn.Parameter]:
        return self._adapter_parameters(POLICY)

    def value_parameters(self) -> list[nn.Parameter]:
        return self._adapter_parameters(VALUE) + list(self.value_head.parameters())

    def encode(self, videos: Sequence[np.ndarray], batch_size: int) -> list[torch.Tensor]:
        return encode_video_list(self.model, self.processor, videos, batch_size)

    def _sequences(self, prompts: Sequence[Sequence[Mapping]], features: Sequence[torch.Tensor], responses: torch.Tensor,
                   response_mask: torch.Tensor, videos: Sequence[np.ndarray]) -> tuple[dict, int]:
        """Model inputs for prompt + response rows (prompts left-padded, responses right-padded),
        and the prompt width: the logits at positions P-1 .. P+R-2 predict the response."""
        inputs = build_inputs(self.processor, list(videos), [list(p) for p in prompts], add_generation_prompt=True).to(self.device)
        kwargs = with_features(inputs, features)
        width = kwargs["input_ids"].shape[1]
        kwargs["input_ids"] = torch.cat([kwargs["input_ids"], responses.to(self.device)], 1)
        kwargs["attention_mask"] = torch.cat([kwargs["attention_mask"], response_mask.to(self.device, kwargs["attention_mask"].dtype)], 1)
        for key in TOKEN_TYPES.intersection(kwargs):  # a response's tokens are text (type 0)
            kwargs[key] = torch.nn.functional.pad(kwargs[key], (0, responses.shape[1]))
        return kwargs, width

    def logprobs(self, adapter: str | None, prompts, features, responses, response_mask, videos,
                 with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-probabilities of each response token under the policy (`adapter` POLICY) or the
        reference (None), [B, R]; and each position's entropy when asked. The hidden states of
        the response positions go through the head chunk by chunk (`vlm_rlaif.logprobs`), so
        [B, R, vocabulary] float32 logits never exist."""
        kwargs, width = self._sequences(prompts, features, responses, response_mask, videos)
        model = self.model.get_base_model()
        with self.adapter(adapter):
            hidden = model.model(**kwargs).last_hidden_state[:, width - 1 : -1]
        logp, entropy = token_logprobs(hidden, model.get_output_embeddings().weight, responses.to(hidden.device))
        return logp, entropy if with_entropy else None

    def values(self, prompts, features, responses, response_mask, videos) -> torch.Tensor:
        """The value model's estimate at each response token's state, [B, R]."""
        kwargs, width = self._sequences(prompts, features, responses, response_mask, videos)
        with self.adapter(VALUE):
            body = self.model.get_base_model().model
            hidden = body(**kwargs).last_hidden_state[:, width - 1 : -1]
        return self.value_head(hidden.float())

    def token_rewards(self, rows: Mapping, ref_logprobs: torch.Tensor) -> torch.Tensor:
        """The likelihood reading per token, [B, R]: the reward adapter's log-probability of each
        response token minus the reference's, over the response's length, times the scale; a
        row sums to the reward model's reward of it, read on the tokens sampled."""
        tuned, _ = self.logprobs(REWARD, **rows)
        mask = rows["response_mask"].to(tuned.device, tuned.dtype)
        lengths = mask.sum(1, keepdim=True).clamp(min=1)
        return self.reward_model.scale * (tuned - ref_logprobs.to(tuned.device)) * mask / lengths

    def rewards(self, videos, prompts, responses: Sequence[str], features, batch_size: int) -> torch.Tensor:
        """The reward model's score of each response: through the shared base's reward adapter
        with the rollout's video features, or through its own model."""
        if not self.shared_reward:
            return score(self.reward_model, self.reward_processor, videos, prompts, responses, batch_size=batch_size)
        with self.adapter(REWARD):
            return score(self.reward_model, self.reward_processor, videos, prompts, responses, features=features, batch_size=batch_size)


def load(params: Params, sft: Path = Path("artifacts/sft"), reward: Path = Path("artifacts/reward_model")) -> Models:
    """The SFT model with a fresh policy adapter (seeded), the value model from the reward
    model, and the reward model itself, shared on one base where it was trained on this one."""
    saved = io.read_json(reward / CONFIG_FILE)
    shared = Path(saved["base"]).resolve() == Path(sft).resolve()
    if params.ppo.token_rewards and not (shared and reading_of(saved)["reading"] == "likelihood"):
        raise ConfigError("ppo.token_rewards: only a reward model that reads likelihood on the "
                          "policy's base has a reward per token; set ppo.token_rewards: false")
    model, processor = load_model_and_processor(sft, dtype=params.base.dtype, load_in_4bit=params.base.load_in_4bit)
    torch.manual_seed(params.seed)
    model = modeling.add_lora(model, params.ppo.policy_lora)
    reward_head = nn.Linear(saved["hidden_size"], 1)
    reward_head.load_state_dict(load_file(reward / HEAD_FILE))
    hidden = model.config.get_text_config().hidden_size
    value_head = ValueHead(hidden)
    if shared:
        model.load_adapter(reward / ADAPTER_DIR, adapter_name=VALUE, is_trainable=True)
        model.load_adapter(reward / ADAPTER_DIR, adapter_name=REWARD, is_trainable=False)
        value_head.linear.load_state_dict(reward_head.state_dict())
        reward_model = RewardModel(model, reward_head, **reading_of(saved))
        reward_processor = processor
    else:
        model.add_adapter(VALUE, copy.deepcopy(model.peft_config[POLICY]))
        nn.init.zeros_(value_head.linear.weight)
        nn.init.zeros_(value_head.linear.bias)
        reward_model, reward_processor = load_reward_model(reward, dtype=params.base.dtype, load_in_4bit=in_4bit(params))
    if params.ppo.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.set_adapter(POLICY)
    models = Models(model, processor, value_head.to(model.device), reward_model, reward_processor, shared)
    models._keep_trainable()
    return models
