"""Curriculum SFT: the easy split (short answers) first, then the hard split (long answers).

The paper tunes its video LMM in two SFT stages, one epoch each. Here both stages are one
training run over one ordered list (so a single learning-rate schedule spans them and a
crash anywhere resumes from the last checkpoint); `sft.curriculum: false` shuffles the two
together for the ablation. `sft.replay_share` draws part of the hard stage from the easy
split again: a language model trained from scratch otherwise forgets to stop after a short
answer (a 7B LLM keeps that from pretraining; zero in the paper profile). The embedded
default also mixes the world's clip-caption examples (and, for the label-reading judge, its
A/B judge examples) into the hard stage (`caption_share`, `judge_share` of it), and asks hard
examples again with their clip captions opening the question (`context_share`): the
abilities the preferences stage asks of the SFT model, which a pretrained LLM brings at
paper scale. Each stage warms up and decays its own
learning rate, as two SFT runs would: under one schedule the hard stage would sit in its
tail, at a rate too low to teach anything new. And it packs each video's questions into one
conversation (`pack_turns`) and passes over the easy split many times (`easy_epochs`):
a language model from scratch needs that many answers before it reads the video at all.

Training is transformers' `Trainer` with this package's video collator (trl's SFTTrainer
expects its own image-message format and collator, not video conversations in the release
layout). Run it in-process, or in `sft.num_processes` processes under an engine of
configs/accelerate/ (`accelerate launch ... -m vlm_rlaif sft --params FILE`; `run` does this for you).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from vlm_rlaif import collate, data, generation, io, logprobs, modeling, prompts, stage, video
from vlm_rlaif.collate import VideoConversationCollator
from vlm_rlaif.config import BaseConfig, ConfigError, Params, SFTConfig
from vlm_rlaif.data import SFTRecord, read_sft
from vlm_rlaif.modeling import load_model_and_processor, save_processor

OUT = Path("artifacts/sft")
CHECKPOINTS = Path("artifacts/checkpoints/sft")
# The part of each family that sees, and the part that connects vision to language.
TOWERS = {"llava_next_video": "vision_tower", "qwen2_5_vl": "visual"}
PROJECTORS = {"llava_next_video": "multi_modal_projector", "qwen2_5_vl": "merger"}
FEATURE_CACHE = 2**30  # bytes of a frozen tower's features kept across epochs


# --------------------------------------------------------------------------- curriculum


@dataclass
class Curriculum:
    """The training order, and where the hard stage starts in it (None when mixed)."""

    records: list[SFTRecord]
    boundary: int | None
    sizes: dict[str, int]


def _epochs(items: Sequence, epochs: float, rng: np.random.Generator) -> list:
    """`epochs` passes over `items`, each in a fresh random order; a fractional pass is cut short."""
    out: list = []
    for e in range(math.ceil(epochs)):
        order = rng.permutation(len(items))
        take = len(items) if e + 1 <= epochs else round((epochs - e) * len(items))
        out.extend(items[i] for i in order[:take])
    return out


def _draw(pool: Sequence, n: int, rng: np.random.Generator) -> list:
    """n examples of `pool` without repeats (all of it if n is larger), in pool order."""
    return [pool[i] for i in sorted(rng.permutation(len(pool))[: min(n, len(pool))])]


def pack_turns(records: list[SFTRecord]) -> list[SFTRecord]:
    """One multi-turn conversation per video from all its single-question records (first-seen
    order): the video is encoded once for every answer that trains on it. Only the first
    human turn keeps the video placeholder, as in the release's multi-turn records."""
    by_video: dict[tuple, list[SFTRecord]] = {}
    for record in records:
        by_video.setdefault((tuple(record.images or ()), record.video), []).append(record)
    packed = []
    for group in by_video.values():
        turns = [*group[0].conversations]
        for record in group[1:]:
            first, *rest = record.conversations
            turns += [dataclasses.replace(first, value=first.value.replace(data.PLACEHOLDER, "").strip()), *rest]
        packed.append(dataclasses.replace(group[0], conversations=turns))
    return packed


def _length_bucket(record: SFTRecord, width: int = 256) -> int:
    """Text length in coarse steps: a short QA, a description or caption, a judge example."""
    return sum(len(turn.value) for turn in record.conversations) // width


