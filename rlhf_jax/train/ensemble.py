"""N models trained as one program: params and optimizer state with a leading member axis.

Reward-model ensembles (Coste et al. 2024; Eisenstein et al. 2023) train N copies of a
model that differ only in their head initialisation and data (order or bootstrap
resample). Rather than N sequential runs, one jitted step vmaps the ordinary train
step (`train.step`) over the member axis: each member has its own Adam moments, step
count, gradient-norm clip and non-finite guard, so member m evolves exactly as it
would alone (`reward.member = m` trains it alone; tests/test_ensemble.py checks it).
The member axis is replicated; each member's params keep the model's own sharding.
Batches carry the member axis second ([B, N, ...]) so the leading axis stays the
data-parallel one every batch helper shards.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax.train.step import accumulate_grads, apply_update


@dataclasses.dataclass(frozen=True)
class Members:
  """Which members one program trains. ids fold into each member's RNG keys and batch
  stream, so member m is the same whether trained with the others or alone; rows[i]
  (optional): member ids[i]'s training rows, indices into the train arrays (a bootstrap
  resample), None = every row."""
  ids: tuple
  rows: tuple | None = None

  def __len__(self):
    return len(self.ids)


def stacked_sharding(s, n: int):
  """A member-stacked leaf's sharding: the member axis replicated, the rest as `s`."""
  return NamedSharding(s.mesh, P(None, *s.spec))


def stack_abstract(abstract, n: int):
  """ShapeDtypeStructs of `n` stacked copies (shape (n,) + shape), member axis replicated."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct((n,) + tuple(a.shape), a.dtype,
                                                     sharding=stacked_sharding(a.sharding, n)),
                      abstract)


def member_keys(key, ids) -> jax.Array:
  """Member i's key: fold_in(key, ids[i])."""
  return jax.vmap(lambda m: jax.random.fold_in(key, m))(jnp.asarray(ids, jnp.uint32))


def fresh_state(optimizer, params) -> dict:
  """Train state of stacked params: one optimizer state per member (its own step count)."""
  return {"params": params, "opt_state": jax.vmap(optimizer.init)(params),
          "step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}


def make_step(loss_fn: Callable, optimizer, ids, *, grad_accum: int = 1, nonfinite: str = "stop"):
  """`step(state, batch, rng) -> (state, metrics)` over stacked params; batch leaves are
  [B, N, ...]. Member i gets batch[:, i] and key fold_in(rng, ids[i]). Metrics are the
  mean over members (finite flags: all members); `skipped` counts skipped member updates."""

  def one(params, opt_state, batch, rng):
    loss, grads, metrics = accumulate_grads(loss_fn, params, batch, rng, grad_accum)
    params, opt_state, upd = apply_update(optimizer, params, opt_state, grads, loss, nonfinite)
    return params, opt_state, {"loss": loss, **metrics, **upd}

  def step(state, batch, rng):
    params, opt_state, m = jax.vmap(one, in_axes=(0, 0, 1, 0))(
        state["params"], state["opt_state"], batch, member_keys(rng, ids))
    bad = ~(m["finite_loss"] & m["finite_grads"])
    new = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1,
               skipped=state["skipped"] + jnp.sum(bad.astype(jnp.int32)))
    out = {k: (jnp.all(v) if v.dtype == jnp.bool_ else jnp.mean(v)) for k, v in m.items()}
    out["member_loss_max"] = jnp.max(m["loss"])
    return new, out

  return step


def mean_over_members(eval_loss: Callable) -> Callable:
  """eval_loss(params, batch) -> (loss, metrics) of one member -> the same, averaged over
  stacked params' members."""
  def fn(params, batch):
    loss, m = jax.vmap(eval_loss, in_axes=(0, None))(params, batch)
    return jnp.mean(loss), jax.tree.map(jnp.mean, m)
  return fn


class MemberBatcher:
  """Each member's batches from its own HostBatcher (own stream; own rows when
  bootstrapped), stacked on axis 1: [B, N, ...]."""

  def __init__(self, batchers: list):
    self.batchers = batchers

  def get(self, step: int) -> dict:
    parts = [b.get(step) for b in self.batchers]
    return {k: np.stack([p[k] for p in parts], axis=1) for k in parts[0]}


def bootstrap_rows(n: int, seed: int) -> np.ndarray:
  """A bootstrap resample of n rows (n draws with replacement; Efron 1979), sorted, a pure
  function of `seed` (the member's stream seed)."""
  return np.sort(np.random.default_rng(seed).integers(0, n, n))
