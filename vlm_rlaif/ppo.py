"""PPO: the policy optimised against the reward model, with a KL penalty to the SFT reference.

One pass over the RL prompts (or `ppo.num_prompts` of them) in rollout batches of
`ppo.rollout_batch_size`: each batch is a rollout (`rollout.collect`), then `ppo.ppo_epochs`
passes over it in minibatches of `ppo.step_batch_size`, each an optimizer step on the
policy's clipped surrogate plus `ppo.vf_coef` times the value model's clipped loss, with the
gradient norm clipped (PAPER.md for every setting). With `ppo.policy_init` the policy adapter first
takes the paper's policy-init SFT pass (`initialise_policy`). The policy and the value model are
adapters on one frozen base (`policy.Models`); their adapters, the value head, the optimizer
and the schedule are checkpointed every `ppo.save_steps` rollout batches, and a killed run
resumes from the last checkpoint: the rollout of batch k is drawn under seed (seed, k), so a
resumed run draws what the uninterrupted one would have. The stage trains one policy per seed
of `ppo.seeds` (`train_seeds`), so the evaluation can set RLAIF's gain against its spread.

With `ppo.num_processes` above 1 (`run`) each process rolls out its share of every batch and
steps on its share of every minibatch; gradients, whitening moments and the logged figures
are averaged over the processes, so the run optimises what one process with the whole batch
would.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments, get_scheduler

from vlm_rlaif import io, policy, ppo_math, rollout, stage
from vlm_rlaif.config import ConfigError, Params, transformers_scheduler
from vlm_rlaif.collate import VideoConversationCollator
from vlm_rlaif.data import RLPrompt, SFTRecord, read_rl_prompts, read_sft
from vlm_rlaif.modeling import save_processor
from vlm_rlaif.policy import POLICY, VALUE, Models

OUT = Path("artifacts/ppo")
CHECKPOINTS = Path("artifacts/checkpoints/ppo")
LOG_FILE = "log.json"
PLOTS_DIR = Path("reports/plots/ppo")  # each seed's log again (seed-N.json), where `dvc plots show` finds it
CRITIC_MIN_EXPLAINED = 0.2  # below this share of the returns' variance the advantages are mostly noise


def minibatch_step(models: Models, batch: rollout.Rollout, cfg, accelerator: Accelerator,
                   optimizer, scheduler, value_clip: float) -> dict[str, float]:
    """One optimizer step on a minibatch: the policy's clipped surrogate, then the value
    model's loss clipped at `value_clip` (each backpropagated after its own pass, one adapter
    at a time), each model's gradient norm clipped on its own: the critic's large early
    gradients must not shrink the policy's step."""
    rows = dict(prompts=batch.prompts, features=batch.features, responses=batch.responses, response_mask=batch.mask, videos=batch.videos)
    mask = batch.mask.float().to(models.device)
    logprobs, entropy = models.logprobs(POLICY, **rows, with_entropy=True)
    pg_loss, pg_stats = ppo_math.policy_loss(logprobs, batch.logprobs.to(models.device), batch.advantages.to(models.device), mask, cfg.clip_range)
    accelerator.backward(pg_loss)
    values = models.values(**rows)
    vf_loss, vf_stats = ppo_math.value_loss(values, batch.values.to(models.device), batch.returns.to(models.device), mask, value_clip)
    accelerator.backward(cfg.vf_coef * vf_loss)
    average_gradients(models.trainable_parameters(), accelerator)
    grad_norm = accelerator.clip_grad_norm_(models.policy_parameters(), cfg.max_grad_norm)
    value_grad_norm = accelerator.clip_grad_norm_(models.value_parameters(), cfg.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"policy_loss": pg_loss.item(), "value_loss": vf_loss.item(), "entropy": ppo_math.masked_mean(entropy.detach(), mask).item(),
            "grad_norm": float(grad_norm), "value_grad_norm": float(value_grad_norm),
            **{k: v.item() for k, v in {**pg_stats, **vf_stats}.items()}}


def make_optimizer(models: Models, cfg) -> torch.optim.AdamW:
    """AdamW over the policy at `ppo.learning_rate` and the value model at its own rate: a
    critic must cover the returns' spread in the few steps a run takes."""
    return torch.optim.AdamW([
        {"params": models.policy_parameters(), "lr": cfg.learning_rate},
        {"params": models.value_parameters(), "lr": cfg.value_learning_rate or cfg.learning_rate},
    ])


