"""The reward model: a video LMM that reads a response and returns one number.

It sees the conversation, the response as the assistant's turn, and then an evaluation
instruction (`prompts/reward.txt`) asking it to rate that response. Two readings
(`reward_model.reading`). "head", the paper's: the hidden state of the input's last token
goes through a linear head (bias zero at the start) to the reward. "likelihood": the reward
is how much likelier the tuned model finds the response than its frozen base does (mean
log-probability ratio per token, times `likelihood_scale`): a small model from scratch learns
its preferences through the token probabilities it already has, where a head on one state
learns little from a thousand pairs (README). The backbone is a fresh LoRA adapter on a
frozen base: the SFT model by default, or the model
`reward_model.base` names (the paper scores its 7B policy with a 13B reward model). Trained on
the AI preferences with the Bradley-Terry loss plus a small term that keeps the rewards
centred on zero (PAPER.md), through transformers' `Trainer`, checkpointing only the adapter
and the head, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, ProcessorMixin, Trainer, TrainingArguments, set_seed

from vlm_rlaif import data, io, modeling, prompts as prompt_files, stage, video
from vlm_rlaif.config import ConfigError, Params, RewardModelConfig, transformers_scheduler
from vlm_rlaif.data import PreferenceRecord, RLPrompt, read_preferences
from vlm_rlaif.errors import InputError
from vlm_rlaif.generation import distinct_media, encode_video_list, with_features
from vlm_rlaif.logprobs import mean_logprob_per_row
from vlm_rlaif.modeling import build_inputs, load_model_and_processor, save_processor
from vlm_rlaif.verdict import accuracy_against
from vlm_rlaif.video import FrameCache, load_video

OUT = Path("artifacts/reward_model")
CHECKPOINTS = Path("artifacts/checkpoints/reward_model")
PREFERENCES = Path("artifacts/preferences")
HEAD_FILE = "reward_head.safetensors"
ADAPTER_DIR = "adapter"
CONFIG_FILE = "reward_model.json"
READINGS = ("head", "likelihood")


class TooFewPairs(InputError):
    """Fewer preference pairs than `reward_model.min_pairs`: a reward model would learn noise."""


def reward_conversation(prompt: Sequence[Mapping], response: str, context: Sequence[str] | None = None) -> list[dict]:
    """The turns the reward model reads: the prompt's turns (ending with the human turn the
    response answers; the first carries the video placeholder), the response as the
    assistant's reply, then the evaluation instruction, the clip captions in it when given."""
    turns = [dict(t) for t in prompt]
    if not turns or turns[-1].get("from") not in ("human", "user"):
        raise ValueError(f"reward_conversation: the prompt must end with a human turn, got {[t.get('from') for t in turns]}")
    return [
        *turns,
        {"from": "gpt", "value": response},
        {"from": "human", "value": prompt_files.reward_instruction(prompt_files.format_context(list(context)) if context else None)},
    ]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, whichever side the padding is on."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(-1).long().argmax(-1)


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, centering_coef: float) -> torch.Tensor:
    """Bradley-Terry, -log sigmoid(r_chosen - r_rejected) averaged, plus `centering_coef`
    times |mean(r_chosen + r_rejected)|: the loss sees only differences, and the term
    anchors the rewards' level at zero for PPO."""
    margin = chosen - rejected
    return F.binary_cross_entropy_with_logits(margin, torch.ones_like(margin)) + centering_coef * (chosen + rejected).mean().abs()


def reward_inputs(processor: ProcessorMixin, videos: list[np.ndarray],
                  conversations: list[list[dict]], reading: str) -> dict:
    """`build_inputs` for a reading: the likelihood reading also gets the response's tokens."""
    likelihood = reading == "likelihood"
    batch = dict(build_inputs(processor, videos, conversations, add_generation_prompt=False,
                              assistant_masks=likelihood))
    if likelihood:
        batch["response_mask"] = response_mask(batch.pop("assistant_masks"))
    return batch


