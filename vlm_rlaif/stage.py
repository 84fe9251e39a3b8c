"""What every stage notebook shares: the repo root, its params, and where results go.

Notebooks call `setup` first, with the params sections papermill injected (or None when
the notebook runs by hand), and save metrics and figures through the two writers here so
every stage lays out reports/ the same way (DESIGN.md, layout contract).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import yaml
from accelerate import PartialState

from vlm_rlaif import io
from vlm_rlaif.config import ConfigError, Params, load_params
from vlm_rlaif.errors import InputError

METRICS_DIR = Path("reports/metrics")
FIGURES_DIR = Path("reports/figures")
ENGINES = Path("configs/accelerate")  # an accelerate config per engine: ddp, zero2, zero3, fsdp
TABLES_DIR = Path("reports/tables")

# stage -> (module, function of Params): what `python -m vlm_rlaif <stage>` runs, and what each
# process of a launched training stage runs.
STAGES = {
    "prepare": ("prepare", "run"),
    "base": ("base", "materialise"),
    "sft": ("sft", "train"),
    "preferences": ("preferences", "judge_prompts"),
    "reward_model": ("reward_model", "train"),
    "ppo": ("ppo", "train_seeds"),
    "evaluate": ("evaluate", "run"),
}


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


def processes() -> PartialState:
    """This process's place among a launched stage's processes (index, count, main or not).
    On a machine without a GPU the processes run on CPU: accelerate must be told, or each
    process would take itself for the only one."""
    import torch

    return PartialState(cpu=not torch.cuda.is_available())


def launch_command(params: Params, stage: str, num_processes: int, params_file: str | Path, accelerate_config: str | None = None,
                   paths: Mapping[str, Path] | None = None) -> list[str]:
    """`accelerate launch` of `python -m vlm_rlaif <stage>` in `num_processes` processes (over
    every machine of `launch`), with the engine of `launch.accelerate_config` unless the stage
    names its own, and the stage function's path arguments `paths` (absolute: the processes
    may start elsewhere). The same command, with its `--machine_rank`, starts the stage on
    the other machines of a multi-node run (README, Paper scale)."""
    cfg = params.launch
    config = accelerate_config or cfg.accelerate_config
    if not Path(config).is_file():
        raise ConfigError(f"launch.accelerate_config: {config} does not exist (the engines are in {ENGINES})")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", str(num_processes),
               "--num_machines", str(cfg.num_machines), "--machine_rank", str(cfg.machine_rank)]
    if cfg.main_process_ip:
        command += ["--main_process_ip", cfg.main_process_ip]
    if cfg.main_process_port:
        command += ["--main_process_port", str(cfg.main_process_port)]
    relayed = [f"--path={name}={Path(path).absolute()}" for name, path in (paths or {}).items()]
    return command + ["-m", "vlm_rlaif", stage, "--params", str(params_file), *relayed]


def stage_function(name: str) -> Callable[..., Any]:
    """The function of Params that stage `name` runs (`STAGES`)."""
    module, function = STAGES[name]
    return getattr(importlib.import_module(f"vlm_rlaif.{module}"), function)


def visible_gpus() -> int:
    """How many GPUs a process launched now would see: CUDA_VISIBLE_DEVICES as it stands (a
    launched process reads it afresh, whatever this one saw at its start), else torch's count."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([device for device in visible.split(",") if device.strip()])
    import torch

    return torch.cuda.device_count()


def launch(params: Params, name: str, num_processes: int, *, accelerate_config: str | None = None, **arguments: Any) -> None:
    """Run stage `name`'s function with `arguments`: in this process when `num_processes` is 1,
    else in `launch_command`'s processes, each given the path arguments (the others, such as
    `progress`, apply only to a run in this process). The processes' output comes through as
    it is written; a process stopped by bad input raises its message here."""
    if num_processes == 1:
        stage_function(name)(params, **arguments)
        return
    gpus = visible_gpus()
    if params.launch.num_machines == 1 and 0 < gpus < num_processes:
        raise ConfigError(f"{name}.num_processes: {num_processes} processes on a machine with {gpus} GPU(s); each process takes a "
                          f"GPU of its own, so ask for at most {gpus}, or run them on CPU with the GPUs hidden (CUDA_VISIBLE_DEVICES=)")
    paths = {key: value for key, value in arguments.items() if isinstance(value, Path)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        io.write_text(path, yaml.safe_dump(dataclasses.asdict(params), sort_keys=False))
        command = launch_command(params, name, num_processes, path, accelerate_config, paths)
        status, errors = _relay(command, f"python -m vlm_rlaif {name}: error: ")
    if errors:
        raise InputError(f"{name} ({num_processes} processes): {errors[0]}")
    if status:
        raise RuntimeError(f"{name}: the {num_processes} processes exited with status {status}; their output is above")


def _relay(command: list[str], marker: str) -> tuple[int, list[str]]:
    """Run `command`, passing its stderr on as it comes (progress bars included); its status,
    and the text after `marker` of each line that holds it."""
    proc = subprocess.Popen(command, stderr=subprocess.PIPE)
    found, line = [], b""
    for chunk in iter(lambda: proc.stderr.read1(65536), b""):
        sys.stderr.write(chunk.decode(errors="replace"))
        sys.stderr.flush()
        *complete, line = (line + chunk).split(b"\n")
        found += [text.split(marker, 1)[1] for text in (c.decode(errors="replace") for c in complete) if marker in text]
    return proc.wait(), found


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