def _grouped_by_length(records: list, batch_size: int, rng: np.random.Generator, window: int = 16) -> list:
    """Within each window of `window` batches, put examples of one length bucket in one batch
    (a batch is padded to its longest example; a judge example is three times a caption),
    then shuffle the order of the batches. Buckets are coarse on purpose: sorting by exact
    length would fill each batch with one question type, and the model then fails to learn
    to read the video at all."""
    out: list = []
    for start in range(0, len(records), batch_size * window):
        chunk = sorted(records[start : start + batch_size * window], key=_length_bucket)
        batches = [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        full = [b for b in batches if len(b) == batch_size]
        for i in rng.permutation(len(full)):
            out.extend(full[i])
        out.extend(x for b in batches if len(b) < batch_size for x in b)  # a short batch stays last
    return out


def _video_key(record: SFTRecord) -> str:
    """The video a record is about: its frames' folder, or its video file."""
    return str(Path(record.images[0]).parent) if record.images else str(record.video)


def with_clip_captions(hard: list[SFTRecord], captions: list[SFTRecord]) -> list[SFTRecord]:
    """Each hard example whose video has clip captions, asked again with those captions (in
    clip order) opening the question, as the judge reads them: a language model from
    scratch must be taught to read a context, which a pretrained LLM already does. The answer
    is the record's `grounded` one where it has one: told the captions, say what they support."""
    clips: dict[str, list[str]] = {}
    for record in sorted(captions, key=lambda r: (r.images or [""])[0]):  # clip order
        clips.setdefault(_video_key(record), []).append(record.conversations[-1].value)
    out = []
    for record in hard:
        key = _video_key(record)
        if key not in clips:
            continue
        first, *rest = record.conversations
        question = first.value.replace(data.PLACEHOLDER, "").strip()
        context = prompts.format_context(clips[key])
        asked = f"{data.PLACEHOLDER}\n{prompts.with_context(question, context)}"
        *turns, answer = rest
        if data.GROUNDED in record.extra:
            answer = dataclasses.replace(answer, value=record.extra[data.GROUNDED])
        out.append(dataclasses.replace(record, id=f"{record.id}_context", conversations=[
            dataclasses.replace(first, value=asked), *turns, answer]))
    return out


def build_curriculum(
    easy: list[SFTRecord], hard: list[SFTRecord], captions: list[SFTRecord], judge: list[SFTRecord], cfg: SFTConfig, seed: int
) -> Curriculum:
    """The training order: the easy passes, then the hard stage, which also carries the world's
    clip captions and judge examples (`caption_share`, `judge_share` of it), hard examples
    asked again with their clip captions (`context_share` of the hard split) and replays easy
    examples (`replay_share`)."""
    if cfg.caption_share + cfg.judge_share >= 1:
        raise ValueError("sft.caption_share + sft.judge_share must be below 1: they are shares of the hard stage")
    rng = np.random.default_rng(seed)
    if cfg.pack_turns:
        easy = pack_turns(easy)
    rest = 1 - cfg.caption_share - cfg.judge_share
    extras = [_draw(pool, round(share / rest * len(hard)), rng) for pool, share in ((captions, cfg.caption_share), (judge, cfg.judge_share))]
    # drawn with a generator of their own: the easy stage's order is the same with them or not
    in_context = _draw(with_clip_captions(hard, captions), round(cfg.context_share * len(hard)),
                       np.random.default_rng([seed, 1])) if cfg.context_share else []
    stage2 = hard + extras[0] + extras[1] + in_context
    sizes = {"easy": len(easy), "hard": len(hard), "captions": len(extras[0]), "judge": len(extras[1]),
             "context": len(in_context)}
    easy_epochs = cfg.epochs if cfg.easy_epochs is None else cfg.easy_epochs
    if not cfg.curriculum:
        mixed = _epochs(easy, easy_epochs, rng) + _epochs(stage2, cfg.epochs, rng)
        mixed = [mixed[i] for i in rng.permutation(len(mixed))]
        return Curriculum(_grouped_by_length(mixed, cfg.batch_size, rng), None, sizes)
    replay = _draw(easy, round(cfg.replay_share / (1 - cfg.replay_share) * len(stage2)), rng)
    sizes["replay"] = len(replay)
    first = _grouped_by_length(_epochs(easy, easy_epochs, rng), cfg.batch_size, rng)
    second = _grouped_by_length(_epochs(stage2 + replay, cfg.epochs, rng), cfg.batch_size, rng)
    return Curriculum(first + second, len(first), sizes)


def stage_schedule(kind: str, warmup_ratio: float, total_steps: int, boundary_step: int | None) -> Callable[[int], float]:
    """The learning-rate factor at each optimizer step: each curriculum stage warms up and
    decays on its own, as two SFT runs (easy, then hard) would; one span when the
    stages are mixed. A function of the step alone, so a resumed run continues it exactly."""
    spans = [(0, total_steps)] if boundary_step is None else [(0, boundary_step), (boundary_step, total_steps)]

    def factor(step: int) -> float:
        start, end = next((span for span in spans if step < span[1]), spans[-1])
        length, t = max(1, end - start), step - start
        warmup = math.ceil(warmup_ratio * length)
        if t < warmup:
            return (t + 1) / (warmup + 1)
        progress = min(1.0, (t - warmup) / max(1, length - warmup))
        return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1.0 + math.cos(math.pi * progress))}[kind]

    return factor


