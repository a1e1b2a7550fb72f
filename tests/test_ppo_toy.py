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
