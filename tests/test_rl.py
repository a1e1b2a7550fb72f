"""Tests for rlhf_jax.rl: PPO math against loops and hand-computed cases."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import rl


def _prefix_mask(lengths, T):
  return (np.arange(T)[None, :] < np.asarray(lengths)[:, None]).astype(np.float32)


def _gae_loop(rewards, values, lengths, gamma, lam):
  B, T = rewards.shape
  adv = np.zeros((B, T))
  for b in range(B):
    last = 0.0
    for t in reversed(range(lengths[b])):
      next_v = values[b, t + 1] if t + 1 < lengths[b] else 0.0
      delta = rewards[b, t] + gamma * next_v - values[b, t]
      last = delta + gamma * lam * last
      adv[b, t] = last
  return adv, adv + values


def test_gae_matches_python_loop():
  rng = np.random.default_rng(0)
  B, T = 5, 9
  lengths = np.array([9, 4, 1, 0, 7])
  mask = _prefix_mask(lengths, T)
  rewards = rng.normal(size=(B, T)).astype(np.float32) * mask  # 0 outside, as produced
  values = rng.normal(size=(B, T)).astype(np.float32)          # garbage outside mask
  for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)]:
    adv, ret = jax.jit(rl.gae)(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = _gae_loop(rewards, values, lengths, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ret) * mask, ref_ret * mask, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
  rewards = np.array([[0.0, 0.0, 2.0, 0.0]], np.float32)
  values = np.array([[0.5, 1.0, -1.0, 9.0]], np.float32)
  mask = _prefix_mask([3], 4)
  adv, ret = rl.gae(rewards, values, mask, 1.0, 1.0)
  np.testing.assert_allclose(adv, [[1.5, 1.0, 3.0, 0.0]], atol=1e-6)
  np.testing.assert_allclose(np.asarray(ret)[:, :3], [[2.0, 2.0, 2.0]], atol=1e-6)


def test_whiten():
  rng = np.random.default_rng(1)
  x = rng.normal(3.0, 2.0, size=(4, 6)).astype(np.float32)
  mask = _prefix_mask([6, 3, 5, 2], 6)
  x_bad = np.where(mask > 0, x, 1e6).astype(np.float32)  # padding must not count
  valid = x[mask > 0]
  w = np.asarray(rl.whiten(x_bad, mask))
  np.testing.assert_allclose(w[mask > 0].mean(), 0.0, atol=1e-5)
  np.testing.assert_allclose(w[mask > 0].var(), 1.0, rtol=1e-4)
  assert np.all(w[mask == 0] == 0)
  w2 = np.asarray(rl.whiten(x_bad, mask, shift_mean=False))
  np.testing.assert_allclose(w2[mask > 0].mean(), valid.mean(), rtol=1e-5)
  np.testing.assert_allclose(w2[mask > 0], (valid - valid.mean()) / valid.std() + valid.mean(),
                             rtol=1e-4)


def test_masked_mean_var_and_explained_variance():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(3, 5)).astype(np.float32)
  mask = _prefix_mask([5, 2, 4], 5)
  valid = x[mask > 0]
  np.testing.assert_allclose(rl.masked_mean(x, mask), valid.mean(), rtol=1e-6)
  np.testing.assert_allclose(rl.masked_var(x, mask), valid.var(), rtol=1e-5)
  np.testing.assert_allclose(rl.masked_var(x, mask, unbiased=True), valid.var(ddof=1), rtol=1e-5)
  assert rl.masked_mean(x, np.zeros_like(mask)) == 0
  v = rng.normal(size=(3, 5)).astype(np.float32)
  ref = 1 - np.var(valid - v[mask > 0]) / np.var(valid)
  np.testing.assert_allclose(rl.explained_variance(v, x, mask), ref, rtol=1e-5)
  np.testing.assert_allclose(rl.explained_variance(x, x, mask), 1.0)
  assert rl.explained_variance(v, np.ones_like(x), mask) == 0.0


def test_adaptive_kl_controller_formula():
  init, target, horizon = 0.1, 6.0, 10000
  ctl = rl.AdaptiveKLController(init, target, horizon)
  value = init
  for kl, n in [(12.0, 512), (6.6, 512), (1.0, 256), (5.4, 64)]:
    e = min(max(kl / target - 1, -0.2), 0.2)
    expect = value * (1 + e * n / horizon)
    got = ctl.update(kl, n)
    np.testing.assert_allclose(got, expect, rtol=1e-6)
    np.testing.assert_allclose(ctl.value, expect, rtol=1e-6)
    fn = jax.jit(rl.adaptive_kl_update)(value, kl, n, target, horizon)
    np.testing.assert_allclose(fn, expect, rtol=1e-6)
    value = expect
  # Direction: KL above target raises beta, below target lowers it.
  assert rl.AdaptiveKLController(init, target, horizon).update(7.0, 100) > init
  assert rl.AdaptiveKLController(init, target, horizon).update(5.0, 100) < init
  fixed = rl.FixedKLController(0.05)
  assert fixed.update(100.0, 512) == 0.05 and fixed.value == 0.05


def test_kl_estimators_hand_case():
  logp = np.log(np.array([[0.5, 0.25, 0.9]], np.float32))
  ref = np.log(np.array([[0.25, 0.5, 0.1]], np.float32))
  mask = np.array([[1.0, 1.0, 0.0]], np.float32)
  out = rl.kl_estimators(logp, ref, mask)
  # k1: log 2 + log 0.5 = 0. k3 with r = ref/p: (0.5 - 1 - log 0.5) + (2 - 1 - log 2).
  np.testing.assert_allclose(out['k1'], [0.0], atol=1e-6)
  np.testing.assert_allclose(out['k3'], [0.5 - 1 + math.log(2) + 1 - math.log(2)], rtol=1e-5)
  np.testing.assert_allclose(out['k2'], [math.log(2) ** 2], rtol=1e-5)
  assert out['k3'].shape == (1,)


def test_token_rewards_score_on_last_valid_token():
  B, T = 3, 5
  mask = _prefix_mask([5, 2, 0], T)
  rng = np.random.default_rng(3)
  logp = rng.normal(size=(B, T)).astype(np.float32)
  ref = rng.normal(size=(B, T)).astype(np.float32)
  score = np.array([1.0, -2.0, 7.0], np.float32)
  beta = 0.1
  rewards, kl = rl.token_rewards(score, logp, ref, mask, beta)
  expect = -beta * (logp - ref) * mask
  expect[0, 4] += 1.0
  expect[1, 1] += -2.0   # row 2 has no valid token: no score anywhere
  np.testing.assert_allclose(rewards, expect, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(kl, (logp - ref) * mask, rtol=1e-6)
  _, kl3 = rl.token_rewards(score, logp, ref, mask, beta, kl_estimator='k3')
  r = np.exp(ref - logp)
  np.testing.assert_allclose(kl3, ((r - 1) - np.log(r)) * mask, rtol=1e-4, atol=1e-6)
  with pytest.raises(ValueError):
    rl.token_rewards(score, logp, ref, mask, beta, kl_estimator='k9')


def test_policy_loss_hand_case():
  # ratios 1.5, 0.5, 1.5, 0.5, (masked); eps 0.2.
  ratio = np.array([[1.5, 0.5, 1.5, 0.5, 3.0]])
  old = np.zeros((1, 5), np.float32)
  logp = np.log(ratio).astype(np.float32)
  adv = np.array([[1.0, 1.0, -1.0, -2.0, 100.0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 0]], np.float32)
  loss, m = rl.policy_loss(logp, old, adv, mask, 0.2)
  # per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.5, 1.6 (clipped)
  np.testing.assert_allclose(loss, (-1.2 - 0.5 + 1.5 + 1.6) / 4, rtol=1e-5)
  np.testing.assert_allclose(m['clipfrac'], 0.5)
  np.testing.assert_allclose(m['approxkl'], 0.5 * (2 * math.log(1.5) ** 2 + 2 * math.log(0.5) ** 2) / 4,
                             rtol=1e-5)


def test_policy_loss_gradient_zero_when_clipped():
  old = jnp.zeros((1, 2))
  adv = jnp.array([[1.0, 1.0]])
  mask = jnp.ones((1, 2))
  g = jax.grad(lambda lp: rl.policy_loss(lp, old, adv, mask, 0.2)[0])(
      jnp.log(jnp.array([[1.5, 1.1]])))
  assert g[0, 0] == 0 and g[0, 1] != 0


def test_value_loss_hand_case():
  old = np.zeros((1, 4), np.float32)
  v = np.array([[0.5, 0.5, -0.1, 9.0]], np.float32)
  ret = np.array([[1.0, 0.0, 1.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 0]], np.float32)
  loss, m = rl.value_loss(v, old, ret, mask, 0.2)
  # max(l1, l2): (0.25, 0.64) -> 0.64 clipped; (0.25, 0.04) -> 0.25; (1.21, 1.21) -> 1.21
  np.testing.assert_allclose(loss, 0.5 * (0.64 + 0.25 + 1.21) / 3, rtol=1e-5)
  np.testing.assert_allclose(m['vf_clipfrac'], 1 / 3, rtol=1e-6)
