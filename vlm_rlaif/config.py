"""Typed parameters: params.yaml (embedded default) and params/*.yaml (other profiles).

Every knob of every stage is a field of a dataclass below. `load_params` validates a
profile into `Params`: an unknown key, a wrong type or an impossible value raises
`ConfigError` naming the key (for example `ppo.clip_range`), before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from vlm_rlaif.errors import InputError


class ConfigError(InputError):
    """A params file or section that does not validate; the message names the key."""


def _check(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    """Field metadata for a numeric range: [lo, hi], or (lo, hi] with lo_open."""
    return {"range": (lo, hi, lo_open)}


def positive() -> dict:
    return _check(0, None, lo_open=True)


def non_negative() -> dict:
    return _check(0, None)


def unit() -> dict:
    return _check(0, 1)


Scheduler = Literal["constant", "cosine", "linear"]  # each after its stage's warmup


def transformers_scheduler(kind: Scheduler) -> str:
    """transformers' name for a stage's `lr_scheduler`: its "constant" would skip the warmup."""
    return {"constant": "constant_with_warmup"}.get(kind, kind)


# --------------------------------------------------------------------------- sections


@dataclass
class WorldConfig:
    """The synthetic video world that writes data/ for the embedded default."""

    seed: int = field(default=0, metadata=non_negative())
    num_sft_videos: int = field(default=600, metadata=positive())
    num_rl_videos: int = field(default=200, metadata=positive())
    num_eval_videos: int = field(default=100, metadata=positive())
    num_frames: int = field(default=16, metadata=_check(4, None))
    frame_size: int = field(default=64, metadata=_check(16, None))
    max_objects: int = field(default=3, metadata=_check(1, 3))
    difficulty: float = field(default=0.5, metadata=unit())
    judge_examples_per_video: int = field(default=2, metadata=non_negative())
    questions_per_video: int = field(default=4, metadata=positive())  # SFT short questions per video
    eval_questions_per_video: int = field(default=4, metadata=positive())
    num_clips: int = field(default=3, metadata=positive())
    # of the SFT descriptions, those whose writer added an object the video does not show
    annotator_additions: float = field(default=0.0, metadata=unit())

    def validate(self, key: str) -> None:
        if self.num_clips > self.num_frames:
            raise ConfigError(f"{key}.num_clips: {self.num_clips} clips do not fit in num_frames {self.num_frames}")


@dataclass
class CurriculumConfig:
    """Easy/hard split by answer length (words): a fixed threshold, or a quantile."""

    threshold_words: int | None = field(default=None, metadata=positive())
    quantile: float | None = field(default=0.5, metadata=_check(0, 1, lo_open=True))

    def validate(self, key: str) -> None:
        if (self.threshold_words is None) == (self.quantile is None):
            raise ConfigError(f"{key}: set exactly one of threshold_words and quantile")


@dataclass
class ZeroShotFiles:
    """A zero-shot QA set as its benchmark distributes it: the questions, the answers when they
    come in a second file (joined by question_id), and the set's own video folder. The files
    are under data.root; the folder is a path like data.eval_video_root."""

    questions: str
    answers: str | None = None  # None: each question record carries its "answer"
    videos: str | None = None  # None: data.eval_video_root


@dataclass
class BenchmarkFile:
    """A Video-ChatGPT benchmark file (under data.root) and the set's own video folder."""

    path: str
    videos: str | None = None  # None: data.eval_video_root


