"""The analysis tables: our rows beside the paper's published ones, and the README's copy of them."""

import json
from pathlib import Path

import numpy as np
import pytest

from vlm_rlaif import analysis, evaluate
from vlm_rlaif.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def metrics(seeds: list[int]) -> dict:
    """Evaluation metrics in the evaluate stage's form, from per-seed rows."""
    def row(model: int, seed: int) -> dict:
        value = 1.0 + model + 0.1 * seed
        return {d: value for d in (*analysis.DIMENSION_HEADERS, "mean")} | {
            "qa_synthetic_accuracy": value / 5, "qa_synthetic_score": value, "description_precision": value / 5,
            "description_recall": 0.5, "description_f1": 0.5, "description_perfect": 0.1, "hallucinated_per_answer": 1.0}
    models = {m: {"seeds": {s: row(i, s) for s in seeds}} for i, m in enumerate(evaluate.MODELS)}
    for stats in models.values():
        stats |= evaluate.spread(stats["seeds"])
    target = evaluate.target({m: {s: answers(models[m]["seeds"][s]) for s in seeds} for m in ("sft", "rlaif")},
                             load_params(ROOT / "params.yaml"))
    return {"judge": ["oracle"], "models": models, "target": target | {"worlds": {"0": target["met"]}}, "worlds": {}}


def answers(row: dict, count: int = 8) -> dict[str, list[float]]:
    """Per-answer measures whose means are the row's, spread evenly about them."""
    jitter = np.linspace(-0.05, 0.05, count)
    return {"precision": list(row["description_precision"] + jitter), "recall": [0.5] * count, "f1": list(0.5 + jitter),
            "hallucinated": [1.0] * count, "words": [20.0] * count}


def test_the_main_table_has_our_rows_with_their_spread_and_the_published_rows_marked():
    three = analysis.main_table(metrics([0, 1, 2])).splitlines()
    assert three[0].startswith("| model | correct | detail | context | temporal | consist. | mean |")
    assert three[2].startswith("| base | 1.10 ± 0.08 |") and three[4].startswith("| RLAIF (PPO) | 3.10 ± 0.08 |")
    assert three[5] == "| VLM-RLAIF 7B | 3.63 | 3.25 | 4.00 | 3.23 | 3.32 | 3.49 | gpt-3.5-turbo | published (paper) |"
    one = analysis.main_table(metrics([0]))
    assert "±" not in one and "| ours, 1 seeds |" in one


def test_the_oracle_table_shows_the_paired_gains_with_their_intervals_and_the_verdict():
    table = analysis.oracle_table(metrics([0, 1, 2]))
    assert "| RLAIF - SFT, paired (95% interval) | +0.200 [+0.200, +0.200] | +0.000 [+0.000, +0.000] |" in table
    assert "RLAIF - SFT on description_precision: +0.2000 (0.6200 vs 0.4200), 95% interval [+0.2000, +0.2000]" in table
    assert "over 3 seeds x 8 questions: met," in table and "Met on 1 of 1 world(s) (world seeds 0)." in table
    two = metrics([0, 1, 2])
    two["worlds"] = {"7": two["target"] | {"met": False, "reason": "the precision gain's interval reaches zero"}}
    two["target"]["worlds"] = {"0": True, "7": False}
    table = analysis.oracle_table(two)
    assert "world seed 7: RLAIF - SFT on description_precision" in table and "Met on 1 of 2 world(s)" in table
    figure = analysis.gains_figure(two)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == ["world 0", "world 7"]
    assert len(figure.axes) == 4  # precision, recall, F1, hallucinated facts
    real_data = {k: v for k, v in two.items() if k != "target"}
    assert "No oracle verdict" in analysis.gains_figure(real_data).axes[0].texts[0].get_text()


def test_the_readme_results_are_the_committed_tables():
    readme = (ROOT / "README.md").read_text()
    assert analysis.splice(readme, analysis.results_block(ROOT / "reports/tables")) == readme, (
        "README's results differ from reports/tables: run python -m vlm_rlaif.analysis --readme README.md")


def test_splicing_needs_both_markers_once():
    assert analysis.splice(f"a\n{analysis.RESULTS_START}\nold\n{analysis.RESULTS_END}\nb", "new") == \
        f"a\n{analysis.RESULTS_START}\nnew\n{analysis.RESULTS_END}\nb"
    with pytest.raises(ValueError, match="exactly one"):
        analysis.splice("no markers", "new")


def test_the_feedback_table_says_n_a_where_nothing_was_measured():
    judge = {"agreement": None, "pairs": 0, "consistency": 0.0, "kept_fraction": 1.0}
    table = analysis.feedback_table({"judges": {"context": judge}}, {"oracle": {"reward_model": {"accuracy": None, "pairs": 0},
                                                                                "reward_correlation": None}})
    assert "| judge, context | n/a | 0 | n/a |  | 1.000 |" in table
    assert table.endswith("correlation: n/a (within a prompt: n/a).")
    assert "| reward model (pairs it did not train on; kept: of held-out prompts) | n/a | 0 | n/a |" in table


def test_a_saved_ablation_is_a_row_beside_the_pipelines_chain(tmp_path):
    def chain(judge: str, agreement: float) -> dict:
        return {"preferences": {"counts": {"prompts": 400, "prompts_kept": 250},
                                "judges": {judge: {"agreement": agreement, "agreement_kept": 0.8}}},
                "reward_model": {"oracle": {"reward_model": {"accuracy": 0.6}},
                                 "heldout": {"oracle": {"accuracy": 0.7}}},
                "evaluate": metrics([0, 1])}
    runs = {"pipeline": chain("context", 0.75), "no_context": chain("no_context", 0.65)}
    for stem, value in runs["pipeline"].items():
        analysis.io.write_json(tmp_path / "metrics" / f"{stem}.json", value)
    saved = analysis.save_ablation("no_context", metrics=tmp_path / "metrics", out=tmp_path / "abl")
    for stem, value in runs["no_context"].items():  # the experiment's chain, kept under its name
        analysis.io.write_json(saved / f"{stem}.json", value)
    read = analysis.chain_runs(tmp_path / "metrics", tmp_path / "abl")
    assert read == json.loads(json.dumps(runs))  # as JSON keeps them
    table = analysis.ablation_table(read)
    assert "| pipeline | context | 0.750 / 0.800 | 250 / 400 | 0.700 | 0.600 | +0.200" in table
    assert "| no context | no context | 0.650 / 0.800 |" in table
    assert "1.00 -> 1.00 | 2.05 -> 3.05 |" in table
    with pytest.raises(FileNotFoundError, match=r"none/preferences.json does not exist"):
        analysis.save_ablation("x", metrics=tmp_path / "abl" / "none", out=tmp_path / "abl")