def response_mask(assistant_masks: torch.Tensor) -> torch.Tensor:
    """[B, L] the last assistant turn of each row (the response scored; earlier turns of a
    multi-turn prompt are left out) from `build_inputs`' assistant masks."""
    mask = assistant_masks.bool()
    starts = mask & ~torch.nn.functional.pad(mask, (1, 0))[:, :-1]
    turn = starts.long().cumsum(1) * mask
    return mask & (turn == turn.max(1, keepdim=True).values)


class RewardModel(nn.Module):
    """A backbone (a LLaVA-style model, LoRA-wrapped) and a scalar head in float32, read by
    the head or by the response's likelihood (`reading`, `scale`: reward_model's settings)."""

    def __init__(self, backbone: PreTrainedModel, head: nn.Linear | None = None, *,
                 reading: str = "head", scale: float = 1.0):
        super().__init__()
        if reading not in READINGS:
            raise ValueError(f"reward model reading {reading!r}; known: {', '.join(READINGS)}")
        self.backbone, self.reading, self.scale = backbone, reading, scale
        hidden = backbone.config.get_text_config().hidden_size
        if head is None:
            head = nn.Linear(hidden, 1)
            nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))
            nn.init.zeros_(head.bias)
        self.head = head.to(device=backbone.device, dtype=torch.float32)

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def _body(self) -> nn.Module:
        """The model without its language-model head: the reward reads hidden states, and
        [batch, length, vocabulary] logits would be wasted memory at 7B."""
        model = self.backbone.get_base_model() if hasattr(self.backbone, "get_base_model") else self.backbone
        return model.model

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """What Trainer calls for `reward_model.gradient_checkpointing`: the backbone recomputes."""
        self.backbone.activation_checkpointing_enable(**kwargs)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor | None = None, **inputs) -> torch.Tensor:
        """One reward per row: the head on its last real token's state, or the likelihood
        reading over the tokens `response_mask` marks."""
        inputs |= {"input_ids": input_ids, "attention_mask": attention_mask}
        hidden = self._body()(**inputs).last_hidden_state
        if self.reading == "head":
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            return self.head(hidden[rows, last_token_index(attention_mask)].float()).squeeze(-1)
        if response_mask is None:
            raise ValueError("the likelihood reading needs the response's tokens (response_mask)")
        weight = self.backbone.get_output_embeddings().weight
        tuned = mean_logprob_per_row(hidden, weight, input_ids, response_mask)
        with torch.no_grad(), self.backbone.disable_adapter():
            frozen = self._body()(**inputs).last_hidden_state
            base = mean_logprob_per_row(frozen, weight, input_ids, response_mask)
        return self.scale * (tuned - base)