@dataclass
class DataConfig:
    """Where the raw data lives (release layout, PAPER.md) and how records are read.

    Each evaluation set is a path (its questions with their answers, videos under
    eval_video_root) or a mapping: `ZeroShotFiles` for a zero-shot QA set, `BenchmarkFile`
    for a Video-ChatGPT benchmark file.
    """

    root: str = "data"
    video_root: str = "data/videos"
    sft_files: list[str] = field(default_factory=lambda: ["SFT_short.json", "SFT_long.json"])
    caption_file: str | None = "SFT_captions.json"
    judge_file: str | None = "SFT_judge.json"
    policy_init_file: str | None = None
    rl_file: str = "RL_data.json"
    preference_file: str | None = None
    zeroshot_qa_files: dict[str, str | ZeroShotFiles] = field(
        default_factory=lambda: {"synthetic": "eval/zeroshot_qa.json"}
    )
    generic_qa_file: str | BenchmarkFile | None = "eval/generic_qa.json"
    temporal_qa_file: str | BenchmarkFile | None = "eval/temporal_qa.json"
    consistency_qa_file: str | BenchmarkFile | None = "eval/consistency_qa.json"
    eval_video_root: str = "data/videos/synthetic_16frames"
    scenes_file: str | None = "scenes.json"
    num_frames: int = field(default=8, metadata=positive())
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    on_bad_record: Literal["stop", "skip"] = "stop"
    check_media: Literal["decode", "exists"] = "decode"

    def zeroshot_sets(self) -> dict[str, ZeroShotFiles]:
        """Every zero-shot QA set in the mapping form, its video folder filled in."""
        sets = {}
        for name, files in self.zeroshot_qa_files.items():
            if files:
                files = ZeroShotFiles(questions=files) if isinstance(files, str) else files
                sets[name] = dataclasses.replace(files, videos=files.videos or self.eval_video_root)
        return sets

    def benchmark_sets(self) -> dict[str, BenchmarkFile]:
        """The Video-ChatGPT benchmark's sets that have a file (generic, temporal, consistency),
        in the mapping form, each video folder filled in."""
        files = {"generic": self.generic_qa_file, "temporal": self.temporal_qa_file,
                 "consistency": self.consistency_qa_file}
        sets = {}
        for name, file in files.items():
            if file:
                file = BenchmarkFile(path=file) if isinstance(file, str) else file
                sets[name] = dataclasses.replace(file, videos=file.videos or self.eval_video_root)
        return sets

    def eval_videos(self, key: str) -> str:
        """The video folder of an evaluation set by its answer-set key ("generic",
        "zeroshot/msvd"): its own, else eval_video_root."""
        own = {f"zeroshot/{name}": files.videos for name, files in self.zeroshot_sets().items()}
        own |= {name: file.videos for name, file in self.benchmark_sets().items()}
        return own.get(key, self.eval_video_root)


@dataclass
class VisionPretrainConfig:
    """The tiny vision tower's pretraining on the world's frames (vlm_rlaif.pretrain)."""

    steps: int = field(default=500, metadata=non_negative())
    batch_size: int = field(default=128, metadata=positive())
    learning_rate: float = field(default=3e-3, metadata=positive())
    heldout: float = field(default=0.05, metadata=_check(0, 1, lo_open=True))


