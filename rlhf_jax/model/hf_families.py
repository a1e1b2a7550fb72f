"""Per-family tables for Hugging Face checkpoints: config.json <-> ModelConfig switches,
tensor names <-> our parameter tree. Used by rlhf_jax/hf.py (load/save).

The references are transformers' modeling_{llama,mistral,qwen2,qwen3,gemma,gemma2,gpt2}.py.
Layouts: torch Linear weights are [out, in] (we store [in, out]); GPT-2's Conv1D
weights are already [in, out]; our attention projection is fused as
[d, kv_heads, group + 2, head_dim] (query heads of each kv head, then its key and
value) and the gated MLP as [d, 2, d_ff] (gate, up), so q/k/v and gate/up are
split on export and joined on import. Llama-family q/k weights are stored by
transformers already permuted for the rotate-half rope that we apply too.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

from rlhf_jax.config_lib import ConfigError

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2")
_ARCH = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3",
         "gemma": "Gemma", "gemma2": "Gemma2", "gpt2": "GPT2"}
# Values transformers' config classes use when config.json omits a key.
_DEFAULTS = {
    "llama": dict(tie=False, head_dim=None, max_pos=2048, window=None),
    "mistral": dict(tie=False, head_dim=None, max_pos=4096 * 32, window=4096),
    "qwen2": dict(tie=False, head_dim=None, max_pos=32768, window=4096),
    "qwen3": dict(tie=False, head_dim=128, max_pos=32768, window=4096),
    "gemma": dict(tie=True, head_dim=256, max_pos=8192, window=None),
    "gemma2": dict(tie=True, head_dim=256, max_pos=8192, window=4096),
}
_ACTS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
         "gelu": "gelu"}
_ACT_NAMES = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
_REQUIRED = object()


class HFError(ConfigError):
  """A Hugging Face folder rlhf_jax cannot read exactly: one line naming the file and
  the field or tensor. A ConfigError, so `rlhf_jax.main` exits 2."""


def _get(raw: dict, key: str, where: str, default=_REQUIRED):
  v = raw.get(key)
  if v is None:
    if default is _REQUIRED:
      raise HFError(f"{where}: missing field {key}")
    return default
  return v


def _rope(raw: dict, where: str) -> dict:
  """rope_theta / rope_scaling (transformers 4) or rope_parameters (transformers 5)."""
  params = raw.get("rope_parameters")
  scaling = dict(params) if isinstance(params, dict) else dict(raw.get("rope_scaling") or {})
  key = "rope_parameters" if isinstance(params, dict) else "rope_scaling"
  theta = float(scaling.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0)
  kind = scaling.get("rope_type", scaling.get("type", "default"))
  if scaling.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
    raise HFError(f"{where}: partial_rotary_factor is not supported (rotary on the whole head only)")
  out = dict(rope_theta=theta)
  if kind == "default":
    return out
  if kind == "linear":
    return {**out, "rope_scaling": "linear", "rope_factor": float(_get(scaling, "factor", f"{where} {key}"))}
  if kind == "llama3":
    w = f"{where} {key}"
    return {**out, "rope_scaling": "llama3", "rope_factor": float(_get(scaling, "factor", w)),
            "rope_low_freq_factor": float(_get(scaling, "low_freq_factor", w)),
            "rope_high_freq_factor": float(_get(scaling, "high_freq_factor", w)),
            "rope_original_max_len": int(_get(scaling, "original_max_position_embeddings", w))}
  raise HFError(f"{where}: {key}.rope_type {kind!r} is not supported (default, linear, llama3)")


def _act(name, where: str, field: str, family: str) -> str:
  if family == "gemma" and name == "gelu":  # transformers maps Gemma's legacy "gelu" to tanh
    name = "gelu_pytorch_tanh"
  if name not in _ACTS:
    raise HFError(f"{where}: {field} {name!r} is not supported ({', '.join(_ACTS)})")
  return _ACTS[name]


def parse_config(raw: dict, where: str, max_len: int | None) -> tuple[dict, dict]:
  """(ModelConfig keyword arguments, info) from a parsed config.json."""
  family = raw.get("model_type")
  if family not in FAMILIES:
    raise HFError(f"{where}: model_type {family!r} is not supported ({', '.join(FAMILIES)})")
  if raw.get("quantization_config"):
    raise HFError(f"{where}: quantization_config: quantized checkpoints are not supported")
  archs = raw.get("architectures") or []
  is_reward = any(a.endswith("ForSequenceClassification") for a in archs)
  for a in archs:
    if not a.endswith(("ForCausalLM", "LMHeadModel", "ForSequenceClassification")):
      raise HFError(f"{where}: architectures {a!r}: only *ForCausalLM and "
                    f"*ForSequenceClassification are supported")
  if is_reward:
    labels = raw.get("num_labels", len(raw.get("id2label") or {0: 0}))
    if labels != 1:
      raise HFError(f"{where}: num_labels/id2label has {labels} labels; a reward model has 1")
  kw = (_parse_gpt2 if family == "gpt2" else _parse_llama_like)(raw, where, family, max_len)
  info = dict(model_type=family, family=family, architectures=archs, is_reward=is_reward,
              max_position_embeddings=kw.pop("_max_pos"))
  return kw, info


def _parse_llama_like(raw, where, family, max_len):
  dflt = _DEFAULTS[family]
  d, heads = int(_get(raw, "hidden_size", where)), int(_get(raw, "num_attention_heads", where))
  head_dim = int(raw.get("head_dim") or dflt["head_dim"] or d // heads)
  max_pos = int(_get(raw, "max_position_embeddings", where, dflt["max_pos"]))
  max_len = int(max_len or max_pos)
  act_key = "hidden_activation" if family == "gemma2" else "hidden_act"
  act = (raw.get("hidden_activation") or raw.get("hidden_act") if family == "gemma"
         else _get(raw, act_key, where, "gelu_pytorch_tanh" if family == "gemma2" else "silu"))
  kw = dict(vocab_size=int(_get(raw, "vocab_size", where)), d_model=d,
            n_layers=int(_get(raw, "num_hidden_layers", where)), n_heads=heads,
            n_kv_heads=int(raw.get("num_key_value_heads") or heads),
            d_ff=int(_get(raw, "intermediate_size", where)), max_len=max_len, head_dim=head_dim,
            norm_eps=float(_get(raw, "rms_norm_eps", where, 1e-6)),
            tie_embeddings=bool(_get(raw, "tie_word_embeddings", where, dflt["tie"])),
            act=_act(act or "gelu_pytorch_tanh", where, act_key, family), _max_pos=max_pos,
            **_rope(raw, where))
  if kw["n_heads"] % kw["n_kv_heads"]:
    raise HFError(f"{where}: num_key_value_heads={kw['n_kv_heads']} does not divide "
                  f"num_attention_heads={heads}")
  bias = bool(raw.get("attention_bias", False))
  if family == "mistral" and bias:
    raise HFError(f"{where}: attention_bias=true: transformers' Mistral has no attention biases")
  if family == "qwen2":  # Qwen2's q/k/v projections always have biases, o never
    kw.update(qkv_bias=True)
  elif family != "mistral":
    kw.update(qkv_bias=bias, o_bias=bias)
  if raw.get("mlp_bias"):
    if family != "llama":
      raise HFError(f"{where}: mlp_bias=true is only read by transformers' Llama")
    kw.update(mlp_bias=True)
  if family == "qwen3":
    kw.update(qk_norm=True)
  if family in ("gemma", "gemma2"):  # (1 + w) norms, sqrt(d)-scaled embeddings (Gemma Team 2024)
    kw.update(norm_offset=True, embed_scale=True)
  if family == "gemma2":  # Gemma Team 2024b: sandwich norms, tanh soft-capping, scaled queries
    kw.update(sandwich_norm=True,
              attn_scale=float(_get(raw, "query_pre_attn_scalar", where, 256)) ** -0.5,
              attn_softcap=float(_get(raw, "attn_logit_softcapping", where, 0.0)),
              final_softcap=float(_get(raw, "final_logit_softcapping", where, 0.0)))
  # Sliding-window attention: exact for us only when no sequence is longer than the window.
  window = None
  if family in ("mistral", "gemma2"):
    window = raw.get("sliding_window", dflt["window"]) if "sliding_window" in raw else dflt["window"]
  elif family in ("qwen2", "qwen3") and raw.get("use_sliding_window"):
    window = raw.get("sliding_window", dflt["window"])
  types = set(raw.get("layer_types") or [])
  if types - {"full_attention", "sliding_attention"}:
    raise HFError(f"{where}: layer_types {sorted(types)}: only full/sliding attention layers")
  if window is not None and window < max_len:
    raise HFError(f"{where}: sliding_window={window} is shorter than the context max_len={max_len}; "
                  f"rlhf_jax attends over the whole context, so use max_len <= {window} "
                  f"(config.model.max_len)")
  return kw


def _parse_gpt2(raw, where, family, max_len):
  d = int(_get(raw, "n_embd", where))
  n_pos = int(_get(raw, "n_positions", where, 1024))
  if max_len and max_len > n_pos:
    raise HFError(f"{where}: n_positions={n_pos} is shorter than the context max_len={max_len}")
  for key, bad in (("scale_attn_by_inverse_layer_idx", True), ("add_cross_attention", True)):
    if raw.get(key) == bad:
      raise HFError(f"{where}: {key}={str(bad).lower()} is not supported")
  return dict(vocab_size=int(_get(raw, "vocab_size", where)), d_model=d,
              n_layers=int(_get(raw, "n_layer", where)), n_heads=int(_get(raw, "n_head", where)),
              n_kv_heads=int(_get(raw, "n_head", where)),
              d_ff=int(raw.get("n_inner") or 4 * d), max_len=n_pos,
              norm_eps=float(_get(raw, "layer_norm_epsilon", where, 1e-5)),
              tie_embeddings=bool(_get(raw, "tie_word_embeddings", where, True)),
              act=_act(_get(raw, "activation_function", where, "gelu_new"), where,
                       "activation_function", family),
              attn_scale=0.0 if raw.get("scale_attn_weights", True) else 1.0,
              norm="layer", qkv_bias=True, o_bias=True, mlp="plain", mlp_bias=True,
              positions="learned", _max_pos=n_pos)


def family_of(cfg) -> str:
  """The Hugging Face family whose config.json expresses these switches."""
  if cfg.positions == "learned":
    return "gpt2"
  if cfg.sandwich_norm or cfg.attn_softcap or cfg.final_softcap:
    return "gemma2"
  if cfg.norm_offset or cfg.embed_scale:
    return "gemma"
  if cfg.qk_norm:
    return "qwen3"
  if cfg.qkv_bias and not cfg.o_bias:
    return "qwen2"
  return "llama"  # includes every model rlhf_jax pretrains


def to_hf_config(cfg, family: str, kind: str, ids: dict) -> dict:
  head = "ForSequenceClassification" if kind == "reward" else (
      "LMHeadModel" if family == "gpt2" else "ForCausalLM")
  out = {"architectures": [_ARCH[family] + head], "model_type": family,
         "vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
         "bos_token_id": ids.get("bos_id"), "eos_token_id": ids.get("eos_id"),
         "pad_token_id": ids.get("pad_id"), "use_cache": True}
  if kind == "reward":
    out.update(id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
  if family == "gpt2":
    out.update(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads, n_inner=cfg.d_ff,
               n_positions=cfg.max_len, n_ctx=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
               activation_function={"gelu_tanh": "gelu_new"}.get(cfg.act, cfg.act),
               scale_attn_weights=cfg.attn_scale == 0.0, resid_pdrop=0.0, embd_pdrop=0.0,
               attn_pdrop=0.0, summary_first_dropout=0.0)
    return out
  rope = None
  if cfg.rope_scaling == "linear":
    rope = {"rope_type": "linear", "factor": cfg.rope_factor}
  elif cfg.rope_scaling == "llama3":
    rope = {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_len}
  out.update(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
             num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
             head_dim=cfg.head_dim, max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps,
             rope_theta=cfg.rope_theta, rope_scaling=rope, hidden_act=_ACT_NAMES[cfg.act],
             attention_dropout=0.0)
  if family in ("llama", "qwen3", "gemma", "gemma2"):
    out["attention_bias"] = cfg.qkv_bias
  if family == "llama":
    out["mlp_bias"] = cfg.mlp_bias
  if family in ("mistral", "qwen2", "qwen3"):
    out.update(sliding_window=None, use_sliding_window=False)
  if family == "gemma2":
    out.update(hidden_activation=_ACT_NAMES[cfg.act], sliding_window=cfg.max_len,
               query_pre_attn_scalar=_int_if_whole((cfg.attn_scale or cfg.head_dim ** -0.5) ** -2),
               attn_logit_softcapping=cfg.attn_softcap or None,
               final_logit_softcapping=cfg.final_softcap or None)
  return out


def _int_if_whole(x: float):
  # transformers 5 type-checks config fields; query_pre_attn_scalar is an int there.
  return int(round(x)) if abs(x - round(x)) < 1e-6 * max(1.0, abs(x)) else x


@dataclasses.dataclass(frozen=True)
class Spec:
  """One of our parameters and the checkpoint tensors it is made of."""
  path: tuple
  names: tuple
  shapes: tuple
  to_ours: Callable  # (*hf arrays) -> our array
  to_hf: Callable  # our array -> tuple of hf arrays


def specs(cfg, family: str, kind: str) -> list[Spec]:
  return (_gpt2_specs if family == "gpt2" else _llama_specs)(cfg, family, kind)


def _linear(path, name, n_in, n_out):
  """A torch Linear weight [out, in] <-> our kernel [in, out]."""
  return Spec(path, (name,), ((n_out, n_in),), lambda w: w.T, lambda k: (k.T,))


def _vector(path, name, n):
  return Spec(path, (name,), ((n,),), lambda w: w, lambda v: (v,))


def _llama_specs(cfg, family, kind) -> list[Spec]:
  d, f, hd, v = cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.vocab_size
  h, kv = cfg.n_heads, cfg.n_kv_heads
  g = h // kv
  out = [Spec(("embed",), ("model.embed_tokens.weight",), ((v, d),), lambda w: w, lambda e: (e,)),
         _vector(("final_norm", "scale"), "model.norm.weight", d)]
  norms = ({"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
           if cfg.sandwich_norm else
           {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"})

  def qkv_in(q, k, vv):  # [h*hd, d], [kv*hd, d] x2 -> [d, kv, g + 2, hd]
    return np.concatenate([q.T.reshape(d, kv, g, hd), k.T.reshape(d, kv, 1, hd),
                           vv.T.reshape(d, kv, 1, hd)], axis=2)

  def qkv_out(x):
    return (x[:, :, :g].reshape(d, h * hd).T, x[:, :, g].reshape(d, kv * hd).T,
            x[:, :, g + 1].reshape(d, kv * hd).T)

  def qkv_bias_in(q, k, vv):
    return np.concatenate([q.reshape(kv, g, hd), k.reshape(kv, 1, hd), vv.reshape(kv, 1, hd)], axis=1)

  def qkv_bias_out(x):
    return x[:, :g].reshape(-1), x[:, g].reshape(-1), x[:, g + 1].reshape(-1)

  for i in range(cfg.n_layers):
    p, L = f"model.layers.{i}.", f"layer_{i}"
    att = p + "self_attn."
    names = tuple(att + f"{n}_proj.weight" for n in "qkv")
    out.append(Spec((L, "attn", "qkv", "kernel"), names, ((h * hd, d), (kv * hd, d), (kv * hd, d)),
                    qkv_in, qkv_out))
    if cfg.qkv_bias:
      out.append(Spec((L, "attn", "qkv", "bias"), tuple(att + f"{n}_proj.bias" for n in "qkv"),
                      ((h * hd,), (kv * hd,), (kv * hd,)), qkv_bias_in, qkv_bias_out))
    out.append(Spec((L, "attn", "o", "kernel"), (att + "o_proj.weight",), ((d, h * hd),),
                    lambda w: w.T.reshape(h, hd, d), lambda k: (k.reshape(h * hd, d).T,)))
    if cfg.o_bias:
      out.append(_vector((L, "attn", "o", "bias"), att + "o_proj.bias", d))
    if cfg.qk_norm:
      out += [_vector((L, "attn", "q_norm", "scale"), att + "q_norm.weight", hd),
              _vector((L, "attn", "k_norm", "scale"), att + "k_norm.weight", hd)]
    for ours, theirs in norms.items():
      out.append(_vector((L, ours, "scale"), p + theirs + ".weight", d))
    out.append(Spec((L, "mlp", "wi", "kernel"), (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"),
                    ((f, d), (f, d)), lambda a, b: np.stack([a.T, b.T], axis=1),
                    lambda k: (k[:, 0].T, k[:, 1].T)))
    out.append(_linear((L, "mlp", "down", "kernel"), p + "mlp.down_proj.weight", f, d))
    if cfg.mlp_bias:
      out += [Spec((L, "mlp", "wi", "bias"), (p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias"),
                   ((f,), (f,)), lambda a, b: np.stack([a, b]), lambda x: (x[0], x[1])),
              _vector((L, "mlp", "down", "bias"), p + "mlp.down_proj.bias", d)]
  out += _heads(cfg, kind, "lm_head.weight")
  return out


def _heads(cfg, kind, lm_name) -> list[Spec]:
  d, v = cfg.d_model, cfg.vocab_size
  if kind == "reward":  # HF's score layer: Linear(d, num_labels=1, bias=False)
    return [_linear(("scalar_head", "kernel"), "score.weight", d, 1)]
  if not cfg.tie_embeddings:
    return [_linear(("lm_head", "kernel"), lm_name, d, v)]
  return []


def _gpt2_specs(cfg, family, kind) -> list[Spec]:
  d, f, hd, v, h = cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.vocab_size, cfg.n_heads
  t = "transformer."
  out = [Spec(("embed",), (t + "wte.weight",), ((v, d),), lambda w: w, lambda e: (e,)),
         Spec(("pos_embed",), (t + "wpe.weight",), ((cfg.max_len, d),), lambda w: w, lambda e: (e,)),
         _vector(("final_norm", "scale"), t + "ln_f.weight", d),
         _vector(("final_norm", "bias"), t + "ln_f.bias", d)]
  for i in range(cfg.n_layers):
    p, L = f"{t}h.{i}.", f"layer_{i}"
    # Conv1D c_attn: [d, 3d] = [d, (q|k|v), heads, hd]; ours [d, heads, 3, hd] (group 1).
    out += [
        Spec((L, "attn", "qkv", "kernel"), (p + "attn.c_attn.weight",), ((d, 3 * d),),
             lambda w: w.reshape(d, 3, h, hd).transpose(0, 2, 1, 3),
             lambda k: (k.transpose(0, 2, 1, 3).reshape(d, 3 * d),)),
        Spec((L, "attn", "qkv", "bias"), (p + "attn.c_attn.bias",), ((3 * d,),),
             lambda b: b.reshape(3, h, hd).transpose(1, 0, 2),
             lambda x: (x.transpose(1, 0, 2).reshape(-1),)),
        Spec((L, "attn", "o", "kernel"), (p + "attn.c_proj.weight",), ((d, d),),
             lambda w: w.reshape(h, hd, d), lambda k: (k.reshape(d, d),)),
        _vector((L, "attn", "o", "bias"), p + "attn.c_proj.bias", d),
        Spec((L, "mlp", "wi", "kernel"), (p + "mlp.c_fc.weight",), ((d, f),),
             lambda w: w[:, None, :], lambda k: (k[:, 0],)),
        Spec((L, "mlp", "wi", "bias"), (p + "mlp.c_fc.bias",), ((f,),),
             lambda b: b[None], lambda x: (x[0],)),
        Spec((L, "mlp", "down", "kernel"), (p + "mlp.c_proj.weight",), ((f, d),),
             lambda w: w, lambda k: (k,)),
        _vector((L, "mlp", "down", "bias"), p + "mlp.c_proj.bias", d)]
    for ours, theirs in (("attn_norm", "ln_1"), ("mlp_norm", "ln_2")):
      out += [_vector((L, ours, "scale"), p + theirs + ".weight", d),
              _vector((L, ours, "bias"), p + theirs + ".bias", d)]
  out += _heads(cfg, kind, "lm_head.weight")
  return out
