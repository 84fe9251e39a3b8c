"""A tiny project for stage tests (params, a generated world, and once per module its base
model), and a tiny VLM on a few sentences for the tests of model-level code."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

if not torch.cuda.is_available():  # before transformers imports triton: its kernels then run on CPU tensors (vlm_rlaif.kernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vlm_rlaif import base, prepare  # noqa: E402
from vlm_rlaif.config import TinyModelConfig, load_params
from vlm_rlaif.modeling import load_model_and_processor
from vlm_rlaif.synthetic.world import generate_world
from vlm_rlaif.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]

PARAMS = {
    "seed": 1,
    "world": {"seed": 5, "num_sft_videos": 6, "num_rl_videos": 2, "num_eval_videos": 2, "num_frames": 8,
              "frame_size": 32, "judge_examples_per_video": 2, "questions_per_video": 2,
              "eval_questions_per_video": 2},
    "data": {"eval_video_root": "data/videos/synthetic_8frames", "num_frames": 4,
             "curriculum": {"threshold_words": 10, "quantile": None}},
    "base": {"tiny": {"image_size": 32, "patch_size": 8, "vision_hidden_size": 32, "vision_heads": 2,
                      "text_hidden_size": 32, "text_layers": 2, "text_heads": 2, "intermediate_size": 64,
                      "vocab_size": 400, "max_position_embeddings": 512,
                      "pretrain": {"steps": 10, "batch_size": 16}}},
    "sft": {"batch_size": 4, "learning_rate": 1.0e-3, "max_length": 512, "caption_share": 0.2, "judge_share": 0.2,
            "save_steps": 2},
}


def make_project(root: Path, params: dict = PARAMS) -> None:
    """params.yaml, dvc.yaml, the engines' configs and a generated data/ under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copy(ROOT / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(ROOT / "configs", root / "configs", dirs_exist_ok=True)
    generate_world(load_params(root / "params.yaml").world, root / "data")


def split_qa(merged: Path, questions: Path, answers: Path, change=lambda rows: None) -> None:
    """A merged zero-shot QA file written as benchmarks distribute theirs: the questions, and
    the answers (in reverse order, then changed by `change`) joined by question_id."""
    rows = json.loads(merged.read_text())
    answer_rows = [{"answer": r.pop("answer"), "question_id": r["question_id"]} for r in rows[::-1]]
    change(answer_rows)
    questions.parent.mkdir(parents=True, exist_ok=True)
    questions.write_text(json.dumps(rows))
    answers.write_text(json.dumps(answer_rows))


