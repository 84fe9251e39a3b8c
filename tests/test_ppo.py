"""The PPO stage on the tiny project: the models on one base, rollouts, training, resume."""

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from peft import PeftModel
from safetensors.torch import load_file
from transformers import get_scheduler

from vlm_rlaif import io, policy, ppo, ppo_math, reward_model as rm, rollout
from vlm_rlaif.config import ConfigError, load_params
from vlm_rlaif.data import read_rl_prompts, read_sft
from vlm_rlaif.modeling import load_model_and_processor

from conftest import PPO, RM, resumed_step

def test_policy_value_and_reward_share_one_base(trained, monkeypatch):
    root, params = trained
    monkeypatch.chdir(root)
    models = policy.load(params, sft=Path("artifacts/base"), reward=Path("ppo_rm"))
    assert models.shared_reward and set(models.model.peft_config) == {policy.POLICY, policy.VALUE, policy.REWARD}
    standalone, processor = rm.load_reward_model("ppo_rm")
    prompts = read_rl_prompts("artifacts/prepare/rl_prompts.json").records[:2]
    batch = rollout.collect(models, prompts, params.ppo, kl_coef=0.1, video_root=params.data.video_root,
                            num_frames=params.data.num_frames, batch_size=2)
    # the fresh policy adapter is the identity: policy and reference agree, the KL is zero
    torch.testing.assert_close(batch.logprobs, batch.ref_logprobs)
    assert batch.kl.abs().max() == 0
    # the reward adapter on the shared base scores as the reward model on its own does
    alone = rm.score(standalone, processor, batch.videos, batch.prompts, batch.texts)
    torch.testing.assert_close(batch.scores, alone, rtol=1e-4, atol=1e-5)
    # the value model starts as a copy of the reward model: adapter and head
    state = models.model.state_dict()
    value = {k.replace(".value.", "."): v for k, v in state.items() if ".value." in k}
    reward = {k.replace(".reward.", "."): v for k, v in state.items() if ".reward." in k}
    assert value and value.keys() == reward.keys() and all(torch.equal(value[k], reward[k]) for k in value)
    torch.testing.assert_close(models.value_head.linear.weight, models.reward_model.head.weight)
    eos = models.processor.tokenizer.eos_token_id
    for i, length in enumerate(batch.mask.sum(1).tolist()):  # the mask ends on the EOS when there is one
        assert (batch.responses[i, length - 1] == eos) == bool(batch.ended[i]) or length == params.ppo.max_new_tokens
    assert batch.values.shape == batch.mask.shape and (batch.values * (1 - batch.mask)).abs().max() == 0
    assert set(n for n, p in models.model.named_parameters() if p.requires_grad) <= {
        n for n, _ in models.model.named_parameters() if ".default." in n or ".value." in n}
    minibatch = batch.rows([1])
    assert minibatch.responses.shape == (1, int(batch.mask[1].sum())) and minibatch.texts == batch.texts[1:]


