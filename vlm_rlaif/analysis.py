"""The analysis stage: the paper's tables from the stages' metrics, with the published rows beside ours.

Every number here is read from reports/metrics/*.json and artifacts/evaluate/ (so from
data.dvc and params.yaml through dvc.lock); nothing is computed twice. Published figures come
from the paper (PAPER.md) and are marked as such: they are 7B models on real videos graded by
gpt-3.5-turbo, ours are whatever profile ran, graded by the judge named in each row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from vlm_rlaif import evaluate, io, plots, stage
from vlm_rlaif.benchmark import DIMENSIONS
from vlm_rlaif.preferences import JUDGES
from vlm_rlaif.verdict import MEASURES

LABELS = {"base": "base", "sft": "SFT", "rlaif": "RLAIF (PPO)"}
DIMENSION_HEADERS = {"correctness": "correct", "detail": "detail", "context": "context", "temporal": "temporal", "consistency": "consist."}

# The paper's Video-ChatGPT benchmark (gpt-3.5-turbo judge), 0-5.
PUBLISHED_VIDEO_CHATGPT = {
    "VLM-RLAIF 7B": (3.63, 3.25, 4.00, 3.23, 3.32, 3.49),
    "SFT 7B": (2.79, 2.82, 3.37, 2.28, 2.49, 2.75),
    "Video-ChatGPT": (2.40, 2.52, 2.62, 1.98, 2.37, 2.38),
    "Video-LLaVA": (2.87, 2.94, 3.44, 2.45, 2.51, 2.84),
}
# The paper's zero-shot QA accuracy (%), VLM-RLAIF 7B and SFT 7B.
PUBLISHED_ZEROSHOT = {"MSVD-QA": (76.4, 67.2), "MSRVTT-QA": (63.0, 52.4), "ActivityNet-QA": (57.3, 44.1)}


def _cell(stats: Mapping, key: str, scale: float = 1.0, digits: int = 2) -> str:
    """mean ± std over seeds (the std left out when one seed ran)."""
    mean, std = stats["mean"].get(key), stats["std"].get(key)
    if mean is None:
        return "n/a"
    return f"{mean * scale:.{digits}f}" + (f" ± {std * scale:.{digits}f}" if len(stats["seeds"]) > 1 else "")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def main_table(metrics: Mapping) -> str:
    """Video-ChatGPT's five dimensions and their mean: our models (mean ± std over seeds) and
    the paper's published rows."""
    judge = ", ".join(metrics["judge"])
    header = ["model", *DIMENSION_HEADERS.values(), "mean", "judge", "source"]
    ours = [[LABELS.get(m, m), *(_cell(stats, d) for d in (*DIMENSIONS, "mean")), judge, f"ours, {len(stats['seeds'])} seeds"]
            for m, stats in metrics["models"].items()]
    published = [[name, *(f"{v:.2f}" for v in values), "gpt-3.5-turbo", "published (paper)"] for name, values in PUBLISHED_VIDEO_CHATGPT.items()]
    return _table(header, ours + published)


def zeroshot_table(metrics: Mapping) -> str:
    """Zero-shot QA accuracy (%) and score per benchmark: ours, then the paper's published accuracies."""
    names = sorted({k.removeprefix("qa_").removesuffix("_accuracy") for stats in metrics["models"].values()
                    for k in stats["mean"] if k.startswith("qa_") and k.endswith("_accuracy")})
    header = ["model", "benchmark", "accuracy (%)", "score (0-5)", "judge", "source"]
    judge = ", ".join(metrics["judge"])
    rows = [[LABELS.get(m, m), name, _cell(stats, f"qa_{name}_accuracy", 100, 1), _cell(stats, f"qa_{name}_score"), judge, "ours"]
            for name in names for m, stats in metrics["models"].items()]
    for name, (rlaif, sft) in PUBLISHED_ZEROSHOT.items():
        rows += [["VLM-RLAIF 7B", name, f"{rlaif:.1f}", "", "gpt-3.5-turbo", "published (paper)"],
                 ["SFT 7B", name, f"{sft:.1f}", "", "gpt-3.5-turbo", "published (paper)"]]
    return _table(header, rows)


# The oracle table's columns: metric key -> (header, the verdict's measure of it).
ORACLE_COLUMNS = {
    "description_precision": ("factual accuracy (precision)", "precision"),
    "description_recall": ("recall", "recall"),
    "description_f1": ("F1", "f1"),
    "description_perfect": ("perfect answers", None),
    "hallucinated_per_answer": ("hallucinated facts / answer", "hallucinated"),
    "description_words": ("words / answer", "words"),
}
VERDICT_RULE = ("The verdict: the precision gain's interval (a bootstrap over seeds and questions "
                "together) lies above zero, and F1 does not fall, so a gain from saying less does "
                "not count.")