@dataclass
class TinyModelConfig:
    """Dimensions of the tiny LLaVA-NeXT-Video the embedded default builds from scratch."""

    image_size: int = field(default=64, metadata=positive())
    patch_size: int = field(default=8, metadata=positive())
    vision_hidden_size: int = field(default=64, metadata=positive())
    vision_layers: int = field(default=2, metadata=positive())
    vision_heads: int = field(default=4, metadata=positive())
    vision_feature_layer: int = -1
    text_hidden_size: int = field(default=128, metadata=positive())
    text_layers: int = field(default=4, metadata=positive())
    text_heads: int = field(default=4, metadata=positive())
    intermediate_size: int = field(default=256, metadata=positive())
    vocab_size: int = field(default=1024, metadata=_check(300, None))
    max_position_embeddings: int = field(default=1024, metadata=positive())
    frame_pairs: bool = False  # the tower reads each frame beside the next (vlm_rlaif.frame_pairs)
    pretrain: VisionPretrainConfig = field(default_factory=VisionPretrainConfig)

    def validate(self, key: str) -> None:
        if not -self.vision_layers <= self.vision_feature_layer <= self.vision_layers:
            raise ConfigError(f"{key}.vision_feature_layer: {self.vision_feature_layer} is not a layer of {self.vision_layers}")
        if self.image_size % self.patch_size:
            raise ConfigError(f"{key}.image_size: {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if (self.image_size // self.patch_size) % 2:
            raise ConfigError(f"{key}.image_size: image_size / patch_size must be even for the 2x2 spatial pooling")
        for hidden, heads in (("vision_hidden_size", "vision_heads"), ("text_hidden_size", "text_heads")):
            if getattr(self, hidden) % getattr(self, heads):
                raise ConfigError(f"{key}.{hidden}: not divisible by {heads}")


@dataclass
class BaseConfig:
    """The starting VLM: 'tiny' builds one from `tiny`; anything else is a hub id or a path."""

    family: Literal["llava_next_video", "qwen2_5_vl"] = "llava_next_video"
    model: str = "tiny"
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    load_in_4bit: bool = False  # QLoRA: every stage that trains adapters holds its frozen base in nf4 (bitsandbytes)
    trust_remote_code: bool = False

    def validate(self, key: str) -> None:
        if self.model == "tiny" and self.family != "llava_next_video":
            raise ConfigError(f"{key}.family: the tiny base is a llava_next_video model, got {self.family!r}")


@dataclass
class LoraConfig:
    r: int = field(default=32, metadata=positive())
    alpha: int = field(default=32, metadata=positive())
    dropout: float = field(default=0.0, metadata=_check(0, 1))
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class SFTConfig:
    """Curriculum SFT: the easy split, then the hard split, `epochs` each (`easy_epochs`, if
    set, for the easy split)."""

    curriculum: bool = True
    epochs: float = field(default=1.0, metadata=positive())
    easy_epochs: float | None = field(default=None, metadata=positive())
    learning_rate: float = field(default=1e-4, metadata=positive())
    lr_scheduler: Scheduler = "cosine"
    warmup_ratio: float = field(default=0.03, metadata=_check(0, 1))
    batch_size: int = field(default=8, metadata=positive())
    grad_accum: int = field(default=1, metadata=positive())
    max_length: int = field(default=2048, metadata=positive())
    lora: LoraConfig | None = None
    # Shares of the hard stage: the world's clip captions and judge examples, and easy
    # examples replayed.
    caption_share: float = field(default=0.0, metadata=unit())
    judge_share: float = field(default=0.0, metadata=unit())
    # of the hard split: examples asked again with their video's clip captions opening the question
    context_share: float = field(default=0.0, metadata=unit())
    replay_share: float = field(default=0.0, metadata=unit())
    pack_turns: bool = False  # the easy split's questions about one video as one conversation
    gradient_checkpointing: bool = False
    save_steps: int = field(default=100, metadata=positive())
    num_processes: int = field(default=1, metadata=positive())
    # LLaVA's recipe keeps the vision tower frozen in SFT and trains the projector.
    train_vision_tower: bool = False
    train_projector: bool = True

    def validate(self, key: str) -> None:
        for name in ("judge_share", "caption_share", "replay_share"):
            if getattr(self, name) >= 1:
                raise ConfigError(f"{key}.{name}: {getattr(self, name)} must be below 1 (it is a share of a stage)")
        if self.lora is not None and self.train_vision_tower:
            raise ConfigError(f"{key}.train_vision_tower: LoRA SFT trains the language model (and the projector) only")


@dataclass
class PreferencesConfig:
    """Context-aware AI feedback: two samples, clip captions, the SFT model as judge."""

    num_prompts: int | None = field(default=None, metadata=positive())
    pairs_per_prompt: int = field(default=1, metadata=positive())  # each drawn and judged alone
    temperature: float = field(default=1.0, metadata=positive())
    top_p: float = field(default=1.0, metadata=_check(0, 1, lo_open=True))
    max_new_tokens: int = field(default=512, metadata=positive())
    use_context: bool = True
    num_clips: int = field(default=3, metadata=positive())
    max_clip_frames: int = field(default=20, metadata=positive())
    caption_max_new_tokens: int = field(default=256, metadata=positive())
    judge_reading: Literal["label", "likelihood"] = "label"  # vlm_rlaif/judge.py says what each reads
    min_margin: float = field(default=0.0, metadata=_check(0, 1))
    drop_inconsistent: bool = True  # drop pairs whose verdict flips with the answers' order (position bias)
    max_resample: int = field(default=2, metadata=non_negative())
    batch_size: int = field(default=8, metadata=positive())
    shard_size: int = field(default=256, metadata=positive())
    num_processes: int = field(default=1, metadata=positive())  # each process judges every n-th shard


@dataclass
class RewardModelConfig:
    """Bradley-Terry reward model: LoRA on a frozen base, read by a scalar head on the last
    token or by the response's likelihood against the base's."""

    base: str | None = None
    lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=64, alpha=16, dropout=0.0))
    learning_rate: float = field(default=2e-5, metadata=positive())
    lr_scheduler: Scheduler = "constant"
    warmup_ratio: float = field(default=0.03, metadata=_check(0, 1))
    epochs: float = field(default=1.0, metadata=positive())
    batch_size: int = field(default=2, metadata=positive())
    grad_accum: int = field(default=1, metadata=positive())
    heldout: float = field(default=500, metadata=positive())
    min_pairs: int = field(default=1, metadata=positive())  # fewer stops the stage (TooFewPairs)
    centering_coef: float = field(default=1e-3, metadata=non_negative())
    max_length: int = field(default=2048, metadata=positive())
    context_in_instruction: bool = False
    # "head": the paper's, a linear head on the last token; "likelihood": how much likelier the
    # tuned model finds the response than its frozen base does, per token, x likelihood_scale
    reading: Literal["head", "likelihood"] = "head"
    likelihood_scale: float = field(default=10.0, metadata=positive())
    preferences: Literal["generated", "released"] = "generated"  # released: data.preference_file's pairs
    load_in_4bit: bool = False  # the reward model's own base (`base` set) in nf4, in training and wherever it scores
    gradient_checkpointing: bool = False
    save_steps: int = field(default=100, metadata=positive())
    num_processes: int = field(default=1, metadata=positive())