def test_a_likelihood_reward_is_earned_token_by_token(trained, monkeypatch, tmp_path):
    root, params = trained
    monkeypatch.chdir(root)
    reading = load_params("params.yaml", overrides={
        "reward_model": RM | {"reading": "likelihood", "epochs": 1.0},
        "ppo": PPO | {"token_rewards": True}})
    rm.train(reading, preferences=Path("ppo_prefs"), policy=Path("artifacts/base"),
             out=tmp_path / "rm", checkpoints=tmp_path / "rm_ckpt")
    models = policy.load(reading, sft=Path("artifacts/base"), reward=tmp_path / "rm")
    prompts = read_rl_prompts("artifacts/prepare/rl_prompts.json").records[:2]
    batch = rollout.collect(models, prompts, reading.ppo, kl_coef=0.1, batch_size=2,
                            video_root=params.data.video_root, num_frames=params.data.num_frames)
    # the reward model on its own, reading the very tokens sampled, gives each response's reward
    standalone, processor = rm.load_reward_model(tmp_path / "rm")
    kwargs, width = models._sequences(batch.prompts, batch.features, batch.responses, batch.mask,
                                      batch.videos)
    with torch.no_grad():
        alone = standalone(**kwargs, response_mask=torch.nn.functional.pad(batch.mask, (width, 0)))
    torch.testing.assert_close(batch.scores, alone, rtol=1e-4, atol=1e-5)
    assert batch.scores.abs().min() > 0  # the trained adapter moves every response's likelihood
    # each token's reward is its own (the fresh policy pays no KL): they sum to the whole
    assert batch.kl.abs().max() == 0
    assert (batch.rewards[:, :-1] != 0).any()
    torch.testing.assert_close(batch.rewards.sum(1), reading.ppo.reward_scale * batch.penalised)
    # the default reward model's head has no reward per token
    with pytest.raises(ConfigError, match="ppo.token_rewards: only a reward model that reads"):
        policy.load(reading, sft=Path("artifacts/base"), reward=Path("ppo_rm"))


def test_ppo_against_the_oracle_scores_each_answer_by_the_scene(trained, monkeypatch, tmp_path):
    root, params = trained
    monkeypatch.chdir(root)
    exact = dataclasses.replace(params, ppo=dataclasses.replace(params.ppo, reward="oracle",
                                                                oracle_scale=4.0))
    oracle = ppo.oracle_reward(exact, Path("artifacts/prepare"))
    prompts = read_rl_prompts("artifacts/prepare/rl_prompts.json").records[:2]
    references = [p.conversations[1].value for p in prompts]  # the world's own answers
    assert oracle(prompts, references).tolist() == [4.0, 4.0]
    assert oracle(prompts, ["A purple cross and a white diamond leave."] * 2).max() < 4.0
    models = policy.load(exact, sft=Path("artifacts/base"), reward=Path("ppo_rm"))
    batch = rollout.collect(models, prompts, exact.ppo, kl_coef=0.1, batch_size=2, oracle=oracle,
                            video_root=params.data.video_root, num_frames=params.data.num_frames)
    torch.testing.assert_close(batch.scores, oracle(prompts, batch.texts))
    (tmp_path / "prepare").mkdir()  # real data: no scene records
    with pytest.raises(ConfigError, match="ppo.reward: oracle scores the synthetic world only"):
        ppo.oracle_reward(exact, tmp_path / "prepare")


def test_ppo_trains_logs_and_saves_a_policy_that_peft_loads(trained, monkeypatch, tmp_path):
    root, params = trained
    monkeypatch.chdir(root)
    out = ppo.train(params, sft=Path("artifacts/base"), reward=Path("ppo_rm"), out=tmp_path / "ppo",
                    checkpoints=tmp_path / "ckpt", progress=False)
    log = json.loads((out / ppo.LOG_FILE).read_text())
    assert [e["step"] for e in log] == [1, 2]  # 4 RL prompts in rollout batches of 2
    for key in ("reward", "score", "return", "value", "explained_variance", "kl", "entropy",
                "policy_loss", "value_loss", "grad_norm", "value_grad_norm", "clip_fraction",
                "response_length", "eos_rate"):
        assert all(isinstance(e[key], float) for e in log), key
    base, _ = load_model_and_processor("artifacts/base")
    loaded = PeftModel.from_pretrained(base, out / "policy")
    trained_lora = load_file(out / "policy" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in trained_lora.items())  # the policy moved off the identity
    assert loaded.peft_config["default"].r == 4
    checkpoint = io.last_checkpoint(tmp_path / "ckpt", "step", "state.json")
    assert not (checkpoint / "reward").exists() and (checkpoint / "value" / "adapter_model.safetensors").is_file()


