"""Tests for rlhf_jax.losses against independent NumPy / loop references."""
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import losses


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_logprobs_matches_numpy_with_temperature():
  rng = np.random.default_rng(0)
  B, L, V, temp = 2, 5, 7, 0.7
  logits = rng.normal(size=(B, L, V)).astype(np.float32) * 3
  tokens = rng.integers(0, V, size=(B, L))
  got = np.asarray(losses.token_logprobs(jnp.asarray(logits), jnp.asarray(tokens), temp))
  assert got.shape == (B, L - 1)
  for b in range(B):
    for t in range(L - 1):
      ref = _np_log_softmax(logits[b, t].astype(np.float64) / temp)[tokens[b, t + 1]]
      np.testing.assert_allclose(got[b, t], ref, rtol=1e-5, atol=1e-5)
  # Temperature matters: at T=1 the answer differs.
  assert not np.allclose(got, losses.token_logprobs(logits, tokens, 1.0))


def _lm_case(seed=0):
  rng = np.random.default_rng(seed)
  B, L, V = 3, 6, 11
  logits = jnp.asarray(rng.normal(size=(B, L, V)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, V, size=(B, L)))
  mask = np.zeros((B, L), np.float32)
  mask[0, 3:] = 1    # prompt of 3 tokens
  mask[1, 2:5] = 1   # padded tail
  mask[2, 1:] = 1
  return logits, tokens, jnp.asarray(mask)


def test_lm_loss_matches_reference():
  logits, tokens, mask = _lm_case()
  loss, metrics = losses.lm_loss(logits.astype(jnp.bfloat16), tokens, mask)
  lg = np.asarray(logits.astype(jnp.bfloat16).astype(jnp.float32), np.float64)
  ces, hits = [], []
  for b in range(tokens.shape[0]):
    for t in range(1, tokens.shape[1]):
      if mask[b, t]:
        lp = _np_log_softmax(lg[b, t - 1])
        ces.append(-lp[tokens[b, t]])
        hits.append(np.argmax(lp) == tokens[b, t])
  np.testing.assert_allclose(loss, np.mean(ces), rtol=1e-5)
  np.testing.assert_allclose(metrics['accuracy'], np.mean(hits), rtol=1e-6)
  assert metrics['tokens'] == len(ces)


def test_lm_loss_ignores_masked_targets():
  logits, tokens, mask = _lm_case()
  loss, _ = losses.lm_loss(logits, tokens, mask)
  # Token (0, 1) is a prompt token (masked) and (1, 5) is padding: change both.
  changed = tokens.at[0, 1].set((tokens[0, 1] + 1) % 11).at[1, 5].set(0)
  loss2, _ = losses.lm_loss(logits, changed, mask)
  assert loss == loss2
  # Changing an unmasked target does change the loss.
  changed = tokens.at[0, 4].set((tokens[0, 4] + 1) % 11)
  assert losses.lm_loss(logits, changed, mask)[0] != loss


def test_lm_loss_zero_gradient_on_prompt_positions():
  logits, tokens, mask = _lm_case()
  g = jax.grad(lambda lg: losses.lm_loss(lg, tokens, mask)[0])(logits)
  g = np.asarray(g)
  m = np.asarray(mask)
  for b in range(m.shape[0]):
    for t in range(m.shape[1] - 1):
      # logits[:, t] predicts token t + 1.
      if m[b, t + 1]:
        assert np.abs(g[b, t]).sum() > 0
      else:
        assert np.all(g[b, t] == 0), (b, t)
    assert np.all(g[b, -1] == 0)


def test_lm_loss_empty_mask_is_finite():
  logits, tokens, mask = _lm_case()
  loss, metrics = losses.lm_loss(logits, tokens, jnp.zeros_like(mask))
  assert loss == 0 and metrics['accuracy'] == 0 and metrics['tokens'] == 0


