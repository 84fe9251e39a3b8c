"""Prompt files: the instructions and the judge template, worded once for every stage.

The synthetic world writes its SFT examples through these functions, and the preferences
stage calls them again, so the SFT model is asked to describe, to caption a clip and to judge
in exactly the format it was trained on. `describe.txt` and `caption_clip.txt` hold one
phrasing per line (the first is the canonical one); `judge.txt`, `judge_context.txt` and
`reward.txt` (the reward model's evaluation instruction) are templates with {named} slots.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

JUDGE_LABELS = ("A", "B")


class PromptError(ValueError):
    """A prompt file that is missing or unusable, or arguments that do not fit it."""


@cache
def load(name: str) -> str:
    """The text of prompts/<name>.txt ("judge" and "judge.txt" both work); read once per process."""
    filename = name if name.endswith(".txt") else f"{name}.txt"
    folder = resources.files(__package__)
    path = folder.joinpath(filename)
    if not path.is_file():
        known = sorted(p.name for p in folder.iterdir() if p.name.endswith(".txt"))
        raise PromptError(f"prompt file {filename!r} not found in vlm_rlaif/prompts (known: {', '.join(known)})")
    return path.read_text(encoding="utf-8")


def variants(name: str) -> list[str]:
    """The phrasings of a one-per-line prompt file."""
    lines = [line.strip() for line in load(name).splitlines() if line.strip()]
    if not lines:
        raise PromptError(f"prompt file {name!r} is empty")
    return lines


def _variant(name: str, variant: int) -> str:
    lines = variants(name)
    if not 0 <= variant < len(lines):
        raise PromptError(f"{name}.txt has {len(lines)} phrasings; variant {variant} does not exist")
    return lines[variant]


def describe_instruction(variant: int = 0) -> str:
    """Asks for a detailed description of the whole video."""
    return _variant("describe", variant)


def caption_instruction(variant: int = 0) -> str:
    """Asks for a detailed caption of one clip (the clip's frames are the visual input)."""
    return _variant("caption_clip", variant)


def format_context(captions: list[str]) -> str:
    """The judge's context block: the clip captions, numbered in order ("Clip 1: ...")."""
    if not captions:
        raise PromptError("format_context: no clip captions given")
    clips = "\n".join(f"Clip {i}: {caption.strip()}" for i, caption in enumerate(captions, 1))
    return load("judge_context").strip().format(clips=clips)


def with_context(question: str, context: str | None) -> str:
    """The question, opened by a context block (`format_context`) when there is one."""
    return f"{context}\n\n{question}" if context else question


def judge_prompt(question: str, response_a: str, response_b: str, context: str | None = None) -> str:
    """The judge's question: which of two responses is better. Its answer is one label of
    JUDGE_LABELS. `context` is a block from `format_context`, or None for no context."""
    for key, value in (("question", question), ("response_a", response_a), ("response_b", response_b)):
        if not isinstance(value, str):
            raise PromptError(f"judge_prompt: {key} must be a string, got {type(value).__name__}")
    block = f"{context.strip()}\n\n" if context else ""
    return load("judge").strip().format(
        context=block, question=question.strip(), response_a=response_a.strip(), response_b=response_b.strip()
    )


def reward_instruction(context: str | None = None) -> str:
    """The evaluation instruction after the response the reward model scores; its last token's
    hidden state is the reward's input. `context` (a `format_context` block) goes into it for
    the ablation with clip captions; the paper's reward model read none."""
    return load("reward").strip().format(context=f"\n\n{context.strip()}" if context else "")