def test_a_killed_run_resumes_to_the_same_policy(trained, monkeypatch, tmp_path, capsys):
    root, params = trained
    monkeypatch.chdir(root)
    where = dict(sft=Path("artifacts/base"), reward=Path("ppo_rm"), progress=False)
    whole = ppo.train(params, **where, out=tmp_path / "whole", checkpoints=tmp_path / "ckpt_whole")
    ppo.train(params, **where, out=tmp_path / "first", checkpoints=tmp_path / "ckpt")
    shutil.rmtree(tmp_path / "ckpt" / "step-2")  # killed during the second rollout batch
    resumed = ppo.train(params, **where, out=tmp_path / "resumed", checkpoints=tmp_path / "ckpt")
    assert resumed_step(capsys.readouterr().err) == 1
    a, b = (load_file(p / "policy" / "adapter_model.safetensors") for p in (whole, resumed))
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=key)
    assert json.loads((whole / ppo.LOG_FILE).read_text()) == json.loads((resumed / ppo.LOG_FILE).read_text())


def test_a_minibatch_step_moves_policy_and_value_and_nothing_else(trained, monkeypatch):
    root, params = trained
    monkeypatch.chdir(root)
    models = policy.load(params, sft=Path("artifacts/base"), reward=Path("ppo_rm"))
    prompts = read_rl_prompts("artifacts/prepare/rl_prompts.json").records[:2]
    torch.manual_seed(0)
    batch = rollout.collect(models, prompts, params.ppo, kl_coef=0.1, video_root=params.data.video_root,
                            num_frames=params.data.num_frames, batch_size=2)
    before = {k: v.clone() for k, v in models.model.state_dict().items()}
    head = models.value_head.linear.weight.clone()
    optimizer = torch.optim.AdamW(models.trainable_parameters(), lr=1e-2)
    scheduler = get_scheduler("constant", optimizer)
    stats = ppo.minibatch_step(models, batch, params.ppo, Accelerator(), optimizer, scheduler,
                               value_clip=0.2)
    assert stats["clip_fraction"] == 0.0  # the first step is on-policy: every ratio is 1
    after = models.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".default." in k for k in changed) and any(".value." in k for k in changed)
    assert all(".default." in k or ".value." in k for k in changed)  # the reward adapter and the base stay as they were
    assert not torch.equal(head, models.value_head.linear.weight)


def test_policy_initialisation_trains_the_policy_adapter_alone(trained, monkeypatch, tmp_path):
    root, params = trained
    monkeypatch.chdir(root)
    models = policy.load(params, sft=Path("artifacts/base"), reward=Path("ppo_rm"))
    records = read_sft("artifacts/prepare/sft_easy.json").records  # 12 records: 6 steps, the first warming up
    before = {k: v.clone() for k, v in models.model.state_dict().items()}
    ppo.initialise_policy(models, params, records, tmp_path / "init")
    after = models.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k].to(before[k].device))}  # the trainer may move it to a GPU
    assert changed and all(".default." in k for k in changed)  # the policy adapter moved; value, reward and base did not

    missing = load_params("params.yaml", overrides={"reward_model": RM, "ppo": PPO | {"policy_init": True}})
    with pytest.raises(ConfigError, match="ppo.policy_init: .*policy_init.json does not exist"):
        ppo.train(missing, sft=Path("artifacts/base"), reward=Path("ppo_rm"), out=tmp_path / "out", checkpoints=tmp_path / "ckpt")


def test_prompts_over_the_query_length_are_left_out(trained, monkeypatch):
    root, _ = trained
    monkeypatch.chdir(root)
    tokenizer = load_model_and_processor("artifacts/base")[1].tokenizer
    prompts = read_rl_prompts("artifacts/prepare/rl_prompts.json").records
    lengths = [len(tokenizer(p.question(), add_special_tokens=False)["input_ids"]) for p in prompts]
    kept, left_out = ppo.within_query_length(prompts, tokenizer, min(lengths))
    assert kept == [p for p, n in zip(prompts, lengths) if n == min(lengths)] and left_out == len(prompts) - len(kept)
    assert ppo.within_query_length(prompts, tokenizer, max(lengths)) == (prompts, 0)
    with pytest.raises(ConfigError, match="ppo.query_length 0: no RL prompt"):
        ppo.within_query_length(prompts, tokenizer, 0)


