"""Best-of-n analysis: unbiased estimates, the KL it costs, and Gao et al. fits.

Pure NumPy, host side. Best-of-n samples n responses from the policy and keeps
the one the proxy reward model scores highest; judging it with a target (gold)
reward measures over-optimisation (Stiennon et al. 2020, Gao et al. 2022).
"""
import math

import numpy as np


def _bon_weights(N, n):
  """w_i = C(i-1, n-1) / C(N, n), i = 1..N: the probability that the i-th
  smallest of N items is the largest of a uniform n-subset. Log-gamma keeps it
  finite for N in the thousands; the weights sum to 1 (hockey-stick identity)."""
  log_total = math.lgamma(N + 1) - math.lgamma(n + 1) - math.lgamma(N - n + 1)
  w = np.zeros(N)
  for i in range(n, N + 1):
    w[i - 1] = math.exp(math.lgamma(i) - math.lgamma(n) - math.lgamma(i - n + 1)
                        - log_total)
  return w / w.sum()


def bon_expected(proxy_scores, target_scores, n):
  """Expected target score of the proxy-best of n draws without replacement.

  One pool of N samples gives an unbiased estimate for every n <= N, far less
  noisy than drawing subsets (the unbiased estimator Gao et al. 2022 use for
  their best-of-n curves). Ties in the proxy are broken uniformly at random, which
  in expectation means replacing each target by the mean target of its proxy
  tie group: the result is then invariant to the order of the pool.
  """
  proxy = np.asarray(proxy_scores, dtype=np.float64)
  target = np.asarray(target_scores, dtype=np.float64)
  if proxy.ndim != 1 or proxy.shape != target.shape:
    raise ValueError('proxy_scores and target_scores must be 1-D arrays of the '
                     f'same length, got shapes {proxy.shape} and {target.shape}')
  N = proxy.shape[0]
  if int(n) != n or not 1 <= n <= N:
    raise ValueError(f'n must be an integer with 1 <= n <= N = {N}, got {n}')
  n = int(n)
  order = np.argsort(proxy, kind='stable')
  p, t = proxy[order], target[order]
  # Average the target within runs of equal proxy scores.
  _, group, counts = np.unique(p, return_inverse=True, return_counts=True)
  t = (np.bincount(group, weights=t) / counts)[group]
  return float(np.dot(_bon_weights(N, n), t))


def bon_kl(n):
  """KL(best-of-n || base) = log n - (n - 1) / n (Stiennon et al. 2020;
  Gao et al. 2022, sec. 2): exact for distinct outcomes, an upper bound in
  general. Vectorised over n; n = 1 gives 0."""
  n = np.asarray(n, dtype=np.float64)
  if np.any(n < 1):
    raise ValueError(f'n must be >= 1, got {n}')
  return np.log(n) - (n - 1.0) / n


def _lstsq(X, r):
  coef, *_ = np.linalg.lstsq(X, np.asarray(r, dtype=np.float64), rcond=None)
  return float(coef[0]), float(coef[1])


def fit_bon(d, r):
  """Least-squares fit of R_bon(d) = d (a - b d), d = sqrt(KL) (Gao et al. 2022,
  sec. 3). Returns (a, b)."""
  d = np.asarray(d, dtype=np.float64)
  return _lstsq(np.stack([d, -d * d], axis=1), r)


def fit_rl(d, r):
  """Least-squares fit of R_rl(d) = d (a - b log d), d = sqrt(KL) (Gao et al.
  2022, sec. 3); d log d is taken as 0 at d = 0. Returns (a, b)."""
  d = np.asarray(d, dtype=np.float64)
  dlogd = np.where(d > 0, d * np.log(np.where(d > 0, d, 1.0)), 0.0)
  return _lstsq(np.stack([d, -dlogd], axis=1), r)
