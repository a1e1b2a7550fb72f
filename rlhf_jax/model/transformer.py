"""A Llama-style decoder-only transformer with an optional scalar head.

One module serves every model in the pipeline: the LM (pretrain, SFT, policy,
reference) reads `logits`; the reward model and the critic read `scalar`, a
linear head over the final hidden states (Stiennon et al. 2020; InstructGPT).

Architecture (Touvron et al. 2023, "LLaMA"): pre-RMSNorm, rotary positions
(Su et al. 2021), SwiGLU MLP (Shazeer 2020), grouped-query attention
(Ainslie et al. 2023), optional tied input/output embeddings.

Padding is expressed by `mask` (True = real token) and positions are derived
from it (`cumsum(mask) - 1`), so left-padded prompts (the sampler) and
right-padded sequences (SFT, reward) share one code path. With `cache` the
call writes its keys/values into a preallocated KV cache at `cache_index`
and attends over the cache (prefill and decode in `rlhf_jax.sampling`).

Every parameter carries logical axis names; `rlhf_jax.train.sharding` maps
them to mesh axes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int = 128
  n_layers: int = 2
  n_heads: int = 4
  n_kv_heads: int = 4
  d_ff: int = 512
  max_len: int = 128
  rope_theta: float = 10000.0
  tie_embeddings: bool = True
  dropout: float = 0.0
  dtype: str = "float32"  # compute dtype; parameters stay float32
  remat: str = "none"  # none | full | dots (save matmul outputs only)
  attention: str = "xla"  # xla | cudnn (fused kernel on GPU)
  norm_eps: float = 1e-5

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @classmethod
  def from_config(cls, cfg, vocab_size: int | None = None) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(cfg).items() if k in fields}
    if vocab_size is not None:
      kw["vocab_size"] = vocab_size
    return cls(**kw)


def param_count(cfg: ModelConfig, with_embeddings: bool = True) -> int:
  d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
  attn = d * cfg.n_heads * h * 2 + d * cfg.n_kv_heads * h * 2
  per_layer = attn + 3 * d * f + 2 * d
  n = cfg.n_layers * per_layer + d + d + 1  # final norm, scalar head
  if with_embeddings:
    n += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
  return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), attention included.

  Forward: 2 * (non-embedding matmul params + lm head) + attention scores and
  values 2 * 2 * L_layers * seq * d (PaLM paper, appendix B).
  """
  d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
  matmul = cfg.n_layers * (d * cfg.n_heads * h * 2 + d * cfg.n_kv_heads * h * 2 + 3 * d * f)
  matmul += cfg.vocab_size * d
  attn = 2 * cfg.n_layers * seq_len * cfg.n_heads * h  # QK^T and AV, per token
  return 3 * (2 * matmul + 2 * attn)


def _dense_init(std):
  return nn.initializers.normal(stddev=std)


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


def rope(x, positions, theta):
  """Rotary embedding on [B, T, H, D] at integer positions [B, T] (Su et al. 2021)."""
  d = x.shape[-1]
  freq = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angle = positions[..., None].astype(jnp.float32) * freq  # [B, T, D/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nn.Module):
  cfg: ModelConfig
  constrain: Any

  @nn.compact
  def __call__(self, x, positions, attn_mask, cache=None, cache_index=None):
    cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
    std = cfg.d_model ** -0.5
    # One fused projection [d, kv_heads, group + 2, head_dim]: each kv head's group of
    # query heads, then its key and value. One matmul instead of three, and sharding
    # kv_heads over `tensor` keeps every head's q, k and v on the same device.
    group = cfg.n_heads // cfg.n_kv_heads
    qkv = nn.DenseGeneral(
        (cfg.n_kv_heads, group + 2, cfg.head_dim), dtype=dt, param_dtype=jnp.float32,
        use_bias=False, name="qkv",
        kernel_init=nn.with_logical_partitioning(_dense_init(std), ("embed", "kv_heads", None, "head_dim")))(x)
    b, t = x.shape[:2]
    # Query head n = kv * group + g: the layout jax.nn.dot_product_attention expects for GQA.
    q = qkv[:, :, :, :group].reshape(b, t, cfg.n_heads, cfg.head_dim)
    k, v = qkv[:, :, :, group], qkv[:, :, :, group + 1]
    q = rope(q, positions, cfg.rope_theta)
    k = rope(k, positions, cfg.rope_theta)
    q = self.constrain(q, ("batch", "length", "act_heads", "head_dim"))
    new_cache = None
    if cache is not None:
      # Write this call's keys/values at cache_index, attend over all slots.
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
      new_cache = {"k": k, "v": v}
      k, v = k.astype(dt), v.astype(dt)
    if cfg.attention == "cudnn" and attn_mask is None:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    else:
      if attn_mask is None:  # unpadded causal training batch
        t = x.shape[1]
        attn_mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
      out = jax.nn.dot_product_attention(q, k, v, mask=attn_mask)
    out = nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), dtype=dt, param_dtype=jnp.float32, use_bias=False, name="o",
        kernel_init=nn.with_logical_partitioning(
            _dense_init(std / (2 * cfg.n_layers) ** 0.5), ("heads", "head_dim", "embed")))(out)
    # out's heads are kv-major (n = kv * group + g), matching the qkv layout above.
    return out, new_cache


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
    dense = lambda name, feats, axes, std: nn.Dense(
        feats, dtype=dt, param_dtype=jnp.float32, use_bias=False, name=name,
        kernel_init=nn.with_logical_partitioning(_dense_init(std), axes))
    std = cfg.d_model ** -0.5
    # Gate and up projections fused into one matmul [d, 2, d_ff].
    wi = nn.DenseGeneral((2, cfg.d_ff), dtype=dt, param_dtype=jnp.float32, use_bias=False, name="wi",
                         kernel_init=nn.with_logical_partitioning(_dense_init(std), ("embed", None, "mlp")))(x)
    return dense("down", cfg.d_model, ("mlp", "embed"), cfg.d_ff ** -0.5 / (2 * cfg.n_layers) ** 0.5)(
        nn.silu(wi[..., 0, :]) * wi[..., 1, :])


