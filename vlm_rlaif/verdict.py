"""The claim's test: does RLAIF describe videos more accurately than SFT, beyond chance and brevity?

Both models answer the same description questions under each seed, so every (seed, question)
gives a paired difference per oracle measure. A crossed bootstrap resamples seeds (the PPO
runs) and questions together, so the interval carries both sources of chance. The claim holds
when the precision gain's interval lies above zero and F1 does not fall: a shorter answer that
drops true facts raises precision, never F1.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Mapping, Sequence

import numpy as np

from vlm_rlaif.synthetic.oracle import OracleScore

# Each measure of one answer, worded as the tables word it; "higher" says which way is better.
MEASURES = {
    "precision": {"label": "factual accuracy (precision)", "higher": True},
    "recall": {"label": "recall", "higher": True},
    "f1": {"label": "F1", "higher": True},
    "hallucinated": {"label": "hallucinated facts / answer", "higher": False},
    "words": {"label": "words / answer", "higher": None},
}
TARGET = "precision"
GUARD = "f1"  # a precision gain counts only where this does not fall


def answer_measures(
    scores: Sequence[OracleScore], answers: Sequence[str]
) -> dict[str, list[float]]:
    """Every measure of every answer, in question order."""
    return {
        "precision": [s.precision for s in scores],
        "recall": [s.recall for s in scores],
        "f1": [s.f1 for s in scores],
        "hallucinated": [float(len(s.hallucinated)) for s in scores],
        "words": [float(len(a.split())) for a in answers],
    }


def paired(
    sft: Mapping[int, Mapping[str, Sequence[float]]],
    rlaif: Mapping[int, Mapping[str, Sequence[float]]],
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(SFT, RLAIF) arrays [seed, question] per measure, the seeds both models answered under."""
    seeds = sorted(set(sft) & set(rlaif))
    if not seeds:
        raise ValueError(
            f"no seed answered by both models (SFT {sorted(sft)}, RLAIF {sorted(rlaif)})"
        )
    out = {}
    for name in MEASURES:
        a = np.array([sft[s][name] for s in seeds], dtype=float)
        b = np.array([rlaif[s][name] for s in seeds], dtype=float)
        if a.shape != b.shape:
            raise ValueError(
                f"{name}: SFT answered {a.shape[1]} questions a seed, RLAIF {b.shape[1]}"
            )
        out[name] = (a, b)
    return out


def bootstrap_means(
    differences: np.ndarray, resamples: int, rng: np.random.Generator
) -> np.ndarray:
    """Means of `differences` [seed, question] over resampled seeds and questions (drawn
    independently, with replacement): the crossed bootstrap of a two-way design."""
    seeds, questions = differences.shape
    seed_counts = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=resamples)
    question_counts = rng.multinomial(questions, np.full(questions, 1 / questions), size=resamples)
    return np.einsum("bs,sq,bq->b", seed_counts, differences, question_counts) / (seeds * questions)


def compare(
    pairs: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    level: float,
    resamples: int,
    seed: int = 0,
) -> dict:
    """Each measure's means, RLAIF - SFT gain and its `level` percentile interval."""
    out = {}
    for name, (sft, rlaif) in pairs.items():
        means = bootstrap_means(rlaif - sft, resamples, np.random.default_rng([seed, len(out)]))
        low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
        out[name] = {
            "sft": round(float(sft.mean()), 4),
            "rlaif": round(float(rlaif.mean()), 4),
            "gain": round(float((rlaif - sft).mean()), 4),
            "interval": [round(float(low), 4), round(float(high), 4)],
        }
    return out


def decide(measures: Mapping[str, Mapping]) -> tuple[bool, str]:
    """The verdict and its reason, in words a table can carry."""
    target, guard = measures[TARGET], measures[GUARD]
    if target["interval"][0] <= 0:
        return False, "the precision gain's interval reaches zero or below"
    if guard["gain"] < 0:
        return False, f"precision rose but F1 fell ({guard['gain']:+.4f}): a gain from saying less"
    return True, "the precision gain's interval lies above zero and F1 did not fall"


def verdict(
    sft: Mapping[int, Mapping[str, Sequence[float]]],
    rlaif: Mapping[int, Mapping[str, Sequence[float]]],
    *,
    level: float,
    resamples: int,
) -> dict:
    """Whether RLAIF beats SFT on the oracle's description precision; every measure side by side."""
    pairs = paired(sft, rlaif)
    measures = compare(pairs, level=level, resamples=resamples)
    met, reason = decide(measures)
    seeds, questions = pairs[TARGET][0].shape
    return {
        "metric": f"description_{TARGET}",
        "level": level,
        "resamples": resamples,
        "seeds": seeds,
        "questions": questions,
        "met": met,
        "reason": reason,
        "measures": measures,
    }



def at_chance(right: int, count: int, level: float = 0.95) -> bool | None:
    """Whether `right` of `count` two-way choices could be a coin's: 0.5 lies inside the
    Wilson interval of their accuracy at `level`. None with nothing to count."""
    if count == 0:
        return None
    z = NormalDist().inv_cdf((1 + level) / 2)
    p, spread = right / count, z * z / count
    centre = (p + spread / 2) / (1 + spread)
    half = z * np.sqrt(p * (1 - p) / count + spread / (4 * count)) / (1 + spread)
    return bool(centre - half <= 0.5 <= centre + half)


def accuracy_against(picks: Mapping[int, int], truth: Mapping[int, int | None], rows: Sequence[int]) -> dict:
    """How often two-way `picks` match `truth` on `rows` (rows with no truth are left out),
    how many counted, and whether a coin could have done as well (`at_chance`)."""
    scored = [i for i in rows if truth.get(i) is not None]
    right = sum(picks[i] == truth[i] for i in scored)
    return {"accuracy": right / len(scored) if scored else None, "pairs": len(scored),
            "at_chance": at_chance(right, len(scored))}