def two_file_zeroshot(root: Path, change=lambda rows: None) -> None:
    """The project's zero-shot set split into eval/test_q.json and eval/test_a.json
    (`split_qa`), named so in params.yaml."""
    folder = root / "data/eval"
    split_qa(folder / "zeroshot_qa.json", folder / "test_q.json", folder / "test_a.json", change)
    params = yaml.safe_load((root / "params.yaml").read_text())
    two_files = {"questions": "eval/test_q.json", "answers": "eval/test_a.json"}
    params["data"] = {**params["data"], "zeroshot_qa_files": {"synthetic": two_files}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A fresh tiny project as the working directory."""
    make_project(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny project with its `prepare` and `base` stages run, shared by a module's tests."""
    root = tmp_path_factory.mktemp("built")
    make_project(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        params = load_params("params.yaml")
        prepare.run(params)
        base.materialise(params, prepare.OUT)
    return root


# Preferences, reward-model and PPO settings small enough for a test to run each in seconds.
PREFERENCES = {"num_prompts": None, "pairs_per_prompt": 1, "temperature": 2.0, "max_new_tokens": 6,
               "num_clips": 3, "caption_max_new_tokens": 4, "min_margin": 0.0, "max_resample": 1,
               "batch_size": 4, "shard_size": 2}
RM = {"lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}, "learning_rate": 1.0e-3,
      "epochs": 2.0, "batch_size": 1, "heldout": 1, "save_steps": 100}
PPO = {"policy_lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}, "learning_rate": 1.0e-3,
       "warmup_steps": 0, "rollout_batch_size": 2, "step_batch_size": 1, "ppo_epochs": 2, "max_new_tokens": 6,
       "save_steps": 1, "policy_init_batch_size": 2}


@pytest.fixture(scope="module")
def trained(built):
    """The built tiny project with a reward model (ppo_rm/) trained on hand-made preferences;
    the base stands in for the SFT model."""
    from vlm_rlaif import reward_model
    from vlm_rlaif.data import write_records
    from vlm_rlaif.preferences import preference_record

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(built)
        prefs = Path("ppo_prefs")
        prefs.mkdir(exist_ok=True)
        judged = hand_judged(built)
        (prefs / "judged.json").write_text(json.dumps(judged))
        write_records(prefs / "preferences.json", [preference_record(r) for r in judged if r["dropped"] is None])
        params = load_params("params.yaml", overrides={"reward_model": RM, "ppo": PPO})
        reward_model.train(params, preferences=prefs, policy=Path("artifacts/base"), out=Path("ppo_rm"), checkpoints=Path("ppo_rm_ckpt"))
    return built, params


def hand_judged(root: Path) -> list[dict]:
    """Judged records as the preferences stage writes them: each RL prompt's reference answer
    against a worse one, the better one preferred; the last pair dropped as inconsistent."""
    judged = []
    for i, prompt in enumerate(json.loads((root / "data" / "RL_data.json").read_text())):
        outputs = [prompt["conversations"][1]["value"], "Nothing happens."]
        if i % 2:
            outputs.reverse()
        reading = {"first_as_a": 0.8, "first_as_b": 0.3, "label_mass": 1.0}
        judged.append(prompt | {
            "output_1": {"value": outputs[0]}, "output_2": {"value": outputs[1]}, "preference": 1 + i % 2, "margin": 0.25,
            "judge": {"context": reading, "no_context": reading}, "context": ["A clip.", "Another clip."], "description": "A video.",
            "dropped": None,
        })
    judged[-1]["dropped"] = "inconsistent"
    return judged


TINY_CORPUS = [
    "The video shows two objects. A red circle moves from left to right. A blue square stays still.",
    "What colour is the triangle? Green. How many objects are in the video? Three.",
    "Describe the video in detail. First, the yellow star enters. Then the green cross leaves.",
    "Response A: Green. Response B: Three. Which response is better? Answer with one letter, A or B.",
] * 10
TINY_VLM = TinyModelConfig(
    image_size=32, patch_size=8, vision_hidden_size=32, vision_layers=1, vision_heads=2, text_hidden_size=32,
    text_layers=2, text_heads=2, intermediate_size=64, vocab_size=400, max_position_embeddings=512,
)


@pytest.fixture
def cpu_processes(monkeypatch):
    """Processes the test launches run on CPU (gloo) on any machine: GPUs hidden from them."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory):
    """(model, processor) of a tiny LLaVA-NeXT-Video on TINY_CORPUS, built once per session."""
    path = build_tiny_model(TINY_VLM, TINY_CORPUS, tmp_path_factory.mktemp("tiny_vlm") / "model", seed=0)
    return load_model_and_processor(path)


def stage_env(**extra: str) -> dict:
    """The environment a stage runs in under test: offline, quiet tokenizers."""
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **extra}


def kill_when(command: list[str], cwd: Path, target: Path, log: Path, env: dict | None = None, timeout: float = 300) -> None:
    """Run `command` in `cwd`, SIGKILL it and every process it started as soon as `target`
    exists (a checkpoint it wrote), and check it was still running then: the rerun after it has
    real work to resume."""
    import os
    import signal
    import subprocess
    import time

    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=cwd, env=env or stage_env(OMP_NUM_THREADS="1"), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.time() + timeout
        while not target.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"{' '.join(command)} ended before {target} appeared:\n{log.read_text()[-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def resumed_step(stderr: str) -> int | None:
    """The step of the checkpoint a stage said it resumed from (io.report_resume), None if it did not."""
    import re

    found = re.findall(r"resuming from \S*?(\d+)\s*$", stderr, flags=re.MULTILINE)
    return int(found[-1]) if found else None


def serving(server):
    """Serve `server` (an http.server on 127.0.0.1) from a thread for the body of a fixture:
    `yield from serving(server)`. Its `stop` event, if any, releases handlers that wait."""
    import threading

    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield server
    if hasattr(server, "stop"):
        server.stop.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)