def _ranking_reference(rewards, ranks, valid):
  """Explicit double loop: per-prompt mean over pairs, then mean over prompts."""
  p_losses, p_accs, diffs = [], [], []
  for b in range(rewards.shape[0]):
    ls, accs = [], []
    for i, j in itertools.combinations(range(rewards.shape[1]), 2):
      if not (valid[b, i] and valid[b, j]) or ranks[b, i] == ranks[b, j]:
        continue
      hi, lo = (i, j) if ranks[b, i] < ranks[b, j] else (j, i)
      d = float(rewards[b, hi]) - float(rewards[b, lo])
      ls.append(math.log1p(math.exp(-d)))  # -log sigmoid(d)
      accs.append(float(d > 0))
      diffs.append(d)
    if ls:
      p_losses.append(np.mean(ls))
      p_accs.append(np.mean(accs))
  if not p_losses:
    return 0.0, 0.0, 0, 0.0
  return np.mean(p_losses), np.mean(p_accs), len(diffs), np.mean(diffs)


def _ranking_case(seed):
  rng = np.random.default_rng(seed)
  B, K = 6, 5
  rewards = rng.normal(size=(B, K)).astype(np.float32) * 2
  ranks = rng.integers(0, 3, size=(B, K))          # few levels -> many ties
  n_valid = np.array([5, 4, 3, 2, 5, 3])
  valid = np.arange(K)[None, :] < n_valid[:, None]
  rewards[~valid] = np.nan  # padding garbage must not leak
  ranks[3] = [1, 1, 0, 0, 0]  # prompt 3 has two valid responses, tied: no pair
  return rewards, ranks, valid


def test_ranking_loss_matches_double_loop():
  for seed in range(5):
    rewards, ranks, valid = _ranking_case(seed)
    loss, m = losses.ranking_loss(jnp.asarray(rewards), jnp.asarray(ranks),
                                  jnp.asarray(valid))
    ref_loss, ref_acc, ref_pairs, ref_margin = _ranking_reference(rewards, ranks, valid)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(m['accuracy'], ref_acc, rtol=1e-6)
    np.testing.assert_allclose(m['margin'], ref_margin, rtol=1e-5, atol=1e-6)
    assert m['pairs'] == ref_pairs
    assert np.isfinite(loss)


def test_ranking_loss_all_tie_prompt_excluded():
  rewards = jnp.array([[1.0, 0.0, 5.0], [3.0, -3.0, 0.0]])
  ranks = jnp.array([[0, 1, 2], [1, 1, 1]])
  valid = jnp.ones((2, 3), bool)
  loss, m = losses.ranking_loss(rewards, ranks, valid)
  only_first, m1 = losses.ranking_loss(rewards[:1], ranks[:1], valid[:1])
  np.testing.assert_allclose(loss, only_first, rtol=1e-6)
  # Hand case: pairs (0>1: d=1), (0>2: d=-4), (1>2: d=-5); accuracy 1/3.
  ref = np.mean([math.log1p(math.exp(-d)) for d in (1.0, -4.0, -5.0)])
  np.testing.assert_allclose(loss, ref, rtol=1e-6)
  np.testing.assert_allclose(m['accuracy'], 1 / 3, rtol=1e-6)
  assert m['pairs'] == 3


def test_ranking_loss_permutation_invariant():
  rewards, ranks, valid = _ranking_case(7)
  loss, m = losses.ranking_loss(rewards, ranks, valid)
  rng = np.random.default_rng(1)
  for _ in range(3):
    perm = np.stack([rng.permutation(rewards.shape[1]) for _ in range(rewards.shape[0])])
    take = lambda x: np.take_along_axis(x, perm, axis=1)
    loss_p, m_p = losses.ranking_loss(take(rewards), take(ranks), take(valid))
    np.testing.assert_allclose(loss_p, loss, rtol=1e-5)
    np.testing.assert_allclose(m_p['accuracy'], m['accuracy'], rtol=1e-6)


def test_ranking_loss_nothing_counts_is_finite():
  rewards = jnp.array([[1.0, 2.0], [0.5, 0.1]])
  ranks = jnp.array([[0, 0], [0, 1]])
  valid = jnp.array([[True, True], [True, False]])
  loss, m = losses.ranking_loss(rewards, ranks, valid)
  assert loss == 0 and m['accuracy'] == 0 and m['pairs'] == 0
  g = jax.grad(lambda r: losses.ranking_loss(r, ranks, valid)[0])(rewards)
  assert np.all(np.asarray(g) == 0)