def value_clip_range(models: Models, cfg) -> float:
    """`ppo.value_clip` in the unit `ppo.value_clip_unit` names: as given, or in standard
    deviations of the returns the value head was calibrated on (its unit), so the critic's
    step is sized to what it must learn even once a rollout's returns stop varying."""
    if cfg.value_clip_unit == "absolute":
        return cfg.value_clip
    return cfg.value_clip * float(models.value_head.scale)


def average_gradients(parameters: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Data parallelism by hand: each gradient replaced by its mean over the processes. What
    PPO trains (adapters and a head) is small enough to all-reduce in one flat tensor, and the
    frozen base needs no wrapper that would fight the adapter switching of `policy.Models`."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    for p, part in zip(parameters, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p).clone()


def mean_over_processes(stats: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """Each figure's mean over the processes (each reports on its share of the rollout)."""
    if accelerator.num_processes == 1:
        return stats
    values = accelerator.reduce(torch.tensor(list(stats.values()), dtype=torch.float64, device=accelerator.device), reduction="mean")
    return dict(zip(stats, values.tolist()))


def rollout_stats(batch: rollout.Rollout) -> dict[str, float]:
    """What a rollout says of the policy and the critic: the reward model's mean score, the
    score with its penalties (what is optimised, with the KL), the mean summed KL per response,
    the mean return and value at a response's first token, how much of the returns' variance
    the critic explained before the updates, response length and the share that ended on EOS."""
    lengths = batch.mask.sum(1).float()
    return {"reward": batch.scores.mean().item(), "score": batch.penalised.mean().item(),
            "kl": batch.kl.sum(1).mean().item(), "return": batch.returns[:, 0].mean().item(),
            "value": batch.values[:, 0].mean().item(),
            "explained_variance": ppo_math.explained_variance(batch.values, batch.returns,
                                                              batch.mask),
            "response_length": lengths.mean().item(), "eos_rate": batch.ended.float().mean().item()}


def oracle_reward(params: Params,
                  prepared: Path) -> Callable[[list[RLPrompt], list[str]], torch.Tensor]:
    """`ppo.reward: oracle`: each response scored by the synthetic world's oracle (fact F1 of a
    description, 1 for a right short answer), times `ppo.oracle_scale`."""
    from vlm_rlaif.preferences import answer_score

    path = prepared / "scenes.json"
    if not path.is_file():
        raise ConfigError(f"ppo.reward: oracle scores the synthetic world only, and {path} does "
                          "not exist (the data has no scene records)")
    scenes = io.read_json(path)

    def reward(prompts: list[RLPrompt], responses: list[str]) -> torch.Tensor:
        scores = [answer_score(p.to_dict(), r, scenes) for p, r in zip(prompts, responses)]
        return params.ppo.oracle_scale * torch.tensor(scores)
    return reward


def learning_flags(log: list[dict], share: float = 0.25) -> dict:
    """Whether a run learnt, from its log's first and last quarter of rollouts: the critic's
    explained variance (flagged below CRITIC_MIN_EXPLAINED), how far the value loss fell, and
    whether the shaped score rose."""
    k = max(1, round(share * len(log)))
    first, last = log[:k], log[-k:]

    def mean(rows: list[dict], key: str) -> float:
        return float(np.mean([r[key] for r in rows]))

    explained, gain = mean(last, "explained_variance"), mean(last, "score") - mean(first, "score")
    return {"explained_variance": round(explained, 4), "critic_fits": explained >= CRITIC_MIN_EXPLAINED,
            "value_loss_fall": round(mean(first, "value_loss") / max(mean(last, "value_loss"), 1e-12), 3),
            "score_gain": round(gain, 4), "score_rises": gain > 0}


# --------------------------------------------------------------------------- checkpoints


def save_checkpoint(folder: Path, models: Models, optimizer, scheduler, step: int, kl_coef: float, log: list[dict]) -> None:
    """The trained state after rollout batch `step`: adapters, value head, optimizer, schedule."""
    with io.atomic_dir(folder) as tmp:
        models.model.save_pretrained(tmp, selected_adapters=[POLICY, VALUE])
        save_file({k: v.detach().cpu().contiguous() for k, v in models.value_head.state_dict().items()}, tmp / "value_head.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        io.write_json(tmp / "state.json", {"step": step, "kl_coef": kl_coef, "log": log})


def load_checkpoint(folder: Path, models: Models, optimizer, scheduler) -> dict:
    """Put a checkpoint's state back; returns its state.json (step, kl_coef, log)."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(models.model, load_file(folder / "adapter_model.safetensors"), adapter_name=POLICY)
    set_peft_model_state_dict(models.model, load_file(folder / VALUE / "adapter_model.safetensors"), adapter_name=VALUE)
    models.value_head.load_state_dict(load_file(folder / "value_head.safetensors"))
    state = torch.load(folder / "optimizer.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return io.read_json(folder / "state.json")


def fingerprint(params: Params, prompts_file: Path, sft: Path, reward: Path) -> str:
    """What a checkpoint was trained from: a checkpoint of another run is never resumed."""
    from vlm_rlaif import generation, logprobs, modeling, reward_model

    code = [Path(m.__file__) for m in (sys.modules[__name__], policy, ppo_math, rollout, generation, logprobs, modeling, reward_model)]
    ppo = {k: v for k, v in dataclasses.asdict(params.ppo).items() if k != "seeds"}  # a run is one seed's
    settings = {"ppo": ppo, "seed": params.seed, "num_frames": params.data.num_frames}
    inputs = [prompts_file, prompts_file.with_name("policy_init.json"), reward / policy.HEAD_FILE]
    return io.run_stamp(code, settings, inputs, [sft, reward / policy.ADAPTER_DIR])


# --------------------------------------------------------------------------- training


def within_query_length(prompts: list[RLPrompt], tokenizer, query_length: int) -> tuple[list[RLPrompt], int]:
    """The prompts whose question (text tokens; the video's come on top) fits `ppo.query_length`,
    as the paper's rollouts keep, and how many were left out."""
    kept = [p for p in prompts if len(tokenizer(p.question(), add_special_tokens=False)["input_ids"]) <= query_length]
    if not kept:
        raise ConfigError(f"ppo.query_length {query_length}: no RL prompt's question is that short")
    return kept, len(prompts) - len(kept)


def initialise_policy(models: Models, params: Params, records: list[SFTRecord], work: Path) -> None:
    """The paper's policy initialisation: before PPO, one epoch of SFT of the fresh policy
    adapter on PPO_init.json (lr 1e-4, cosine, 3 % warmup in the paper), the loss on the
    assistant's tokens; the value and reward adapters take no part."""
    cfg = params.ppo
    steps = math.ceil(len(records) / cfg.policy_init_batch_size)
    args = TrainingArguments(
        output_dir=str(work), per_device_train_batch_size=cfg.policy_init_batch_size, num_train_epochs=1,
        learning_rate=cfg.policy_init_learning_rate, lr_scheduler_type="cosine", warmup_steps=math.ceil(0.03 * steps),
        logging_steps=max(1, steps // 20), save_strategy="no", report_to="none", remove_unused_columns=False, seed=params.seed,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    collator = VideoConversationCollator(models.processor, params.data.video_root, params.data.num_frames, params.sft.max_length)
    with models.adapter(POLICY):
        Trainer(model=models.model, args=args, data_collator=collator, train_dataset=records).train()


def train(params: Params, prepared: Path = Path("artifacts/prepare"), sft: Path = Path("artifacts/sft"),
          reward: Path = Path("artifacts/reward_model"), out: Path = OUT, checkpoints: Path = CHECKPOINTS,
          progress: bool = True) -> Path:
    """PPO from the SFT model against the reward model; the policy adapter and the per-step log to `out`."""
    cfg = params.ppo
    prompts_file = prepared / "rl_prompts.json"
    oracle = oracle_reward(params, prepared) if cfg.reward == "oracle" else None
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    models = policy.load(params, sft, reward)
    prompts, too_long = within_query_length(read_rl_prompts(prompts_file).records, models.processor.tokenizer, cfg.query_length)
    order = np.random.default_rng(params.seed).permutation(len(prompts))[: cfg.num_prompts or len(prompts)]
    batches = [order[i : i + cfg.rollout_batch_size] for i in range(0, len(order), cfg.rollout_batch_size)]
    batches = [b for b in batches if len(b) == cfg.rollout_batch_size] or batches[:1]  # a short last batch is dropped
    minibatches = math.ceil(len(batches[0]) / cfg.step_batch_size)  # per PPO epoch, in every process
    if len(batches[0]) // world < minibatches:
        raise ConfigError(f"ppo.num_processes: a rollout of {len(batches[0])} RL prompts is too small to share among {world} processes")

    models.to(accelerator.device)
    optimizer = make_optimizer(models, cfg)
    scheduler = get_scheduler(transformers_scheduler(cfg.lr_scheduler), optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=len(batches) * cfg.ppo_epochs * minibatches)

    init_file = prepared / "policy_init.json"
    if cfg.policy_init and not init_file.is_file():
        raise ConfigError(f"ppo.policy_init: {init_file} does not exist; name the policy-init data in data.policy_init_file")
    if accelerator.is_main_process:
        io.claim(checkpoints, fingerprint(params, prompts_file, sft, reward))
    accelerator.wait_for_everyone()
    start, log, kl_coef = 0, [], cfg.kl_coef
    resume = io.last_checkpoint(checkpoints, "step", "state.json")
    if resume is not None:  # the checkpoint holds the initialised policy too
        io.report_resume(resume)
        state = load_checkpoint(resume, models, optimizer, scheduler)
        start, log, kl_coef = state["step"], state["log"], state["kl_coef"]
    elif cfg.policy_init:
        initialise_policy(models, params, read_sft(init_file).records, checkpoints / "policy_init")
    controller = ppo_math.AdaptiveKLController(kl_coef, cfg.target_kl, adaptive=cfg.adaptive_kl)

    progress = progress and accelerator.is_main_process
    for step in tqdm(range(start, len(batches)), desc="ppo", initial=start, total=len(batches), disable=not progress):
        torch.manual_seed(params.seed * 100_003 + step * world + rank)  # each process samples its share of the batch
        batch = rollout.collect(models, [prompts[i] for i in batches[step][rank::world]], cfg, kl_coef=controller.coef,
                                video_root=params.data.video_root, num_frames=params.data.num_frames,
                                batch_size=cfg.step_batch_size, oracle=oracle,
                                calibrate_value=cfg.calibrate_value and step == 0)
        models.model.train(cfg.gradient_checkpointing)  # layers recompute only in train mode
        updates, value_clip = [], value_clip_range(models, cfg)
        for _ in range(cfg.ppo_epochs):
            for index in np.array_split(torch.randperm(len(batch)).numpy(), minibatches):
                updates.append(minibatch_step(models, batch.rows(index), cfg, accelerator,
                                              optimizer, scheduler, value_clip))
        stats = mean_over_processes({**rollout_stats(batch), **{k: float(np.mean([u[k] for u in updates])) for k in updates[0]}}, accelerator)
        entry = {"step": step + 1, **stats, "kl_coef": controller.coef, "learning_rate": scheduler.get_last_lr()[0]}
        log.append({k: round(v, 6) if isinstance(v, float) else v for k, v in entry.items()})
        controller.update(stats["kl"], len(batches[step]))
        if accelerator.is_main_process and ((step + 1) % cfg.save_steps == 0 or step + 1 == len(batches)):
            save_checkpoint(checkpoints / f"step-{step + 1}", models, optimizer, scheduler, step + 1, controller.coef, log)
            for old in sorted(checkpoints.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-2]:
                shutil.rmtree(old)

    if accelerator.is_main_process:
        save_policy(out, models, sft, log, {"rollouts": len(batches), "optimizer_steps": len(batches) * cfg.ppo_epochs * minibatches,
                                            "prompts_over_query_length": too_long})
    accelerator.wait_for_everyone()
    return out


def save_policy(out: Path, models: Models, sft: Path, log: list[dict], run: dict) -> None:
    """The trained policy adapter (loads on the SFT model `sft` names), its log and run facts."""
    with io.atomic_dir(out) as tmp:
        models.model.save_pretrained(tmp / "policy", selected_adapters=[POLICY])
        save_processor(sft, tmp / "policy")
        io.write_json(tmp / "policy" / "base.json", {"base": str(sft)})
        io.write_json(tmp / LOG_FILE, log)
        io.write_json(tmp / "run.json", run)


def seed_folder(folder: Path, seed: int) -> Path:
    return folder / f"seed-{seed}"


def train_seeds(params: Params, out: Path = OUT, checkpoints: Path = CHECKPOINTS, progress: bool = True, **inputs: Path) -> list[Path]:
    """One PPO run per seed of `ppo.seeds`, each to out/seed-N with its own checkpoints; runs
    of seeds no longer listed are removed, so `out` holds exactly the configured runs."""
    for stale in out.glob("seed-*") if stage.processes().is_main_process else []:
        if stale.name not in {seed_folder(out, s).name for s in params.ppo.seeds}:
            shutil.rmtree(stale)
    return [train(dataclasses.replace(params, seed=s), out=seed_folder(out, s), checkpoints=seed_folder(checkpoints, s), progress=progress, **inputs)
            for s in params.ppo.seeds]


def run(params: Params) -> list[Path]:
    """The stage: `train_seeds` in this process, or in `ppo.num_processes` data-parallel
    processes. Those start under DDP whatever engine `launch` names: PPO trains adapters on a
    frozen base, which ZeRO or FSDP would shard to no gain and under Trainer-only wrappers."""
    stage.launch(params, "ppo", params.ppo.num_processes, accelerate_config=str(stage.ENGINES / "ddp.yaml"))
    return [seed_folder(OUT, s) for s in params.ppo.seeds]

