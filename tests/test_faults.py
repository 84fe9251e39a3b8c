"""SIGKILL at chosen points of every training and generation stage, then a rerun: it resumes
from what was finished, never shows a half-written output, and ends with exactly what an
uninterrupted run writes.

Each stage runs as `python -m vlm_rlaif <stage> --params params.yaml` does (its `main`), in a
process forked from a server that imported the package once: a run costs its work, not a fresh
interpreter's imports. A kill comes from outside (as soon as a file appears, or after a delay
drawn from a seeded generator) or from inside at an exact point: a `Fault` makes the stage's
process SIGKILL itself when it reaches a named call on a named path.
"""

from __future__ import annotations

import importlib
import json
import multiprocessing
import multiprocessing.forkserver
import os
import random
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from conftest import PARAMS, PPO, PREFERENCES, RM, hand_judged, make_project, resumed_step

# PARAMS' sft: 22 examples in batches of 4, so 6 steps and checkpoints 2, 4, 6
SETTINGS = PARAMS | {
    "preferences": PREFERENCES,  # 4 RL prompts in 2 shards
    "reward_model": RM | {"epochs": 3.0, "save_steps": 2},  # 6 steps, checkpoints 2, 4, 6
    "ppo": PPO | {"rollout_batch_size": 1, "ppo_epochs": 1},  # 4 rollout batches, a checkpoint after each
    "evaluate": {"max_new_tokens": 10, "batch_size": 4},
}
STAGE_MODULES = ["vlm_rlaif.stage", *(f"vlm_rlaif.{m}" for m in ("prepare", "base", "sft", "preferences", "reward_model", "ppo", "evaluate"))]
STAGE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
TEMP = re.compile(r"^\..+\.tmp$")  # io.atomic_open / atomic_dir: a temp file or folder beside its target
CHECKPOINT = re.compile(r"^checkpoint-\d+$")  # a Trainer checkpoint: complete once trainer_state.json is in it
TIMEOUT = 300.0
Forks = multiprocessing.context.ForkServerContext


# --------------------------------------------------------------------------- stage processes


@dataclass(frozen=True)
class Fault:
    """Where a stage's process SIGKILLs itself: at a call of `function` ("module:attribute.path")
    with an argument that is a path ending as the regex `path` says: `at` "before" the call runs,
    "after" it returned, or "inside" it, once it has removed its first file."""

    function: str
    path: str
    at: str = "before"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(fault: Fault) -> None:
    """Replace `fault.function` in this process by one that dies where `fault` says."""
    module, _, attribute = fault.function.partition(":")
    *parents, name = attribute.split(".")
    owner = importlib.import_module(module)
    for parent in parents:
        owner = getattr(owner, parent)
    real = getattr(owner, name)
    pattern = re.compile(f"(?:^|/){fault.path}$")

    def armed(*args: object, **kwargs: object) -> object:
        if not any(isinstance(a, (str, os.PathLike)) and pattern.search(os.fspath(a)) for a in args):
            return real(*args, **kwargs)
        if fault.at == "before":
            _die()
        if fault.at == "inside":
            unlink = os.unlink
            os.unlink = lambda *a, **k: (unlink(*a, **k), _die())
        result = real(*args, **kwargs)
        if fault.at == "after":
            _die()
        return result

    setattr(owner, name, armed)


def _stage_process(root: str, stage: str, log: str, fault: Fault | None) -> None:
    """`python -m vlm_rlaif <stage> --params params.yaml` in `root`, its output to `log`."""
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.chdir(root)
    if fault is not None:
        _arm(fault)
    from vlm_rlaif.__main__ import main

    sys.exit(main([stage, "--params", "params.yaml"]))


