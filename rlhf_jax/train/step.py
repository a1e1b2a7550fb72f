"""The generic train step: pure `step(state, batch, rng) -> (state, metrics)`.

Gradient accumulation scans over micro-batches (the batch's leading axis is
split into `grad_accum` chunks), so the peak activation memory is that of a
micro-batch. A non-finite loss or gradient norm either leaves the state
untouched and is counted (`nonfinite='skip'`) or is reported by the loop,
which stops before saving anything (`'stop'`).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax


def split_microbatches(batch, n: int):
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} does not split into grad_accum={n} micro-batches")
    return x.reshape((n, x.shape[0] // n) + x.shape[1:])
  return jax.tree.map(split, batch)


def accumulate_grads(loss_fn: Callable, params, batch, rng, grad_accum: int):
  """Mean loss, grads and metrics over `grad_accum` micro-batches.

  Each micro-batch's loss is already a mean over its own valid tokens (or pairs); the
  micro-batch means are averaged with equal weight. With variable-length rows (SFT,
  reward) that weights tokens slightly differently from one big batch, as gradient
  accumulation does in most frameworks.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum == 1:
    (loss, metrics), grads = grad_fn(params, batch, rng)
    return loss, grads, metrics
  micro = split_microbatches(batch, grad_accum)

  def body(carry, xs):
    mb, i = xs
    (loss, metrics), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
    acc = jax.tree.map(jnp.add, carry, (loss, grads, metrics))
    return acc, None

  (loss_s, metrics_s), grads_s = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], micro), rng)
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (loss_s, grads_s, metrics_s))
  (loss, grads, metrics), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum)))
  return jax.tree.map(lambda x: x / grad_accum, (loss, grads, metrics))


def apply_update(optimizer, params, opt_state, grads, loss, nonfinite: str):
  """Optimizer update guarded against non-finite values; returns (params, opt_state, metrics)."""
  gnorm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
  updates, new_opt = optimizer.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  if nonfinite == "skip":
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_params, new_opt = keep(new_params, params), keep(new_opt, opt_state)
  metrics = {"grad_norm": gnorm, "finite_loss": jnp.isfinite(loss), "finite_grads": jnp.isfinite(gnorm)}
  return new_params, new_opt, metrics


def make_train_step(loss_fn: Callable, optimizer, *, grad_accum: int = 1, nonfinite: str = "stop",
                    params_key: str = "params", opt_key: str = "opt_state"):
  """loss_fn(params, batch, rng) -> (loss, metrics). State: dict with params, opt_state, step."""

  def step(state, batch, rng):
    loss, grads, metrics = accumulate_grads(loss_fn, state[params_key], batch, rng, grad_accum)
    params, opt_state, upd = apply_update(optimizer, state[params_key], state[opt_key], grads,
                                          loss, nonfinite)
    new_state = dict(state, **{params_key: params, opt_key: opt_state, "step": state["step"] + 1})
    if "skipped" in state:
      new_state["skipped"] = state["skipped"] + (~(upd["finite_loss"] & upd["finite_grads"])).astype(jnp.int32)
    return new_state, {"loss": loss, **metrics, **upd}

  return step


def compile_step(step, mesh, state_shardings, example_batch, *, donate: bool = True,
                 extra_shardings=None):
  """jit with explicit shardings: state as created, batch over the data axes, rng replicated.

  extra_shardings: a fourth argument `step(state, batch, rng, extra)` that is read, not
  donated (a LoRA stage's frozen base)."""
  from rlhf_jax.train import sharding as sh
  batch_sh = jax.tree.map(lambda x: sh.batch_sharding(mesh, x.ndim), example_batch)
  extra = () if extra_shardings is None else (extra_shardings,)
  return jax.jit(step, in_shardings=(state_shardings, batch_sh, sh.replicated(mesh), *extra),
                 out_shardings=(state_shardings, sh.replicated(mesh)),
                 donate_argnums=(0,) if donate else ())
