"""The evaluate and analysis stages on the tiny project: real answers from the tiny base, SFT and
PPO-trained RLAIF models, graded by the oracle or by an LLM judge behind a real local server."""

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vlm_rlaif import analysis, evaluate, io, ppo
from vlm_rlaif.benchmark import DIMENSIONS
from vlm_rlaif.config import ConfigError, load_params
from vlm_rlaif.convert import convert
from vlm_rlaif.evaluation import oracle_description_scores

from conftest import PPO
from test_convert import clip_folder, original_checkpoint

EVALUATE = {"max_new_tokens": 10, "batch_size": 4}


@pytest.fixture(scope="module")
def policies(trained):
    """The tiny project with an SFT model (the base stands in), a reward model, and two PPO
    policies (seeds 0 and 1) trained against it."""
    root, _ = trained
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        shutil.copytree("artifacts/base", "artifacts/sft", dirs_exist_ok=True)
        shutil.copytree("ppo_rm", "artifacts/reward_model", dirs_exist_ok=True)
        params = load_params("params.yaml", overrides={"ppo": PPO | {"seeds": [0, 1]}, "evaluate": EVALUATE})
        ppo.train_seeds(params, progress=False)
    return root, params


@pytest.fixture(scope="module")
def evaluated(policies):
    root, params = policies
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        metrics = evaluate.run(params, progress=False)
    return root, params, metrics


def test_every_model_and_seed_is_graded_on_every_set_by_the_oracle(evaluated, monkeypatch):
    root, params, metrics = evaluated
    monkeypatch.chdir(root)
    assert metrics["judge"] == ["oracle"] and set(metrics["models"]) == {"base", "sft", "rlaif"}
    scenes = io.read_json("artifacts/prepare/scenes.json")
    for model, stats in metrics["models"].items():
        assert set(stats["seeds"]) == {0, 1}
        for seed, row in stats["seeds"].items():
            assert all(0.0 <= row[d] <= 5.0 for d in (*DIMENSIONS, "mean")) and 0.0 <= row["qa_synthetic_accuracy"] <= 1.0
            written = evaluate.read_judged(model, seed)
            assert {r["judge"] for records in written["judged"].values() for r in records} == {"oracle"}
            answers = [r["prediction"] for r in written["judged"]["generic"]]
            facts = oracle_description_scores(scenes, [_generic(r) for r in written["judged"]["generic"]], answers)
            assert row["description_precision"] == round(facts["precision"], 4)  # the metric is the oracle's count of these answers
            assert row["correctness"] == round(5 * facts["precision"], 4)
        assert stats["mean"]["mean"] == pytest.approx(sum(r["mean"] for r in stats["seeds"].values()) / 2, abs=1e-4)
    rlaif = [evaluate.read_judged("rlaif", s)["judged"]["generic"] for s in (0, 1)]
    assert [r["prediction"] for r in rlaif[0]] != [r["prediction"] for r in rlaif[1]]  # two policies, two seeds
    target = metrics["target"]
    assert target["metric"] == evaluate.TARGET and (target["seeds"], target["questions"]) == (2, len(rlaif[0]))
    assert target["gain"] == pytest.approx(target["rlaif"] - target["sft"], abs=1e-4)
    assert target["interval"][0] <= target["gain"] <= target["interval"][1]
    assert target["met"] == (target["interval"][0] > 0 and target["measures"]["f1"]["gain"] >= 0)
    assert target["worlds"] == {"5": target["met"]} and metrics["worlds"] == {}
    words = [len(r["prediction"].split()) for r in rlaif[0]]
    assert metrics["models"]["rlaif"]["seeds"][0]["description_words"] == pytest.approx(sum(words) / len(words), abs=1e-4)


def model_loads(monkeypatch) -> list[str]:
    """The runs whose model evaluate loads from now on, in order."""
    loads, real = [], evaluate.load
    monkeypatch.setattr(evaluate, "load", lambda run, p: loads.append(run.name) or real(run, p))
    return loads


