"""Converters between the unrolled parameter layout (`layer_0`, `layer_1`, ...) and the
stacked one of `ModelConfig.scan_layers` (one `layers` subtree whose leaves carry a
leading layer axis, the layout nn.scan reads).

A checkpoint holds the layout of the model that wrote it (its `model.scan_layers` is in
the checkpoint's model meta): converting the whole train state (params, AdamW moments,
adapters) at every save and restore would copy a 7B model's state each time, and
resuming under another layout is refused like any other model change. Layouts meet
where weights cross a boundary, and are converted there:
- `stages.common.load_params`: an earlier stage written with the other layout;
- `rlhf_jax.hf`: Hugging Face folders are per layer (`model.layers.{i}.*`), so import
  reads the unrolled layout and stacks, export unstacks.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

_LAYER = re.compile(r"layer_(\d+)$")


def is_stacked(params) -> bool:
  return isinstance(params, dict) and "layers" in params


def n_layers_of(params) -> int:
  return sum(1 for k in params if _LAYER.match(str(k)))


def stack_layers(params, axis: int = 0):
  """{layer_i: tree} -> {layers: tree, leaves stacked on `axis`}; other keys unchanged.
  axis=1 for a tree that already has a leading axis (a reward ensemble's members)."""
  if not isinstance(params, dict) or is_stacked(params) or not n_layers_of(params):
    return params
  n = n_layers_of(params)
  out = {k: v for k, v in params.items() if not _LAYER.match(str(k))}
  out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs, axis=axis),
                               *[params[f"layer_{i}"] for i in range(n)])
  return out


def unstack_layers(params, axis: int = 0):
  """The inverse of `stack_layers`; an unrolled tree comes back as is."""
  if not is_stacked(params):
    return params
  out = {k: v for k, v in params.items() if k != "layers"}
  n = jax.tree.leaves(params["layers"])[0].shape[axis]
  for i in range(n):
    out[f"layer_{i}"] = jax.tree.map(lambda x: jnp.take(x, i, axis=axis), params["layers"])
  return out


def to_layout(params, scan_layers: bool, axis: int = 0):
  """`params` in the layout a model with this `scan_layers` reads."""
  return stack_layers(params, axis) if scan_layers else unstack_layers(params, axis)