@dataclass
class PPOConfig:
    """PPO against the reward model with a KL penalty to the SFT reference (PAPER.md)."""

    policy_init: bool = False
    policy_init_learning_rate: float = field(default=1e-4, metadata=positive())
    policy_init_batch_size: int = field(default=4, metadata=positive())
    policy_lora: LoraConfig = field(default_factory=lambda: LoraConfig(r=64, alpha=16, dropout=0.0))
    learning_rate: float = field(default=3e-5, metadata=positive())
    # the value model's own rate; None: learning_rate
    value_learning_rate: float | None = field(default=None, metadata=positive())
    lr_scheduler: Scheduler = "cosine"
    warmup_steps: int = field(default=5, metadata=non_negative())
    num_prompts: int | None = field(default=None, metadata=positive())
    rollout_batch_size: int = field(default=256, metadata=positive())
    step_batch_size: int = field(default=128, metadata=positive())
    ppo_epochs: int = field(default=2, metadata=positive())
    clip_range: float = field(default=0.2, metadata=positive())
    value_clip: float = field(default=0.2, metadata=positive())
    # "absolute": the release's; "return_std": in standard deviations of the returns the value
    # head was calibrated on (its unit; needs calibrate_value)
    value_clip_unit: Literal["absolute", "return_std"] = "absolute"
    calibrate_value: bool = False  # on the first rollout, the value head rescaled onto the returns
    vf_coef: float = field(default=0.1, metadata=non_negative())
    gamma: float = field(default=1.0, metadata=unit())
    lam: float = field(default=1.0, metadata=unit())
    max_grad_norm: float = field(default=1.0, metadata=positive())
    kl_coef: float = field(default=0.1, metadata=non_negative())
    kl_estimator: Literal["k1_clamped", "k1", "k3"] = "k1_clamped"
    adaptive_kl: bool = False
    target_kl: float = field(default=6.0, metadata=positive())
    temperature: float = field(default=1.0, metadata=positive())
    top_p: float = field(default=1.0, metadata=_check(0, 1, lo_open=True))
    query_length: int = field(default=128, metadata=positive())
    max_new_tokens: int = field(default=896, metadata=positive())
    length_penalty: float = field(default=10.0, metadata=non_negative())
    length_penalty_tokens: int = field(default=896, metadata=positive())  # length_penalty per this many
    missing_eos_penalty: float = field(default=8.0, metadata=non_negative())
    reward_scale: float = field(default=10.0, metadata=positive())
    # a likelihood reward model's log-ratio earned at each token instead of all at the last
    # (needs reward_model.reading: likelihood on the policy's own base)
    token_rewards: bool = False
    # "oracle": the synthetic world's exact score of each answer instead of the reward model's,
    # times oracle_scale: how far PPO itself gets when the reward is right
    reward: Literal["reward_model", "oracle"] = "reward_model"
    oracle_scale: float = field(default=4.0, metadata=positive())
    whiten_rewards: bool = False
    gradient_checkpointing: bool = False  # recompute activations in the backward pass; the updates then run in train mode
    save_steps: int = field(default=10, metadata=positive())
    num_processes: int = field(default=1, metadata=positive())
    seeds: list[int] = field(default_factory=lambda: [0])  # one PPO run per seed: the spread the evaluation reports

    def validate(self, key: str) -> None:
        if self.rollout_batch_size % self.step_batch_size:
            raise ConfigError(f"{key}.step_batch_size: must divide rollout_batch_size ({self.rollout_batch_size})")
        if self.step_batch_size % self.num_processes:  # each process takes an equal share of every batch
            raise ConfigError(f"{key}.num_processes: must divide step_batch_size ({self.step_batch_size}) and so rollout_batch_size")
        if self.gradient_checkpointing and self.policy_lora.dropout:
            raise ConfigError(f"{key}.policy_lora.dropout: must be 0 with gradient_checkpointing, whose train-mode updates would "
                              "otherwise score tokens under dropout the rollout never had")
        if self.value_clip_unit == "return_std" and not self.calibrate_value:
            raise ConfigError(f"{key}.value_clip_unit: return_std counts in the calibrated value "
                              f"head's unit; set {key}.calibrate_value: true or value_clip_unit: "
                              "absolute")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ConfigError(f"{key}.seeds: expected distinct non-negative seeds, at least one; got {self.seeds}")


