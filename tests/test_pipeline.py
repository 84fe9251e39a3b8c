"""The whole pipeline under `dvc repro` on a tiny world: every stage runs from the repo's
dvc.yaml and notebooks; a run killed in the middle of PPO resumes under a second `dvc repro`,
which reruns only the unfinished stages; and it ends with the metrics of an uninterrupted run."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import PARAMS, PPO, PREFERENCES, RM, ROOT, kill_when, make_project, stage_env

TINY = PARAMS | {
    "sft": PARAMS["sft"] | {"epochs": 1.0},
    "preferences": PREFERENCES,  # the repo's likelihood reading: no order, every pair kept
    "reward_model": RM | {"min_pairs": 2},  # the tiny world has 4 RL prompts
    "ppo": PPO | {"seeds": [0, 1]},
    "evaluate": {"max_new_tokens": 8, "batch_size": 4},
}
STAGES = ("prepare", "base", "sft", "preferences", "reward_model", "ppo", "evaluate", "analysis")


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` written over it, section by section."""
    return {k: merged(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v for k, v in changes.items()} | {
        k: v for k, v in base.items() if k not in changes}


def pipeline_project(root: Path) -> Path:
    """A tiny project that runs the repo's own dvc.yaml, notebooks and package; its params.yaml
    is the repo's with the tiny settings over it (dvc.yaml names keys that must be there)."""
    make_project(root, merged(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY))
    for name in ("vlm_rlaif", "notebooks"):
        (root / name).symlink_to(ROOT / name, target_is_directory=True)
    for kept in ("reports/notebooks", "reports/ablations"):  # as in the repo, where git keeps them
        (root / kept).mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=_env())
    return root


def _env() -> dict:
    """One thread a process: the two pipelines run side by side, and the same float sums in each."""
    return stage_env(PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", DVC_NO_ANALYTICS="1", OMP_NUM_THREADS="1")


def repro(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=_env(), capture_output=True, text=True, timeout=900)


def start_repro(root: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dvc", "repro"], cwd=root, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics(root: Path) -> dict:
    return {p.name: json.loads(p.read_text()) for p in sorted((root / "reports/metrics").glob("*.json"))}


def outputs(root: Path) -> dict:
    """Every stage output's hash in dvc.lock but the executed notebooks (they hold timestamps)."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return {o["path"]: o.get("md5") for s in lock.values() for o in s.get("outs", []) if not o["path"].startswith("reports/notebooks/")}


def stage_reports(root: Path) -> None:
    """What each stage's notebook reports, with the tiny settings papermill injected."""
    got = metrics(root)
    assert set(got) == {f"{s}.json" for s in STAGES if s != "analysis"}
    assert got["prepare.json"]["records"]["sft_hard"] == 6
    assert got["base.json"]["visual_tokens_per_video"] == 4 * (32 // 8 // 2) ** 2
    assert got["preferences.json"]["counts"]["prompts"] == 4 and set(got["preferences.json"]["judges"]) == {"context", "no_context"}
    assert got["preferences.json"]["counts"]["kept"] == 4 - got["preferences.json"]["counts"]["dropped"]["identical"]  # no order filter
    assert got["reward_model.json"]["pairs"]["heldout"] == 1 and got["reward_model.json"]["final_loss"] > 0
    assert set(got["ppo.json"]["final"]) == {"seed-0", "seed-1"} and got["ppo.json"]["rollouts"] == 2
    assert sorted(p.name for p in (root / "reports/plots/ppo").iterdir()) == ["seed-0.json", "seed-1.json"]
    evaluation = got["evaluate.json"]
    assert evaluation["judge"] == ["oracle"] and all(set(m["seeds"]) == {"0", "1"} for m in evaluation["models"].values())
    assert evaluation["target"]["seeds"] == 2
    main = (root / "reports/tables/main.md").read_text()
    assert main.count("| ours, 2 seeds |") == 3 and main.count("published (paper)") == 4 and " ± " in main
    assert f"{evaluation['target']['gain']:+.4f}" in (root / "reports/tables/oracle_facts.md").read_text()
    for table in ("zeroshot_qa", "feedback", "ablation", "samples"):
        assert (root / f"reports/tables/{table}.md").read_text().startswith("| ")
    for figure in ("prepare_frame_strips", "base_pretraining", "sft_loss", "preferences_quality", "reward_model", "ppo_curves",
                   "analysis_scores", "analysis_samples"):
        assert (root / f"reports/figures/{figure}.png").stat().st_size > 0, figure


def test_a_killed_pipeline_resumes_reruns_only_what_is_unfinished_and_ends_as_an_uninterrupted_one(tmp_path):
    whole, killed = pipeline_project(tmp_path / "whole"), pipeline_project(tmp_path / "killed")
    uninterrupted = start_repro(whole)  # beside the run that is killed
    kill_when([sys.executable, "-m", "dvc", "repro"], killed, killed / "artifacts/checkpoints/ppo/seed-1/step-1/state.json",
              killed / "killed.log", env=_env(), timeout=900)
    assert (killed / "artifacts/reward_model").is_dir() and not (killed / "artifacts/evaluate").exists()
    stdout, stderr = uninterrupted.communicate(timeout=900)
    assert uninterrupted.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert all(f"Running stage '{s}'" in stdout for s in STAGES)
    stage_reports(whole)

    again = repro(killed)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    ran = {s for s in STAGES if f"Running stage '{s}'" in again.stdout}
    assert ran == {"ppo", "evaluate", "analysis"}, again.stdout[-3000:]  # the finished stages are not redone
    assert "resuming from" in (killed / "reports/notebooks/06_ppo.ipynb").read_text()  # seed 1 went on from its checkpoint

    assert metrics(killed) == metrics(whole)  # two runs, one of them killed: the same numbers
    assert outputs(killed) == outputs(whole)
    assert "Data and pipelines are up to date" in repro(killed).stdout


# Modules that move files, read params or name errors: they change how a stage runs, never what it computes.
PLUMBING = {"__init__", "config", "errors", "io", "stage"}


def package_imports(source: str) -> set[str]:
    """The vlm_rlaif modules and packages that Python `source` imports, or names as a string
    (`importlib.resources.files("vlm_rlaif.prompts")` reads package data)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        # a whole name only: f"vlm_rlaif.{module}" (stage.launch) runs the stage it is asked for
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("vlm_rlaif.") and node.value != "vlm_rlaif.":
            found.add(node.value.split(".")[1])
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlm_rlaif"):
            parts = node.module.split(".")[1:]
            if parts:
                found.add(parts[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("vlm_rlaif."))
    return found


def imported_closure(names: set[str]) -> set[str]:
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = ROOT / "vlm_rlaif" / f"{name}.py"
        if path.is_file():
            todo.extend(package_imports(path.read_text()))
    return seen


@pytest.mark.parametrize("stage", list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]))
def test_every_module_a_stage_runs_is_one_of_its_dvc_deps(stage):
    """A change to code a stage computes with must rerun it: otherwise dvc.lock would vouch
    for results that the code no longer gives."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]
    notebook = json.loads((ROOT / spec["cmd"].split()[1]).read_text())
    code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    used = imported_closure(package_imports(code)) - PLUMBING
    declared = {Path(d).stem if d.endswith(".py") else Path(d).name for d in spec["deps"] if d.startswith("vlm_rlaif/")}
    assert used <= declared, f"{stage}: dvc.yaml deps lack {sorted(used - declared)}"
