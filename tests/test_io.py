"""Atomic outputs: a write either lands whole or leaves the old output, and a killed writer's
temp files are cleared by the next one."""

import os
import signal
import subprocess
import sys

import pytest

from vlm_rlaif import io


def test_a_failed_write_keeps_the_old_output_and_leaves_nothing_beside_it(tmp_path):
    path = tmp_path / "metrics.json"
    io.write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_open(path) as f:
            f.write('{"a": 2')
            raise RuntimeError("killed mid-write")
    assert io.read_json(path) == {"a": 1} and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]

    folder = tmp_path / "model"
    with io.atomic_dir(folder) as tmp:
        (tmp / "weights").write_text("old")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(folder) as tmp:
            (tmp / "weights").write_text("half")
            raise RuntimeError("killed mid-save")
    assert (folder / "weights").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "model"]


def test_temp_files_of_a_sigkilled_writer_are_cleared_by_the_next_write(tmp_path):
    script = ("import os, sys, time; from vlm_rlaif import io\n"
              "with io.atomic_dir(sys.argv[1]) as tmp:\n"
              "    (tmp / 'part').write_text('x'); print('ready', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "model")], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    [left] = [p.name for p in tmp_path.iterdir()]
    assert left.startswith(".model.") and left.endswith(".tmp") and not (tmp_path / "model").exists()
    (tmp_path / ".other.abc.tmp").write_text("another output's temp file")
    with io.atomic_dir(tmp_path / "model") as tmp:
        (tmp / "part").write_text("y")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.abc.tmp", "model"]


def test_the_saved_trainer_log_of_a_resumed_run_is_the_uninterrupted_ones():
    first = [{"loss": 1.0, "epoch": 0.5, "step": 1, "train_runtime": 3.2, "train_loss": 5.94}]
    resumed = [{"step": 1, "epoch": 0.5, "loss": 1.0, "train_samples_per_second": 9.0, "train_loss": 0.0}]
    assert repr(io.stable_log(first)) == repr(io.stable_log(resumed)) == "[{'epoch': 0.5, 'loss': 1.0, 'step': 1}]"


def test_a_model_retrained_to_the_same_size_is_another_run(tmp_path):
    model = tmp_path / "reward_model" / "adapter"
    model.mkdir(parents=True)
    (model / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "code.py").write_text("x = 1")

    def stamp() -> str:
        return io.run_stamp([tmp_path / "code.py"], {"lr": 1e-3}, [], [model.parent])

    first = stamp()
    assert stamp() == first
    (model / "adapter_model.safetensors").write_bytes(b"\x01" * 64)  # same name, same size
    assert stamp() != first
