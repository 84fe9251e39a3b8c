"""The analysis tables: our rows beside the paper's published ones, and the README's copy of them."""

from pathlib import Path

import pytest

from vlm_rlaif import analysis, evaluate

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
    return {"judge": ["oracle"], "models": models, "target": evaluate.target(models)}


def test_the_main_table_has_our_rows_with_their_spread_and_the_published_rows_marked():
    three = analysis.main_table(metrics([0, 1, 2])).splitlines()
    assert three[0].startswith("| model | correct | detail | context | temporal | consist. | mean |")
    assert three[2].startswith("| base | 1.10 ± 0.08 |") and three[4].startswith("| RLAIF (PPO) | 3.10 ± 0.08 |")
    assert three[5] == "| VLM-RLAIF 7B | 3.63 | 3.25 | 4.00 | 3.23 | 3.32 | 3.49 | gpt-3.5-turbo | published (paper) |"
    one = analysis.main_table(metrics([0]))
    assert "±" not in one and "| ours, 1 seeds |" in one


def test_the_oracle_table_states_whether_the_gain_clears_the_spread():
    table = analysis.oracle_table(metrics([0, 1, 2]))
    assert "RLAIF - SFT on description_precision: +0.2000" in table and "so the gain clears it" in table
    flat = metrics([0, 1, 2])
    flat["models"]["rlaif"]["seeds"] = dict(flat["models"]["sft"]["seeds"])
    assert not evaluate.target(flat["models"])["met"]


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
    assert "| judge, context | n/a | 0 | 0.000 | 1.000 |" in table and table.endswith("correlation: n/a.")