def _gain(measure: Mapping | None) -> str:
    """A paired gain with its interval: +0.012 [-0.004, +0.027]."""
    if measure is None:
        return ""
    low, high = measure["interval"]
    return f"{measure['gain']:+.3f} [{low:+.3f}, {high:+.3f}]"


def verdict_text(t: Mapping, world: str | None = None) -> str:
    """The verdict in one sentence: the precision gain, its interval, met or not and why."""
    where = f"world seed {world}: " if world is not None else ""
    low, high = t["interval"]
    return (f"{where}RLAIF - SFT on {t['metric']}: {t['gain']:+.4f} "
            f"({t['rlaif']:.4f} vs {t['sft']:.4f}), {t['level']:.0%} interval "
            f"[{low:+.4f}, {high:+.4f}] over {t['seeds']} seeds x {t['questions']} questions: "
            f"{'met' if t['met'] else 'not met'}, {t['reason']}.")


def oracle_table(metrics: Mapping) -> str:
    """The oracle's count of the facts in every detailed description (synthetic world only), the
    paired RLAIF - SFT gain of each with its bootstrap interval, and the verdict on every world."""
    header = ["model", *(label for label, _ in ORACLE_COLUMNS.values())]
    rows = [[LABELS.get(m, m), *(_cell(stats, k, digits=3) for k in ORACLE_COLUMNS)]
            for m, stats in metrics["models"].items()]
    t = metrics.get("target")
    if not t:
        return _table(header, rows)
    gains = (_gain(t["measures"].get(measure)) for _, measure in ORACLE_COLUMNS.values())
    rows.append([f"RLAIF - SFT, paired ({t['level']:.0%} interval)", *gains])
    lines = [_table(header, rows), verdict_text(t), VERDICT_RULE]
    lines += [verdict_text(w, world) for world, w in metrics.get("worlds", {}).items()]
    held = t["worlds"]
    lines.append(f"Met on {sum(held.values())} of {len(held)} world(s) "
                 f"(world seeds {', '.join(held)}).")
    return "\n\n".join(lines)