def test_entropy_from_logits():
  logits = jnp.array([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
  ent = losses.entropy_from_logits(logits)
  np.testing.assert_allclose(ent, [[math.log(4), 0.0]], atol=1e-5)
  np.testing.assert_allclose(
      losses.entropy_from_logits(logits, jnp.array([[1.0, 0.0]])), math.log(4), rtol=1e-6)


def test_ranking_accuracy_needs_strictly_higher_reward():
  # Equal rewards for differently ranked responses count as a wrong ordering.
  loss, m = losses.ranking_loss(jnp.array([[0.3, 0.3]]), jnp.array([[0, 1]]),
                                jnp.ones((1, 2), bool))
  assert m['accuracy'] == 0 and m['pairs'] == 1
  np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)


def test_model_dropout_is_on_in_train_steps_and_off_in_evaluation():
  """model.dropout acts when a train step passes its key; evaluation passes none."""
  from rlhf_jax.model.transformer import ModelConfig
  from rlhf_jax.stages.common import lm_losses
  from rlhf_jax.stages.reward import make_losses
  from rlhf_jax.train import state as st
  tokens = jax.random.randint(jax.random.key(0), (4, 12), 4, 32)
  batch = {"tokens": tokens, "mask": jnp.ones((4, 12), bool), "loss_mask": jnp.ones((4, 12))}
  rank_batch = {"tokens": tokens.reshape(2, 2, 12), "mask": jnp.ones((2, 2, 12), bool),
                "ranks": jnp.array([[0, 1], [1, 0]]), "valid": jnp.ones((2, 2), bool)}
  for rate in (0.0, 0.5):
    cfg = ModelConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64,
                      max_len=16, dropout=rate)
    model = st.make_model(cfg)
    params = st.init_params(model, jax.random.key(1))
    for loss, b in ((lm_losses(model)[0], batch), (make_losses(model)[0], rank_batch)):
      loss = jax.jit(loss)  # as a train step runs it (op by op, each op would compile)
      ev = float(loss(params, b)[0])
      assert ev == float(loss(params, b)[0])  # evaluation is deterministic
      tr = [float(loss(params, b, jax.random.key(i))[0]) for i in (1, 2)]
      if rate == 0.0:
        np.testing.assert_allclose(tr, [ev, ev], rtol=1e-6)
      else:
        assert tr[0] != tr[1] and ev not in tr, (ev, tr)


def test_weight_decay_spares_norm_scales():
  """AdamW decays matrices only: with zero gradients a norm scale stays at 1."""
  from configs import tiny
  from rlhf_jax.train.optim import make_optimizer
  opt_cfg = tiny.get_config().pretrain.opt.copy_and_resolve_references()
  opt_cfg.update(weight_decay=0.5, warmup_steps=0, schedule="constant")
  opt = make_optimizer(opt_cfg, 10)
  params = {"scale": jnp.ones((4,)), "kernel": jnp.ones((4, 4))}
  state = opt.init(params)
  upd, _ = opt.update(jax.tree.map(jnp.zeros_like, params), state, params)
  assert float(jnp.max(jnp.abs(upd["scale"]))) == 0.0
  assert float(jnp.min(-upd["kernel"])) > 0  # the kernel is decayed toward 0


def test_initial_lm_loss_is_near_uniform_at_any_width():
  """At initialisation the tied logits are about N(0, 1): loss near ln V, not sqrt(d)."""
  from rlhf_jax.model.transformer import ModelConfig
  from rlhf_jax.train import state as st
  tokens = jax.random.randint(jax.random.key(1), (4, 32), 0, 512)
  for d in (128, 512):
    cfg = ModelConfig(vocab_size=512, d_model=d, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=2 * d,
                      max_len=32)
    model = st.make_model(cfg)
    logits = jax.jit(model.apply)({"params": st.init_params(model, jax.random.key(0))}, tokens)["logits"]
    loss = float(losses.lm_loss(logits, tokens, jnp.ones(tokens.shape))[0])
    assert math.log(512) <= loss < math.log(512) + 1.0, (d, loss)