# --------------------------------------------------------------------------- model


def _modules(model, part: str):
    """Every module of `model` named `part` (wrappers such as peft's add prefixes)."""
    return [module for name, module in model.named_modules() if name.rsplit(".", 1)[-1] == part]


def set_trainable(model, cfg: SFTConfig, family: str) -> None:
    """Freeze the vision tower and/or the projector as `cfg` asks (the language model trains)."""
    for part, trainable in ((TOWERS[family], cfg.train_vision_tower), (PROJECTORS[family], cfg.train_projector)):
        for module in _modules(model, part):
            module.requires_grad_(trainable)


def video_side_frozen(model, family: str) -> bool:
    """Whether nothing of the vision tower or the projector trains (a LoRA on them included):
    then a video's features are the same in every epoch."""
    parts = [m for part in (TOWERS[family], PROJECTORS[family]) for m in _modules(model, part)]
    return not any(p.requires_grad for module in parts for p in module.parameters())


def fingerprint(params: Params, files: Sequence[Path], base: Path) -> str:
    """What a checkpoint was trained from (params, data, base model, the training code):
    a checkpoint of another run is never resumed."""
    code = [Path(m.__file__) for m in (sys.modules[__name__], collate, data, modeling, video)]
    settings = {"sft": dataclasses.asdict(params.sft), "seed": params.seed, "num_frames": params.data.num_frames}
    return io.run_stamp(code, settings, files, [base])


def full_head_weight(model) -> torch.Tensor | None:
    """The output head's whole [vocabulary, hidden] weight, or None where the fused loss cannot
    read it: a head with a bias, or one an engine shards outside the forward pass (ZeRO-3
    leaves an empty tensor, FSDP a flat shard or a DTensor)."""
    head = model.get_output_embeddings()
    weight = head.weight
    if getattr(head, "bias", None) is not None or type(weight.data).__name__ == "DTensor":
        return None
    return weight if tuple(weight.shape) == (head.out_features, head.in_features) else None