def _generic(record):
    from vlm_rlaif.data import GenericQA

    return GenericQA.from_dict({k: record[k] for k in ("video_name", "Q", "A")}, "record")


def test_a_rerun_answers_only_what_is_missing_and_ends_the_same(evaluated, monkeypatch):
    root, params, metrics = evaluated
    monkeypatch.chdir(root)
    loads = model_loads(monkeypatch)
    assert evaluate.run(params, progress=False) == metrics and loads == []  # everything answered already
    (evaluate.CHECKPOINTS / "sft" / "seed-1" / "consistency.json").unlink()  # killed while answering this set
    assert evaluate.run(params, progress=False) == metrics and loads == ["sft/seed-1"]
    hotter = load_params("params.yaml", overrides={"ppo": PPO | {"seeds": [0]}, "evaluate": EVALUATE | {"temperature": 0.9}})
    loads.clear()
    evaluate.run(hotter, out=Path("hot"), progress=False)
    assert loads == ["base/seed-0", "sft/seed-0", "rlaif/seed-0"]  # other decoding: no answer is reused


def test_a_released_checkpoint_converted_from_the_original_layout_is_evaluated_beside_them(evaluated, monkeypatch, tmp_path):
    root, params, metrics = evaluated
    monkeypatch.chdir(root)
    original_checkpoint(tmp_path / "checkpoint")
    clip_folder(tmp_path / "clip")
    folder = convert(tmp_path / "checkpoint", tmp_path / "released", tmp_path / "clip")
    loads = model_loads(monkeypatch)
    assert evaluate.run(params, progress=False) == metrics  # the trained models' answers as `evaluated` left them
    loads.clear()
    frames = []
    answer_sets = evaluate.benchmark.answer_sets
    monkeypatch.setattr(evaluate.benchmark, "answer_sets", lambda *a, **k: frames.append(k["num_frames"]) or answer_sets(*a, **k))
    released = {"vlm-rlaif-7b": {"path": str(folder), "num_frames": params.data.num_frames + 2}}  # its own frame count
    overrides = {"ppo": PPO | {"seeds": [0, 1]}, "evaluate": EVALUATE | {"released": released}}
    with_released = evaluate.run(load_params("params.yaml", overrides=overrides), out=Path("with-released"), progress=False)
    assert loads == ["vlm-rlaif-7b/seed-0", "vlm-rlaif-7b/seed-1"]  # the trained models' answers are reused
    assert frames and set(frames) == {params.data.num_frames + 2}
    assert list(with_released["models"]) == ["base", "sft", "rlaif", "vlm-rlaif-7b"]
    assert all(with_released["models"][m] == metrics["models"][m] for m in evaluate.MODELS)
    released = with_released["models"]["vlm-rlaif-7b"]
    assert set(released["seeds"]) == {0, 1} and all(0.0 <= row["mean"] <= 5.0 for row in released["seeds"].values())
    assert "| vlm-rlaif-7b |" in analysis.main_table(with_released)
    clash = load_params("params.yaml", overrides={"evaluate": {"released": {"sft": {"path": str(folder)}}}})
    with pytest.raises(ConfigError, match="evaluate.released.sft: 'sft' names a trained model"):
        evaluate.runs(clash)