def test_a_reward_model_on_another_base_is_loaded_beside_the_policy(trained, monkeypatch, tmp_path):
    root, params = trained
    monkeypatch.chdir(root)
    other = tmp_path / "larger_sft"
    shutil.copytree("artifacts/base", other)
    on_other = load_params("params.yaml", overrides={"reward_model": RM | {"base": str(other), "epochs": 1.0}, "ppo": PPO})
    rm.train(on_other, preferences=Path("ppo_prefs"), out=tmp_path / "rm", checkpoints=tmp_path / "rm_ckpt")
    models = policy.load(on_other, sft=Path("artifacts/base"), reward=tmp_path / "rm")
    assert not models.shared_reward and set(models.model.peft_config) == {policy.POLICY, policy.VALUE}
    assert models.reward_model.backbone is not models.model
    assert models.value_head.linear.weight.abs().sum() == 0
    prompts = read_rl_prompts("artifacts/prepare/rl_prompts.json").records[:2]
    batch = rollout.collect(models, prompts, on_other.ppo, kl_coef=0.1, video_root=params.data.video_root,
                            num_frames=params.data.num_frames, batch_size=2)
    standalone, processor = rm.load_reward_model(tmp_path / "rm")
    torch.testing.assert_close(batch.scores, rm.score(standalone, processor, batch.videos, batch.prompts, batch.texts))


def test_the_first_rollout_calibrates_the_value_head_onto_the_returns(trained, monkeypatch):
    root, params = trained
    monkeypatch.chdir(root)
    prompts = read_rl_prompts("artifacts/prepare/rl_prompts.json").records[:2]
    rollouts = {}
    for calibrate in (False, True):
        models = policy.load(params, sft=Path("artifacts/base"), reward=Path("ppo_rm"))
        torch.manual_seed(0)
        rollouts[calibrate] = rollout.collect(
            models, prompts, params.ppo, kl_coef=0.1, video_root=params.data.video_root,
            num_frames=params.data.num_frames, batch_size=2, calibrate_value=calibrate)
    raw, calibrated = rollouts[False], rollouts[True]
    torch.testing.assert_close(calibrated.rewards, raw.rewards)  # the same responses and rewards
    mask = raw.mask.bool()
    to_go = ppo_math.reward_to_go(raw.rewards, raw.mask, params.ppo.gamma)
    # the head that reads the rollout's states now says a * value + b, b the mean return where a = 0
    assert abs(calibrated.values[mask].mean() - to_go[mask].mean()) < 1e-3
    error = lambda batch: ((batch.values - to_go)[mask] ** 2).mean()
    assert error(calibrated) <= error(raw)
    assert ppo_math.explained_variance(calibrated.values, to_go, raw.mask) >= -1e-6
    # the model's own head gives the calibrated values: PPO's updates start from them
    values = models.values(prompts=calibrated.prompts, features=calibrated.features,
                           responses=calibrated.responses, response_mask=calibrated.mask,
                           videos=calibrated.videos)
    torch.testing.assert_close((values * calibrated.mask).detach(), calibrated.values,
                               rtol=1e-4, atol=1e-4)


def test_the_reward_model_stage_stops_on_too_few_pairs_and_writes_nothing(trained, monkeypatch, tmp_path):
    root, params = trained
    monkeypatch.chdir(root)
    strict = load_params("params.yaml", overrides={"reward_model": RM | {"min_pairs": 100}, "ppo": PPO})
    with pytest.raises(rm.TooFewPairs, match=r"ppo_prefs/preferences\.json: \d+ preference pairs, fewer than "
                                             r"reward_model\.min_pairs \(100\)"):
        rm.train(strict, preferences=Path("ppo_prefs"), policy=Path("artifacts/base"), out=tmp_path / "rm",
                 checkpoints=tmp_path / "ckpt")
    assert not (tmp_path / "rm").exists() and not (tmp_path / "ckpt").exists()


