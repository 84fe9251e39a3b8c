"""The evaluation stage: the base, SFT and RLAIF models on the paper's benchmarks.

Every model answers every benchmark set (`benchmark.BenchmarkSets`) with the paper's decoding
(`evaluate.temperature`, `evaluate.max_new_tokens`) once per seed of `ppo.seeds`: the RLAIF
model of seed s is the PPO policy trained under s, the base and SFT models sample under s.
So each row of the results carries a seed-to-seed spread, and RLAIF's gain over SFT is tested
on paired answers against chance (`target`, vlm_rlaif/verdict.py), on the default world and
on the eval splits of the worlds `evaluate.worlds` names. The configured judge grades every
answer (`benchmark.judge_answers`); on the synthetic world the oracle also counts the facts of
every detailed description, so the claim "RLAIF describes more accurately" is measured
exactly, whichever judge grades.

Long evaluations resume: each (model, seed, set)'s answers are kept under
artifacts/checkpoints/evaluate/ as soon as they exist, and an LLM judge's replies are cached
there by request, so a rerun pays only for what changed.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from vlm_rlaif import benchmark, evaluation, generation, io, modeling, ppo, verdict
from vlm_rlaif.benchmark import BenchmarkSets, Judge, LLMJudge, OracleJudge
from vlm_rlaif.config import ConfigError, Params
from vlm_rlaif.data import read_generic_qa
from vlm_rlaif.llm_client import ChatClient
from vlm_rlaif.synthetic.world import generate_world, video_folder

OUT = Path("artifacts/evaluate")
CHECKPOINTS = Path("artifacts/checkpoints/evaluate")
JUDGE_CACHE = "judge_cache.jsonl"
PLOTS_FILE = Path("reports/plots/evaluate.json")  # per-model means, where `dvc plots show` finds them
MODELS = ("base", "sft", "rlaif")  # trained here; evaluate.released adds models by name
TARGET = "description_precision"  # the oracle's factual accuracy of detailed descriptions


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


def _fingerprint(run: Run, params: Params, prepared: Path, videos: Mapping[str, str]) -> str:
    """What a run's answers depend on: the code that writes them, the decoding, the sets, their
    video folders and the model."""
    code = [Path(m.__file__) for m in (sys.modules[__name__], benchmark, evaluation, generation, modeling)]
    grading = ("judge", "released", "confidence", "resamples", "worlds")  # what follows the answers
    decoding = {k: v for k, v in dataclasses.asdict(params.evaluate).items() if k not in grading}
    settings = {"seed": run.seed, "decoding": decoding, "num_frames": run.num_frames,
                "videos": dict(videos)}
    return io.run_stamp(code, settings, sorted((prepared / "eval").glob("*.json")), [run.folder])


def answer(run: Run, params: Params, sets: BenchmarkSets, prepared: Path, checkpoints: Path = CHECKPOINTS,
           progress: bool = True, video_root: str | Path | None = None) -> dict[str, list]:
    """The run's answers to every set, each set kept under `checkpoints` once answered; the
    model is loaded only if a set is missing. Set k is sampled under seed (seed, k), so a
    resumed run answers what an uninterrupted one would have. Videos are read from each set's
    folder (data.eval_videos), or from `video_root` where given."""
    videos = {key: str(video_root or params.data.eval_videos(key)) for key in sets.questions()}
    stamp = _fingerprint(run, params, prepared, videos)
    folder = io.claim(checkpoints / run.model / f"seed-{run.seed}", stamp)
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
            model, processor, sets, only=[key], video_root=videos[key], num_frames=run.num_frames,
            max_new_tokens=params.evaluate.max_new_tokens, temperature=params.evaluate.temperature,
            zeroshot_max_new_tokens=params.evaluate.zeroshot_max_new_tokens,
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
    and score per benchmark, and (on the synthetic world) the oracle's description facts and
    length."""
    row = dict(summary["video_chatgpt"])
    for name, qa in summary["zeroshot"].items():
        row[f"qa_{name}_accuracy"], row[f"qa_{name}_score"] = qa["accuracy"], qa["score"]
    if facts is not None:
        facts_kept = ("precision", "recall", "f1", "perfect", "words")
        row |= {f"description_{k}": facts[k] for k in facts_kept}
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


def spread_width(models: Mapping[str, Mapping]) -> float:
    """The larger min-max range of SFT's and RLAIF's per-seed means of the target metric."""
    values = ([row[TARGET] for row in models[m]["seeds"].values()] for m in ("sft", "rlaif"))
    return max(max(v) - min(v) for v in values)


def description_measures(world: Mapping, sets: BenchmarkSets, answers: Sequence[str]
                         ) -> dict[str, list[float]]:
    """Every oracle measure of every answer to the generic (description) questions."""
    scores = evaluation.score_descriptions(world, sets.generic, answers)
    return verdict.answer_measures(scores, answers)


