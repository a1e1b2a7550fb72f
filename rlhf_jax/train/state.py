"""Building sharded state: model params and the train-state dict.

State is created already sharded: the init function is jitted and its
output shardings come from the parameters' logical axis names, so no full
copy of a large model ever sits on one device. The same abstract state
(shapes + shardings) is what a checkpoint restores onto.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import flax.linen as nn

from rlhf_jax.model.transformer import ModelConfig, Transformer
from rlhf_jax.train import sharding as sh


def make_model(cfg: ModelConfig, mesh=None, rules=sh.RULES) -> Transformer:
  """The transformer bound to a mesh (one device when `mesh` is None)."""
  if mesh is None:
    mesh = sh.mesh_of((1, 1, 1), jax.devices()[:1])
  return Transformer(cfg, mesh=mesh, rules=tuple(rules))


def _init_boxed(model: Transformer, rng):
  tokens = jnp.zeros((1, 8), jnp.int32)
  return model.init(rng, tokens, jnp.ones((1, 8), bool))["params"]


@functools.lru_cache(maxsize=32)
def _cached_boxed(model: Transformer):
  return jax.eval_shape(functools.partial(_init_boxed, model), jax.random.key(0))


def _boxed_shapes(model: Transformer):
  """The params' shapes with their logical axis names, traced once per model (equal
  configs, mesh and rules: equal models). Loading a LoRA stage asked for them ~30 times
  (every FineTune, restore and sharding lookup), 0.2 s of tracing each for a tiny model."""
  try:
    return _cached_boxed(model)
  except TypeError:  # an unhashable (e.g. bound) module
    return jax.eval_shape(functools.partial(_init_boxed, model), jax.random.key(0))


def param_shardings(model: Transformer):
  return sh.logical_sharding(_boxed_shapes(model), model.mesh, model.rules)


def abstract_params(model: Transformer):
  shardings = param_shardings(model)
  shapes = nn.unbox(_boxed_shapes(model))
  return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), shapes, shardings)


def init_params(model: Transformer, rng):
  """Random parameters, created directly with their shardings."""
  return jax.jit(lambda r: nn.unbox(_init_boxed(model, r)),
                 out_shardings=param_shardings(model))(rng)


def abstract_of(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def _like_inputs(shapes, abstract_args):
  """Output shardings for `jit_init`: an output leaf whose key path ends with an input leaf's
  path, and has its shape, takes that leaf's sharding; any other is left to the compiler.

  Optimizer moments mirror the params they update (opt_state[..].mu['embed'] is params
  ['embed']'s), but optax builds them as zeros from the shape alone, so XLA's propagation
  left them replicated: under FSDP every device held both AdamW moments of the whole model.
  """
  known = {}
  for arg in abstract_args:
    for path, x in jax.tree_util.tree_flatten_with_path(arg)[0]:
      if getattr(x, "sharding", None) is not None:
        known.setdefault(tuple(path), x)

  def pick(path, s):
    for i in range(len(path)):
      x = known.get(tuple(path[i:]))
      if x is not None and x.shape == s.shape:
        return x.sharding
    return None  # the compiler's choice
  return jax.tree_util.tree_map_with_path(pick, shapes)


def jit_init(fn, *abstract_args):
  """Compile `fn` and return (compiled, abstract output with its shardings).

  Lets a stage learn the exact shardings of its full train state (optimizer
  moments included) without materialising it, so a checkpoint can be
  restored straight onto them.
  """
  shapes = jax.eval_shape(fn, *abstract_args)
  compiled = jax.jit(fn, out_shardings=_like_inputs(shapes, abstract_args)).lower(*abstract_args).compile()
  abstract = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d),
                          shapes, compiled.output_shardings)
  return compiled, abstract