def test_the_trained_models_also_answer_the_descriptions_of_another_world(evaluated, monkeypatch):
    root, params, metrics = evaluated
    monkeypatch.chdir(root)
    loads = model_loads(monkeypatch)
    more = load_params("params.yaml", overrides={"ppo": PPO | {"seeds": [0, 1]}, "evaluate": EVALUATE | {"worlds": [9]}})
    two = evaluate.run(more, out=Path("two-worlds"), progress=False)
    assert loads[-4:] == ["sft/seed-0", "sft/seed-1", "rlaif/seed-0", "rlaif/seed-1"]  # the base model is not asked
    assert two["models"] == metrics["models"] and set(two["target"]["worlds"]) == {"5", "9"}
    other = two["worlds"]["9"]
    assert (other["seeds"], other["questions"]) == (2, params.world.num_eval_videos)
    assert other["met"] == two["target"]["worlds"]["9"]
    world, default = io.read_json(evaluate.CHECKPOINTS / "worlds/seed-9/scenes.json"), io.read_json("artifacts/prepare/scenes.json")
    assert set(world) == {q.video_name for q in evaluate.BenchmarkSets.load("artifacts/prepare").generic}  # the eval split's ids
    assert all(world[name] != default[name] for name in world)  # other scenes under them
    written = io.read_json("two-worlds/worlds/seed-9/rlaif/seed-1.json")
    assert len(written["answers"]) == params.world.num_eval_videos
    loads.clear()
    assert evaluate.run(more, out=Path("two-worlds"), progress=False) == two and loads == []
    with pytest.raises(ConfigError, match="evaluate.worlds: 5 is world.seed"):
        evaluate.world_sets(load_params("params.yaml", overrides={"evaluate": {"worlds": [5]}}), 5)


def test_missing_models_and_an_oracle_without_scenes_are_named(policies, monkeypatch, tmp_path):
    root, params = policies
    monkeypatch.chdir(root)
    more = load_params("params.yaml", overrides={"ppo": PPO | {"seeds": [0, 7]}})
    with pytest.raises(FileNotFoundError, match="rlaif/seed-7: artifacts/ppo/seed-7/policy does not exist"):
        evaluate.runs(more)
    shutil.copytree("artifacts/prepare/eval", tmp_path / "prepared" / "eval")
    with pytest.raises(ConfigError, match="evaluate.judge.kind: the oracle judges the synthetic world only"):
        evaluate.judge(params, tmp_path / "prepared")


class JudgeServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge: 4 when the reference's first word is in the answer, else 1;
    zero-shot instructions get a yes/no match as well."""

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests += 1
        prompt = body["messages"][-1]["content"]
        reference = prompt.split("Reference answer: ")[1].split("\n")[0]
        answer = prompt.split("Assistant's answer: ")[1].split("\n")[0] if "Assistant's answer: " in prompt else ""
        hit = reference.split()[0].strip(".").lower() in answer.lower()
        reply = {"score": 4 if hit else 1} | ({"pred": "yes" if hit else "no"} if '"pred"' in prompt else {})
        data = json.dumps({"model": "judge-7b-0613", "choices": [{"message": {"role": "assistant", "content": json.dumps(reply)}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_an_llm_judge_behind_a_local_server_grades_and_a_rerun_costs_no_request(policies, monkeypatch):
    root, _ = policies
    monkeypatch.chdir(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), JudgeServer)
    server.requests = 0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        judge = {"kind": "openai", "model": "judge-7b", "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1", "api_key_env": "NO_SUCH_KEY"}
        params = load_params("params.yaml", overrides={"ppo": PPO | {"seeds": [0]}, "evaluate": EVALUATE | {"num_samples": 2, "judge": judge}})
        metrics = evaluate.run(params, out=Path("llm_judged"), checkpoints=Path("llm_ckpt"), progress=False)
        asked = server.requests
        sets = evaluate.BenchmarkSets.load("artifacts/prepare", 2)
        per_run = 3 * len(sets.generic) + len(sets.temporal) + len(sets.consistency) + len(sets.zeroshot["synthetic"])
        assert asked <= 3 * per_run and asked > 0  # identical answers of two models share a cached grade
        assert metrics["judge"] == ["openai:judge-7b-0613"]  # the id the server reported
        for stats in metrics["models"].values():
            row = stats["seeds"][0]
            assert all(1.0 <= row[d] <= 4.0 for d in DIMENSIONS)
            assert row["description_precision"] is not None  # the oracle still counts facts on the synthetic world
        assert evaluate.run(params, out=Path("llm_judged"), checkpoints=Path("llm_ckpt"), progress=False) == metrics
        assert server.requests == asked  # every grade from the cache
    finally:
        server.shutdown()
        server.server_close()