@torch.no_grad()
def score(
    reward_model: RewardModel,
    processor: ProcessorMixin,
    videos: Sequence[np.ndarray],
    prompts: Sequence[Sequence[Mapping]],
    responses: Sequence[str],
    *,
    contexts: Sequence[Sequence[str] | None] | None = None,
    features: Sequence[torch.Tensor] | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> torch.Tensor:
    """The reward of each (video frames, prompt turns, response) row: what PPO asks of the
    reward model. `contexts` (clip captions per row) go into the instruction; `features`
    (from `generation.encode_video_list`, one per row) skip the vision tower."""
    rows = len(responses)
    if len(videos) != rows or len(prompts) != rows or any(x is not None and len(x) != rows for x in (contexts, features)):
        raise ValueError(f"score: {len(videos)} videos, {len(prompts)} prompts, {rows} responses, "
                         f"{'no' if contexts is None else len(contexts)} contexts, {'no' if features is None else len(features)} features: "
                         "give one of each per row")
    conversations = [reward_conversation(p, r, None if contexts is None else contexts[i]) for i, (p, r) in enumerate(zip(prompts, responses))]
    was_training = reward_model.training
    reward_model.eval()
    rewards = []
    try:
        for start in tqdm(range(0, rows, batch_size), desc="rewards", disable=not progress):
            stop = start + batch_size
            inputs = reward_inputs(processor, list(videos[start:stop]), conversations[start:stop],
                                   reward_model.reading)
            inputs = {k: v.to(reward_model.device) for k, v in inputs.items()}
            kwargs = with_features(inputs, features[start:stop]) if features is not None else inputs
            rewards.append(reward_model(**kwargs).float().cpu())
    finally:
        reward_model.train(was_training)
    return torch.cat(rewards) if rewards else torch.zeros(0)


# --------------------------------------------------------------------------- saving


def save_weights(reward_model: RewardModel, out: Path) -> None:
    """The trained part only: the adapter (peft's safetensors) and the head."""
    reward_model.backbone.save_pretrained(out / ADAPTER_DIR)
    save_file({k: v.detach().cpu().contiguous() for k, v in reward_model.head.state_dict().items()}, out / HEAD_FILE)


def load_weights(reward_model: RewardModel, folder: Path) -> None:
    """Put the adapter and head `save_weights` wrote back into `reward_model`."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(reward_model.backbone, load_file(folder / ADAPTER_DIR / "adapter_model.safetensors"))
    reward_model.head.load_state_dict(load_file(folder / HEAD_FILE))


def save_reward_model(reward_model: RewardModel, out: Path, base: str | os.PathLike) -> None:
    """Adapter, head, the base's processor, and the base the adapter sits on: `load_reward_model`
    needs only the folder's path."""
    save_weights(reward_model, out)
    save_processor(base, out / ADAPTER_DIR)
    io.write_json(out / CONFIG_FILE, {
        "base": str(base), "hidden_size": reward_model.head.in_features,
        "reading": reward_model.reading, "scale": reward_model.scale,
    })


def load_reward_model(path: str | os.PathLike, *, dtype: str = "float32", load_in_4bit: bool = False) -> tuple[RewardModel, ProcessorMixin]:
    """A saved reward model and its processor: the base by the path it was saved with (relative
    paths from the repo root), the adapter on it, the head."""
    from peft import PeftModel

    path = Path(path)
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path}: no {CONFIG_FILE}; not a saved reward model")
    saved = io.read_json(path / CONFIG_FILE)
    model, processor = load_model_and_processor(saved["base"], dtype=dtype, load_in_4bit=load_in_4bit, device_map=modeling.process_device_map())
    backbone = PeftModel.from_pretrained(model, path / ADAPTER_DIR)
    head = nn.Linear(saved["hidden_size"], 1)
    head.load_state_dict(load_file(path / HEAD_FILE))
    return RewardModel(backbone, head, **reading_of(saved)).eval(), processor


def reading_of(saved: Mapping) -> dict:
    """How a saved reward model is read (a model saved before readings existed has a head)."""
    return {"reading": saved.get("reading", "head"), "scale": saved.get("scale", 1.0)}


# --------------------------------------------------------------------------- training


def in_4bit(params: Params) -> bool:
    """Whether the reward model's base is held in nf4: its own setting on its own base, the
    policy's on the SFT model it shares with the policy."""
    return params.reward_model.load_in_4bit if params.reward_model.base else params.base.load_in_4bit


def split_heldout(records: Sequence, heldout: float, seed: int, prompt=None) -> tuple[list, list]:
    """(train, held out), a prompt's pairs on one side (`prompt` names a record's prompt; each
    record is its own without it): `heldout` below 1 is a share of the pairs, from 1 up a
    count (the paper holds out 500), met by whole prompts; at least one pair on each side."""
    n = len(records)
    if heldout >= 1 and heldout != int(heldout):
        raise ValueError(f"reward_model.heldout {heldout}: from 1 up it is a count of pairs and must be whole")
    count = round(heldout * n) if heldout < 1 else int(heldout)
    count = max(1, count)
    if n - count < 1:
        raise ValueError(f"reward_model.heldout {heldout}: {n} preference pairs leave nothing to train on after holding out {count}")
    groups: dict = {}
    for i, record in enumerate(records):
        groups.setdefault(i if prompt is None else prompt(record), []).append(i)
    members = list(groups.values())
    held: set[int] = set()
    for g in np.random.default_rng(seed).permutation(len(members)):
        if len(held) >= count:
            break
        held.update(members[g])
    if len(held) == n:
        raise ValueError(f"reward_model.heldout {heldout}: {n} preference pairs of {len(members)} "
                         "prompts leave nothing to train on")
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def pair_key(record: PreferenceRecord | Mapping) -> str:
    """A judged pair's name: its prompt's uid and its number among that prompt's pairs."""
    extra = record.extra if isinstance(record, PreferenceRecord) else record
    return f"{extra.get('uid')}:{extra.get('pair', 0)}"


