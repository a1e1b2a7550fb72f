"""PPO raises a simple programmatic reward within a few iterations on CPU.

The reward is the fraction of response tokens equal to one token (7): a policy
that starts near 1/16 of it must learn to say 7 more, through the real
iteration (rollout, four forward passes, GAE, clipped updates, KL penalty).
"""
import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from rlhf_jax.model.transformer import ModelConfig
from rlhf_jax.sampling import SampleConfig
from rlhf_jax.stages.ppo_step import make_iteration
from rlhf_jax.train import state as st
from rlhf_jax.train.optim import make_optimizer

TARGET = 7


def toy_score(tokens, mask, response, response_mask, ended):
  hits = jnp.sum((response == TARGET) & response_mask, axis=-1)
  return hits / jnp.maximum(jnp.sum(response_mask, axis=-1), 1)


def test_ppo_raises_a_token_frequency_reward():
  pc = tiny.get_config("test").ppo.copy_and_resolve_references()
  pc.update(rollout_batch=32, minibatches=2, epochs=2, response_len=8, kl_coef=0.01,
            use_eos_penalty=False, critic_lr=3e-3)
  pc.opt.update(lr=3e-3)
  cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                    max_len=32)
  model = st.make_model(cfg)
  policy = st.init_params(model, jax.random.key(0))
  critic = st.init_params(model, jax.random.key(1))
  popt, copt = make_optimizer(pc.opt, 100), make_optimizer(pc.opt, 100)
  sc = SampleConfig(max_new_tokens=pc.response_len, eos_id=3, pad_id=0, temperature=1.0)
  prompt_len = 4
  iteration = jax.jit(make_iteration(model, model, popt, copt, pc, sc, prompt_len,
                                     score_fn=toy_score))
  state = {"params": policy, "opt_state": popt.init(policy), "critic_params": critic,
           "critic_opt_state": copt.init(critic), "step": jnp.zeros((), jnp.int32),
           "kl_coef": jnp.float32(pc.kl_coef)}
  frozen = {"ref": jax.tree.map(jnp.copy, policy), "reward": critic,
            "gain": jnp.float32(1.0), "bias": jnp.float32(0.0)}
  rng = np.random.default_rng(0)
  scores = []
  for i in range(12):
    prompt = np.concatenate([np.full((32, 1), 2), rng.integers(4, 16, (32, prompt_len - 1))], 1)
    batch = {"prompt": jnp.asarray(prompt, jnp.int32), "prompt_mask": jnp.ones((32, prompt_len), bool),
             "index": jnp.arange(32, dtype=jnp.int32)}
    state, m = iteration(state, frozen, batch, jax.random.key(i))
    scores.append(float(m["score"]))
    assert bool(m["finite_loss"]) and bool(m["finite_grads"])
  print("token-7 frequency per iteration:", np.round(scores, 3))
  assert scores[0] < 0.2
  assert np.mean(scores[-3:]) > scores[0] + 0.25, scores
  assert float(m["kl"]) > 0  # it moved away from the reference to get there


def test_critic_starts_from_the_reward_model_in_normalised_units():
  """The critic predicts normalised scores (gain * raw + bias), so it starts there."""
  from rlhf_jax.stages.policy_eval import RewardModel, reward_scores
  cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                    max_len=16)
  model = st.make_model(cfg)
  rm = RewardModel.__new__(RewardModel)  # without a workdir: params and normalisation only
  rm.model, rm.params, rm.gain, rm.bias = model, st.init_params(model, jax.random.key(0)), 1.7, -0.6
  tokens = jax.random.randint(jax.random.key(1), (4, 10), 4, 16)
  mask = jnp.arange(10)[None, :] < jnp.array([10, 7, 5, 9])[:, None]
  score, raw = reward_scores(model, rm.params, tokens, mask, rm.gain, rm.bias)
  critic_score, _ = reward_scores(model, rm.normalized_params(), tokens, mask, 1.0, 0.0)
  np.testing.assert_allclose(critic_score, score, rtol=1e-5, atol=1e-5)
  assert not np.allclose(raw, score, atol=0.1)  # the normalisation does change the units
  critic_score2, _ = reward_scores(model, rm.params, tokens, mask, 1.0, 0.0)
  np.testing.assert_allclose(critic_score2, raw)  # the frozen reward model is untouched


def test_ppo_learning_rate_schedule_spans_every_update():
  """A linear decay reaches its floor at the run's last minibatch update, not 1/(epochs x
  minibatches) of the way through. With a constant gradient Adam moves a parameter by
  about lr(t) per update, so the step sizes read the schedule back."""
  import optax
  from rlhf_jax.stages.ppo import optimizers
  pc = tiny.get_config().ppo.copy_and_resolve_references()
  pc.opt.update(schedule="linear", end_lr_frac=0.1, clip_norm=0.0, weight_decay=0.0)
  n = pc.iterations * pc.epochs * pc.minibatches
  assert n > pc.iterations  # several updates per iteration in the default config
  policy_opt, _ = optimizers(pc)
  x, state, steps = jnp.zeros(()), policy_opt.init(jnp.zeros(())), []
  for _ in range(n):
    upd, state = policy_opt.update(jnp.ones(()), state, x)
    steps.append(-float(upd))
    x = optax.apply_updates(x, upd)
  lr = pc.opt.lr
  np.testing.assert_allclose(steps[0], lr, rtol=1e-3)
  np.testing.assert_allclose(steps[pc.iterations], lr * (1 - 0.9 * pc.iterations / n), rtol=1e-3)
  np.testing.assert_allclose(steps[-1], lr * 0.1, rtol=0.05)