class CheckpointTrainer(Trainer):
    """Trainer with the fused language-model loss, whose resume reads full-model checkpoints
    through `from_pretrained`.

    The loss: the model runs through its (engine-wrapped) forward with `logits_to_keep=1`,
    the language model's final hidden states are taken on the way by a hook, and
    `logprobs.labelled_logprob_sum` turns the labelled ones into the loss chunk by chunk
    (through the Triton row kernels on CUDA); the [batch, length, vocabulary]
    float32 logits of the model's own loss never exist. Same
    value and normalisation as the model's loss (tests/test_sft.py); the model's own loss
    where the head's weight is sharded (`full_head_weight`).

    Resume: `save_pretrained` writes LLaVA-NeXT-Video weights under the hub's key names,
    which Trainer's own loader (a raw `load_state_dict`) does not map back: it would warn about
    missing keys and go on from the base weights. Adapter checkpoints keep Trainer's loader.
    """

    def __init__(self, *args, schedule: Callable[[int], float], **kwargs):
        super().__init__(*args, **kwargs)
        self.schedule = schedule
        self.features = video.Kept(FEATURE_CACHE)  # a frozen tower's output by video

    def _with_video_features(self, model, inputs: dict) -> dict:
        """The batch with each video's features in place of its pixels, where the collator named
        the videos (the tower is frozen): every video passes the tower once per run."""
        keys = inputs.pop("video_keys", None)
        if keys is None:
            return inputs
        if any(key not in self.features for key in keys):
            encoded = generation.encode_videos(model, inputs)
            kept = [self.features.keep(key, features) for key, features in zip(keys, encoded)]
            return generation.with_features(inputs, kept)
        return generation.with_features(inputs, [self.features[key] for key in keys])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        inputs = self._with_video_features(unwrapped, inputs)
        weight = full_head_weight(unwrapped)
        if weight is None or return_outputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        hidden: list[torch.Tensor] = []
        hook = unwrapped.get_decoder().register_forward_hook(lambda module, args, output: hidden.append(output.last_hidden_state))
        try:
            model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=1)
        finally:
            hook.remove()
        total, count = logprobs.labelled_logprob_sum(hidden[-1], weight, inputs["labels"].to(hidden[-1].device), collate.IGNORE_INDEX)
        loss = -total / (num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1))
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # num_items_in_batch counts every process's tokens; DDP averages
        return loss

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The curriculum's own schedule (`stage_schedule`) in place of Trainer's single one."""
        if self.lr_scheduler is None:
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, self.schedule)
        return self.lr_scheduler

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = model if model is not None else self.model
        if hasattr(model, "peft_config"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(model).from_pretrained(resume_from_checkpoint, dtype=model.dtype)
        model.load_state_dict(saved.state_dict())


# --------------------------------------------------------------------------- training


def train(params: Params, prepared: Path = Path("artifacts/prepare"), base: Path = Path("artifacts/base"),
          out: Path = OUT, checkpoints: Path = CHECKPOINTS) -> Path:
    """Run curriculum SFT from `base` on the prepared sets; save the model to `out`."""
    cfg = params.sft
    names = ["sft_easy.json", "sft_hard.json", "sft_captions.json", "sft_judge.json"]
    files = [prepared / n for n in names]
    if not all(p.is_file() for p in files[:2]):
        raise FileNotFoundError(f"{prepared}: no {' or '.join(names[:2])}; run the prepare stage first (dvc repro prepare)")
    sets = [read_sft(p).records if p.is_file() else [] for p in files]  # captions and judge sets are optional
    curriculum = build_curriculum(*sets, cfg, params.seed)

    state = stage.processes()
    cuda = torch.cuda.is_available()
    steps_per_update = cfg.batch_size * cfg.grad_accum * state.num_processes
    total_steps = math.ceil(len(curriculum.records) / steps_per_update)
    boundary_step = None if curriculum.boundary is None else math.ceil(curriculum.boundary / steps_per_update)
    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=1,
        learning_rate=cfg.learning_rate,
        logging_steps=max(1, total_steps // 200),
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to="none",
        remove_unused_columns=False,
        train_sampling_strategy="sequential",
        seed=params.seed,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        activation_checkpointing=cfg.gradient_checkpointing,
        use_cpu=not cuda,
        dataloader_num_workers=0,
    )
    if state.is_main_process:
        io.claim(checkpoints, fingerprint(params, files, base))
    state.wait_for_everyone()
    resume = io.last_checkpoint(checkpoints)

    if params.base.load_in_4bit and cfg.lora is None:
        raise ConfigError("sft.lora: a 4-bit base (base.load_in_4bit) trains adapters only; set sft.lora")
    model, processor = load_model_and_processor(base, dtype=params.base.dtype, load_in_4bit=params.base.load_in_4bit)
    if cfg.lora is not None:
        model = modeling.add_lora(model, cfg.lora, [PROJECTORS[params.base.family]] if cfg.train_projector else None)
    else:
        set_trainable(model, cfg, params.base.family)
    collator = VideoConversationCollator(
        processor,
        params.data.video_root,
        params.data.num_frames,
        cfg.max_length,
        independent_turns=cfg.pack_turns,  # a packed question must not see the others' answers
        video_keys=video_side_frozen(model, params.base.family),
    )
    trainer = CheckpointTrainer(
        model=model, args=args, data_collator=collator, train_dataset=curriculum.records,
        schedule=stage_schedule(cfg.lr_scheduler, cfg.warmup_ratio, total_steps, boundary_step),
    )
    io.report_resume(resume)
    trainer.train(resume_from_checkpoint=resume)

    if trainer.is_world_process_zero():
        final = merged(trainer.model, base, params.base) if cfg.lora is not None else trainer.model
        with io.atomic_dir(out) as tmp:
            final.save_pretrained(tmp)
            save_processor(base, tmp)
            io.write_json(tmp / "log_history.json", io.stable_log(trainer.state.log_history))
            io.write_json(tmp / "curriculum.json", {
                "sizes": curriculum.sizes, "examples": len(curriculum.records), "boundary_step": boundary_step,
                "total_steps": trainer.state.global_step,
            })
    state.wait_for_everyone()
    return out


def merged(model, base: Path, cfg: BaseConfig):
    """The trained adapters folded into the base's weights. A 4-bit layer cannot hold the sum,
    so under QLoRA the adapters go onto the base reloaded in `base.dtype`."""
    if not cfg.load_in_4bit:
        return model.merge_and_unload()
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        full, _ = load_model_and_processor(base, dtype=cfg.dtype)
        return PeftModel.from_pretrained(full, tmp).merge_and_unload()


def run(params: Params) -> Path:
    """The stage: `train` in this process, or in `sft.num_processes` processes (`stage.launch`)."""
    stage.launch(params, "sft", params.sft.num_processes)
    return OUT


def stage_losses(out: Path = OUT) -> dict[str, float]:
    """Mean training loss over the last fifth of each curriculum stage's logged steps."""
    history = [e for e in io.read_json(out / "log_history.json") if "loss" in e]
    boundary = io.read_json(out / "curriculum.json")["boundary_step"]
    stages = {"all": history} if boundary is None else {
        "easy": [e for e in history if e["step"] <= boundary], "hard": [e for e in history if e["step"] > boundary]
    }
    return {name: round(float(np.mean([e["loss"] for e in logs[-max(1, len(logs) // 5):]])), 4)
            for name, logs in stages.items() if logs}