def _context(record: PreferenceRecord | Mapping, wanted: bool, uid: object) -> list[str] | None:
    """The record's clip captions when the instruction carries them, else None."""
    if not wanted:
        return None
    extra = record.extra if isinstance(record, PreferenceRecord) else record
    if not extra.get("context"):
        raise ValueError(f"preference pair uid {uid}: reward_model.context_in_instruction is set but the record has no clip-caption \"context\"")
    return extra["context"]


class PairCollator:
    """Preference pairs -> one batch: the chosen rows, then the rejected rows (same videos).
    A record's turns before its last (the gpt slot the outputs fill) are the prompt."""

    def __init__(self, processor: ProcessorMixin, video_root: str | os.PathLike, num_frames: int, cfg: RewardModelConfig):
        self.processor, self.video_root, self.cfg = processor, video_root, cfg
        self.frames = FrameCache(num_frames)

    def __call__(self, records: Sequence[PreferenceRecord]) -> dict:
        videos = [self.frames(r.media(self.video_root)) for r in records]
        rows = [
            reward_conversation([t.to_dict() for t in r.conversations[:-1]], getattr(r, side),
                                _context(r, self.cfg.context_in_instruction, r.extra.get("uid", "?")))
            for side in ("chosen", "rejected") for r in records
        ]
        batch = reward_inputs(self.processor, videos + videos, rows, self.cfg.reading)
        if batch["input_ids"].shape[1] > self.cfg.max_length:
            uids = [r.extra.get("uid", "?") for r in records]
            raise ValueError(f"preference pairs (uids {uids}): {batch['input_ids'].shape[1]} tokens exceed reward_model.max_length "
                             f"{self.cfg.max_length}; the instruction at the end would be cut: raise it")
        return batch


