"""The judge: the SFT model itself says which of two responses to a video question is better.

Two readings (`preferences.judge_reading`). "label", the paper's: the verdict is read from
the next-token distribution after the judge prompt, not from a generated reply: the
probability of label A against label B is a graded preference, and a margin to filter on. A
judge favours a position as much as a response, so every pair is judged twice, the responses
swapped the second time; the two readings, each turned into "the first response is better",
are averaged. Pairs whose two orders pick different winners, or whose averaged preference is
too close to even, are dropped. "likelihood": each response is scored by how likely the
model finds it as the answer (mean log-probability per token), the context opening the
question; the likelier response wins. Nothing is shown in an order, so there is no position
bias to cancel and no pair is lost to it; a small model that cannot yet answer "A or B"
still knows which answer fits what it sees.

With `context` (the clip captions, `prompts.format_context`) the judge is context-aware, as
in the paper; without it, the same reading is the ablation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ProcessorMixin

from vlm_rlaif import prompts
from vlm_rlaif.data import PLACEHOLDER
from vlm_rlaif.generation import with_features
from vlm_rlaif.logprobs import mean_logprob_per_row
from vlm_rlaif.modeling import build_inputs


class JudgeError(ValueError):
    """A judge that cannot be read (labels the tokenizer cannot tell apart), or bad arguments."""


def label_token_ids(processor: ProcessorMixin) -> tuple[int, int]:
    """The token that opens the judge's reply for each label, as the chat template renders it
    after the generation prompt (" A" in Vicuna's "ASSISTANT: A", "A" after Qwen's
    "<|im_start|>assistant\\n"), so it is the token the SFT judge examples trained."""
    user = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
    prompt = processor.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
    tokenize = processor.tokenizer
    head = tokenize(prompt, add_special_tokens=False)["input_ids"]
    ids = []
    for label in prompts.JUDGE_LABELS:
        reply = [{"role": "assistant", "content": [{"type": "text", "text": label}]}]
        whole = tokenize(processor.apply_chat_template(user + reply, tokenize=False), add_special_tokens=False)["input_ids"]
        if whole[: len(head)] != head or len(whole) == len(head):
            raise JudgeError(f"the chat template does not render the reply {label!r} after its generation prompt")
        ids.append(whole[len(head)])
    if ids[0] == ids[1]:
        raise JudgeError(f"labels {prompts.JUDGE_LABELS} open with the same token {ids[0]}")
    return ids[0], ids[1]


def label_probabilities(last_logits: torch.Tensor, labels: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """From next-token logits [N, vocab]: P(label A | A or B), and the probability mass the
    two labels hold together (near 1 when the judge answers in its trained format)."""
    log_probs = torch.log_softmax(last_logits.float(), dim=-1)[:, list(labels)]
    return torch.softmax(log_probs, dim=-1)[:, 0], log_probs.exp().sum(-1)


@torch.no_grad()
def read_judge(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    videos: Sequence[np.ndarray],
    judge_prompts: Sequence[str],
    *,
    features: Sequence[torch.Tensor] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> tuple[list[float], list[float]]:
    """P(A) and the labels' mass for each (video, judge prompt), one forward pass per batch
    that keeps only the last position's logits. `features` (from `generation.encode_videos`,
    one per prompt) skip the vision tower."""
    if len(videos) != len(judge_prompts) or (features is not None and len(features) != len(judge_prompts)):
        raise JudgeError(f"{len(videos)} videos, {len(judge_prompts)} prompts, {len(features or [])} features: one each per prompt")
    labels = label_token_ids(processor)
    was_training = model.training
    model.eval()
    p_a: list[float] = []
    mass: list[float] = []
    try:
        for start in tqdm(range(0, len(judge_prompts), batch_size), desc="judge", unit="batch", disable=not progress):
            stop = start + batch_size
            conversations = [[{"from": "human", "value": f"{PLACEHOLDER}\n{p}"}] for p in judge_prompts[start:stop]]
            inputs = build_inputs(processor, list(videos[start:stop]), conversations, add_generation_prompt=True).to(model.device)
            kwargs = with_features(inputs, features[start:stop]) if features is not None else dict(inputs)
            logits = model(**kwargs, logits_to_keep=1).logits[:, -1]
            a, m = label_probabilities(logits, labels)
            p_a.extend(a.tolist())
            mass.extend(m.tolist())
    finally:
        model.train(was_training)
    return p_a, mass


@dataclass
class Verdict:
    """One pair judged in both orders. `first_as_a`: P(A) with the first response shown as A;
    `first_as_b`: P(A) with it shown as B; `label_mass`: the two labels' probability mass,
    averaged over both orders. `preference`: P(first is better), the two orders averaged.
    A likelihood reading has no labels and no order: `likelihood_verdict` fills the fields."""

    first_as_a: float
    first_as_b: float
    label_mass: float

    @property
    def preference(self) -> float:
        return (self.first_as_a + (1.0 - self.first_as_b)) / 2

    @property
    def consistent(self) -> bool:
        """Both orders pick the same winner (a reading of exactly 0.5 picks none)."""
        return (self.first_as_a - 0.5) * (0.5 - self.first_as_b) > 0

    @property
    def margin(self) -> float:
        """How far from even the averaged preference is, in [0, 1]."""
        return abs(2 * self.preference - 1)

    @property
    def winner(self) -> int:
        """1 if the first response is preferred, else 2 (the release's "preference" field)."""
        return 1 if self.preference > 0.5 else 2


def judge_pairs(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    videos: Sequence[np.ndarray],
    questions: Sequence[str],
    first: Sequence[str],
    second: Sequence[str],
    contexts: Sequence[str | None],
    *,
    features: Sequence[torch.Tensor] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[Verdict]:
    """Judge each (video, question, first, second, context) in both orders; a video's
    features (one per pair) serve both."""
    n = len(questions)
    if not len(videos) == len(first) == len(second) == len(contexts) == n:
        raise JudgeError(f"judge_pairs: {len(videos)} videos, {n} questions, {len(first)}/{len(second)} responses, {len(contexts)} contexts")
    shown = [prompts.judge_prompt(q, a, b, c) for q, a, b, c in zip(questions, first, second, contexts)]
    swapped = [prompts.judge_prompt(q, b, a, c) for q, a, b, c in zip(questions, first, second, contexts)]
    p_a, mass = read_judge(
        model, processor, [*videos, *videos], shown + swapped,
        features=None if features is None else [*features, *features], batch_size=batch_size, progress=progress,
    )
    return [Verdict(p_a[i], p_a[n + i], (mass[i] + mass[n + i]) / 2) for i in range(n)]


def likelihood_verdict(first: float, second: float) -> Verdict:
    """The verdict of two responses' mean log-probabilities per token: P(first is better) is
    the logistic of their difference, the same whichever is shown first; the mass is whole."""
    p = 1.0 / (1.0 + math.exp(second - first))
    return Verdict(p, 1.0 - p, 1.0)


@torch.no_grad()
def answer_likelihoods(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    videos: Sequence[np.ndarray],
    questions: Sequence[str],
    responses: Sequence[str],
    *,
    features: Sequence[torch.Tensor] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[float]:
    """Mean log-probability per token of each response (and its end of turn) as the reply to
    its (video, question), from the hidden states through the head a chunk at a time."""
    if not len(videos) == len(questions) == len(responses):
        raise JudgeError(f"{len(videos)} videos, {len(questions)} questions, {len(responses)} responses")
    was_training = model.training
    model.eval()
    scores: list[float] = []
    try:
        batches = range(0, len(questions), batch_size)
        for start in tqdm(batches, desc="judge", unit="batch", disable=not progress):
            stop = start + batch_size
            conversations = [[{"from": "human", "value": f"{PLACEHOLDER}\n{q}"}, {"from": "gpt", "value": r}]
                             for q, r in zip(questions[start:stop], responses[start:stop])]
            inputs = build_inputs(processor, list(videos[start:stop]), conversations,
                                  add_generation_prompt=False, assistant_masks=True).to(model.device)
            mask = inputs.pop("assistant_masks")
            kwargs = with_features(inputs, features[start:stop]) if features is not None else dict(inputs)
            hidden = model.model(**kwargs).last_hidden_state
            weight = model.get_output_embeddings().weight
            scores.extend(mean_logprob_per_row(hidden, weight, kwargs["input_ids"], mask).tolist())
    finally:
        model.train(was_training)
    return scores


def likelihood_pairs(
    model: PreTrainedModel,
    processor: ProcessorMixin,
    videos: Sequence[np.ndarray],
    questions: Sequence[str],
    first: Sequence[str],
    second: Sequence[str],
    contexts: Sequence[str | None],
    *,
    features: Sequence[torch.Tensor] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> list[Verdict]:
    """The likelihood reading of each (video, question, first, second, context): both
    responses scored as answers to the question, the context (if any) opening it."""
    n = len(questions)
    if not len(videos) == len(first) == len(second) == len(contexts) == n:
        raise JudgeError(f"likelihood_pairs: {len(videos)} videos, {n} questions, {len(first)}/{len(second)} responses, "
                         f"{len(contexts)} contexts")
    asked = [prompts.with_context(q, c) for q, c in zip(questions, contexts)]
    scores = answer_likelihoods(model, processor, [*videos, *videos], asked + asked, [*first, *second],
                                features=None if features is None else [*features, *features], batch_size=batch_size,
                                progress=progress)
    return [likelihood_verdict(scores[i], scores[n + i]) for i in range(n)]


def select(verdicts: Sequence[Verdict], min_margin: float, drop_inconsistent: bool = True) -> tuple[list[int], dict[str, int]]:
    """Indices of the verdicts kept as preference pairs, and how many were dropped for which
    reason: the two orders disagree (unless `drop_inconsistent` is off: then the averaged
    verdict stands), or the margin is below `min_margin`."""
    kept, counts = [], {"inconsistent": 0, "low_margin": 0}
    for i, verdict in enumerate(verdicts):
        if drop_inconsistent and not verdict.consistent:
            counts["inconsistent"] += 1
        elif verdict.margin < min_margin:
            counts["low_margin"] += 1
        else:
            kept.append(i)
    return kept, counts
