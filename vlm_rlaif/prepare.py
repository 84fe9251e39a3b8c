"""The `prepare` stage: validate the raw data once and lay out every later stage's inputs.

Reads data/ (the release layout, PAPER.md, and the benchmarks as distributed: a zero-shot
set's answers may come in a second file, each set may have its own video folder), checks
every record and that its video is there and decodes (`data.check_media`), splits the SFT
conversations into the curriculum's easy and hard halves by answer length, and writes the
validated sets under artifacts/prepare/ (each evaluation set merged, its answers joined in).
Later stages read only those files, so a malformed record stops the pipeline here, named,
before any training; with `data.on_bad_record: skip` it is left out instead and listed in
reports/skipped_records.json.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from vlm_rlaif import data as records
from vlm_rlaif import io
from vlm_rlaif.config import ConfigError, DataConfig, Params
from vlm_rlaif.video import VideoError, check_readable, resolve_video

OUT = Path("artifacts/prepare")
SKIPPED = Path("reports/skipped_records.json")  # with data.on_bad_record: skip, what was left out and why


@dataclass
class Prepared:
    """What the stage wrote, and what a reader of the notebook wants to see about it."""

    counts: dict[str, int]
    threshold_words: int
    easy_lengths: list[int]
    hard_lengths: list[int]
    skipped: list[str] = field(default_factory=list)

    def metrics(self) -> dict:
        return {
            "records": self.counts,
            "curriculum": {
                "threshold_words": self.threshold_words,
                "easy": len(self.easy_lengths),
                "hard": len(self.hard_lengths),
                "easy_mean_words": round(float(np.mean(self.easy_lengths)), 2) if self.easy_lengths else 0.0,
                "hard_mean_words": round(float(np.mean(self.hard_lengths)), 2) if self.hard_lengths else 0.0,
            },
            "skipped_records": len(self.skipped),
        }


def check_world(params: Params) -> None:
    """data/ must come from the world that params.yaml describes, else the lock would lie."""
    if params.world is None:
        return
    path = Path(params.data.root) / "world.json"
    if not path.is_file():
        raise ConfigError(f"{path}: missing; params.yaml has a `world` section but data/ was not written by it (run `make data`)")
    written = io.read_json(path).get("config")
    expected = dataclasses.asdict(params.world)
    if written != expected:
        diff = sorted(k for k in expected if (written or {}).get(k) != expected[k])
        raise ConfigError(
            f"{path}: data/ was generated with other world settings than params.yaml ({', '.join(f'world.{k}' for k in diff)}); "
            "run `make data` to regenerate it, or restore params.yaml"
        )


class _Reader:
    """Reads record files under one data root, applying the bad-record policy and media checks."""

    def __init__(self, params: Params):
        self.root = Path(params.data.root)
        self.video_root = Path(params.data.video_root)
        self.policy = params.data.on_bad_record
        self.decode = params.data.check_media == "decode"
        self.num_frames = params.data.num_frames
        self.skipped: list[str] = []
        self._unreadable: dict[str, str | None] = {}

    def _unreadable_media(self, source) -> str | None:
        """What is wrong with decoding `source` (None when it reads), once per distinct video."""
        key = str(source)
        if key not in self._unreadable:
            try:
                check_readable(source, self.num_frames)
                self._unreadable[key] = None
            except VideoError as e:
                self._unreadable[key] = str(e)
        return self._unreadable[key]

    def _bad(self, message: str) -> None:
        if self.policy == "stop":
            raise records.RecordError(message)
        self.skipped.append(message)

    def _read(self, name: str, read: Callable, check: Callable[[object], str | None]) -> list:
        """Well-formed records of `name` that also pass `check` (None, or what is wrong)."""
        path = self.root / name
        result = read(path, on_bad_record=self.policy)
        self.skipped.extend(message for _, message in result.skipped)
        dropped = {index for index, _ in result.skipped}
        indices = (i for i in range(len(result.records) + len(dropped)) if i not in dropped)
        kept = []
        for index, record in zip(indices, result.records):
            problem = check(record)
            if problem:
                self._bad(f"{path}, record {index}: {problem}")
            else:
                kept.append(record)
        return kept

    def dialogues(self, name: str, read: Callable) -> list:
        """Records whose frames (or video) all exist under the video root."""

        def missing_media(record) -> str | None:
            try:
                media = record.media(self.video_root)
            except VideoError as e:  # a path that leaves the video root
                return str(e)
            missing = [p for p in (media if isinstance(media, list) else [media]) if not p.exists()]
            if not missing:
                return self._unreadable_media(media) if self.decode else None
            more = f" (and {len(missing) - 1} more frames)" if len(missing) > 1 else ""
            return f"video not found: {missing[0]}{more}"

        return self._read(name, read, missing_media)

    def questions(self, name: str, read: Callable, video_root: str) -> list:
        """Benchmark questions whose `video_name` resolves under their set's video folder."""

        def unresolved(question) -> str | None:
            try:
                path = resolve_video(video_root, question.video_name)
            except VideoError as e:
                return str(e)
            return self._unreadable_media(path) if self.decode else None

        return self._read(name, read, unresolved)


