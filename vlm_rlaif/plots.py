"""Figures the stage notebooks show: frame strips and distributions.

Plain matplotlib on a given Axes, so notebooks compose them and stage.save_figure writes them.
"""

from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import numpy as np


def frame_strip(ax, frames: np.ndarray, title: str | None = None, caption: str | None = None) -> None:
    """Frames [T, H, W, 3] side by side with a 1-px gap, a title above and a caption below."""
    t, h, w, _ = frames.shape
    strip = np.full((h, t * (w + 1) - 1, 3), 255, dtype=np.uint8)
    for i, frame in enumerate(frames):
        strip[:, i * (w + 1) : i * (w + 1) + w] = frame
    ax.imshow(strip, interpolation="nearest")
    ax.set_xticks([(i + 0.5) * (w + 1) for i in range(t)], [str(i) for i in range(t)], fontsize=6)
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8, loc="left")
    if caption:
        ax.set_xlabel("\n".join(textwrap.fill(line, 160) for line in caption.splitlines()), fontsize=7, loc="left")


def length_histogram(ax, easy: Sequence[int], hard: Sequence[int], threshold: float) -> None:
    """Answer lengths of the two curriculum splits, with the threshold that separates them."""
    top = max([*easy, *hard, 1])
    bins = np.arange(0, top + 2) - 0.5 if top <= 120 else 60
    ax.hist(easy, bins=bins, alpha=0.7, label=f"easy ({len(easy)})", color="tab:blue")
    ax.hist(hard, bins=bins, alpha=0.7, label=f"hard ({len(hard)})", color="tab:orange")
    ax.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"threshold = {threshold:g} words")
    ax.set_xlabel("answer length (words)")
    ax.set_ylabel("SFT records")
    ax.set_yscale("log")
    ax.legend(fontsize=8)