@dataclass
class JudgeConfig:
    """Who scores free-text answers: the synthetic world's oracle or an OpenAI-compatible LLM."""

    kind: Literal["oracle", "openai"] = "oracle"
    model: str | None = None
    base_url: str | None = None  # None: the OPENAI_BASE_URL environment variable
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = field(default=60.0, metadata=positive())
    max_retries: int = field(default=5, metadata=non_negative())


@dataclass
class ReleasedModel:
    """A model evaluated beside ours: a release converted with `python -m vlm_rlaif.convert`,
    or any model folder the package loads, read at its own frame count if it has one."""

    path: str
    num_frames: int | None = field(default=None, metadata=positive())  # None: data.num_frames


@dataclass
class EvaluateConfig:
    temperature: float = field(default=0.2, metadata=non_negative())
    max_new_tokens: int = field(default=512, metadata=positive())
    # None: max_new_tokens on the zero-shot sets too
    zeroshot_max_new_tokens: int | None = field(default=None, metadata=positive())
    num_samples: int | None = field(default=None, metadata=positive())
    batch_size: int = field(default=16, metadata=positive())
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    released: dict[str, ReleasedModel] = field(default_factory=dict)  # by the name its rows carry
    # The verdict RLAIF > SFT: a crossed bootstrap over seeds and questions (vlm_rlaif/verdict.py).
    confidence: float = field(default=0.95, metadata=_check(0, 1, lo_open=True))
    resamples: int = field(default=10_000, metadata=_check(100, None))
    worlds: list[int] = field(default_factory=list)  # world seeds whose eval split SFT and RLAIF also answer

    def validate(self, key: str) -> None:
        if self.confidence >= 1:
            raise ConfigError(f"{key}.confidence: {self.confidence} must be below 1")
        if len(set(self.worlds)) != len(self.worlds) or any(s < 0 for s in self.worlds):
            raise ConfigError(f"{key}.worlds: expected distinct non-negative world seeds; got {self.worlds}")


