"""Tests for rlhf_jax.best_of_k against brute force and Monte Carlo."""
import itertools

import numpy as np
import pytest

from rlhf_jax import best_of_k


def _brute_force(proxy, target, n):
  """Average over every n-subset of the target of its proxy-best member; ties at
  the top are broken uniformly at random, i.e. their targets are averaged."""
  vals = []
  for subset in itertools.combinations(range(len(proxy)), n):
    s = np.array(subset)
    top = s[proxy[s] == proxy[s].max()]
    vals.append(target[top].mean())
  return np.mean(vals)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_bon_expected_matches_all_subsets(seed):
  rng = np.random.default_rng(seed)
  for N in range(1, 9):
    proxy = rng.normal(size=N)
    if seed == 2:
      proxy = np.round(proxy)  # many ties
    target = rng.normal(size=N) + proxy
    for n in range(1, N + 1):
      got = best_of_k.bon_expected(proxy, target, n)
      np.testing.assert_allclose(got, _brute_force(proxy, target, n), rtol=1e-9, atol=1e-12)


def test_bon_expected_permutation_invariant_with_ties():
  rng = np.random.default_rng(3)
  proxy = rng.integers(0, 4, size=12).astype(float)
  target = rng.normal(size=12)
  base = best_of_k.bon_expected(proxy, target, 5)
  for _ in range(5):
    p = rng.permutation(12)
    np.testing.assert_allclose(best_of_k.bon_expected(proxy[p], target[p], 5), base, rtol=1e-12)


def test_bon_expected_endpoints_and_large_pool():
  rng = np.random.default_rng(4)
  proxy, target = rng.normal(size=5000), rng.normal(size=5000)
  np.testing.assert_allclose(best_of_k.bon_expected(proxy, target, 1), target.mean(), rtol=1e-9)
  np.testing.assert_allclose(best_of_k.bon_expected(proxy, target, 5000),
                             target[np.argmax(proxy)], rtol=1e-9)
  assert np.isfinite(best_of_k.bon_expected(proxy, target, 2500))


def test_bon_expected_matches_monte_carlo():
  rng = np.random.default_rng(5)
  N, n, draws = 200, 8, 20_000
  proxy = rng.normal(size=N)
  target = proxy + rng.normal(size=N)
  # Draw n without replacement per trial: the n smallest of N uniform keys.
  idx = np.argpartition(rng.random((draws, N)), n, axis=1)[:, :n]
  best = idx[np.arange(draws), np.argmax(proxy[idx], axis=1)]
  samples = target[best]
  # Tolerance: 5 standard errors of the Monte Carlo mean (~0.05 here).
  tol = 5 * samples.std() / np.sqrt(draws)
  assert abs(best_of_k.bon_expected(proxy, target, n) - samples.mean()) < tol
  # And best-of-8 really does beat the pool mean.
  assert best_of_k.bon_expected(proxy, target, n) > target.mean() + 10 * tol


def test_bon_expected_validates_n():
  with pytest.raises(ValueError, match='1 <= n <= N'):
    best_of_k.bon_expected([1.0, 2.0], [1.0, 2.0], 3)
  with pytest.raises(ValueError, match='1 <= n <= N'):
    best_of_k.bon_expected([1.0, 2.0], [1.0, 2.0], 0)
  with pytest.raises(ValueError):
    best_of_k.bon_expected([1.0, 2.0], [1.0], 1)


def test_bon_kl():
  np.testing.assert_allclose(best_of_k.bon_kl(1), 0.0)
  np.testing.assert_allclose(best_of_k.bon_kl(2), np.log(2) - 0.5)
  ns = np.array([1, 4, 16, 1000])
  np.testing.assert_allclose(best_of_k.bon_kl(ns), np.log(ns) - (ns - 1) / ns)
  assert np.all(np.diff(best_of_k.bon_kl(np.arange(1, 50))) > 0)


def test_fits_recover_known_coefficients():
  rng = np.random.default_rng(6)
  d = np.linspace(0.0, 4.0, 40)  # includes d = 0
  a, b = 1.3, 0.25
  r_bon = d * (a - b * d) + rng.normal(scale=1e-3, size=d.shape)
  np.testing.assert_allclose(best_of_k.fit_bon(d, r_bon), (a, b), atol=5e-3)
  with np.errstate(divide='ignore', invalid='ignore'):
    r_rl = d * (a - b * np.where(d > 0, np.log(d), 0.0))
  r_rl = r_rl + rng.normal(scale=1e-3, size=d.shape)
  a_rl, b_rl = best_of_k.fit_rl(d, r_rl)
  np.testing.assert_allclose((a_rl, b_rl), (a, b), atol=5e-3)
  assert np.isfinite(a_rl) and np.isfinite(b_rl)