@pytest.fixture(scope="module")
def forks() -> Iterator[Forks]:
    """The fork server the stages run from, the stage modules imported in it once."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([*STAGE_MODULES, __name__])
    with pytest.MonkeyPatch.context() as mp:  # its children's environment is the server's
        for key, value in STAGE_ENV.items():
            mp.setenv(key, value)
        multiprocessing.forkserver.ensure_running()
    yield context
    multiprocessing.forkserver._forkserver._stop()  # its imports' memory back for the modules after this one


def _start(forks: Forks, root: Path, stage: str, fault: Fault | None = None) -> tuple[multiprocessing.Process, Path]:
    log = root / f"{stage}.log"
    process = forks.Process(target=_stage_process, args=(str(root), stage, str(log), fault))
    process.start()
    return process, log


def _run(forks: Forks, root: Path, stage: str) -> str:
    """Run the stage in `root` to the end; its log (stdout and stderr)."""
    process, log = _start(forks, root, stage)
    process.join(TIMEOUT)
    assert process.exitcode == 0, f"{stage} in {root} ended with {process.exitcode}:\n{log.read_text()[-3000:]}"
    return log.read_text()


def _killed(forks: Forks, root: Path, stage: str, *, fault: Fault | None = None, when: Callable[[], bool] | None = None,
            after: float | None = None) -> str:
    """Run the stage in `root` and SIGKILL it: where `fault` says, as soon as `when()` holds, or
    `after` seconds if it still runs then; its log. A fault or a `when` it never reaches fails."""
    process, log = _start(forks, root, stage, fault)
    if fault is None:
        deadline = time.monotonic() + (TIMEOUT if after is None else after)
        while process.is_alive() and time.monotonic() < deadline and not (when is not None and when()):
            time.sleep(0.005)
        process.kill()
    process.join(TIMEOUT)
    assert when is None or when(), f"{stage} was killed before the point to kill at:\n{log.read_text()[-3000:]}"
    ended = (-signal.SIGKILL,) if after is None else (-signal.SIGKILL, 0)  # a late random kill finds it done
    assert process.exitcode in ended, f"{stage} ended with {process.exitcode}, not at the point to kill at:\n{log.read_text()[-3000:]}"
    return log.read_text()


# --------------------------------------------------------------------------- projects and outputs


class World(NamedTuple):
    root: Path  # a project with its prepare and base stages run
    base_seconds: float  # how long its base stage took


@pytest.fixture(scope="module")
def world(tmp_path_factory, forks: Forks) -> World:
    """A tiny project with its prepare and base stages run: the base of every other project here."""
    root = tmp_path_factory.mktemp("world")
    make_project(root, SETTINGS)
    _run(forks, root, "prepare")
    start = time.monotonic()
    _run(forks, root, "base")
    return World(root, time.monotonic() - start)


def _project(world: World, root: Path, folders: dict[str, Path]) -> Path:
    """A project in `root` on the world's data and prepared sets (linked), with a copy of each
    folder of `folders` (its place in the project: the source)."""
    (root / "artifacts").mkdir(parents=True)
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(world.root / name, root / name)
    for name in ("data", "artifacts/prepare"):
        (root / name).symlink_to(world.root / name, target_is_directory=True)
    for name, source in folders.items():
        shutil.copytree(source, root / name)
    return root


def _files(folder: Path) -> list[str]:
    """Every file under `folder`, relative, symbolic links not followed."""
    return sorted(str(Path(d, f).relative_to(folder)) for d, _, files in os.walk(folder) for f in files)


def _assert_same(got: Path, want: Path) -> None:
    """`got` holds the files of `want` with the same bytes; weights the same tensors to float
    rounding. Every file that differs is named."""
    assert _files(got) == _files(want)
    differ = []
    for name in _files(want):
        if name.endswith(".safetensors"):
            a, b = load_file(got / name), load_file(want / name)
            if a.keys() != b.keys() or any(not torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5) for k in b):
                differ.append(name)
        elif (got / name).read_bytes() != (want / name).read_bytes():
            differ.append(name)
    assert not differ, f"unlike an uninterrupted run's: {differ}"


def _leftovers(root: Path) -> list[str]:
    """The temp files and folders a killed writer left under root/artifacts."""
    return sorted(str(Path(d, n).relative_to(root)) for d, dirs, files in os.walk(root / "artifacts") for n in dirs + files if TEMP.match(n))


def _assert_nothing_half_written(root: Path) -> None:
    """Every output under root/artifacts reads whole (JSON parses, weights load). Temp files and
    checkpoints their writer has not finished (no marker file) are not outputs: a rerun passes over them."""
    broken = []
    for folder, dirs, files in os.walk(root / "artifacts"):
        dirs[:] = [d for d in dirs if not TEMP.match(d) and not (CHECKPOINT.match(d) and not Path(folder, d, "trainer_state.json").is_file())]
        for name in files:
            path = Path(folder, name)
            try:
                if name.endswith(".json") and not TEMP.match(name):
                    json.loads(path.read_text())
                elif name.endswith(".safetensors"):
                    load_file(path)
            except Exception as e:  # whatever fails to read it, it is not whole
                broken.append(f"{path.relative_to(root)}: {e}")
    assert not broken, broken


def _stamps(folder: Path, pattern: str) -> dict[str, tuple[int, bytes]]:
    """(mtime_ns, bytes) of each file of `folder` matching `pattern`: a rewrite changes the first."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob(pattern))}