class RewardTrainer(Trainer):
    """Bradley-Terry on the [chosen; rejected] rows of each batch; checkpoints hold the
    adapter and head only (the frozen base is the same for every checkpoint)."""

    def __init__(self, *args, centering_coef: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.centering_coef = centering_coef

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        chosen, rejected = model(**inputs).chunk(2)
        loss = preference_loss(chosen, rejected, self.centering_coef)
        return (loss, {"chosen": chosen, "rejected": rejected}) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if self.args.should_save:
            save_weights(self.accelerator.unwrap_model(self.model), Path(output_dir or self.args.output_dir))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_weights(self.accelerator.unwrap_model(model if model is not None else self.model), Path(resume_from_checkpoint))


def fingerprint(params: Params, pairs: Path, base: Path | str) -> str:
    """What a checkpoint was trained from: a checkpoint of another run is never resumed."""
    code = [Path(m.__file__) for m in (sys.modules[__name__], data, modeling, video, prompt_files)]
    settings = {"reward_model": dataclasses.asdict(params.reward_model), "seed": params.seed, "num_frames": params.data.num_frames}
    models = [base] if Path(base).is_dir() else []
    return io.run_stamp(code, settings | {"base": str(base), "instruction": prompt_files.load("reward")}, [pairs], models)


def training_pairs(params: Params, preferences: Path, prepared: Path = Path("artifacts/prepare")) -> Path:
    """The pairs the reward model learns from: the preference stage's AI feedback, or with
    `reward_model.preferences: released` the release's (data.preference_file, as prepared)."""
    if params.reward_model.preferences == "generated":
        return preferences / "preferences.json"
    path = prepared / "preferences.json"
    if not path.is_file():
        raise ConfigError(f"reward_model.preferences: released, but there is no {path}; name the release's pairs in data.preference_file")
    return path


def train(params: Params, preferences: Path = PREFERENCES, policy: Path = Path("artifacts/sft"),
          out: Path = OUT, checkpoints: Path = CHECKPOINTS) -> Path:
    """Train the reward model on `preferences/preferences.json`, holding out
    `reward_model.heldout` pairs; save it to `out` with the split it used."""
    cfg = params.reward_model
    pairs_file = training_pairs(params, preferences)
    records = read_preferences(pairs_file).records
    if len(records) < cfg.min_pairs:
        raise TooFewPairs(f"{pairs_file}: {len(records)} preference pairs, fewer than reward_model.min_pairs "
                          f"({cfg.min_pairs}); the judge kept too few (reports/metrics/preferences.json)")
    train_set, heldout = split_heldout(records, cfg.heldout, params.seed,
                                       prompt=lambda r: r.extra.get("uid", id(r)))
    base = cfg.base or policy  # the paper's reward model sits on a larger SFT model than its policy

    state = stage.processes()
    cuda = torch.cuda.is_available()
    total_steps = math.ceil(cfg.epochs * math.ceil(len(train_set) / (cfg.batch_size * cfg.grad_accum * state.num_processes)))
    args = TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=transformers_scheduler(cfg.lr_scheduler),
        warmup_steps=math.ceil(cfg.warmup_ratio * total_steps),
        logging_steps=max(1, total_steps // 100),
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        report_to="none",
        remove_unused_columns=False,
        seed=params.seed,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        activation_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},  # the frozen embeddings' outputs need no grad
        use_cpu=not cuda,
        dataloader_num_workers=0,
    )
    if state.is_main_process:
        io.claim(checkpoints, fingerprint(params, pairs_file, base))
    state.wait_for_everyone()
    resume = io.last_checkpoint(checkpoints)

    model, processor = load_model_and_processor(base, dtype=params.base.dtype, load_in_4bit=in_4bit(params))
    set_seed(params.seed)  # the adapter's and the head's initial weights are drawn: the same in every run
    reward_model = RewardModel(modeling.add_lora(model, cfg.lora), reading=cfg.reading,
                               scale=cfg.likelihood_scale)
    trainer = RewardTrainer(
        model=reward_model, args=args, train_dataset=train_set, centering_coef=cfg.centering_coef,
        data_collator=PairCollator(processor, params.data.video_root, params.data.num_frames, cfg),
    )
    io.report_resume(resume)
    trainer.train(resume_from_checkpoint=resume)

    if trainer.is_world_process_zero():
        with io.atomic_dir(out) as tmp:
            save_reward_model(reward_model, tmp, base)
            io.write_json(tmp / "log_history.json", io.stable_log(trainer.state.log_history))
            io.write_json(tmp / "split.json", {
                "train": [pair_key(r) for r in train_set],
                "heldout": [pair_key(r) for r in heldout],
                "total_steps": trainer.state.global_step,
            })
    state.wait_for_everyone()
    return out


# --------------------------------------------------------------------------- measured quality


def reward_pairs(
    reward_model: RewardModel,
    processor: ProcessorMixin,
    records: Sequence[Mapping],
    *,
    video_root: str | os.PathLike,
    num_frames: int,
    context_in_instruction: bool,
    batch_size: int = 8,
    progress: bool = False,
) -> np.ndarray:
    """[N, 2] rewards of each record's output_1 and output_2 (judged records of the
    preferences stage, or its preference records: both carry the prompt's uid), each video
    encoded once for both."""
    media, video_of = distinct_media([RLPrompt.from_dict(r, f"pair {i}") for i, r in enumerate(records)], video_root)
    videos = [load_video(source, num_frames) for source in media]
    features = encode_video_list(reward_model.backbone, processor, videos, batch_size)
    contexts = [_context(r, context_in_instruction, r["uid"]) for r in records]
    rewards = score(
        reward_model, processor, [videos[v] for v in video_of] * 2, [r["conversations"][:1] for r in records] * 2,
        [r[key]["value"] for key in ("output_1", "output_2") for r in records],
        contexts=contexts * 2, features=[features[v] for v in video_of] * 2, batch_size=batch_size, progress=progress,
    )
    return rewards.view(2, len(records)).T.numpy()


def _pearson(x: Sequence[float], y: Sequence[float]) -> float | None:
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(np.corrcoef(x, y)[0, 1]) if len(x) > 2 and x.std() > 0 and y.std() > 0 else None


