"""GRPO and RLOO raise a programmatic reward through the real iteration (rollout of K
samples per prompt, group advantages, clipped updates, KL term), as PPO's toy test does."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from rlhf_jax.model.transformer import ModelConfig
from rlhf_jax.sampling import SampleConfig
from rlhf_jax.stages.grpo import make_iteration
from rlhf_jax.train import state as st
from rlhf_jax.train.optim import make_optimizer

TARGET = 7


def toy_score(tokens, mask, response, response_mask, ended):
  hits = jnp.sum((response == TARGET) & response_mask, axis=-1)
  return hits / jnp.maximum(jnp.sum(response_mask, axis=-1), 1)


@pytest.mark.parametrize("advantage,kl_mode,agg", [("grpo", "loss", "sequence"),
                                                   ("rloo", "reward", "token")])
def test_group_baseline_raises_a_token_frequency_reward(advantage, kl_mode, agg):
  gc = tiny.get_config("test").grpo.copy_and_resolve_references()
  gc.update(prompts_per_iteration=8, k=4, minibatches=2, epochs=2, response_len=8, kl_coef=0.01,
            use_eos_penalty=False, advantage=advantage, kl_mode=kl_mode, loss_agg=agg)
  with gc.unlocked():  # the rloo arm also scores its 32 rows in 4 chunks (grpo.score_chunks)
    gc.score_chunks = 4 if advantage == "rloo" else 1
  gc.opt.update(lr=3e-3)
  cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                    max_len=16)  # one layer: half the compile time of PPO's toy model
  model = st.make_model(cfg)
  policy = st.init_params(model, jax.random.key(0))
  opt = make_optimizer(gc.opt, 100)
  sc = SampleConfig(max_new_tokens=gc.response_len, eos_id=3, pad_id=0, temperature=1.0)
  prompt_len = 4
  iteration = jax.jit(make_iteration(model, opt, gc, sc, prompt_len, score_fn=toy_score))
  state = {"params": policy, "opt_state": opt.init(policy), "step": jnp.zeros((), jnp.int32),
           "skipped": jnp.zeros((), jnp.int32)}
  frozen = {"ref": jax.tree.map(jnp.copy, policy)}
  rng = np.random.default_rng(0)
  scores = []
  for i in range(8):  # seen: 0.08 -> 0.60 (grpo), 0.08 -> 0.78 (rloo) by the eighth
    prompt = np.concatenate([np.full((8, 1), 2), rng.integers(4, 16, (8, prompt_len - 1))], 1)
    batch = {"prompt": jnp.asarray(prompt, jnp.int32), "prompt_mask": jnp.ones((8, prompt_len), bool),
             "index": jnp.arange(8, dtype=jnp.int32)}
    state, m = iteration(state, frozen, batch, jax.random.key(i))
    scores.append(float(m["score"]))
    assert bool(m["finite_loss"]) and bool(m["finite_grads"])
    assert m["_index"].shape == (32,)  # K samples of each prompt
  print(f"{advantage}: token-7 frequency per iteration:", np.round(scores, 3))
  assert scores[0] < 0.2
  assert np.mean(scores[-3:]) > scores[0] + 0.25, scores
  assert float(m["kl"]) > 0
  assert int(state["skipped"]) == 0 and int(state["step"]) == 8