def _kept(before: dict[str, tuple[int, bytes]], now: dict[str, tuple[int, bytes]]) -> bool:
    """Every file of `before` is in `now`, untouched."""
    return all(now.get(name) == stamp for name, stamp in before.items())


def _whole_json(path: Path) -> bool:
    """`path` exists and parses: its writer finished it."""
    try:
        json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return False
    return True


def _delays(seed: int, seconds: float, n: int) -> list[float]:
    """`n` kill delays within a run of `seconds`, the same on every test run."""
    draw = random.Random(seed)
    return [draw.uniform(0.0, seconds) for _ in range(n)]


# --------------------------------------------------------------------------- base


def test_a_killed_base_build_shows_no_half_built_model_and_its_rerun_builds_the_uninterrupted_one(forks, world, tmp_path):
    project = _project(world, tmp_path / "project", {})
    out, whole = project / "artifacts/base", world.root / "artifacts/base"
    _killed(forks, project, "base", fault=Fault("os:replace", "artifacts/base"))  # every file written, not yet in place
    assert not out.exists() and _leftovers(project)
    for delay in _delays(1, world.base_seconds, 2):
        _killed(forks, project, "base", after=delay)
        assert not out.exists() or _files(out) == _files(whole)
        _assert_nothing_half_written(project)
    _run(forks, project, "base")
    assert not _leftovers(project)
    _assert_same(out, whole)


def test_a_rebuild_killed_while_replacing_the_previous_base_leaves_that_one_whole_or_none(forks, world, tmp_path):
    whole = world.root / "artifacts/base"
    project = _project(world, tmp_path / "project", {"artifacts/base": whole})
    out = project / "artifacts/base"
    # inside the removal of the previous base, in place or moved aside first
    _killed(forks, project, "base", fault=Fault("shutil:rmtree", r"artifacts/(?:base|\.base\.[^/]+\.tmp)", at="inside"))
    assert not out.exists() or _files(out) == _files(whole), f"a half-removed base is left in place: {_files(out)}"
    _run(forks, project, "base")
    assert not _leftovers(project)
    _assert_same(out, whole)


# --------------------------------------------------------------------------- sft


@pytest.fixture(scope="module")
def sft_reference(forks: Forks, world: World, tmp_path_factory) -> Path:
    """An uninterrupted SFT run."""
    project = _project(world, tmp_path_factory.mktemp("sft_reference"), {"artifacts/base": world.root / "artifacts/base"})
    _run(forks, project, "sft")
    return project


def test_sft_killed_inside_a_checkpoint_after_one_and_while_saving_resumes_to_the_uninterrupted_model(forks, world, sft_reference, tmp_path):
    project = _project(world, tmp_path / "project", {"artifacts/base": world.root / "artifacts/base"})
    checkpoints, out = project / "artifacts/checkpoints/sft", project / "artifacts/sft"

    # while checkpoint-2 is written: its weights and optimizer are there, trainer_state.json not yet
    _killed(forks, project, "sft", fault=Fault("transformers.trainer_callback:TrainerState.save_to_json", r"checkpoint-2/trainer_state\.json"))
    assert (checkpoints / "checkpoint-2/model.safetensors").is_file() and not (checkpoints / "checkpoint-2/trainer_state.json").exists()
    _assert_nothing_half_written(project)
    # right after checkpoint-4 is complete; the incomplete checkpoint-2 was passed over
    log = _killed(forks, project, "sft", when=lambda: _whole_json(checkpoints / "checkpoint-4/trainer_state.json"))
    assert resumed_step(log) is None
    _assert_nothing_half_written(project)
    # with every step done, while the model is put in place
    log = _killed(forks, project, "sft", fault=Fault("os:replace", "artifacts/sft"))
    assert resumed_step(log) == 4 and not out.exists()
    _assert_nothing_half_written(project)

    assert resumed_step(_run(forks, project, "sft")) == 6
    assert not _leftovers(project)
    _assert_same(out, sft_reference / "artifacts/sft")