class Block(nn.Module):
  cfg: ModelConfig
  constrain: Any

  @nn.compact
  def __call__(self, x, positions, attn_mask, cache, cache_index, deterministic):
    cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
    h, new_cache = Attention(cfg, self.constrain, name="attn")(
        RMSNorm(cfg.norm_eps, dt, name="attn_norm")(x), positions, attn_mask, cache, cache_index)
    x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    h = MLP(cfg, name="mlp")(RMSNorm(cfg.norm_eps, dt, name="mlp_norm")(x))
    x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    return self.constrain(x, ("batch", "length", "act_embed")), new_cache


class Transformer(nn.Module):
  """`apply(params, tokens, mask, ...) -> dict(logits, scalar, hidden, cache)`."""
  cfg: ModelConfig
  mesh: Any = None
  rules: tuple = ()

  def constrain(self, x, names):
    if self.mesh is None:
      return x
    return nn.with_logical_constraint(x, names, mesh=self.mesh, rules=self.rules)

  @nn.compact
  def __call__(self, tokens, mask=None, *, positions=None, cache=None, cache_index=None,
               kv_mask=None, logits=True, scalar=False, deterministic=True):
    cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
    b, t = tokens.shape
    if positions is None:
      positions = (jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0) if mask is not None
                   else jnp.broadcast_to(jnp.arange(t), (b, t)))
    attn_mask = None
    if cache is not None:
      # Keys are cache slots; a query at cache_index + i sees valid slots up to itself.
      s = cache[0]["k"].shape[1]
      q_slot = cache_index + jnp.arange(t)
      causal = jnp.arange(s)[None, :] <= q_slot[:, None]  # [T, S]
      attn_mask = causal[None, None] & kv_mask[:, None, None, :]
    elif mask is not None:
      causal = jnp.tril(jnp.ones((t, t), bool))
      # A padded query sees itself only, so its row is finite and it changes nothing.
      attn_mask = (causal[None] & mask[:, None, :]) | jnp.eye(t, dtype=bool)[None]
      attn_mask = attn_mask[:, None]
    # Embedding std d^-0.5: the final hidden state has unit RMS, so tied logits
    # x . e_v start as N(0, 1) and the initial loss is near ln(vocab) (6.7 at V=512
    # for d = 128..2048). With std 1 and logits scaled by d^-0.5, the current token's
    # own logit started near sqrt(d): initial loss 10, 25 and 41 at d = 128, 768, 2048.
    # GPT-2 uses std 0.02 at d=768, about 0.55 d^-0.5.
    embed = self.param("embed", nn.with_logical_partitioning(
        nn.initializers.normal(cfg.d_model ** -0.5), ("vocab", "embed")),
        (cfg.vocab_size, cfg.d_model), jnp.float32)
    x = jnp.take(embed, tokens, axis=0).astype(dt)
    x = self.constrain(x, ("batch", "length", "act_embed"))
    block = Block
    if cfg.remat != "none":
      policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots"
                else None)
      block = nn.remat(Block, policy=policy, static_argnums=(6,))
    new_cache = []
    for i in range(cfg.n_layers):
      layer_cache = None if cache is None else cache[i]
      x, c = block(cfg, self.constrain, name=f"layer_{i}")(
          x, positions, attn_mask, layer_cache, cache_index, deterministic)
      new_cache.append(c)
    x = RMSNorm(cfg.norm_eps, dt, name="final_norm")(x)
    out = {"hidden": x, "cache": new_cache if cache is not None else None}
    if logits or self.is_initializing():
      if cfg.tie_embeddings:
        out["logits"] = jnp.einsum("btd,vd->btv", x, embed.astype(dt))
      else:
        out["logits"] = nn.Dense(
            cfg.vocab_size, dtype=dt, param_dtype=jnp.float32, use_bias=False, name="lm_head",
            kernel_init=nn.with_logical_partitioning(_dense_init(cfg.d_model ** -0.5),
                                                     ("embed", "vocab")))(x)
      out["logits"] = self.constrain(out["logits"], ("batch", "length", "act_vocab"))
    if scalar or self.is_initializing():
      # Reward/value head; std 1/sqrt(d_model + 1) (Stiennon et al. 2020, lm-human-preferences).
      out["scalar"] = nn.Dense(
          1, dtype=jnp.float32, param_dtype=jnp.float32, name="scalar_head",
          kernel_init=nn.with_logical_partitioning(_dense_init((cfg.d_model + 1) ** -0.5),
                                                   ("embed", "scalar")),
          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("scalar",)))(
              x.astype(jnp.float32))[..., 0]
    return out


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None):
  """Zeroed KV cache: one {'k','v'} of [B, S, kv_heads, head_dim] per layer."""
  dtype = dtype or DTYPES[cfg.dtype]
  shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]
