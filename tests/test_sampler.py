"""The KV-cache sampler agrees with the training forward pass it is trained against."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from rlhf_jax import losses
from rlhf_jax.model.transformer import ModelConfig, init_cache
from rlhf_jax.sampling import SampleConfig, generate
from rlhf_jax.train import state as st

# One worker runs the module, so its module-scoped fixture runs once (pytest-xdist loadgroup).
pytestmark = pytest.mark.xdist_group("sampler")

VOCAB, BOS, EOS, PAD = 16, 1, 2, 0
CFG = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_len=32)
P, N = 8, 8


@pytest.fixture(scope="module")
def model_params():
  model = st.make_model(CFG)
  return model, st.init_params(model, jax.random.key(0))


@pytest.fixture(scope="module")
def forward(model_params):
  """The training forward pass (no cache), jitted: (params, tokens, mask) -> logits."""
  model, _ = model_params
  fn = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m)["logits"])
  return lambda params, tokens, mask: np.asarray(fn(params, jnp.asarray(tokens), jnp.asarray(mask)))


def _prompts(b=6, seed=0):
  """Left-padded prompts of mixed lengths (1..P real tokens, BOS first)."""
  rng = np.random.default_rng(seed)
  prompt = np.full((b, P), PAD, np.int32)
  mask = np.zeros((b, P), bool)
  for i, n in enumerate([P, 1, 3, 5, P - 1, 2][:b] + list(rng.integers(1, P + 1, max(b - 6, 0)))):
    prompt[i, P - n:] = [BOS, *rng.integers(3, VOCAB, n - 1)]
    mask[i, P - n:] = True
  return jnp.asarray(prompt), jnp.asarray(mask)


_COMPILED = {}


def _generate_fn(model, sc):  # one compile per (model, sampling config)
  key = (id(model), sc)
  if key not in _COMPILED:
    _COMPILED[key] = jax.jit(lambda p, x, m, k: generate(model, p, x, m, k, sc))
  return _COMPILED[key]


def _sample(model, params, sc, key=0, b=6, seed=0):
  prompt, mask = _prompts(b, seed)
  return prompt, mask, jax.device_get(_generate_fn(model, sc)(params, prompt, mask, jax.random.key(key)))


def test_cached_decoding_matches_full_forward(model_params, forward):
  model, params = model_params
  prompt, pmask = _prompts()
  b = prompt.shape[0]
  new = jnp.asarray(np.random.default_rng(1).integers(3, VOCAB, (b, N)), jnp.int32)
  kv_mask = jnp.concatenate([pmask, jnp.ones((b, N), bool)], axis=1)
  pos = jnp.maximum(jnp.cumsum(pmask, axis=-1) - 1, 0)
  prefill = jax.jit(lambda p, x, m, pos, c: model.apply(
      {"params": p}, x, m, positions=pos, cache=c, cache_index=0, kv_mask=kv_mask))
  decode = jax.jit(lambda p, x, pos, c, i: model.apply(
      {"params": p}, x, None, positions=pos, cache=c, cache_index=i, kv_mask=kv_mask))
  out = prefill(params, prompt, pmask, pos, init_cache(CFG, b, P + N))
  cache, step_logits = out["cache"], [out["logits"][:, -1]]
  n_prompt = jnp.sum(pmask, axis=-1)
  for i in range(N - 1):
    o = decode(params, new[:, i:i + 1], (n_prompt + i)[:, None], cache, P + i)
    cache = o["cache"]
    step_logits.append(o["logits"][:, -1])
  full = forward(params, jnp.concatenate([prompt, new], 1), kv_mask)
  pm = np.asarray(pmask)
  # Prefill logits at every real prompt position.
  np.testing.assert_allclose(np.asarray(out["logits"])[pm], full[:, :P][pm], rtol=1e-5, atol=1e-5)
  # Each decode step's logits = full-pass logits at the same position.
  np.testing.assert_allclose(np.stack([np.asarray(l) for l in step_logits], 1), full[:, P - 1:P + N - 1],
                             rtol=1e-5, atol=1e-5)


def test_greedy_equals_stepwise_argmax_of_full_forward(model_params, forward):
  model, params = model_params
  prompt, pmask, out = _sample(model, params, SampleConfig(N, EOS, PAD, greedy=True))
  b = prompt.shape[0]
  # Full forward passes over a fixed [B, P+N] buffer; columns not generated yet are masked
  # out, so the logits at column P-1+i are those of the sequence so far.
  tokens = np.concatenate([np.asarray(prompt), np.full((b, N), PAD, np.int32)], 1)
  mask = np.concatenate([np.asarray(pmask), np.zeros((b, N), bool)], 1)
  done = np.zeros(b, bool)
  for i in range(N):
    nxt = forward(params, tokens, mask)[:, P - 1 + i].argmax(-1)
    tokens[:, P + i] = np.where(done, PAD, nxt)
    mask[:, P + i] = ~done
    done |= tokens[:, P + i] == EOS
  np.testing.assert_array_equal(out["tokens"], tokens)
  np.testing.assert_array_equal(out["mask"], mask)
  np.testing.assert_array_equal(out["ended"], done)


def test_logprobs_match_training_forward_at_temperature(model_params, forward):
  model, params = model_params
  prompt, pmask, out = _sample(model, params, SampleConfig(N, EOS, PAD, temperature=0.7))
  logits = jnp.asarray(forward(params, out["tokens"], out["mask"]))
  ref = np.asarray(losses.token_logprobs(logits, jnp.asarray(out["tokens"]), 0.7))[:, P - 1:]
  rm = out["response_mask"]
  np.testing.assert_allclose(out["logprobs"][rm], ref[rm], rtol=1e-5, atol=1e-5)
  assert np.all(out["logprobs"][~rm] == 0)
  # At temperature 1 they would differ: the temperature is really applied.
  ref1 = np.asarray(losses.token_logprobs(logits, jnp.asarray(out["tokens"]), 1.0))[:, P - 1:]
  assert np.max(np.abs(out["logprobs"][rm] - ref1[rm])) > 1e-2


def test_same_key_same_samples_different_key_different(model_params):
  model, params = model_params
  sc = SampleConfig(N, EOS, PAD, temperature=1.0)
  _, _, a = _sample(model, params, sc, key=0)
  _, _, b = _sample(model, params, sc, key=0)
  _, _, c = _sample(model, params, sc, key=1)
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  np.testing.assert_array_equal(a["logprobs"], b["logprobs"])
  assert not np.array_equal(a["tokens"], c["tokens"])


def test_top_k_1_and_tiny_top_p_equal_greedy(model_params):
  model, params = model_params
  _, _, greedy = _sample(model, params, SampleConfig(N, EOS, PAD, greedy=True))
  _, _, topk = _sample(model, params, SampleConfig(N, EOS, PAD, top_k=1), key=5)
  _, _, topp = _sample(model, params, SampleConfig(N, EOS, PAD, top_p=1e-6), key=6)
  _, _, free = _sample(model, params, SampleConfig(N, EOS, PAD), key=5)
  for out in (topk, topp):
    np.testing.assert_array_equal(out["tokens"], greedy["tokens"])
    np.testing.assert_array_equal(out["response_mask"], greedy["response_mask"])
  assert not np.array_equal(free["tokens"], greedy["tokens"])  # unfiltered sampling differs


def _check_eos_bookkeeping(out, sc):
  resp, rm, ended, lengths = out["response"], out["response_mask"], out["ended"], out["lengths"]
  n = resp.shape[1]
  np.testing.assert_array_equal(rm, np.arange(n)[None] < lengths[:, None])  # mask is a prefix
  for r, m, e, l in zip(resp, rm, ended, lengths):
    eos_at = np.flatnonzero(r[m] == sc.eos_id)
    if e:  # ended: exactly one EOS, the last real token
      assert list(eos_at) == [l - 1], (r, l)
    else:
      assert l == n and len(eos_at) == 0, (r, l)
    assert np.all(r[~m] == sc.pad_id)
  np.testing.assert_array_equal(out["tokens"][:, -n:], resp)
  np.testing.assert_array_equal(out["mask"][:, -n:], rm)


def test_min_new_tokens_and_eos_bookkeeping(model_params):
  model, params = model_params
  m = 4
  # Temperature 5 flattens a 16-token vocabulary: EOS is likely at every step.
  free_sc = SampleConfig(N, EOS, PAD, temperature=5.0)
  min_sc = SampleConfig(N, EOS, PAD, temperature=5.0, min_new_tokens=m)
  _, _, free = _sample(model, params, free_sc, b=64, seed=2)
  _, _, held = _sample(model, params, min_sc, b=64, seed=2)
  assert np.any(free["response"][:, :m] == EOS), "EOS never sampled early; the test proves nothing"
  assert np.any(free["ended"]) and not np.all(free["ended"])
  assert not np.any(held["response"][:, :m] == EOS)
  assert np.all(held["lengths"] >= m)
  assert np.any(held["ended"])  # EOS still allowed afterwards
  _check_eos_bookkeeping(free, free_sc)
  _check_eos_bookkeeping(held, min_sc)


_SHARDED_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from rlhf_jax.model.transformer import ModelConfig
from rlhf_jax.sampling import SampleConfig, make_generate
from rlhf_jax.train import sharding as sh, state as st

cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, max_len=32)
mesh8 = sh.mesh_of((2, 2, 2), jax.devices())
m1, m8 = st.make_model(cfg), st.make_model(cfg, mesh8)
params = st.init_params(m1, jax.random.key(0))
params8 = jax.device_put(params, st.param_shardings(m8))
assert not params8["embed"].sharding.is_fully_replicated
rng = np.random.default_rng(0)
B, P = 8, 8
prompt = np.zeros((B, P), np.int32); mask = np.zeros((B, P), bool)
for i in range(B):
  n = 1 + i % P
  prompt[i, P - n:] = [1, *rng.integers(3, 64, n - 1)]; mask[i, P - n:] = True
sc = SampleConfig(max_new_tokens=10, eos_id=2, pad_id=0, temperature=1.0, top_k=20)
key = jax.random.key(7)
a = jax.device_get(make_generate(m1, sc)(params, prompt, mask, key))
b = jax.device_get(make_generate(m8, sc, mesh8, st.param_shardings(m8))(params8, prompt, mask, key))
print(json.dumps(dict(tokens_equal=bool(np.array_equal(a["tokens"], b["tokens"])),
                      mask_equal=bool(np.array_equal(a["mask"], b["mask"])),
                      logprob_diff=float(np.max(np.abs(a["logprobs"] - b["logprobs"]))),
                      tokens=a["tokens"].tolist(), tokens8=b["tokens"].tolist())))
"""


def test_sharded_sampling_matches_unsharded():
  r = helpers.run_script(_SHARDED_SCRIPT, devices=8)
  assert r["tokens_equal"], (r["tokens"], r["tokens8"])
  assert r["mask_equal"]
  assert r["logprob_diff"] < 1e-4


def test_sample_config_and_ppo_reject_bad_sampling_settings():
  """top_p <= 0 used to sample uniformly over the vocabulary; PPO needs on-policy rollouts."""
  from configs import tiny
  from rlhf_jax.stages.ppo_step import make_iteration
  for bad in (dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1), dict(temperature=0.0),
              dict(max_new_tokens=0)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      SampleConfig(**{"max_new_tokens": 4, "eos_id": EOS, "pad_id": PAD, **bad})
  pc = tiny.get_config("test").ppo
  for off_policy in (dict(top_k=5), dict(top_p=0.9), dict(min_new_tokens=2), dict(greedy=True)):
    with pytest.raises(ValueError, match="full tempered policy"):
      make_iteration(None, None, None, None, pc, SampleConfig(4, EOS, PAD, **off_policy), 4)
