"""DPO: preference pairs from K-way rankings, and a few steps on a toy preference
raise the implicit-reward accuracy on held-out pairs."""
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from rlhf_jax.model.transformer import ModelConfig
from rlhf_jax.stages.dpo import make_loss, pair_examples, preference_pairs, sequence_logps
from rlhf_jax.train import state as st
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.step import make_train_step


def test_pairs_from_rankings_skip_ties_and_mask_the_prompt():
  assert sorted(preference_pairs([1, 0, 1, 2], "all")) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]
  assert preference_pairs([1, 0, 1, 2], "best_vs_rest") == [(1, 0), (1, 2), (1, 3)]
  assert preference_pairs([0, 0], "all") == []  # a full tie gives no pair
  arrays, counts = pair_examples([[5, 6]], [[[7, 7, 7], [8]]], [[1, 0]], max_len=8, bos_id=1,
                                 eos_id=3, pad_id=0, mode="all")
  assert counts["pairs"] == 1
  np.testing.assert_array_equal(arrays["chosen_tokens"][0], [1, 5, 6, 8, 3, 0, 0, 0])
  np.testing.assert_array_equal(arrays["rejected_tokens"][0], [1, 5, 6, 7, 7, 7, 3, 0])
  # Only the response and its EOS are scored: the policy did not choose the prompt.
  np.testing.assert_array_equal(arrays["chosen_loss_mask"][0], [0, 0, 0, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(arrays["rejected_mask"][0], [1] * 7 + [0])
  # Too long: the response is cut and has no EOS (it did not end where the model sees it).
  arrays, counts = pair_examples([[5]], [[[7] * 9, [8]]], [[0, 1]], max_len=6, bos_id=1, eos_id=3,
                                 pad_id=0, mode="all")
  assert counts["truncated"] == 1
  np.testing.assert_array_equal(arrays["chosen_tokens"][0], [1, 5, 7, 7, 7, 7])
  # A label-stage sample that did not end gets no EOS either; one that ended does.
  arrays, _ = pair_examples([[5]], [[[7, 7], [8]]], [[0, 1]], max_len=6, bos_id=1, eos_id=3,
                            pad_id=0, mode="all", ended=[[False, True]])
  np.testing.assert_array_equal(arrays["chosen_tokens"][0], [1, 5, 7, 7, 0, 0])
  np.testing.assert_array_equal(arrays["rejected_tokens"][0], [1, 5, 8, 3, 0, 0])


def _toy_pairs(rng, n, length=6):
  """Chosen responses use token 7 more often, rejected ones token 9; the rest is noise."""
  def resp(fav):
    r = rng.integers(4, 16, (n, length))
    r[rng.random((n, length)) < 0.5] = fav
    return r
  prompt = rng.integers(4, 16, (n, 3))
  out = {}
  for side, fav in (("chosen", 7), ("rejected", 9)):
    tokens = np.concatenate([np.full((n, 1), 1), prompt, resp(fav), np.full((n, 1), 3)], 1)
    lm = np.zeros(tokens.shape, np.float32)
    lm[:, 4:] = 1.0
    out.update({f"{side}_tokens": jnp.asarray(tokens, jnp.int32),
                f"{side}_mask": jnp.ones(tokens.shape, bool), f"{side}_loss_mask": jnp.asarray(lm)})
  return out


def test_dpo_steps_raise_implicit_reward_accuracy():
  cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                    max_len=16)
  model = st.make_model(cfg)
  ref = st.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  train, held = _toy_pairs(rng, 32), _toy_pairs(rng, 64)
  logp = jax.jit(lambda p, t, m, l: sequence_logps(model, p, t, m, l))
  for b in (train, held):  # the reference's log-probs, once per pair
    for side in ("chosen", "rejected"):
      b[f"ref_{side}"] = logp(ref, b[f"{side}_tokens"], b[f"{side}_mask"], b[f"{side}_loss_mask"])
  # IPO (its loss is checked against the formula in test_preference_math) would regress h to
  # 1 / (2 beta); one compiled step per loss type is test time, so DPO's sigmoid only here.
  for loss_type, beta in (("sigmoid", 0.5),):
    dc = tiny.get_config("test").dpo.copy_and_resolve_references()
    dc.update(beta=beta, loss_type=loss_type)
    dc.opt.update(lr=3e-3, warmup_steps=0)
    opt = make_optimizer(dc.opt, 10)
    loss = make_loss(model, dc)
    step = jax.jit(make_train_step(loss, opt))
    evaluate = jax.jit(lambda p: loss(p, held)[1])
    params = jax.tree.map(jnp.copy, ref)
    before = evaluate(params)
    assert float(before["accuracy"]) == 0.0  # policy = reference: h = 0 on every pair
    state = {"params": params, "opt_state": opt.init(params), "step": jnp.zeros((), jnp.int32)}
    accs = []
    for i in range(3):
      state, m = step(state, train, jax.random.key(i))
      accs.append(float(evaluate(state["params"])["accuracy"]))
    after = evaluate(state["params"])
    print(loss_type, "held-out implicit-reward accuracy per step:", accs)
    assert accs[0] > 0.6, accs  # one step already orders most unseen pairs
    assert float(after["accuracy"]) > 0.8 and float(after["margin"]) > 0
    assert float(after["loss"]) < float(before["loss"])
    assert float(after["chosen_reward"]) > float(after["rejected_reward"])


def test_bad_dpo_and_grpo_settings_fail_naming_the_key():
  import pytest
  from rlhf_jax import config_lib
  cases = [("dpo.loss_type", "hinge", "config.dpo.loss_type"),
           ("dpo.beta", 0.0, "config.dpo.beta"),
           ("dpo.label_smoothing", 0.5, "config.dpo.label_smoothing"),
           ("dpo.pairs", "random", "config.dpo.pairs"),
           ("grpo.k", 1, "config.grpo.k"),
           ("grpo.advantage", "ppo", "config.grpo.advantage"),
           ("grpo.loss_agg", "sum", "config.grpo.loss_agg"),
           ("grpo.minibatches", 3, "config.grpo.prompts_per_iteration"),  # 4 x 2 rows into 3
           ("grpo.response_len", 60, "config.grpo.response_len")]
  for key, value, msg in cases:
    c = tiny.get_config("test")
    with c.unlocked():
      section, field = key.split(".")
      c[section][field] = value
    with pytest.raises(config_lib.ConfigError, match=msg.replace(".", r"\.")):
      config_lib.validate(c, 1)


def test_online_dpo_raises_a_token_frequency_reward():
  """dpo.online: two samples per prompt from the current policy, ranked by the (here
  programmatic) reward, one DPO step each: the reward rises and the policy leaves the reference."""
  from rlhf_jax.sampling import SampleConfig
  from rlhf_jax.stages.online_dpo import make_step
  dc = tiny.get_config("test").dpo.copy_and_resolve_references()
  dc.update(beta=0.1, batch_size=16, response_len=8)
  dc.opt.update(lr=3e-3, warmup_steps=0)
  rc = tiny.get_config("test").ppo.copy_and_resolve_references()
  rc.use_eos_penalty = False
  cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                    max_len=16)
  model = st.make_model(cfg)
  policy = st.init_params(model, jax.random.key(0))
  opt = make_optimizer(dc.opt, 100)
  score = lambda tokens, mask, r, rm, ended: jnp.sum((r == 7) & rm, -1) / jnp.maximum(jnp.sum(rm, -1), 1)
  step = jax.jit(make_step(model, opt, dc, rc, SampleConfig(max_new_tokens=8, eos_id=3, pad_id=0),
                           4, score_fn=score))
  state = {"params": policy, "opt_state": opt.init(policy), "step": jnp.zeros((), jnp.int32),
           "skipped": jnp.zeros((), jnp.int32)}
  frozen = {"ref": jax.tree.map(jnp.copy, policy)}
  rng = np.random.default_rng(0)
  scores = []
  for i in range(12):
    batch = {"prompt": jnp.asarray(rng.integers(4, 16, (16, 4)), jnp.int32),
             "prompt_mask": jnp.ones((16, 4), bool), "index": jnp.arange(16, dtype=jnp.int32)}
    state, m = step(state, frozen, batch, jax.random.key(i))
    scores.append(float(m["proxy_reward"]))
  print("online DPO token-7 frequency per step:", np.round(scores, 3))
  assert scores[0] < 0.2 and np.mean(scores[-3:]) > scores[0] + 0.15, scores
  assert float(m["kl"]) > 0 and int(state["skipped"]) == 0