def test_ppo_ptx_mixes_fresh_pretraining_batches_into_every_update():
  """PPO-ptx (InstructGPT eq. 2): with no reward signal, the pretraining term alone
  teaches the policy a repeating pattern; each minibatch update takes its own rows."""
  pc = tiny.get_config("test").ppo.copy_and_resolve_references()
  pc.update(rollout_batch=16, minibatches=2, epochs=2, response_len=4, kl_coef=0.0,
            use_eos_penalty=False, ptx_coef=1.0, ptx_batch=4)
  pc.opt.update(lr=3e-3)
  cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                    max_len=16)
  model = st.make_model(cfg)
  policy = st.init_params(model, jax.random.key(0))
  popt, copt = make_optimizer(pc.opt, 100), make_optimizer(pc.opt, 100)
  sc = SampleConfig(max_new_tokens=pc.response_len, eos_id=3, pad_id=0, temperature=1.0)
  zero = lambda tokens, mask, response, response_mask, ended: jnp.zeros(response.shape[0])
  iteration = jax.jit(make_iteration(model, model, popt, copt, pc, sc, 4, score_fn=zero))
  state = {"params": policy, "opt_state": popt.init(policy), "critic_params": policy,
           "critic_opt_state": copt.init(policy), "step": jnp.zeros((), jnp.int32),
           "kl_coef": jnp.float32(0.0)}
  frozen = {"ref": policy, "reward": policy, "gain": jnp.float32(1.0), "bias": jnp.float32(0.0)}
  n_ptx = pc.epochs * pc.minibatches * pc.ptx_batch  # one fresh slice per update
  pattern = np.resize([5, 9, 12], (n_ptx, 12)).astype(np.int32)
  rng = np.random.default_rng(0)
  losses = []
  for i in range(8):
    prompt = rng.integers(4, 16, (16, 4))
    batch = {"prompt": jnp.asarray(prompt, jnp.int32), "prompt_mask": jnp.ones((16, 4), bool),
             "index": jnp.arange(16, dtype=jnp.int32), "ptx_tokens": jnp.asarray(pattern),
             "ptx_mask": jnp.ones((n_ptx, 12), bool), "ptx_loss_mask": jnp.ones((n_ptx, 12))}
    state, m = iteration(state, frozen, batch, jax.random.key(i))
    losses.append(float(m["ptx_loss"]))
  print("ptx loss per iteration:", np.round(losses, 3))
  assert losses[0] > 1.0  # the first iteration's four updates start from about ln 16
  assert losses[-1] < 0.2 * losses[0], losses


def test_chunked_scoring_gives_the_same_rollout_figures():
  """ppo.score_chunks runs the four scoring passes (policy and reference log-probs, critic
  values, reward-model score) over slices of the rollout's rows: the same figures as one
  pass, to float32 rounding (XLA's matmuls at another batch size may round differently)."""
  cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                    max_len=16)
  model = st.make_model(cfg)
  policy = st.init_params(model, jax.random.key(0))
  critic = st.init_params(model, jax.random.key(1))
  ref = jax.tree.map(lambda x: x * 1.1, policy)  # a reference that differs from the policy
  frozen = {"ref": ref, "reward": critic, "gain": jnp.float32(1.5), "bias": jnp.float32(-0.2)}
  state = {"params": policy, "critic_params": critic}
  prompt = np.random.default_rng(0).integers(4, 16, (16, 4))
  batch = {"prompt": jnp.asarray(prompt, jnp.int32), "prompt_mask": jnp.ones((16, 4), bool)}
  sc = SampleConfig(max_new_tokens=6, eos_id=3, pad_id=0, temperature=0.8)
  scored, g = {}, None
  for chunks in (1, 4):
    pc = tiny.get_config("test").ppo.copy_and_resolve_references()
    with pc.unlocked():
      pc.update(rollout_batch=16, minibatches=2, epochs=1, response_len=6, temperature=0.8,
                score_chunks=chunks)
    opt = make_optimizer(pc.opt, 10)
    it = make_iteration(model, model, opt, opt, pc, sc, 4)
    g = g or jax.jit(it.rollout)(state, batch, jax.random.key(3))
    scored[chunks] = jax.jit(it.score)(state, frozen, g)
  one, four = scored[1], scored[4]
  assert 0.0 < float(jnp.mean(g["ended"])) < 1.0  # some rows end early: masks differ per row
  assert not np.allclose(one["old_logp"], one["ref_logp"])  # policy and reference differ
  for key in ("old_logp", "ref_logp", "values", "score", "proxy", "raw"):
    a, b = np.asarray(four[key]), np.asarray(one[key])
    print(key, "max |chunked - one pass|:", np.max(np.abs(a - b)))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=key)
  np.testing.assert_array_equal(four["rmask"], one["rmask"])