def loss_curve(ax, log_history: list[dict], boundary_step: int | None) -> None:
    """Training loss per logged step (Trainer's log_history), the curriculum boundary dashed."""
    logs = [e for e in log_history if "loss" in e]
    ax.plot([e["step"] for e in logs], [e["loss"] for e in logs], color="tab:blue", linewidth=1)
    if boundary_step is not None:
        ax.axvline(boundary_step, color="black", linestyle="--", linewidth=1, label="easy → hard")
        ax.legend(fontsize=8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")


def accuracy_by_type(ax, results: dict[str, dict]) -> None:
    """Short-question accuracy per question type, one bar per result (oracle_short_accuracy's
    output, by name), the overall accuracy in the legend."""
    kinds = sorted({kind for result in results.values() for kind in result["by_type"]})
    width = 0.8 / max(1, len(results))
    x = np.arange(len(kinds))
    for i, (name, result) in enumerate(results.items()):
        values = [result["by_type"].get(kind, {}).get("accuracy", 0.0) for kind in kinds]
        ax.bar(x + (i - (len(results) - 1) / 2) * width, values, width, label=f"{name} ({result['accuracy']:.2f})")
    ax.set_xticks(x, kinds, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("oracle accuracy")
    # above the axes: bars may reach 1.0 anywhere, so no spot inside is sure to stay clear
    ax.legend(
        fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(results), frameon=False
    )


def feedback_quality(ax_judge, ax_captions, quality: dict) -> None:
    """The judge with and without the clip-caption context, side by side (agreement with the
    oracle on all judged pairs and on the kept ones, order consistency, share kept, chance
    dashed at 0.5); and the context itself: clip captions against their clips next to the
    whole-video description against the whole video."""
    measures = {"agreement": "agreement", "agreement (kept)": "agreement_kept", "consistent orders": "consistency", "kept": "kept_fraction"}
    judges = quality["judges"]
    width = 0.8 / max(1, len(judges))
    x = np.arange(len(measures))
    for i, (name, judge) in enumerate(judges.items()):
        values = [judge[key] if judge[key] is not None else 0.0 for key in measures.values()]
        ax_judge.bar(x + (i - (len(judges) - 1) / 2) * width, values, width, label=name.replace("_", " "))
    ax_judge.axhline(0.5, color="black", linestyle="--", linewidth=1)
    ax_judge.set_xticks(x, list(measures), fontsize=8)
    ax_judge.set_ylim(0, 1)
    ax_judge.set_title("judge vs oracle", fontsize=9)
    ax_judge.legend(fontsize=8)
    captions = quality.get("captions")
    if not captions:
        ax_captions.set_axis_off()
        return
    x = np.arange(2)
    for i, (name, label) in enumerate((("clip", "each clip caption"), ("video", "whole-video description"))):
        ax_captions.bar(x + (i - 0.5) * 0.4, [captions[name]["precision"], captions[name]["f1"]], 0.4, label=label)
    ax_captions.set_xticks(x, ["fact precision", "fact F1"], fontsize=8)
    ax_captions.set_ylim(0, 1)
    ax_captions.set_title("context: SFT captions vs oracle", fontsize=9)
    ax_captions.legend(fontsize=8)


def reward_calibration(ax, probability: Sequence[float], first_better: Sequence[bool], bins: int = 5) -> None:
    """Reliability of the reward model's preferences: pairs binned by P(output 1 better) =
    sigmoid(r1 - r2), against how often the oracle prefers output 1 in each bin (marker
    area by pair count); a calibrated model sits on the diagonal, a blind one at 0.5."""
    p, truth = np.asarray(probability, float), np.asarray(first_better, float)
    edges = np.quantile(p, np.linspace(0, 1, bins + 1)) if len(p) else np.linspace(0, 1, bins + 1)
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    for b in range(bins):
        inside = which == b
        if inside.any():
            ax.scatter(p[inside].mean(), truth[inside].mean(), s=20 + 4 * inside.sum(), color="tab:blue", alpha=0.7)
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("reward model: P(output 1 better)")
    ax.set_ylabel("oracle: output 1 better")
    ax.set_title(f"calibration ({len(p)} pairs, quantile bins)", fontsize=9)


def reward_margins(ax, margins: Sequence[float], agrees: Sequence[bool]) -> None:
    """Reward margins |r1 - r2| of pairs the reward model orders as the oracle does, and of
    those it orders wrongly: a useful reward model is right more often when it is sure."""
    margins, agrees = np.abs(np.asarray(margins, float)), np.asarray(agrees, bool)
    bins = np.linspace(0, max(margins.max(initial=0.0), 1e-6), 16)
    ax.hist(margins[agrees], bins=bins, alpha=0.7, label=f"as the oracle ({agrees.sum()})", color="tab:green")
    ax.hist(margins[~agrees], bins=bins, alpha=0.7, label=f"against it ({(~agrees).sum()})", color="tab:red")
    ax.set_xlabel("|reward margin|")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8)


PPO_PANELS = {
    "reward": ("reward model score, and with its penalties", ["reward", "score"]),
    "kl": ("KL to the reference (per response)", ["kl"]),
    "entropy": ("entropy (per token)", ["entropy"]),
    "length": ("response length (tokens)", ["response_length"]),
    "critic": ("return and value at the first token", ["return", "value"]),
    "explained": ("critic's explained variance", ["explained_variance"]),
    "losses": ("losses", ["policy_loss", "value_loss"]),
    "clipping": ("clipped share", ["clip_fraction", "value_clip_fraction", "eos_rate"]),
}


def ppo_curves(axes, logs: Mapping[str, list[dict]]) -> None:
    """PPO's per-rollout logs (ppo.LOG_FILE), one panel per quantity of PPO_PANELS: one colour
    per run (seed), one line style per quantity where a panel holds several."""
    styles = ["-", "--", ":"]
    for ax, (title, keys) in zip(np.ravel(axes), PPO_PANELS.values()):
        for colour, (run, log) in enumerate(logs.items()):
            steps = [e["step"] for e in log]
            for style, key in zip(styles, keys):
                label = " ".join(part for part in (run if len(logs) > 1 else "", key.replace("_", " ") if len(keys) > 1 else "") if part)
                ax.plot(steps, [e[key] for e in log], marker=".", linewidth=1, linestyle=style, color=f"C{colour}", label=label or None)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("rollout batch", fontsize=8)
        if len(keys) > 1 or len(logs) > 1:
            ax.legend(fontsize=6)