def _eval_sources(cfg: DataConfig) -> dict[str, tuple[str, Callable, str]]:
    """Each evaluation set to write, by its name under `out`: (its questions file under
    data.root, the reader that joins its answers, its video folder)."""
    sources = {}
    for name, files in cfg.zeroshot_sets().items():
        answers = Path(cfg.root) / files.answers if files.answers else None
        read = partial(records.read_zeroshot_qa, answers=answers)
        sources[f"eval/zeroshot_{name}.json"] = (files.questions, read, files.videos)
    readers = {"generic": records.read_generic_qa, "temporal": records.read_generic_qa,
               "consistency": records.read_consistency_qa}
    for name, file in cfg.benchmark_sets().items():
        sources[f"eval/{name}_qa.json"] = (file.path, readers[name], file.videos)
    return sources


def run(params: Params, out: Path = OUT, skipped: Path = SKIPPED) -> Prepared:
    """Validate data/ and write the stage inputs under `out` (see module docstring). Nothing is
    written until every file has been read: bad input leaves the last good `out` as it was."""
    check_world(params)
    cfg = params.data
    reader = _Reader(params)
    sets: dict[str, list] = {}

    def add(name: str, source: str, rows: list) -> None:
        if not rows:
            path = Path(cfg.root) / source
            left_out = [m for m in reader.skipped if m.startswith(str(path))]
            why = f" (all {len(left_out)} skipped; the first: {left_out[0]})" if left_out else ""
            raise records.RecordError(f"{path}: no usable records{why}")
        sets[name] = rows

    sft = [r for name in cfg.sft_files for r in reader.dialogues(name, records.read_sft)]
    if not sft:
        raise records.RecordError(f"{', '.join(cfg.sft_files)}: no SFT records to train on")
    easy, hard, threshold = records.curriculum_split(sft, cfg.curriculum.threshold_words, cfg.curriculum.quantile)
    sets["sft_easy.json"], sets["sft_hard.json"] = easy, hard
    dialogue_files = {"sft_captions.json": (cfg.caption_file, records.read_sft), "sft_judge.json": (cfg.judge_file, records.read_sft),
                      "policy_init.json": (cfg.policy_init_file, records.read_sft), "rl_prompts.json": (cfg.rl_file, records.read_rl_prompts),
                      "preferences.json": (cfg.preference_file, records.read_preferences)}
    for name, (source, read) in dialogue_files.items():
        if source:
            add(name, source, reader.dialogues(source, read))

    for name, (source, read, videos) in _eval_sources(cfg).items():
        add(name, source, reader.questions(source, read, videos))

    prepared = Prepared(
        counts={name.removesuffix(".json"): len(rows) for name, rows in sets.items()},
        threshold_words=threshold,
        easy_lengths=[records.answer_words(r) for r in easy],
        hard_lengths=[records.answer_words(r) for r in hard],
        skipped=reader.skipped,
    )
    with io.atomic_dir(out) as tmp:
        for name, rows in sets.items():
            records.write_records(tmp / name, rows)
        if cfg.scenes_file:
            io.write_json(tmp / "scenes.json", io.read_json(Path(cfg.root) / cfg.scenes_file), indent=None)
        io.write_json(tmp / "manifest.json", {"video_root": cfg.video_root, "eval_video_root": cfg.eval_video_root, **prepared.metrics()})
    io.write_json(skipped, reader.skipped)
    return prepared