def ppo_on_a_fixed_reward(trained, monkeypatch, reward, rollouts: int, **settings
                          ) -> tuple[list[float], list[float]]:
    """The loop `ppo.train` runs (a calibrated first rollout, clipped minibatch steps) against
    `reward(question, response)`; each rollout's mean reward and the critic's explained
    variance before its updates."""
    root, params = trained
    monkeypatch.chdir(root)
    cfg = dataclasses.replace(params.ppo, kl_coef=0.0, max_new_tokens=8, calibrate_value=True,
                              value_clip_unit="return_std", **settings)
    models = policy.load(params, sft=Path("artifacts/base"), reward=Path("ppo_rm"))
    with torch.no_grad():  # the untrained base's logits are near zero; a trained model's are not
        models.model.get_base_model().get_output_embeddings().weight.mul_(30.0)

    def fixed_rewards(self, videos, prompts, texts, features, batch_size):
        return torch.tensor([reward(p[0]["value"], text) for p, text in zip(prompts, texts)])

    monkeypatch.setattr(policy.Models, "rewards", fixed_rewards)
    prompts = read_rl_prompts("artifacts/prepare/rl_prompts.json").records * 4
    optimizer, accelerator = ppo.make_optimizer(models, cfg), Accelerator()
    scheduler = get_scheduler("constant", optimizer)
    rewards, explained = [], []
    torch.manual_seed(0)
    for step in range(rollouts):
        batch = rollout.collect(models, prompts, cfg, kl_coef=0.0, batch_size=4,
                                video_root=params.data.video_root,
                                num_frames=params.data.num_frames, calibrate_value=step == 0)
        rewards.append(batch.scores.mean().item())
        explained.append(ppo_math.explained_variance(batch.values, batch.returns, batch.mask))
        for _ in range(cfg.ppo_epochs):
            for index in np.array_split(torch.randperm(len(batch)).numpy(), 2):
                ppo.minibatch_step(models, batch.rows(index), cfg, accelerator, optimizer,
                                   scheduler, value_clip=ppo.value_clip_range(models, cfg))
    return rewards, explained


def test_ppo_on_a_fixed_reward_raises_it(trained, monkeypatch):
    letters = lambda question, response: float(sum("a" <= c <= "z" for c in response))
    rewards, _ = ppo_on_a_fixed_reward(trained, monkeypatch, letters, rollouts=16,
                                       learning_rate=1e-2, value_learning_rate=1e-2)
    assert np.mean(rewards[-3:]) > 1.5 * np.mean(rewards[:3]), rewards


def test_the_critic_learns_to_predict_a_fixed_policys_returns(trained, monkeypatch):
    """The policy held still (a negligible learning rate), the return is the question's length:
    the critic that reads the question explains it."""
    length = lambda question, response: float(len(question))
    _, explained = ppo_on_a_fixed_reward(trained, monkeypatch, length, rollouts=12,
                                         learning_rate=1e-12, value_learning_rate=1e-2)
    assert np.mean(explained[:3]) < 0.5 and np.mean(explained[-3:]) > 0.8, explained


def test_a_run_that_did_not_learn_is_flagged():
    log = [{"explained_variance": ev, "value_loss": loss, "score": score}
           for ev, loss, score in [(0.0, 500, 0.1), (0.1, 400, 0.2), (0.3, 200, 0.4), (0.5, 100, 0.6)]]
    assert ppo.learning_flags(log) == {"explained_variance": 0.5, "critic_fits": True,
                                       "value_loss_fall": 5.0, "score_gain": 0.5, "score_rises": True}
    stuck = [r | {"explained_variance": 0.01, "score": 0.3} for r in log]
    flags = ppo.learning_flags(stuck)
    assert not flags["critic_fits"] and not flags["score_rises"]