def gains_figure(metrics: Mapping):
    """RLAIF - SFT per oracle measure, a point and its interval for every world, zero marked; a
    note instead where no oracle counted facts (real data)."""
    import matplotlib.pyplot as plt

    t = metrics.get("target")
    if not t:
        fig, ax = plt.subplots(figsize=(8, 1))
        ax.axis("off")
        ax.text(0, 0.5, "No oracle verdict: the evaluation data has no scene records.", fontsize=9)
        return fig
    worlds = {world: metrics["worlds"].get(world, t) for world in t["worlds"]}
    shown = [m for m in MEASURES if m != "words"]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown), 1.4 + 0.45 * len(worlds)),
                             sharey=True, squeeze=False)
    for ax, measure in zip(axes[0], shown):
        for row, w in enumerate(worlds.values()):
            m = w["measures"][measure]
            low, high = m["interval"]
            ax.errorbar(m["gain"], row, xerr=[[m["gain"] - low], [high - m["gain"]]], fmt="o",
                        capsize=3, color="C2" if w["met"] else "C3")
        ax.axvline(0, color="grey", linewidth=0.8)
        better = "higher is better" if MEASURES[measure]["higher"] else "lower is better"
        ax.set_title(f"{MEASURES[measure]['label']}\n({better})", fontsize=8)
    axes[0, 0].set_yticks(range(len(worlds)), [f"world {w}" for w in worlds], fontsize=8)
    axes[0, 0].invert_yaxis()
    fig.suptitle(f"RLAIF - SFT, paired, {t['level']:.0%} intervals (green: the verdict is met)",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # room for the title above the panels
    return fig


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def feedback_table(preferences: Mapping, reward_model: Mapping) -> str:
    """The context ablation that runs in every pipeline: the AI judge's agreement with the
    oracle with and without clip-caption context, and the reward model trained on its
    preferences, each on every pair and on the kept ones (n/a where nothing was measured)."""
    rows = [[f"judge, {name.replace('_', ' ')}", _number(j["agreement"]), str(j["pairs"]),
             _number(j.get("agreement_kept")), str(j.get("pairs_kept", "")),
             _number(j["kept_fraction"])]
            for name, j in preferences["judges"].items()]
    oracle = reward_model["oracle"]
    unseen, held = oracle["reward_model"], reward_model.get("heldout", {}).get("oracle", {})
    rows.append(["reward model (pairs it did not train on; kept: of held-out prompts)",
                 _number(unseen["accuracy"]), str(unseen["pairs"]),
                 _number(held.get("accuracy")), str(held.get("pairs", "")), ""])
    header = ["feedback", "agreement with the oracle, all pairs", "pairs", "kept pairs", "pairs",
              "kept share"]
    correlation = _number(oracle["reward_correlation"])
    within = _number(oracle.get("within_prompt_correlation"))
    return _table(header, rows) + ("\n\nChance is 0.5. Reward/oracle-score correlation: "
                                   f"{correlation} (within a prompt: {within}).")


ABLATIONS = Path("reports/ablations")  # each a `dvc exp run`'s metrics, saved by `--save-ablation`
CHAIN_METRICS = ("preferences", "reward_model", "evaluate")


def save_ablation(name: str, metrics: Path = Path("reports/metrics"),
                  out: Path = ABLATIONS) -> Path:
    """Keep the metrics an experiment's whole chain wrote, under `out/name`, for the table."""
    for stem in CHAIN_METRICS:
        if not (metrics / f"{stem}.json").is_file():
            raise FileNotFoundError(f"{metrics / stem}.json does not exist; run the chain first")
    for stem in CHAIN_METRICS:
        io.write_json(out / name / f"{stem}.json", io.read_json(metrics / f"{stem}.json"))
    return out / name


def chain_runs(metrics: Path = Path("reports/metrics"), ablations: Path = ABLATIONS) -> dict:
    """The pipeline's own chain ("pipeline") and every saved ablation's, by name."""
    saved = {f.name: f for f in sorted(ablations.glob("*")) if f.is_dir()}
    folders = {"pipeline": metrics, **saved}
    return {name: {stem: io.read_json(folder / f"{stem}.json") for stem in CHAIN_METRICS}
            for name, folder in folders.items()}


def _judge_in_use(preferences: Mapping) -> tuple[str, Mapping]:
    """The judge whose verdicts the stage kept: the context one, unless it ran without."""
    judges = preferences["judges"]
    name = next(j for j in JUDGES if j in judges)
    return name.replace("_", " "), judges[name]


def ablation_table(runs: Mapping[str, Mapping]) -> str:
    """Each chain from its judge to RLAIF: the judge whose verdicts were kept, the reward model
    trained on them and the policy PPO made of it, all measured by the oracle."""
    header = ["run", "judge", "agreement: all / kept", "prompts kept", "RM: held-out prompts",
              "RM: every unseen pair", "RLAIF - SFT precision", "hallucinated facts",
              "Video-ChatGPT mean"]
    rows = []
    for name, run in runs.items():
        judge_name, judge = _judge_in_use(run["preferences"])
        counts, oracle = run["preferences"]["counts"], run["reward_model"]["oracle"]
        held = run["reward_model"]["heldout"].get("oracle", {})
        target, models = run["evaluate"].get("target") or {}, run["evaluate"]["models"]
        halluc = (target.get("measures") or {}).get("hallucinated")
        rows.append([
            name.replace("_", " "), judge_name,
            f"{_number(judge['agreement'])} / {_number(judge.get('agreement_kept'))}",
            f"{counts['prompts_kept']} / {counts['prompts']}",
            _number(held.get("accuracy")), _number(oracle["reward_model"]["accuracy"]),
            _gain((target.get("measures") or {}).get("precision")),
            f"{halluc['sft']:.2f} -> {halluc['rlaif']:.2f}" if halluc else "n/a",
            f"{models['sft']['mean']['mean']:.2f} -> {models['rlaif']['mean']['mean']:.2f}",
        ])
    return _table(header, rows)


def score_bars(ax, metrics: Mapping, keys: Sequence[str], labels: Sequence[str], title: str) -> None:
    """Grouped bars, one group per metric and one bar per model, error bars the std over seeds."""
    models = list(metrics["models"])
    width = 0.8 / len(models)
    x = np.arange(len(keys))
    for i, model in enumerate(models):
        stats = metrics["models"][model]
        means = [stats["mean"].get(k) or 0.0 for k in keys]
        errors = [stats["std"].get(k) or 0.0 for k in keys]
        ax.bar(x + (i - (len(models) - 1) / 2) * width, means, width, yerr=errors, capsize=3, label=LABELS.get(model, model), color=f"C{i}")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)


def samples(judged_sft: Mapping, judged_rlaif: Mapping, count: int = 4) -> list[dict]:
    """Detailed-description questions where SFT and RLAIF answered differently: the first
    `count` in benchmark order (no picking by outcome), with the oracle's precision of each."""
    out = []
    for sft, rlaif in zip(judged_sft["judged"]["generic"], judged_rlaif["judged"]["generic"]):
        if sft["prediction"] != rlaif["prediction"]:
            out.append({"video_name": sft["video_name"], "question": sft["Q"], "reference": sft["A"], "sft": sft["prediction"],
                        "rlaif": rlaif["prediction"], "sft_correctness": sft["correctness"], "rlaif_correctness": rlaif["correctness"]})
        if len(out) == count:
            break
    return out


