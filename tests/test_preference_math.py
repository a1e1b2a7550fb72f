"""dpo_loss and group_advantages against plain-Python references (the formulas of the
papers written out element by element), and the loss aggregation modes."""
import math

import numpy as np
import pytest

from rlhf_jax import rl
from rlhf_jax.losses import dpo_loss


def _logsig(x):
  return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _ref_dpo(pc, pr, rc, rr, beta, loss_type, ls):
  total, right = 0.0, 0
  for a, b, c, d in zip(pc, pr, rc, rr):
    h = (a - c) - (b - d)
    right += h > 0
    if loss_type == "sigmoid":
      total += -(1 - ls) * _logsig(beta * h) - ls * _logsig(-beta * h)
    else:
      total += (h - 1 / (2 * beta)) ** 2
  return total / len(pc), right / len(pc)


@pytest.mark.parametrize("loss_type,ls,beta", [("sigmoid", 0.0, 0.1), ("sigmoid", 0.2, 0.5),
                                               ("ipo", 0.0, 0.1), ("ipo", 0.3, 1.0)])
def test_dpo_loss_matches_the_papers_formulas(loss_type, ls, beta):
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20, 5, 64) for _ in range(4))
  loss, m = dpo_loss(pc, pr, rc, rr, beta, loss_type=loss_type, label_smoothing=ls)
  want, acc = _ref_dpo(pc, pr, rc, rr, beta, loss_type, ls)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  assert math.isclose(float(m["accuracy"]), acc)
  np.testing.assert_allclose(float(m["margin"]), beta * np.mean((pc - rc) - (pr - rr)), rtol=1e-4)
  np.testing.assert_allclose(float(m["chosen_logp"]), np.mean(pc), rtol=1e-5)


def test_dpo_label_smoothing_changes_the_optimum():
  """cDPO: with ls > 0 the loss is no longer minimised by an infinite margin."""
  z = np.zeros(1)
  big, small = dpo_loss(z + 50, z, z, z, 1.0, label_smoothing=0.1), dpo_loss(z + 2, z, z, z, 1.0,
                                                                             label_smoothing=0.1)
  assert float(big[0]) > float(small[0])
  big0, small0 = dpo_loss(z + 50, z, z, z, 1.0), dpo_loss(z + 2, z, z, z, 1.0)
  assert float(big0[0]) < float(small0[0])
  # IPO's minimum is exactly at h = 1 / (2 beta).
  assert float(dpo_loss(z + 2.5, z, z, z, 0.2, loss_type="ipo")[0]) == 0.0
  with pytest.raises(ValueError, match="loss_type"):
    dpo_loss(z, z, z, z, 1.0, loss_type="hinge")


def _ref_group(scores, method, eps=1e-6):
  out = np.zeros_like(scores)
  for b, row in enumerate(scores):
    k = len(row)
    mean = sum(row) / k
    std = math.sqrt(sum((x - mean) ** 2 for x in row) / (k - 1))
    for i, x in enumerate(row):
      if method == "grpo":
        out[b, i] = (x - mean) / (std + eps)
      elif method == "rloo":
        out[b, i] = x - (sum(row) - x) / (k - 1)
      else:
        out[b, i] = x - mean
  return out


@pytest.mark.parametrize("method", ["grpo", "rloo", "dr_grpo"])
def test_group_advantages_match_plain_loops(method):
  rng = np.random.default_rng(1)
  scores = rng.normal(0, 2, (6, 5))
  scores[2] = 0.7  # a group with no spread: zero advantage, no division blow-up
  got = np.asarray(rl.group_advantages(scores, method))
  np.testing.assert_allclose(got, _ref_group(scores, method), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got[2], 0.0, atol=1e-6)
  np.testing.assert_allclose(got.mean(-1), 0.0, atol=1e-5)  # every method is zero-mean per group
  with pytest.raises(ValueError, match="K >= 2"):
    rl.group_advantages(scores[:, :1], method)


def test_loss_aggregation_modes():
  per = np.array([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
  mask = np.array([[1, 1, 1, 1], [1, 0, 0, 0]])
  assert math.isclose(float(rl.aggregate(per, mask, "token")), 8 / 5, rel_tol=1e-6)  # DAPO token mean
  assert math.isclose(float(rl.aggregate(per, mask, "sequence")), (1 + 4) / 2, rel_tol=1e-6)  # GRPO
  assert math.isclose(float(rl.aggregate(per, mask, "constant")), (4 / 4 + 4 / 4) / 2, rel_tol=1e-6)  # Dr. GRPO
