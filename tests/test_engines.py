"""Multi-process training: the engines' accelerate configs, the launch command, the moments
and gradients PPO shares between processes, and two CPU processes (gloo) running the reward
model and PPO stages as their notebooks do (the SFT stage's is in tests/test_sft.py)."""

import json
import math
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.commands.config.config_args import load_config_from_file
from safetensors.torch import load_file

from vlm_rlaif import ppo, ppo_math, preferences, reward_model, stage
from vlm_rlaif.config import ConfigError, load_params
from vlm_rlaif.data import write_records
from vlm_rlaif.errors import InputError
from vlm_rlaif.preferences import preference_record

from conftest import PPO, PREFERENCES, RM, ROOT, hand_judged

pytestmark = pytest.mark.usefixtures("cpu_processes")

ENGINES = {"ddp": "MULTI_GPU", "zero2": "DEEPSPEED", "zero3": "DEEPSPEED", "fsdp": "FSDP"}


@pytest.mark.parametrize("engine", ENGINES)
def test_every_engine_config_is_one_accelerate_reads(engine):
    config = load_config_from_file(str(ROOT / stage.ENGINES / f"{engine}.yaml"))
    assert config.distributed_type.value == ENGINES[engine]
    if engine.startswith("zero"):
        assert config.deepspeed_config["zero_stage"] == int(engine[-1])
    if engine == "fsdp":  # frozen base weights beside trainable adapters
        assert config.fsdp_config["fsdp_use_orig_params"] and config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"


def test_the_launch_command_carries_processes_machines_and_engine(monkeypatch):
    monkeypatch.chdir(ROOT)
    params = load_params("params.yaml", overrides={"launch": {"accelerate_config": "configs/accelerate/zero3.yaml", "num_machines": 2,
                                                              "machine_rank": 1, "main_process_ip": "10.0.0.1", "main_process_port": 29555}})
    command = stage.launch_command(params, "sft", 16, "p.yaml")
    flags = dict(zip(command[3:-5:2], command[4:-5:2]))
    assert flags == {"--config_file": "configs/accelerate/zero3.yaml", "--num_processes": "16", "--num_machines": "2",
                     "--machine_rank": "1", "--main_process_ip": "10.0.0.1", "--main_process_port": "29555"}
    assert command[-5:] == ["-m", "vlm_rlaif", "sft", "--params", "p.yaml"]
    relayed = stage.launch_command(params, "reward_model", 2, "p.yaml", paths={"out": Path("rm_out")})
    assert relayed[-6:] == ["-m", "vlm_rlaif", "reward_model", "--params", "p.yaml", f"--path=out={ROOT / 'rm_out'}"]
    assert "configs/accelerate/ddp.yaml" in stage.launch_command(params, "ppo", 2, "p.yaml", accelerate_config="configs/accelerate/ddp.yaml")

    with pytest.raises(ConfigError, match=r"launch\.accelerate_config: configs/accelerate/zero4\.yaml does not exist"):
        stage.launch_command(load_params("params.yaml", overrides={"launch": {"accelerate_config": "configs/accelerate/zero4.yaml"}}), "sft", 2, "p")
    with pytest.raises(ConfigError, match=r"launch\.main_process_ip"):
        load_params("params.yaml", overrides={"launch": {"num_machines": 2}})
    with pytest.raises(ConfigError, match=r"launch\.machine_rank"):
        load_params("params.yaml", overrides={"launch": {"num_machines": 2, "machine_rank": 2, "main_process_ip": "h"}})
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # one GPU: two processes cannot each take one
    with pytest.raises(ConfigError, match=r"sft\.num_processes: 2 processes on a machine with 1 GPU"):
        stage.launch(load_params("params.yaml"), "sft", 2)
    with pytest.raises(ConfigError, match=r"ppo\.num_processes: must divide step_batch_size"):
        load_params("params.yaml", overrides={"ppo": {"rollout_batch_size": 6, "step_batch_size": 3, "num_processes": 2}})