def target(measures: Mapping[str, Mapping[int, Mapping]], params: Params) -> dict:
    """The embedded default's claim, RLAIF describes more accurately than SFT, tested on paired
    answers (vlm_rlaif/verdict.py); `measures` holds each model's per-answer measures by seed."""
    cfg = params.evaluate
    out = verdict.verdict(measures["sft"], measures["rlaif"], level=cfg.confidence,
                          resamples=cfg.resamples)
    precision = out["measures"][verdict.TARGET]
    headline = {k: precision[k] for k in ("sft", "rlaif", "gain", "interval")}
    return {"metric": TARGET, **headline, **{k: v for k, v in out.items() if k != "metric"}}


def world_sets(params: Params, seed: int, checkpoints: Path = CHECKPOINTS
               ) -> tuple[Path, BenchmarkSets, dict]:
    """(folder, description questions, scenes) of the eval split of the world regenerated under
    `seed`, every other world setting as params.yaml's; written once, then reused."""
    if params.world is None:
        raise ConfigError("evaluate.worlds: extra worlds regenerate the synthetic world, and "
                          "params.yaml has no `world` section")
    if seed == params.world.seed:
        raise ConfigError(f"evaluate.worlds: {seed} is world.seed, the default world, which is "
                          "evaluated anyway")
    cfg = dataclasses.replace(params.world, seed=seed)
    folder = checkpoints / "worlds" / f"seed-{seed}"
    stamp = folder / "world.json"
    if not stamp.is_file() or io.read_json(stamp).get("config") != dataclasses.asdict(cfg):
        generate_world(cfg, folder, splits=("eval",))
    generic = read_generic_qa(folder / "eval/generic_qa.json").records[:params.evaluate.num_samples]
    return folder, BenchmarkSets(generic, [], [], {}), io.read_json(folder / "scenes.json")


def other_worlds(params: Params, evaluated: Sequence[Run], out: Path, checkpoints: Path,
                 progress: bool) -> dict[str, dict]:
    """The verdict on each world of `evaluate.worlds`: SFT and RLAIF answer its description
    questions (answers kept as on the default world) and the oracle scores them."""
    verdicts = {}
    for seed in params.evaluate.worlds:
        folder, sets, world = world_sets(params, seed, checkpoints)
        videos = folder / "videos" / video_folder(params.world)
        measures: dict[str, dict[int, dict]] = {"sft": {}, "rlaif": {}}
        for each in (r for r in evaluated if r.model in measures):
            answers = answer(each, params, sets, folder, folder / "answers", progress,
                             video_root=videos)["generic"]
            measures[each.model][each.seed] = description_measures(world, sets, answers)
            written = {"answers": answers, "measures": measures[each.model][each.seed]}
            io.write_json(out / "worlds" / f"seed-{seed}" / each.model / f"seed-{each.seed}.json",
                          written)
        verdicts[str(seed)] = target(measures, params)
    return verdicts


def run(params: Params, prepared: Path = Path("artifacts/prepare"), out: Path = OUT, checkpoints: Path = CHECKPOINTS,
        progress: bool = True, **models: Path) -> dict:
    """Evaluate every run; graded answers to out/<model>/seed-N.json; returns the stage's metrics."""
    sets = BenchmarkSets.load(prepared, params.evaluate.num_samples)
    grader, world = judge(params, prepared, checkpoints), scenes(prepared)
    evaluated = runs(params, **models)
    results: dict[str, dict] = {each.model: {"seeds": {}} for each in evaluated}
    measures: dict[str, dict[int, dict]] = {each.model: {} for each in evaluated}
    judges: set[str] = set()
    with io.atomic_dir(out) as tmp:
        for each in evaluated:
            answers = answer(each, params, sets, prepared, checkpoints, progress)
            judged = benchmark.judge_answers(sets, answers, grader, progress=progress)
            summary = benchmark.summarise(judged)
            facts = None
            if world is not None:
                scores = evaluation.score_descriptions(world, sets.generic, answers["generic"])
                described = verdict.answer_measures(scores, answers["generic"])
                facts = evaluation.description_summary(scores)
                facts["words"] = float(np.mean(described["words"]))
                measures[each.model][each.seed] = described
            judges.update(summary["judges"])
            io.write_json(tmp / each.model / f"seed-{each.seed}.json", {"summary": summary, "oracle_facts": facts, "judged": judged})
            results[each.model]["seeds"][each.seed] = {k: None if v is None else round(v, 4) for k, v in flat(summary, facts).items()}
        worlds = other_worlds(params, evaluated, tmp, checkpoints, progress)
    for model in results.values():
        model |= spread(model["seeds"])
    metrics = {"judge": sorted(judges), "decoding": {"temperature": params.evaluate.temperature, "max_new_tokens": params.evaluate.max_new_tokens},
               "models": results}
    if world is not None:
        default = target(measures, params)
        held = {str(params.world.seed) if params.world else "default": default["met"]}
        held |= {seed: w["met"] for seed, w in worlds.items()}
        metrics["target"] = default | {"spread": round(spread_width(results), 4), "worlds": held}
        metrics["worlds"] = worlds
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

