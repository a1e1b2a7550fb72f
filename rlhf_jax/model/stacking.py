"""Converters between the unrolled parameter layout (`layer_0`, `layer_1`, ...) and the
stacked one of `ModelConfig.scan_layers` (one `layers` subtree whose leaves carry a
leading layer axis).

Checkpoints, the HF import/export and LoRA metadata keep ONE on-disk layout, the
unrolled one: a run can switch `scan_layers` on or off and still read every earlier
stage's checkpoint, and `rlhf_jax.hf` maps `model.layers.{i}` names 1:1. Stages stack
right after loading and unstack right before saving (`to_model` / `to_disk`).
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

_LAYER = re.compile(r"layer_(\d+)$")


def is_stacked(params) -> bool:
  return isinstance(params, dict) and "layers" in params


def _n_layers(params) -> int:
  return sum(1 for k in params if _LAYER.match(str(k)))


def stack_layers(params):
  """{layer_i: tree} -> {layers: tree with leaves stacked on axis 0}; other keys unchanged.
  A tree that is already stacked (or has no layers) comes back as is."""
  if not isinstance(params, dict) or is_stacked(params):
    return params
  n = _n_layers(params)
  if n == 0:
    return params
  out = {k: v for k, v in params.items() if not _LAYER.match(str(k))}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[params[f"layer_{i}"] for i in range(n)])
  return out


def unstack_layers(params):
  """The inverse of `stack_layers`; an unrolled tree comes back as is."""
  if not is_stacked(params):
    return params
  out = {k: v for k, v in params.items() if k != "layers"}
  n = jax.tree.leaves(params["layers"])[0].shape[0]
  for i in range(n):
    out[f"layer_{i}"] = jax.tree.map(lambda x: x[i], params["layers"])
  return out
