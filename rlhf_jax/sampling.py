"""Rollout generation: prefill + KV-cache decode, the whole loop on device.

Prompts are LEFT-padded (`prompt_mask` False on pads) so every sequence's
next token is written to the same cache slot; positions come from the mask,
exactly as in the training forward pass, so the log-probs returned here match
`losses.token_logprobs` on the concatenated sequence (tested).

The decode loop is a `lax.while_loop` that stops as soon as every sequence
has produced EOS; the cache is preallocated for prompt + max_new_tokens and
updated in place (XLA reuses the loop-carried buffers).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from rlhf_jax.model.transformer import DTYPES, init_cache


@dataclasses.dataclass(frozen=True)
class SampleConfig:
  max_new_tokens: int
  eos_id: int
  pad_id: int
  temperature: float = 1.0
  greedy: bool = False
  top_k: int = 0  # 0 = off
  top_p: float = 1.0  # 1.0 = off
  min_new_tokens: int = 0  # EOS is masked out before this many tokens

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"SampleConfig.max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if not self.greedy and self.temperature <= 0:
      raise ValueError(f"SampleConfig.temperature must be > 0, got {self.temperature}")
    if self.top_k < 0:
      raise ValueError(f"SampleConfig.top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"SampleConfig.top_p must be in (0, 1] (1 = off), got {self.top_p}")


def _filter_logits(logits, sc: SampleConfig):
  """Top-k then nucleus (top-p) filtering on temperature-scaled logits."""
  neg = jnp.finfo(logits.dtype).min
  if sc.top_k:
    kth = jax.lax.top_k(logits, sc.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if sc.top_p < 1.0:
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
    before = jnp.cumsum(probs, axis=-1) - probs
    cutoff = jnp.min(jnp.where(before < sc.top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < cutoff, neg, logits)
  return logits


def generate(model, params, prompt, prompt_mask, rng, sc: SampleConfig) -> dict:
  """Sample continuations of a left-padded prompt batch.

  Returns dict with
    tokens [B, P+N] prompt + response (pad after EOS), mask [B, P+N] real tokens,
    response [B, N], response_mask [B, N] (up to and including EOS),
    logprobs [B, N] log p(token) under softmax(logits / temperature) — the full
      tempered distribution, which the training pass recomputes; 0 off the mask,
    ended [B] (EOS produced), lengths [B].
  """
  b, p = prompt.shape
  n = sc.max_new_tokens
  cfg = model.cfg
  if sc.top_k > cfg.vocab_size:
    raise ValueError(f"SampleConfig.top_k={sc.top_k} exceeds the vocabulary ({cfg.vocab_size})")
  # Cast the matmul weights to the compute dtype once, outside the decode loop; the
  # layers would otherwise convert every f32 kernel again at each generated token. The
  # training pass casts kernels the same way; norm scales stay f32 there, so they do
  # here, and the log-probs still agree.
  dt = DTYPES[cfg.dtype]
  if dt != jnp.float32:
    params = jax.tree.map(lambda x: x.astype(dt) if x.ndim >= 2 and x.dtype == jnp.float32 else x,
                          params)
  cache = init_cache(cfg, b, p + n)
  kv_mask = jnp.concatenate([prompt_mask, jnp.ones((b, n), bool)], axis=1)
  prompt_pos = jnp.maximum(jnp.cumsum(prompt_mask, axis=-1) - 1, 0)
  out = model.apply({"params": params}, prompt, prompt_mask, positions=prompt_pos, cache=cache,
                    cache_index=0, kv_mask=kv_mask)
  n_prompt = jnp.sum(prompt_mask, axis=-1)
  temp = 1.0 if sc.greedy else sc.temperature

  def cond(carry):
    i, done = carry[0], carry[4]
    return (i < n) & ~jnp.all(done)

  def body(carry):
    i, cache, logits, key, done, toks, logps, rmask = carry
    logits = logits.astype(jnp.float32) / temp
    # Log-probs come from the plain tempered distribution, before the EOS ban and
    # top-k/top-p, because that is what the training forward pass recomputes.
    full_logp = jax.nn.log_softmax(logits, -1)
    if sc.min_new_tokens:
      logits = jnp.where((i < sc.min_new_tokens) & (jnp.arange(logits.shape[-1]) == sc.eos_id),
                         jnp.finfo(jnp.float32).min, logits)
    key, sub = jax.random.split(key)
    if sc.greedy:
      tok = jnp.argmax(logits, axis=-1)
    else:
      tok = jax.random.categorical(sub, _filter_logits(logits, sc), axis=-1)
    logp = jnp.take_along_axis(full_logp, tok[:, None], -1)[:, 0]
    live = ~done
    tok = jnp.where(live, tok, sc.pad_id).astype(jnp.int32)
    toks = jax.lax.dynamic_update_slice(toks, tok[:, None], (0, i))
    logps = jax.lax.dynamic_update_slice(logps, jnp.where(live, logp, 0.0)[:, None], (0, i))
    rmask = jax.lax.dynamic_update_slice(rmask, live[:, None], (0, i))
    done = done | (tok == sc.eos_id)
    step = model.apply({"params": params}, tok[:, None], None, positions=(n_prompt + i)[:, None],
                       cache=cache, cache_index=p + i, kv_mask=kv_mask)
    return (i + 1, step["cache"], step["logits"][:, -1], key, done, toks, logps, rmask)

  init = (jnp.int32(0), out["cache"], out["logits"][:, -1], rng, jnp.zeros((b,), bool),
          jnp.full((b, n), sc.pad_id, jnp.int32), jnp.zeros((b, n), jnp.float32),
          jnp.zeros((b, n), bool))
  _, _, _, _, done, toks, logps, rmask = jax.lax.while_loop(cond, body, init)
  return {
      "tokens": jnp.concatenate([prompt, toks], axis=1),
      "mask": jnp.concatenate([prompt_mask, rmask], axis=1),
      "response": toks, "response_mask": rmask, "logprobs": logps,
      "ended": done, "lengths": jnp.sum(rmask, axis=-1),
  }


def make_generate(model, sc: SampleConfig, mesh=None, param_shardings=None):
  """A jitted `fn(params, prompt, prompt_mask, rng) -> generate(...)`, compiled once per shape.

  With a mesh, prompts are split over the data axes and params keep their
  training shardings, so rollouts run on the same mesh as the updates.
  """
  fn = functools.partial(generate, model, sc=sc)
  wrapped = lambda params, prompt, prompt_mask, rng: fn(params, prompt, prompt_mask, rng)
  if mesh is None:
    return jax.jit(wrapped)
  from rlhf_jax.train import sharding as sh
  return jax.jit(wrapped, in_shardings=(param_shardings, sh.batch_sharding(mesh, 2),
                                        sh.batch_sharding(mesh, 2), sh.replicated(mesh)))
