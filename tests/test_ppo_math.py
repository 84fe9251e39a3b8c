"""PPO's mathematics against values worked out by hand on small tensors."""

import math

import pytest
import torch

from vlm_rlaif import ppo_math as ppo


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-5, atol=1e-6)


def test_gae_with_gamma_and_lambda():
    rewards, values, mask = torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3)
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    close(advantages, [[0.5, 0.5, 0.5]])  # gamma = lambda = 1: the return to go minus the value
    close(returns, [[1.0, 1.0, 1.0]])
    advantages, _ = ppo.gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # delta = (-0.05, -0.05, 0.5); A2 = 0.5, A1 = -0.05 + 0.45 * 0.5, A0 = -0.05 + 0.45 * A1
    close(advantages, [[-0.05 + 0.45 * 0.175, 0.175, 0.5]])


def test_gae_ignores_everything_after_the_response():
    rewards, values = torch.tensor([[0.0, 2.0, 9.0]]), torch.tensor([[1.0, 1.0, 7.0]])
    advantages, returns = ppo.gae(rewards, values, torch.tensor([[1, 1, 0]]), gamma=1.0, lam=1.0)
    close(advantages, [[1.0, 1.0, 0.0]])  # the last token bootstraps from zero, not from the junk value
    close(returns, [[2.0, 2.0, 0.0]])


def test_whitening_over_the_masked_positions():
    x, mask = torch.tensor([[1.0, 2.0], [3.0, 100.0]]), torch.tensor([[1, 1], [1, 0]])
    s = math.sqrt(1.5)  # mean 2, variance 2/3
    close(ppo.whiten(x, mask), [[-s, 0.0], [s, 0.0]])
    close(ppo.whiten(x, mask, shift_mean=False), [[2 - s, 2.0], [2 + s, 0.0]])


def test_kl_estimators():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    close(ppo.kl_penalty(logp, ref, "k1"), [0.5, -1.0])
    close(ppo.kl_penalty(logp, ref, "k1_clamped"), [0.5, 0.0])
    close(ppo.kl_penalty(logp, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])
    assert (ppo.kl_penalty(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator 'k2'"):
        ppo.kl_penalty(logp, ref, "k2")


def test_the_clipped_policy_objective():
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 9.0]]))
    old, advantages, mask = torch.zeros(1, 4), torch.tensor([[1.0, 1.0, -1.0, 5.0]]), torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo.policy_loss(logp, old, advantages, mask, clip_range=0.2)
    # ratio 1.5, A 1: clipped to 1.2; ratio 0.5, A 1: unclipped; ratio 0.5, A -1: clipped to 0.8; the 4th is masked
    close(loss, (-1.2 - 0.5 + 0.8) / 3)
    close(stats["clip_fraction"], 2 / 3)


def test_the_clipped_value_loss():
    values, old, returns, mask = torch.tensor([[0.5, 0.1, 3.0]]), torch.zeros(1, 3), torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[1, 1, 0]])
    loss, stats = ppo.value_loss(values, old, returns, mask, value_clip=0.2)
    # token 1: V clipped to 0.2, (0.2 - 1)^2 = 0.64 > 0.25; token 2: 0.01 either way
    close(loss, 0.5 * (0.64 + 0.01) / 2)
    close(stats["value_clip_fraction"], 0.5)


def test_the_sequence_score_and_its_place_at_the_last_token():
    score = ppo.sequence_score(torch.tensor([1.0, 1.0]), torch.tensor([48, 96]),
                               torch.tensor([False, True]), length_penalty=10.0,
                               length_penalty_tokens=96, missing_eos_penalty=8.0)
    close(score, [1 - 5 - 8, 1 - 10])
    # the paper's rate: -10 per 896 tokens, whatever max_new_tokens is
    paper = ppo.sequence_score(torch.tensor([0.0]), torch.tensor([448]), torch.tensor([True]),
                               length_penalty=10.0, length_penalty_tokens=896,
                               missing_eos_penalty=8.0)
    close(paper, [-5.0])
    kl, mask = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.1, 0.1, 0.1, 0.1]]), torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    rewards = ppo.shaped_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1, reward_scale=10.0)
    # the scale multiplies the whole shaped reward, the KL penalty too (as the release does)
    close(rewards, [[-0.1, -0.2, -0.3 + 20.0, 0.0], [-0.1, -0.1, -0.1, -0.1 - 10.0]])


