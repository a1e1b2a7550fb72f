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

Other families are a handful of `ModelConfig` switches on this one module
(`rlhf_jax.hf` maps their checkpoints): GPT-2 (Radford et al. 2019: LayerNorm
with bias, learned positions, plain GELU MLP, biases), Qwen2 (q/k/v biases),
Qwen3 (q/k RMSNorm, free head_dim), Gemma (Gemma Team 2024: (1 + w) norms,
sqrt(d) embedding scale, GeGLU) and Gemma 2 (sandwich norms, soft-capping),
Llama 3's rope scaling. The defaults are the Llama-style model above.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
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
  # Run the layers as one nn.scan over a stacked Block (params and KV cache gain a leading
  # layer axis, under "layers") instead of a Python loop: the backward is then a loop
  # that rematerialises one layer at a time. Unrolled, XLA's CPU scheduler hoisted every
  # layer's recomputation ahead of the backward (docs/performance.md, memory section).
  scan_layers: bool = False
  attention: str = "xla"  # xla | cudnn (fused kernel on GPU)
  norm_eps: float = 1e-5
  # Family switches (defaults = the Llama-style model; see the module docstring).
  head_dim: int = 0  # 0 = d_model // n_heads (resolved in __post_init__); Qwen3/Gemma set it
  norm: str = "rms"  # rms | layer (LayerNorm with bias: GPT-2)
  norm_offset: bool = False  # scale applied as (1 + w), w initialised at 0 (Gemma)
  qkv_bias: bool = False  # Qwen2, GPT-2
  o_bias: bool = False  # GPT-2
  mlp: str = "gated"  # gated (SwiGLU/GeGLU) | plain (GPT-2: act(x W1) W2)
  mlp_bias: bool = False  # GPT-2
  act: str = "silu"  # silu | gelu_tanh | gelu (erf)
  positions: str = "rope"  # rope | learned (GPT-2: a [max_len, d] table)
  qk_norm: bool = False  # RMSNorm over head_dim on q and k before rope (Qwen3)
  embed_scale: bool = False  # embeddings times sqrt(d_model) (Gemma)
  rope_scaling: str = "none"  # none | linear | llama3 (Llama 3.1 frequency-dependent scaling)
  rope_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  attn_scale: float = 0.0  # 0 = head_dim ** -0.5; Gemma 2: query_pre_attn_scalar ** -0.5
  attn_softcap: float = 0.0  # 0 = off; Gemma 2: scores = c * tanh(scores / c)
  final_softcap: float = 0.0  # 0 = off; Gemma 2 logit soft-capping
  sandwich_norm: bool = False  # extra norms on the attention and MLP outputs (Gemma 2)

  def __post_init__(self):
    # Resolved once, so cfg.head_dim is always the real size (cache, param_count, meta).
    # dataclasses.replace(cfg, d_model=...) therefore needs head_dim=0 passed too.
    if not self.head_dim:
      object.__setattr__(self, "head_dim", self.d_model // self.n_heads)

  @classmethod
  def from_config(cls, cfg, vocab_size: int | None = None) -> "ModelConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in dict(cfg).items() if k in fields}
    if vocab_size is not None:
      kw["vocab_size"] = vocab_size
    return cls(**kw)


# ModelConfig fields that choose how the model runs, not which weights it has: the compute
# dtype (params stay float32), rematerialisation, the attention kernel, dropout, and the
# layer layout (stacked under "layers" or one subtree per layer; model/stacking.py converts,
# and stages.common.load_params does). A checkpoint written under one value is the same
# model under any other, so these are left out wherever a model is checked against a
# checkpoint or a config.json: stages.common.load_params (a later stage reading an earlier
# one's checkpoint), pipeline.fixed_keys (what a workdir's finished stages fix) and
# hf.architecture_fields (what config.model.hf fixes). Everything else is architecture.
NOT_ARCHITECTURE = ("dtype", "remat", "attention", "dropout", "scan_layers")


def architecture(model: dict) -> dict:
  """The architecture fields of a model description (dataclasses.asdict of a ModelConfig,
  or a checkpoint's meta["model"]): what two checkpoints of the same model agree on."""
  return {k: v for k, v in model.items() if k not in NOT_ARCHITECTURE}


def param_count(cfg: ModelConfig, with_embeddings: bool = True) -> int:
  d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
  attn = d * cfg.n_heads * h * 2 + d * cfg.n_kv_heads * h * 2
  attn += (cfg.n_heads + 2 * cfg.n_kv_heads) * h * cfg.qkv_bias + d * cfg.o_bias
  attn += 2 * h * cfg.qk_norm
  n_in = 2 if cfg.mlp == "gated" else 1
  mlp = (n_in + 1) * d * f + (n_in * f + d) * cfg.mlp_bias
  norm = d * (2 if cfg.norm == "layer" else 1)
  per_layer = attn + mlp + norm * (4 if cfg.sandwich_norm else 2)
  n = cfg.n_layers * per_layer + norm + d + 1  # final norm, scalar head
  if with_embeddings:
    n += cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    n += cfg.max_len * d * (cfg.positions == "learned")
  return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward = 3x forward), attention included.

  Forward: 2 * (non-embedding matmul params + lm head) + attention scores and
  values 2 * 2 * L_layers * seq * d (PaLM paper, appendix B).
  """
  d, f, h = cfg.d_model, cfg.d_ff, cfg.head_dim
  n_in = 2 if cfg.mlp == "gated" else 1
  matmul = cfg.n_layers * (d * cfg.n_heads * h * 2 + d * cfg.n_kv_heads * h * 2 + (n_in + 1) * d * f)
  matmul += cfg.vocab_size * d
  attn = 2 * cfg.n_layers * seq_len * cfg.n_heads * h  # QK^T and AV, per token
  return 3 * (2 * matmul + 2 * attn)


def _dense_init(std):
  return nn.initializers.normal(stddev=std)


def _zeros(axes):
  return nn.with_logical_partitioning(nn.initializers.zeros, axes)


ACTS = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True),
        "gelu": lambda x: nn.gelu(x, approximate=False)}


class RMSNorm(nn.Module):
  """RMSNorm (Zhang & Sennrich 2019); kind="layer" is LayerNorm with a bias (GPT-2);
  offset=True applies the scale as (1 + w) with w starting at 0 (Gemma)."""
  eps: float
  dtype: Any
  kind: str = "rms"
  offset: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.offset else nn.initializers.ones
    scale = self.param("scale", nn.with_logical_partitioning(init, ("norm",)),
                       (x.shape[-1],), jnp.float32)
    x32 = x.astype(jnp.float32)
    if self.kind == "layer":
      x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    y = y * (1.0 + scale if self.offset else scale)
    if self.kind == "layer":
      y = y + self.param("bias", _zeros(("norm",)), (x.shape[-1],), jnp.float32)
    return y.astype(self.dtype)


def _norm(cfg: ModelConfig, name: str):
  return RMSNorm(cfg.norm_eps, DTYPES[cfg.dtype], cfg.norm, cfg.norm_offset, name=name)


def rope_frequencies(cfg: ModelConfig):
  """Inverse frequencies [head_dim / 2] of the rotary embedding, with rope scaling."""
  d = cfg.head_dim
  if cfg.rope_scaling == "none":
    return cfg.rope_theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  freq = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
  if cfg.rope_scaling == "linear":  # position interpolation (Chen et al. 2023)
    freq = freq / cfg.rope_factor
  elif cfg.rope_scaling == "llama3":
    # Llama 3.1 (transformers' _compute_llama3_parameters): wavelengths longer than
    # original/low_freq_factor are slowed by `factor`, shorter than original/high_freq_factor
    # are kept, and the band between is interpolated smoothly.
    old, lo, hi = cfg.rope_original_max_len, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    wavelen = 2 * np.pi / freq
    scaled = np.where(wavelen > old / lo, freq / cfg.rope_factor, freq)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    freq = np.where(medium, smoothed, scaled)
  else:
    raise ValueError(f"rope_scaling {cfg.rope_scaling!r} is not one of none, linear, llama3")
  return jnp.asarray(freq, jnp.float32)


def rope(x, positions, freq):
  """Rotary embedding on [B, T, H, D] at integer positions [B, T] (Su et al. 2021).

  Rotates the two halves of each head (the "rotate_half" layout of Llama/GPT-NeoX
  checkpoints as transformers stores them)."""
  angle = positions[..., None].astype(jnp.float32) * freq  # [B, T, D/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def softcap_attention(q, k, v, mask, scale, cap):
  """Attention with tanh soft-capped scores, cap * tanh(s / cap) (Gemma 2); the fused
  kernels have no hook for it. q [B,T,N,D], k/v [B,S,K,D], mask broadcastable to [B,1,T,S]."""
  b, t, n, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, n // kv, d)
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
  s = cap * jnp.tanh(s / cap)
  s = jnp.where(mask[:, :, None], s, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, n, d)


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
        use_bias=cfg.qkv_bias, name="qkv", bias_init=_zeros(("kv_heads", None, "head_dim")),
        kernel_init=nn.with_logical_partitioning(_dense_init(std), ("embed", "kv_heads", None, "head_dim")))(x)
    b, t = x.shape[:2]
    # Query head n = kv * group + g: the layout jax.nn.dot_product_attention expects for GQA.
    q = qkv[:, :, :, :group].reshape(b, t, cfg.n_heads, cfg.head_dim)
    k, v = qkv[:, :, :, group], qkv[:, :, :, group + 1]
    if cfg.qk_norm:  # Qwen3: per-head RMSNorm of q and k before rotation
      q = RMSNorm(cfg.norm_eps, dt, name="q_norm")(q)
      k = RMSNorm(cfg.norm_eps, dt, name="k_norm")(k)
    if cfg.positions == "rope":
      freq = rope_frequencies(cfg)
      q = rope(q, positions, freq)
      k = rope(k, positions, freq)
    q = self.constrain(q, ("batch", "length", "act_heads", "head_dim"))
    new_cache = None
    if cache is not None:
      # Write this call's keys/values at cache_index, attend over all slots.
      k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, cache_index, 0, 0))
      v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, cache_index, 0, 0))
      new_cache = {"k": k, "v": v}
      k, v = k.astype(dt), v.astype(dt)
    scale = cfg.attn_scale or None  # None: jax's default head_dim ** -0.5
    if cfg.attention == "cudnn" and attn_mask is None and not cfg.attn_softcap:
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale, implementation="cudnn")
    else:
      if attn_mask is None:  # unpadded causal training batch
        t = x.shape[1]
        attn_mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
      if cfg.attn_softcap:
        out = softcap_attention(q, k, v, attn_mask, cfg.attn_scale or cfg.head_dim ** -0.5,
                                cfg.attn_softcap)
      else:
        out = jax.nn.dot_product_attention(q, k, v, mask=attn_mask, scale=scale)
    out = nn.DenseGeneral(
        cfg.d_model, axis=(-2, -1), dtype=dt, param_dtype=jnp.float32, use_bias=cfg.o_bias,
        name="o", bias_init=_zeros(("embed",)),
        kernel_init=nn.with_logical_partitioning(
            _dense_init(std / (2 * cfg.n_layers) ** 0.5), ("heads", "head_dim", "embed")))(out)
    # out's heads are kv-major (n = kv * group + g), matching the qkv layout above.
    return out, new_cache


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
    std = cfg.d_model ** -0.5
    # Gate and up projections fused into one matmul [d, 2, d_ff] (SwiGLU, Shazeer 2020);
    # a plain MLP (GPT-2) has the up projection only, [d, 1, d_ff].
    n_in = 2 if cfg.mlp == "gated" else 1
    wi = nn.DenseGeneral((n_in, cfg.d_ff), dtype=dt, param_dtype=jnp.float32, use_bias=cfg.mlp_bias,
                         name="wi", bias_init=_zeros((None, "mlp")),
                         kernel_init=nn.with_logical_partitioning(_dense_init(std), ("embed", None, "mlp")))(x)
    act = ACTS[cfg.act]
    h = act(wi[..., 0, :]) * wi[..., 1, :] if n_in == 2 else act(wi[..., 0, :])
    return nn.Dense(
        cfg.d_model, dtype=dt, param_dtype=jnp.float32, use_bias=cfg.mlp_bias, name="down",
        bias_init=_zeros(("embed",)),
        kernel_init=nn.with_logical_partitioning(
            _dense_init(cfg.d_ff ** -0.5 / (2 * cfg.n_layers) ** 0.5), ("mlp", "embed")))(h)


class Block(nn.Module):
  cfg: ModelConfig
  constrain: Any

  @nn.compact
  def __call__(self, x, positions, attn_mask, cache, cache_index, deterministic):
    cfg = self.cfg
    h, new_cache = Attention(cfg, self.constrain, name="attn")(
        _norm(cfg, "attn_norm")(x), positions, attn_mask, cache, cache_index)
    if cfg.sandwich_norm:  # Gemma 2 normalises each sublayer's output too
      h = _norm(cfg, "post_attn_norm")(h)
    x = x + nn.Dropout(cfg.dropout)(h, deterministic=deterministic)
    h = MLP(cfg, name="mlp")(_norm(cfg, "mlp_norm")(x))
    if cfg.sandwich_norm:
      h = _norm(cfg, "post_mlp_norm")(h)
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
      s = cache["k"].shape[2] if cfg.scan_layers else cache[0]["k"].shape[1]
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
    # mode="clip": a PAD id outside the table (pad_id = vocab size for tokenizers without
    # a PAD token) embeds as the last row instead of jnp.take's default NaN fill; padded
    # positions are masked everywhere, but NaN * 0 would still poison the sums.
    x = jnp.take(embed, tokens, axis=0, mode="clip").astype(dt)
    if cfg.embed_scale:  # Gemma: times sqrt(d), rounded to the compute dtype as in transformers
      x = x * jnp.asarray(cfg.d_model ** 0.5, dt)
    if cfg.positions == "learned":  # GPT-2's absolute position table
      pos = self.param("pos_embed", nn.with_logical_partitioning(
          nn.initializers.normal(0.01), (None, "embed")), (cfg.max_len, cfg.d_model), jnp.float32)
      x = x + jnp.take(pos, positions, axis=0, mode="clip").astype(dt)
    x = self.constrain(x, ("batch", "length", "act_embed"))
    block = Block
    if cfg.remat != "none":
      policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots"
                else None)
      # prevent_cse guards remat against XLA's CSE merging the recomputation back into the
      # forward; inside a scan the loop boundary already does that (jax.checkpoint docs),
      # and MaxText turns it off there.
      block = nn.remat(Block, policy=policy, static_argnums=(6,), prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      # Params and cache stacked on a leading axis named "layers" (no mesh axis: RULES).
      stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
                      length=cfg.n_layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, new_cache = stack(cfg, self.constrain, name="layers")(
          x, positions, attn_mask, cache, cache_index, deterministic)
    else:
      new_cache = []
      for i in range(cfg.n_layers):
        layer_cache = None if cache is None else cache[i]
        x, c = block(cfg, self.constrain, name=f"layer_{i}")(
            x, positions, attn_mask, layer_cache, cache_index, deterministic)
        new_cache.append(c)
    x = _norm(cfg, "final_norm")(x)
    out = {"hidden": x, "cache": new_cache if cache is not None else None}
    if logits or self.is_initializing():
      if cfg.tie_embeddings:
        out["logits"] = jnp.einsum("btd,vd->btv", x, embed.astype(dt))
      else:
        out["logits"] = nn.Dense(
            cfg.vocab_size, dtype=dt, param_dtype=jnp.float32, use_bias=False, name="lm_head",
            kernel_init=nn.with_logical_partitioning(_dense_init(cfg.d_model ** -0.5),
                                                     ("embed", "vocab")))(x)
      if cfg.final_softcap:  # Gemma 2
        out["logits"] = cfg.final_softcap * jnp.tanh(out["logits"] / cfg.final_softcap)
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
  """Zeroed KV cache: one {'k','v'} of [B, S, kv_heads, head_dim] per layer; with
  cfg.scan_layers one {'k','v'} of [n_layers, B, S, kv_heads, head_dim] (the scan's layout)."""
  dtype = dtype or DTYPES[cfg.dtype]
  shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
  if cfg.scan_layers:
    shape = (cfg.n_layers,) + shape
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layers)]
