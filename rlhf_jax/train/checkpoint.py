"""Orbax checkpoints: one CheckpointManager per stage under DIR/<stage>/checkpoints.

Each top-level key of the train state is its own orbax item, so a later stage
can restore one model (`params`) without reading optimizer state, straight
onto its own shardings. A `meta` JSON item holds what must match on resume
(the model shape) and host-side state (data position, controllers).

Orbax writes each step into a temporary directory and renames it when
complete, so a process killed mid-save never leaves a checkpoint that reads
as finished: the manager lists only finalized steps.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import threading

import jax
import orbax.checkpoint as ocp


class _QuietReadOnly(logging.Filter):
  """Orbax warns three times per read-only manager (every load of an earlier stage's
  params) that read_only turns saving off, which is what read_only means."""
  _NOISE = ("CheckpointManagerOptions.read_only=True", "Given directory is read only")

  def filter(self, record):
    return not str(record.msg).startswith(self._NOISE)


logging.getLogger("absl").addFilter(_QuietReadOnly())


# Orbax keeps process-global state per operation: the signals that order a save's directory
# creation and writes are keyed by the *current* operation id
# (orbax/checkpoint/_src/futures/synchronization.py: OperationIdGenerator), so two managers
# saving at once in one process mix up each other's signals (FileExistsError on a tmp
# directory, seen when ppo, best_of_k, dpo and grpo ran at once). Every orbax call goes
# through this lock, and while stages run at once (`exclusive_saves`, pipeline._run_at_once)
# a save also finishes inside it instead of in the background.
_ORBAX = threading.RLock()
_EXCLUSIVE = threading.Event()


@contextlib.contextmanager
def exclusive_saves():
  """While active, every save completes before the lock is released (one at a time)."""
  _EXCLUSIVE.set()
  try:
    yield
  finally:
    _EXCLUSIVE.clear()


class CheckpointMismatch(ValueError):
  """The checkpoint on disk was written by a different configuration."""


def _abstract(tree):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _is_leaf(x) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _group(state: dict) -> dict:
  """Top-level arrays (step, counters, KL coefficient) go together in one `scalars` item."""
  out = {k: v for k, v in state.items() if not _is_leaf(v)}
  leaves = {k: v for k, v in state.items() if _is_leaf(v)}
  if leaves:
    out["scalars"] = leaves
  return out


def _ungroup(items: dict) -> dict:
  out = {k: v for k, v in items.items() if k != "scalars"}
  out.update(items.get("scalars", {}))
  return out


class Checkpointer:

  def __init__(self, directory: str, *, keep: int = 2, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    with _ORBAX:
      self._mngr = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
              cleanup_tmp_directories=True))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: dict, meta: dict) -> None:
    items = {k: ocp.args.StandardSave(v) for k, v in _group(state).items()}
    items["meta"] = ocp.args.JsonSave(meta)
    with _ORBAX:
      self._mngr.save(step, args=ocp.args.Composite(**items), force=True)
      if _EXCLUSIVE.is_set():
        self._mngr.wait_until_finished()

  def restore(self, abstract_state: dict, step: int | None = None, expect_meta: dict | None = None):
    """Restore every item of `abstract_state` (ShapeDtypeStructs with shardings)."""
    step = self.latest_step() if step is None else step
    meta = self.read_meta(step)
    check_meta(meta, expect_meta, f"{self.directory}/{step}")
    items = {k: ocp.args.StandardRestore(v) for k, v in _group(abstract_state).items()}
    with _ORBAX:
      restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    return _ungroup({k: restored[k] for k in items}), meta

  def read_meta(self, step: int) -> dict:
    with _ORBAX:
      return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self) -> None:
    with _ORBAX:
      self._mngr.wait_until_finished()

  def close(self) -> None:
    with _ORBAX:
      self._mngr.wait_until_finished()
      self._mngr.close()


def check_meta(meta: dict, expect: dict | None, where: str) -> None:
  """Clear message instead of a shape error deep inside orbax."""
  if not expect:
    return
  for key, want in expect.items():
    have = meta.get(key)
    if have is not None and have != want:
      diff = want
      if isinstance(want, dict) and isinstance(have, dict):
        # A field the checkpoint predates (e.g. a model family switch added later) is
        # at its default, which keeps the old behaviour: only recorded fields compare.
        diff = {k: (have[k], v) for k, v in want.items() if k in have and have[k] != v}
        if not diff:
          continue
      raise CheckpointMismatch(
          f"{where}: checkpoint was written with a different {key} (checkpoint, config): "
          f"{json.dumps(diff, default=str)}; use a fresh --workdir or the original config")


def _open_latest(stage_dir: str):
  """(read-only manager, latest finished step, its `meta` item) of a stage's checkpoints."""
  directory = os.path.join(stage_dir, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"{directory}: no checkpoint to start from; run that stage first")
  with _ORBAX:
    mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
    step = mngr.latest_step()
    if step is None:
      mngr.close()
      raise FileNotFoundError(f"{directory}: no finished checkpoint to start from; run that stage first")
    return mngr, step, mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def latest_meta(stage_dir: str) -> tuple[int, dict]:
  """(step, `meta` item) of a stage's latest checkpoint: which model it holds (a LoRA
  checkpoint names its base stage there)."""
  mngr, step, meta = _open_latest(stage_dir)
  with _ORBAX:
    mngr.close()
  return step, meta


def restore_item(stage_dir: str, item: str, abstract, expect_meta: dict | None = None):
  """Restore one item (e.g. `params`) of a stage's latest checkpoint onto `abstract`'s shardings."""
  mngr, step, meta = _open_latest(stage_dir)
  check_meta(meta, expect_meta, os.path.join(stage_dir, "checkpoints", str(step)))
  with _ORBAX:
    out = mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))
    mngr.close()
  return out[item], meta