def verdict(sample: Mapping) -> str:
    """Which answer the judge's correctness grade prefers."""
    a, b = sample["sft_correctness"], sample["rlaif_correctness"]
    return "tie" if a == b else "RLAIF" if b > a else "SFT"


def samples_table(rows: Sequence[Mapping]) -> str:
    body = [[r["video_name"], r["question"], r["sft"], f"{r['sft_reward']:.2f}", r["rlaif"], f"{r['rlaif_reward']:.2f}", verdict(r)]
            for r in rows]
    return _table(["video", "question", "SFT answer", "reward", "RLAIF answer", "reward", "more correct (judge)"], body)


def with_rewards(rows: Sequence[Mapping], reward_dir: str | Path, video_root: str | Path, num_frames: int, dtype: str = "float32"):
    """The samples with the reward model's score of both answers, and each video's frames."""
    from vlm_rlaif import reward_model
    from vlm_rlaif.evaluation import release_conversation
    from vlm_rlaif.video import load_video, resolve_video

    model, processor = reward_model.load_reward_model(reward_dir, dtype=dtype)
    videos = [load_video(resolve_video(video_root, r["video_name"]), num_frames) for r in rows]
    prompts = [release_conversation(r["question"]) for r in rows]
    rewards = {key: reward_model.score(model, processor, videos, prompts, [r[key] for r in rows]).tolist() for key in ("sft", "rlaif")}
    scored = [{**r, "sft_reward": rewards["sft"][i], "rlaif_reward": rewards["rlaif"][i]} for i, r in enumerate(rows)]
    return scored, videos


def samples_figure(rows: Sequence[Mapping], videos: Sequence[np.ndarray]):
    """One frame strip per sample, both answers under it with their reward and grade; a note
    instead when SFT and RLAIF answered every question alike."""
    import matplotlib.pyplot as plt

    if not rows:
        fig, ax = plt.subplots(figsize=(8, 1))
        ax.axis("off")
        ax.text(0, 0.5, "SFT and RLAIF answered every detailed-description question alike.", fontsize=9)
        return fig
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 3.2 * len(rows)), squeeze=False)
    for ax, row, frames in zip(axes[:, 0], rows, videos):
        caption = (f"SFT ({row['sft_reward']:.2f}, correct {row['sft_correctness']:.1f}): {row['sft']}\n"
                   f"RLAIF ({row['rlaif_reward']:.2f}, correct {row['rlaif_correctness']:.1f}): {row['rlaif']}")
        plots.frame_strip(ax, frames, title=f"{row['video_name']}: {row['question']}", caption=caption)
    fig.tight_layout()
    return fig


def read_evaluation(seed: int, out: Path = evaluate.OUT) -> tuple[dict, dict]:
    """The SFT and RLAIF runs of one seed, as the evaluate stage graded them."""
    return evaluate.read_judged("sft", seed, out), evaluate.read_judged("rlaif", seed, out)


# --------------------------------------------------------------------------- README

RESULTS_START, RESULTS_END = "<!-- results: start -->", "<!-- results: end -->"
README_TABLES = {"main": "Video-ChatGPT benchmark", "oracle_facts": "Facts of detailed descriptions (the oracle)"}


def results_block(tables: Path = stage.TABLES_DIR) -> str:
    """The README's results: the main table and the oracle's table, as the analysis stage wrote them."""
    parts = []
    for name, title in README_TABLES.items():
        path = tables / f"{name}.md"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist; run the analysis stage first (dvc repro analysis)")
        parts.append(f"**{title}** (`{(stage.TABLES_DIR / path.name).as_posix()}`)\n\n{path.read_text().strip()}")
    return "\n\n".join(parts)


def splice(readme: str, block: str) -> str:
    """`readme` with the text between the results markers replaced by `block`."""
    if readme.count(RESULTS_START) != 1 or readme.count(RESULTS_END) != 1:
        raise ValueError(f"the README needs exactly one {RESULTS_START} and one {RESULTS_END} line")
    head, rest = readme.split(RESULTS_START)
    _, tail = rest.split(RESULTS_END)
    return f"{head}{RESULTS_START}\n{block}\n{RESULTS_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_rlaif.analysis",
                                     description="Copy the analysis stage's tables into the "
                                                 "README's results section, or keep an "
                                                 "ablation's metrics.")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--save-ablation", metavar="NAME",
                        help="instead, keep an experiment's chain metrics as ablation NAME")
    args = parser.parse_args(argv)
    if args.save_ablation:
        print(save_ablation(args.save_ablation))
        return 0
    io.write_text(args.readme, splice(args.readme.read_text(), results_block()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