def test_sft_killed_while_writing_a_checkpoints_trainer_state_resumes_from_the_checkpoint_before(forks, world, sft_reference, tmp_path):
    project = _project(world, tmp_path / "project", {"artifacts/base": world.root / "artifacts/base"})
    checkpoints = project / "artifacts/checkpoints/sft"
    # checkpoint-4's trainer_state.json opened, nothing written to it yet
    _killed(forks, project, "sft", fault=Fault("builtins:open", r"checkpoint-4/trainer_state\.json", at="after"))
    assert (checkpoints / "checkpoint-4/trainer_state.json").read_text() == "" and _whole_json(checkpoints / "checkpoint-2/trainer_state.json")

    assert resumed_step(_run(forks, project, "sft")) == 2
    assert not _leftovers(project)
    _assert_same(project / "artifacts/sft", sft_reference / "artifacts/sft")


# --------------------------------------------------------------------------- preferences


def test_preferences_killed_after_a_shard_inside_one_anywhere_and_while_writing_keep_finished_shards_and_end_the_same(
    forks, world, tmp_path
):
    sft = {"artifacts/sft": world.root / "artifacts/base"}
    reference = _project(world, tmp_path / "whole", sft)
    start = time.monotonic()
    _run(forks, reference, "preferences")
    seconds = time.monotonic() - start
    project = _project(world, tmp_path / "project", sft)
    shards, out = project / "artifacts/checkpoints/preferences", project / "artifacts/preferences"
    assert len(_stamps(reference / "artifacts/checkpoints/preferences", "shard_*.json")) == 2

    _killed(forks, project, "preferences", when=(shards / "shard_00000.json").is_file)
    finished = _stamps(shards, "shard_*.json")
    assert list(finished) == ["shard_00000.json"]
    # with the second shard's file written but not yet in place
    _killed(forks, project, "preferences", fault=Fault("os:replace", r"shard_00001\.json"))
    assert _kept(finished, _stamps(shards, "shard_*.json")) and not (shards / "shard_00001.json").exists()
    for delay in _delays(2, seconds, 2):
        _killed(forks, project, "preferences", after=delay)
        assert _kept(finished, _stamps(shards, "shard_*.json"))
        _assert_nothing_half_written(project)
        finished = _stamps(shards, "shard_*.json")
    # every shard done, while judged.json is put in place
    _killed(forks, project, "preferences", fault=Fault("os:replace", r"artifacts/preferences/judged\.json"))
    assert _kept(finished, _stamps(shards, "shard_*.json"))
    _assert_nothing_half_written(project)
    finished = _stamps(shards, "shard_*.json")

    _run(forks, project, "preferences")
    assert _kept(finished, _stamps(shards, "shard_*.json"))
    assert not _leftovers(project)
    _assert_same(out, reference / "artifacts/preferences")
    _assert_same(shards, reference / "artifacts/checkpoints/preferences")


# --------------------------------------------------------------------------- reward model and PPO


@pytest.fixture(scope="module")
def reward_reference(forks, world, tmp_path_factory) -> Path:
    """An uninterrupted reward-model run on hand-made preferences, the base as the SFT model."""
    from vlm_rlaif.data import write_records
    from vlm_rlaif.preferences import preference_record

    project = _project(world, tmp_path_factory.mktemp("reward_reference"), {"artifacts/sft": world.root / "artifacts/base"})
    preferences = project / "artifacts/preferences"
    preferences.mkdir()
    judged = hand_judged(world.root)
    (preferences / "judged.json").write_text(json.dumps(judged))
    write_records(preferences / "preferences.json", [preference_record(r) for r in judged if r["dropped"] is None])
    _run(forks, project, "reward_model")
    return project


@pytest.fixture(scope="module")
def ppo_reference(forks, world, reward_reference, tmp_path_factory) -> Path:
    """An uninterrupted PPO run (seed 0) against the reference reward model."""
    project = _project(world, tmp_path_factory.mktemp("ppo_reference"), {
        "artifacts/sft": world.root / "artifacts/base", "artifacts/reward_model": reward_reference / "artifacts/reward_model"})
    _run(forks, project, "ppo")
    return project