def test_a_score_earned_token_by_token_lands_where_it_was_earned():
    kl, mask = torch.tensor([[0.1, 0.2, 0.3, 0.4]]), torch.tensor([[1, 1, 1, 0]])
    earned = torch.tensor([[0.5, -0.2, 0.1, 9.0]])  # nothing is earned after the response
    rewards = ppo.shaped_rewards(torch.tensor([2.0]), kl, mask, kl_coef=0.1, reward_scale=10.0,
                                 earned=earned)
    # 0.4 of the score was earned on the tokens; the other 1.6 (the penalties') at the last
    close(rewards, [[10 * (0.5 - 0.01), 10 * (-0.2 - 0.02), 10 * (0.1 - 0.03 + 1.6), 0.0]])
    whole = ppo.shaped_rewards(torch.tensor([2.0]), kl, mask, kl_coef=0.1, reward_scale=10.0)
    close(rewards.sum(1), whole.sum(1))


def test_reward_to_go_sums_what_comes_after():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0], [0.0, 0.0, 0.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    close(ppo.reward_to_go(rewards, mask, gamma=1.0), [[6.0, 5.0, 3.0, 0.0], [4.0, 4.0, 4.0, 4.0]])
    close(ppo.reward_to_go(rewards, mask, gamma=0.5),
          [[1 + 1 + 0.75, 2 + 1.5, 3.0, 0.0], [0.5, 1.0, 2.0, 4.0]])
    # with gamma = lambda = 1, GAE's returns are the reward to go whatever the critic says
    _, returns = ppo.gae(rewards, torch.randn(2, 4), mask, gamma=1.0, lam=1.0)
    close(returns, ppo.reward_to_go(rewards, mask, gamma=1.0))


def test_a_critic_calibrated_by_the_affine_fit_explains_what_it_can():
    torch.manual_seed(0)
    mask = torch.ones(4, 8, dtype=torch.long)
    mask[0, 5:] = 0
    raw = torch.randn(4, 8)
    returns = -40.0 + 0.3 * raw + 0.01 * torch.randn(4, 8)  # the raw critic: scaled and shifted
    assert ppo.explained_variance(raw, returns, mask) < 0
    a, b = ppo.affine_fit(raw, returns, mask)
    assert abs(a - 0.3) < 0.01 and abs(b + 40.0) < 0.01
    assert ppo.explained_variance(a * raw + b, returns, mask) > 0.99
    assert ppo.explained_variance(returns, returns, mask) == 1.0
    # a constant critic fits the mean and explains nothing
    a, b = ppo.affine_fit(torch.zeros(4, 8), returns, mask)
    assert a == 0.0 and abs(b - float(returns[mask.bool()].mean())) < 1e-4
    assert abs(ppo.explained_variance(torch.full((4, 8), b), returns, mask)) < 1e-9


def test_the_response_mask_ends_at_the_first_eos():
    tokens = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0], [5, 0, 0, 0, 0]])
    close(ppo.response_mask(tokens, {2}, pad_id=0), [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 0, 0, 0, 0]])
    # the pad token doubling as EOS is the EOS
    close(ppo.response_mask(torch.tensor([[5, 0, 0]]), {0}, pad_id=0), [[1, 1, 0]])


def test_masked_positions_get_no_gradient():
    logp = torch.tensor([[-1.0, -1.0, -1.0]], requires_grad=True)
    loss, _ = ppo.policy_loss(logp, torch.full((1, 3), -1.05), torch.tensor([[1.0, -2.0, 4.0]]), torch.tensor([[1, 1, 0]]), 0.2)
    loss.backward()
    assert logp.grad[0, 2] == 0 and logp.grad[0, 0] != 0


def test_the_adaptive_kl_coefficient():
    fixed = ppo.AdaptiveKLController(0.1, target=6.0)
    assert fixed.update(kl=100.0, n_steps=64) == 0.1
    adaptive = ppo.AdaptiveKLController(0.1, target=6.0, horizon=10000, adaptive=True)
    assert adaptive.update(kl=12.0, n_steps=100) == pytest.approx(0.1 * (1 + 0.2 * 100 / 10000))
    assert adaptive.update(kl=5.4, n_steps=100) == pytest.approx(0.1 * 1.002 * (1 - 0.1 * 100 / 10000))
