"""The evaluation stage: the base, SFT and RLAIF models on the paper's benchmarks.

Every model answers every benchmark set (`benchmark.BenchmarkSets`) with the paper's decoding
(`evaluate.temperature`, `evaluate.max_new_tokens`) once per seed of `ppo.seeds`: the RLAIF
model of seed s is the PPO policy trained under s, the base and SFT models sample under s.
So each row of the results carries a seed-to-seed spread, and RLAIF's gain over SFT can be
set against it (`target`). The configured judge grades every answer (`benchmark.judge_answers`);
on the synthetic world the oracle also counts the facts of every detailed description, so the
claim "RLAIF describes more accurately" is measured exactly, whichever judge grades.

Long evaluations resume: each (model, seed, set)'s answers are kept under
artifacts/checkpoints/evaluate/ as soon as they exist, and an LLM judge's replies are cached
there by request, so a rerun pays only for what changed.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from vlm_rlaif import benchmark, evaluation, generation, io, modeling, ppo
from vlm_rlaif.benchmark import BenchmarkSets, Judge, LLMJudge, OracleJudge
from vlm_rlaif.config import ConfigError, Params
from vlm_rlaif.llm_client import ChatClient

OUT = Path("artifacts/evaluate")
CHECKPOINTS = Path("artifacts/checkpoints/evaluate")
JUDGE_CACHE = "judge_cache.jsonl"
PLOTS_FILE = Path("reports/plots/evaluate.json")  # per-model means, where `dvc plots show` finds them
MODELS = ("base", "sft", "rlaif")  # trained here; evaluate.released adds models by name
TARGET = "description_precision"  # the oracle's factual accuracy of detailed descriptions
LARGE_FILE = 256 * 2**20  # model files above this size are fingerprinted by size, not content


@dataclass(frozen=True)
class Run:
    """One model answering under one seed."""

    model: str
    seed: int
    folder: Path  # the model, or for RLAIF the policy adapter on the SFT model
    num_frames: int  # frames a video is read at

    @property
    def name(self) -> str:
        return f"{self.model}/seed-{self.seed}"


def runs(params: Params, base: Path = Path("artifacts/base"), sft: Path = Path("artifacts/sft"), policies: Path = ppo.OUT) -> list[Run]:
    """Every (model, seed) the stage evaluates, the released models after the trained ones,
    checking that each model exists."""
    frames = params.data.num_frames
    # model -> (its folder under seed s, the frames it reads)
    sources = {"base": (lambda s: base, frames), "sft": (lambda s: sft, frames),
               "rlaif": (lambda s: ppo.seed_folder(policies, s) / "policy", frames)}
    for name, released in params.evaluate.released.items():
        if name in MODELS:
            raise ConfigError(f"evaluate.released.{name}: {name!r} names a trained model; give the released one another name")
        sources[name] = (lambda s, folder=Path(released.path): folder, released.num_frames or frames)
    out = [Run(model, seed, folder(seed), read_at) for model, (folder, read_at) in sources.items() for seed in params.ppo.seeds]
    for run in out:
        if not run.folder.is_dir():
            raise FileNotFoundError(f"{run.name}: {run.folder} does not exist; run the stages before evaluate (dvc repro)")
    return out


def load(run: Run, params: Params):
    """(model, processor) of a run; an RLAIF policy is merged into the SFT model it was trained on
    (the one its base.json names)."""
    where = modeling.process_device_map()
    if run.model != "rlaif":
        return modeling.load_model_and_processor(run.folder, dtype=params.base.dtype, device_map=where)
    from peft import PeftModel

    model, processor = modeling.load_model_and_processor(io.read_json(run.folder / "base.json")["base"], dtype=params.base.dtype, device_map=where)
    return PeftModel.from_pretrained(model, run.folder).merge_and_unload(), processor


def _fingerprint(run: Run, params: Params, prepared: Path) -> str:
    """What a run's answers depend on: the code that writes them, the decoding, the sets and the model."""
    code = [Path(m.__file__) for m in (sys.modules[__name__], benchmark, evaluation, generation, modeling)]
    settings = {"seed": run.seed, "decoding": {k: v for k, v in dataclasses.asdict(params.evaluate).items() if k not in ("judge", "released")},
                "num_frames": run.num_frames}
    files = [p for p in sorted(run.folder.rglob("*")) if p.is_file()]
    small = [p for p in files if p.stat().st_size <= LARGE_FILE]
    return io.run_stamp(code, settings, [*sorted((prepared / "eval").glob("*.json")), *small], [run.folder])


def answer(run: Run, params: Params, sets: BenchmarkSets, prepared: Path, checkpoints: Path = CHECKPOINTS,
           progress: bool = True) -> dict[str, list]:
    """The run's answers to every set, each set kept under `checkpoints` once answered; the
    model is loaded only if a set is missing. Set k is sampled under seed (seed, k), so a
    resumed run answers what an uninterrupted one would have."""
    folder = io.claim(checkpoints / run.model / f"seed-{run.seed}", _fingerprint(run, params, prepared))
    answers, model = {}, None
    for index, key in enumerate(sets.questions()):
        path = folder / f"{key.replace('/', '_')}.json"
        if path.is_file():
            answers[key] = io.read_json(path)
            continue
        if model is None:
            model, processor = load(run, params)
        torch.manual_seed(run.seed * 1_000 + index)
        answers[key] = benchmark.answer_sets(
            model, processor, sets, only=[key], video_root=params.data.eval_videos(key), num_frames=run.num_frames,
            max_new_tokens=params.evaluate.max_new_tokens, temperature=params.evaluate.temperature,
            batch_size=params.evaluate.batch_size, progress=progress,
        )[key]
        io.write_json(path, answers[key])
    return answers


