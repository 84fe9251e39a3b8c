"""What every stage notebook shares: the repo root, its params, and where results go.

Notebooks call `setup` first, with the params sections papermill injected (or None when
the notebook runs by hand), and save metrics and figures through the two writers here so
every stage lays out reports/ the same way (DESIGN.md, layout contract).
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

import numpy as np

from vlm_rlaif import io
from vlm_rlaif.config import Params, load_params
from vlm_rlaif.errors import InputError

METRICS_DIR = Path("reports/metrics")
FIGURES_DIR = Path("reports/figures")
TABLES_DIR = Path("reports/tables")


def repo_root(start: Path | None = None) -> Path:
    """The nearest folder upwards holding dvc.yaml: notebooks run from there (DESIGN.md)."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise InputError(f"no dvc.yaml in {here} or above: run inside the vlm-rlaif repo")


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(params_file: str = "params.yaml", **sections: Any) -> Params:
    """Move to the repo root, validate the profile (injected sections win), seed everything."""
    os.chdir(repo_root())
    params = load_params(params_file, overrides=sections)
    seed_everything(params.seed)
    return params


def launch(params: Params, train: Callable[[Params], Any], stage: str, num_processes: int) -> None:
    """Run a stage's training in this process, or in `num_processes` processes through
    torch.distributed.run (`python -m vlm_rlaif <stage> --params FILE` in each)."""
    if num_processes == 1:
        train(params)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        io.write_text(path, yaml.safe_dump(dataclasses.asdict(params), sort_keys=False))
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_processes}", "-m", "vlm_rlaif", stage, "--params", str(path)]
        subprocess.run(command, check=True)


def write_metrics(stage: str, metrics: dict[str, Any]) -> Path:
    path = METRICS_DIR / f"{stage}.json"
    io.write_json(path, metrics)
    return path


def save_figure(fig: Any, name: str) -> Path:
    """Save a matplotlib figure as reports/figures/<name>.png, byte-stable across runs."""
    path = FIGURES_DIR / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight", metadata={"Software": None})
    return path


def write_table(name: str, markdown: str) -> Path:
    path = TABLES_DIR / f"{name}.md"
    io.write_text(path, markdown.rstrip() + "\n")
    return path