def test_reward_model_killed_inside_a_checkpoint_and_while_saving_resumes_to_the_uninterrupted_model(forks, world, reward_reference, tmp_path):
    project = _project(world, tmp_path / "project", {
        name: reward_reference / name for name in ("artifacts/sft", "artifacts/preferences")})
    checkpoints, out = project / "artifacts/checkpoints/reward_model", project / "artifacts/reward_model"

    _killed(forks, project, "reward_model",
            fault=Fault("transformers.trainer_callback:TrainerState.save_to_json", r"checkpoint-4/trainer_state\.json"))
    assert (checkpoints / "checkpoint-2/trainer_state.json").is_file() and not (checkpoints / "checkpoint-4/trainer_state.json").exists()
    assert list((checkpoints / "checkpoint-4").iterdir())  # its adapter and optimizer are written
    _assert_nothing_half_written(project)
    log = _killed(forks, project, "reward_model", fault=Fault("os:replace", "artifacts/reward_model"))
    assert resumed_step(log) == 2 and not out.exists()
    _assert_nothing_half_written(project)

    assert resumed_step(_run(forks, project, "reward_model")) == 6
    assert not _leftovers(project)
    _assert_same(out, reward_reference / "artifacts/reward_model")


def test_ppo_killed_inside_a_step_save_after_a_step_and_while_saving_resumes_to_the_uninterrupted_policy(
    forks, world, reward_reference, ppo_reference, tmp_path
):
    project = _project(world, tmp_path / "project", {
        name: reward_reference / name for name in ("artifacts/sft", "artifacts/reward_model")})
    steps, out = project / "artifacts/checkpoints/ppo/seed-0", project / "artifacts/ppo/seed-0"

    # step 2's adapters and optimizer are in its temp folder, its state.json not yet
    _killed(forks, project, "ppo", fault=Fault("vlm_rlaif.io:write_json", r"\.step-2\.[^/]+\.tmp/state\.json"))
    assert (steps / "step-1/state.json").is_file() and not (steps / "step-2").exists() and _leftovers(project)
    _assert_nothing_half_written(project)
    log = _killed(forks, project, "ppo", when=(steps / "step-3/state.json").is_file)
    assert resumed_step(log) == 1
    _assert_nothing_half_written(project)
    log = _killed(forks, project, "ppo", fault=Fault("os:replace", "artifacts/ppo/seed-0"))
    assert resumed_step(log) == 3 and not out.exists()
    _assert_nothing_half_written(project)

    assert resumed_step(_run(forks, project, "ppo")) == 4
    assert not _leftovers(project)
    _assert_same(out, ppo_reference / "artifacts/ppo/seed-0")


# --------------------------------------------------------------------------- evaluate


def test_evaluate_killed_after_its_first_answers_anywhere_and_while_writing_keeps_every_answer_and_ends_the_same(
    forks, world, ppo_reference, tmp_path
):
    models = {"artifacts/base": world.root / "artifacts/base", "artifacts/sft": world.root / "artifacts/base",
              "artifacts/ppo/seed-0": ppo_reference / "artifacts/ppo/seed-0"}
    reference = _project(world, tmp_path / "whole", models)
    start = time.monotonic()
    _run(forks, reference, "evaluate")
    seconds = time.monotonic() - start
    project = _project(world, tmp_path / "project", models)
    answers, out = project / "artifacts/checkpoints/evaluate", project / "artifacts/evaluate"

    def answered() -> dict[str, tuple[int, bytes]]:
        return {name: stamp for name, stamp in _stamps(answers, "*/seed-*/*.json").items() if not name.endswith("/run.json")}

    _killed(forks, project, "evaluate", when=lambda: bool(answered()))
    finished = answered()
    assert finished and not out.exists()
    for delay in _delays(3, seconds, 2):
        _killed(forks, project, "evaluate", after=delay)
        assert _kept(finished, answered())
        _assert_nothing_half_written(project)
        finished = answered()
    _killed(forks, project, "evaluate", fault=Fault("os:replace", "artifacts/evaluate"))
    assert _kept(finished, answered())
    _assert_nothing_half_written(project)
    finished = answered()

    _run(forks, project, "evaluate")
    assert _kept(finished, answered())
    assert not _leftovers(project)
    _assert_same(out, reference / "artifacts/evaluate")
    _assert_same(answers, reference / "artifacts/checkpoints/evaluate")