def _centred(values: np.ndarray, groups: Sequence) -> np.ndarray:
    """Each row's values less the mean of its group's: a reward learnt from pairs within a
    prompt is defined only up to a constant per prompt."""
    keys = np.asarray([str(g) for g in groups])
    out = np.asarray(values, float).copy()
    for key in set(keys):
        out[keys == key] -= out[keys == key].mean()
    return out.ravel()


def reward_quality(judged: Sequence[Mapping], rewards: np.ndarray, split: Mapping[str, list], scenes: Mapping[str, Mapping] | None) -> dict:
    """How the reward model ranks pairs it did not train on. `judged` are the preferences
    stage's judged records (those with a verdict), `rewards` their [N, 2] rewards, `split`
    the pairs (`pair_key`) it trained on and held out. Held-out pairs are scored against
    their AI label; pairs the judge dropped against its averaged verdict; both against the
    oracle where the world has one, next to the judge's own agreement on the same pairs, with
    the correlation of rewards (and of reward margins within a pair) with the oracle's scores."""
    from vlm_rlaif.preferences import oracle_scores, oracle_verdict

    if len(judged) != len(rewards):
        raise ValueError(f"reward_quality: {len(judged)} judged records, {len(rewards)} reward pairs")
    trained, heldout = set(split["train"]), set(split["heldout"])
    held = [i for i, r in enumerate(judged) if pair_key(r) in heldout]
    unkept = [i for i, r in enumerate(judged) if pair_key(r) not in trained | heldout]
    winners = {i: 1 if rewards[i, 0] > rewards[i, 1] else 2 for i in range(len(judged))}
    ai = {i: r["preference"] for i, r in enumerate(judged)}
    quality = {
        "pairs": {"train": len(trained), "heldout": len(held), "unkept": len(unkept)},
        "heldout": {"ai": accuracy_against(winners, ai, held)},
        "unkept": {"judge": accuracy_against(winners, ai, unkept)},
        "rewards": {"mean": float(rewards.mean()), "std": float(rewards.std())},
    }
    if scenes is not None:
        truth = {i: oracle_verdict(r, scenes) for i, r in enumerate(judged)}
        unseen = held + unkept
        scores = np.array([oracle_scores(judged[i], scenes) for i in unseen]).reshape(-1, 2)
        quality["heldout"]["oracle"] = accuracy_against(winners, truth, held)
        quality["unkept"]["oracle"] = accuracy_against(winners, truth, unkept)
        kinds = sorted({judged[i].get("type", "describe") for i in unseen})
        quality["oracle"] = {
            "reward_model": accuracy_against(winners, truth, unseen),
            "judge": accuracy_against(ai, truth, unseen),
            "by_kind": {k: accuracy_against(winners, truth, [i for i in unseen if judged[i].get("type", "describe") == k]) for k in kinds},
            "reward_correlation": _pearson(rewards[unseen].ravel(), scores.ravel()),
            "within_prompt_correlation": _pearson(*(_centred(x, [judged[i]["uid"] for i in unseen])
                                                    for x in (rewards[unseen], scores))),
            "margin_correlation": _pearson(rewards[unseen, 0] - rewards[unseen, 1], scores[:, 0] - scores[:, 1]),
        }
    return quality


def run(params: Params, preferences: Path = PREFERENCES, policy: Path = Path("artifacts/sft"), out: Path = OUT,
        progress: bool = True) -> np.ndarray:
    """The stage: train (resuming from the last checkpoint of the same run), in
    `reward_model.num_processes` processes if asked, then the rewards of every judged pair
    (`out/rewards.json`), the input of `reward_quality`."""
    stage.launch(params, "reward_model", params.reward_model.num_processes, preferences=preferences, policy=policy, out=out)
    judged = [r for r in io.read_json(preferences / "judged.json") if r["judge"] is not None]
    reward_model, processor = load_reward_model(out, dtype=params.base.dtype)
    rewards = reward_pairs(
        reward_model, processor, judged, video_root=params.data.video_root, num_frames=params.data.num_frames,
        context_in_instruction=params.reward_model.context_in_instruction, batch_size=params.reward_model.batch_size, progress=progress,
    )
    io.write_json(out / "rewards.json", {"uids": [r["uid"] for r in judged], "rewards": rewards.round(6).tolist()})
    return rewards