@dataclass
class LaunchConfig:
    """How a training stage whose `num_processes` is above 1 starts its processes: `accelerate
    launch` with an engine's config (configs/accelerate/), over `num_machines` machines. No
    stage lists this section among its DVC params: the engine changes how a model is trained,
    not which one."""

    accelerate_config: str = "configs/accelerate/ddp.yaml"
    num_machines: int = field(default=1, metadata=positive())
    machine_rank: int = field(default=0, metadata=non_negative())
    main_process_ip: str | None = None
    main_process_port: int | None = field(default=None, metadata=_check(1, 65535))  # null: accelerate's default, 29500

    def validate(self, key: str) -> None:
        if self.machine_rank >= self.num_machines:
            raise ConfigError(f"{key}.machine_rank: {self.machine_rank} is not below num_machines {self.num_machines}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise ConfigError(f"{key}.main_process_ip: {self.num_machines} machines need the address of machine 0")


@dataclass
class Params:
    """One profile: every section every stage reads."""

    seed: int = 0
    world: WorldConfig | None = None
    data: DataConfig = field(default_factory=DataConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    preferences: PreferencesConfig = field(default_factory=PreferencesConfig)
    reward_model: RewardModelConfig = field(default_factory=RewardModelConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)


# --------------------------------------------------------------------------- validation


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _takes_mapping(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`, converting nested dataclasses."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        inner = [a for a in args if a is not type(None)]
        # A mapping is checked against the mapping forms only, so their error names its sub-key.
        mapped = [a for a in inner if _takes_mapping(a)] if isinstance(value, Mapping) else []
        errors = []
        for a in mapped or inner:
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {[_type_name(a) for a in inner]}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {_convert(k, args[0], key): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"{key}: unsupported annotation {tp!r}")


def _check_range(value: Any, meta: Mapping, key: str) -> None:
    if value is None or "range" not in meta:
        return
    lo, hi, lo_open = meta["range"]
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ConfigError(f"{key}: {value!r} must be {'>' if lo_open else '>='} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: {value!r} must be <= {hi}")


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass `cls` from a mapping, validating every key; `key` prefixes messages."""
    where = key or "params"
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        name = f"{key}.{unknown[0]}" if key else str(unknown[0])
        raise ConfigError(f"{name}: unknown key (known keys here: {', '.join(fields)})")
    unset = dataclasses.MISSING
    required = [n for n, f in fields.items() if f.default is unset and f.default_factory is unset]
    missing = [n for n in required if n not in data]
    if missing:
        name = f"{key}.{missing[0]}" if key else missing[0]
        raise ConfigError(f"{name}: missing (this key is required)")
    kwargs = {}
    for name, value in data.items():
        sub = f"{key}.{name}" if key else name
        kwargs[name] = _convert(value, hints[name], sub)
        _check_range(kwargs[name], fields[name].metadata, sub)
    obj = cls(**kwargs)
    for name, f in fields.items():
        if name not in data:
            _check_range(getattr(obj, name), f.metadata, f"{key}.{name}" if key else name)
    if hasattr(obj, "validate"):
        obj.validate(where)
    return obj


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)


def load_params(path: str | Path = "params.yaml", overrides: Mapping[str, Any] | None = None) -> Params:
    """Read and validate a profile; `overrides` replaces whole sections (None entries ignored).

    Notebooks pass the sections papermill injected (`-f params.yaml`) as overrides, so a
    notebook run by hand and one run by DVC validate the same way.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: params file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    for name, value in (overrides or {}).items():
        if value is not None:
            raw[name] = value
    try:
        return from_dict(Params, raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