def _share_moments_and_gradients(rank: int, init: str, rows: torch.Tensor, mask: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a forked process inherits the test process's
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    accelerator = Accelerator(cpu=True)
    assert accelerator.num_processes == 2
    whitened = ppo_math.whiten(rows[rank::2], mask[rank::2])
    weight = torch.nn.Parameter(torch.zeros(3))
    weight.grad = torch.full((3,), float(rank + 1))
    unused = torch.nn.Parameter(torch.zeros(2))  # no gradient in this process: counts as zero
    ppo.average_gradients([weight, unused], accelerator)
    stats = ppo.mean_over_processes({"reward": float(rank), "kl": 2.0 * rank}, accelerator)
    torch.save({"whitened": whitened, "grad": weight.grad, "unused": unused.grad, "stats": stats}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_whiten_over_the_whole_rollout_and_average_gradients(tmp_path):
    rows, mask = torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), torch.ones(6, 5)
    mask[1, 3:] = mask[4, 1:] = 0
    mp.start_processes(_share_moments_and_gradients, args=(f"file://{tmp_path}/store", rows, mask, str(tmp_path)), nprocs=2, start_method="fork")
    whole = ppo_math.whiten(rows, mask)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["whitened"], whole[rank::2])
        torch.testing.assert_close(got["grad"], torch.full((3,), 1.5))
        torch.testing.assert_close(got["unused"], torch.zeros(2))
        assert got["stats"] == {"reward": 0.5, "kl": 1.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_project(trained):
    """The trained tiny project laid out as the notebooks' default paths expect: the base
    stands in for the SFT model, hand-made preferences for the preference stage's."""
    root, _ = trained
    (root / "artifacts/sft").symlink_to(root / "artifacts/base", target_is_directory=True)
    prefs = root / reward_model.PREFERENCES
    prefs.mkdir(parents=True)
    judged = hand_judged(root)
    (prefs / "judged.json").write_text(json.dumps(judged))
    write_records(prefs / "preferences.json", [preference_record(r) for r in judged if r["dropped"] is None])
    shutil.copytree(root / "ppo_rm", root / reward_model.OUT)
    return root


def _two_process_params(root: Path, monkeypatch, **sections):
    monkeypatch.chdir(root)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return load_params("params.yaml", overrides={"reward_model": RM, "ppo": PPO, "launch": {"main_process_port": _free_port()}, **sections})


def test_two_processes_train_the_reward_model(two_process_project, monkeypatch):
    root = two_process_project
    params = _two_process_params(root, monkeypatch, reward_model={**RM, "num_processes": 2})
    rewards = reward_model.run(params, progress=False)
    split = json.loads((root / reward_model.OUT / "split.json").read_text())
    assert split["total_steps"] == math.ceil(RM["epochs"] * math.ceil(len(split["train"]) / (RM["batch_size"] * 2)))
    judged = json.loads((root / reward_model.PREFERENCES / "judged.json").read_text())
    assert len(rewards) == len(judged) and all(math.isfinite(r) for pair in rewards for r in pair)


def test_two_processes_run_ppo_and_save_one_policy(two_process_project, monkeypatch):
    root = two_process_project
    settings = {**PPO, "rollout_batch_size": 4, "step_batch_size": 2, "num_processes": 2, "seeds": [3]}
    runs = ppo.run(_two_process_params(root, monkeypatch, ppo=settings))
    assert runs == [ppo.OUT / "seed-3"]
    log = json.loads((root / runs[0] / ppo.LOG_FILE).read_text())
    assert [e["step"] for e in log] == [1] and all(math.isfinite(v) for v in log[0].values())
    # one rollout of 4 prompts, two per process; 2 PPO epochs of 2 minibatches (a prompt per process each)
    assert json.loads((root / runs[0] / "run.json").read_text())["optimizer_steps"] == 4
    adapter = load_file(root / runs[0] / "policy/adapter_model.safetensors")
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # trained from its zero start


def test_launch_runs_the_stage_function_here_or_relays_its_paths(monkeypatch, tmp_path):
    """One process calls the stage's function with every argument; more relay the paths only."""
    monkeypatch.chdir(ROOT)
    params = load_params("params.yaml")
    called = []
    monkeypatch.setattr(preferences, "judge_prompts", lambda params, **kwargs: called.append(kwargs))
    stage.launch(params, "preferences", 1, progress=False, out=tmp_path)
    assert called == [{"progress": False, "out": tmp_path}]
    commands = []
    monkeypatch.setattr(stage, "launch_command", lambda *args: commands.append(args) or [sys.executable, "-c", "pass"])
    stage.launch(params, "preferences", 2, progress=False, out=tmp_path)
    assert called == [{"progress": False, "out": tmp_path}] and commands[0][1:3] == ("preferences", 2)
    assert commands[0][-1] == {"out": tmp_path}


def test_a_process_stopped_by_bad_input_names_it_in_the_launching_process(monkeypatch, capfd):
    """What `python -m vlm_rlaif` prints for bad input, relayed from a launched process, becomes the launcher's error."""
    monkeypatch.chdir(ROOT)
    said = "import sys; print('step 1', file=sys.stderr); print('python -m vlm_rlaif ppo: error: ppo.query_length 1: no RL prompt', file=sys.stderr); sys.exit(1)"
    monkeypatch.setattr(stage, "launch_command", lambda *args: [sys.executable, "-c", said])
    with pytest.raises(InputError, match=r"^ppo \(2 processes\): ppo.query_length 1: no RL prompt$"):
        stage.launch(load_params("params.yaml"), "ppo", 2)
    assert "step 1" in capfd.readouterr().err  # the processes' output came through
    monkeypatch.setattr(stage, "launch_command", lambda *args: [sys.executable, "-c", "raise SystemExit(7)"])
    with pytest.raises(RuntimeError, match=r"ppo: the 2 processes exited with status 7"):
        stage.launch(load_params("params.yaml"), "ppo", 2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this process's run would take the GPU, the launched pair the CPU")
def test_two_processes_judge_what_one_process_judges(two_process_project, monkeypatch, tmp_path):
    """Each process judges every other shard under the shard's own seed: the same pairs as one process."""
    root = two_process_project
    settings = {**PREFERENCES, "num_prompts": 4, "shard_size": 1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each launched process runs (OMP_NUM_THREADS=1): the same float sums
    try:
        one = preferences.run(_two_process_params(root, monkeypatch, preferences=settings), out=tmp_path / "one",
                              shards=tmp_path / "one_shards", progress=False)
    finally:
        torch.set_num_threads(threads)
    two = preferences.run(_two_process_params(root, monkeypatch, preferences={**settings, "num_processes": 2}),
                          out=tmp_path / "two", shards=tmp_path / "two_shards")  # every process writes where the caller asked
    assert one == two and two["prompts"] == 4
    assert (tmp_path / "two" / "judged.json").read_text() == (tmp_path / "one" / "judged.json").read_text()
    assert not (root / preferences.OUT / "counts.json").exists()  # the default folder holds only the hand-made pairs


def test_a_path_the_stage_does_not_take_is_a_usage_error(capsys):
    from vlm_rlaif.__main__ import main

    for given, said in (("outdir=x", "--path outdir: the preferences stage takes ["), ("out", "--path 'out': expected NAME=PATH")):
        with pytest.raises(SystemExit) as stopped:
            main(["preferences", f"--path={given}"])
        assert stopped.value.code == 2 and said in capsys.readouterr().err