def scenes(prepared: Path) -> dict | None:
    """The synthetic world's scene records, or None where the data has none (the paper's)."""
    path = prepared / "scenes.json"
    return io.read_json(path) if path.is_file() else None


def judge(params: Params, prepared: Path, checkpoints: Path = CHECKPOINTS) -> Judge:
    """The judge `evaluate.judge` names: the oracle, or an LLM behind an OpenAI-compatible API."""
    cfg = params.evaluate.judge
    if cfg.kind == "oracle":
        world = scenes(prepared)
        if world is None:
            raise ConfigError(f"evaluate.judge.kind: the oracle judges the synthetic world only, and {prepared / 'scenes.json'} "
                              "does not exist; set kind: openai with a model and base_url")
        return OracleJudge(world)
    client = ChatClient.from_env(cfg.base_url, cfg.model, cfg.api_key_env, timeout=cfg.timeout, max_retries=cfg.max_retries,
                                 cache=checkpoints / JUDGE_CACHE)
    return LLMJudge(client)


def flat(summary: Mapping, facts: Mapping | None) -> dict[str, float | None]:
    """One run's numbers as flat metrics: the five dimensions and their mean, zero-shot accuracy
    and score per benchmark, and (on the synthetic world) the oracle's description facts."""
    row = dict(summary["video_chatgpt"])
    for name, qa in summary["zeroshot"].items():
        row[f"qa_{name}_accuracy"], row[f"qa_{name}_score"] = qa["accuracy"], qa["score"]
    if facts is not None:
        row |= {f"description_{k}": facts[k] for k in ("precision", "recall", "f1", "perfect")}
        row["hallucinated_per_answer"] = facts["hallucinated_per_answer"]
    return row


def spread(rows: Mapping[int, Mapping[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """Mean, standard deviation, min and max of every metric over seeds."""
    out: dict[str, dict] = {"mean": {}, "std": {}, "min": {}, "max": {}}
    for key in next(iter(rows.values())):
        values = [r[key] for r in rows.values() if r[key] is not None]
        for stat, fn in (("mean", np.mean), ("std", np.std), ("min", np.min), ("max", np.max)):
            out[stat][key] = round(float(fn(values)), 4) if values else None
    return out


def target(models: Mapping[str, Mapping]) -> dict:
    """The embedded default's claim: RLAIF beats SFT on the oracle's factual accuracy of detailed
    descriptions by more than the seed-to-seed spread (the larger min-max range of the two)."""
    sft, rlaif = (models[m]["seeds"] for m in ("sft", "rlaif"))
    values = {m: [row[TARGET] for row in seeds.values()] for m, seeds in (("sft", sft), ("rlaif", rlaif))}
    gain = float(np.mean(values["rlaif"]) - np.mean(values["sft"]))
    width = max(max(v) - min(v) for v in values.values())
    return {"metric": TARGET, "sft": round(float(np.mean(values["sft"])), 4), "rlaif": round(float(np.mean(values["rlaif"])), 4),
            "gain": round(gain, 4), "spread": round(float(width), 4), "met": bool(gain > width), "seeds": len(values["rlaif"])}


def run(params: Params, prepared: Path = Path("artifacts/prepare"), out: Path = OUT, checkpoints: Path = CHECKPOINTS,
        progress: bool = True, **models: Path) -> dict:
    """Evaluate every run; graded answers to out/<model>/seed-N.json; returns the stage's metrics."""
    sets = BenchmarkSets.load(prepared, params.evaluate.num_samples)
    grader, world = judge(params, prepared, checkpoints), scenes(prepared)
    evaluated = runs(params, **models)
    results: dict[str, dict] = {each.model: {"seeds": {}} for each in evaluated}
    judges: set[str] = set()
    with io.atomic_dir(out) as tmp:
        for each in evaluated:
            answers = answer(each, params, sets, prepared, checkpoints, progress)
            judged = benchmark.judge_answers(sets, answers, grader, progress=progress)
            summary = benchmark.summarise(judged)
            facts = evaluation.oracle_description_scores(world, sets.generic, answers["generic"]) if world is not None else None
            judges.update(summary["judges"])
            io.write_json(tmp / each.model / f"seed-{each.seed}.json", {"summary": summary, "oracle_facts": facts, "judged": judged})
            results[each.model]["seeds"][each.seed] = {k: None if v is None else round(v, 4) for k, v in flat(summary, facts).items()}
    for model in results.values():
        model |= spread(model["seeds"])
    metrics = {"judge": sorted(judges), "decoding": {"temperature": params.evaluate.temperature, "max_new_tokens": params.evaluate.max_new_tokens},
               "models": results}
    if world is not None:
        metrics["target"] = target(results)
    return metrics


def plot_rows(metrics: Mapping) -> list[dict]:
    """One row per model of its mean scores, for dvc.yaml's bar plots."""
    return [{"model": model, **stats["mean"]} for model, stats in metrics["models"].items()]


def read_judged(model: str, seed: int, out: Path = OUT) -> dict:
    """A run's graded answers as the stage wrote them."""
    path = out / model / f"seed-{seed}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the evaluate stage first (dvc repro evaluate)")
    return io.read_json(path)

