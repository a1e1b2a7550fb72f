"""The loop every stage shares: step, log, evaluate, checkpoint, survive preemption.

Exactness on resume: the batch for step s is a pure function of (seed, s)
(`rlhf_jax.data.batching.Batcher.get`) and the step's RNG is
`fold_in(key, s)`, so a run resumed from the checkpoint at step s replays
nothing and skips nothing.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable

import jax
import numpy as np

from rlhf_jax.train import sharding as sh
from rlhf_jax.train.metrics import MetricsWriter, Progress

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later" — re-run the same command
EXIT_NONFINITE = 3


class Preempted(Exception):
  exit_code = EXIT_PREEMPTED


class NonFinite(Exception):
  exit_code = EXIT_NONFINITE


class PreemptionGuard:
  """SIGTERM (TPU/spot preemption notice, `kill`) sets a flag the loop polls each step.

  The pipeline enters one guard for the whole run (`ACTIVE`), so a SIGTERM that
  arrives between training loops (data preparation, sampling stages) is seen
  too: the pipeline stops after the current stage's work is saved.
  """

  def __init__(self):
    self.flag = threading.Event()
    self._prev = None

  def __enter__(self):
    global ACTIVE
    if threading.current_thread() is threading.main_thread():
      self._prev = signal.signal(signal.SIGTERM, lambda *_: self.flag.set())
    self._outer, ACTIVE = ACTIVE, self
    return self

  def __exit__(self, *exc):
    global ACTIVE
    ACTIVE = self._outer
    if self._prev is not None:
      signal.signal(signal.SIGTERM, self._prev)

  def requested(self) -> bool:
    if jax.process_count() > 1:
      # Every host must agree to save at the same step.
      from jax.experimental import multihost_utils
      flags = multihost_utils.process_allgather(np.array([self.flag.is_set()]))
      return bool(np.any(flags))
    return self.flag.is_set()


ACTIVE: PreemptionGuard | None = None


def _check_finite(name: str, step: int, row: dict, ckpt) -> None:
  for key, label in (("finite_loss", "loss"), ("finite_grads", "gradient norm")):
    if key in row and not row[key]:
      last = ckpt.latest_step() if ckpt is not None else None
      raise NonFinite(f"{name}: non-finite {label} at step {step}; stopped, last good checkpoint "
                      f"(step {last}) kept. Lower the learning rate or set "
                      f"--config.{name}.nonfinite=skip")


def train_loop(*, name: str, stage_dir: str, state: dict, step_fn: Callable, get_batch: Callable,
               total_steps: int, key, mesh, ckpt, meta_fn: Callable, log_every: int = 10,
               ckpt_every: int = 100, eval_fn: Callable | None = None, eval_every: int = 0,
               host_fn: Callable | None = None, tokens_per_step: int = 0,
               nonfinite: str = "stop") -> tuple[dict, list[dict]]:
  """Runs steps state['step']..total_steps; returns (state, logged rows of this run).

  step_fn(state, batch, rng) -> (state, metrics). Metrics whose names start
  with '_' are handed to host_fn(step, metrics) (e.g. decoding samples for a
  gold score) and its returned dict is logged, never written raw.
  """
  start = int(jax.device_get(state["step"]))
  writer = MetricsWriter(stage_dir, resume_step=start)
  progress = Progress(name, start, total_steps)
  rows, pending = [], []

  def flush():
    for s, m in pending:
      host = {k: sh.to_host(v) for k, v in m.items() if not k.startswith("_")}
      row = {k: (v.item() if np.ndim(v) == 0 else v) for k, v in host.items()}
      if nonfinite == "stop":
        _check_finite(name, s, row, ckpt)
      if s % log_every == 0 or s == total_steps:
        if host_fn is not None:
          row.update(host_fn(s, {k: v for k, v in m.items() if k.startswith("_")}))
        row = writer.write(s, row)
        rows.append(row)
        progress.update(s, row, tokens_per_step)
    pending.clear()

  # Inside a pipeline run the run-wide guard is already installed: reuse it.
  guard_cm = contextlib.nullcontext(ACTIVE) if ACTIVE is not None else PreemptionGuard()
  with guard_cm as guard:
    for s in range(start, total_steps):
      batch = sh.put_batch(get_batch(s), mesh)
      state, metrics = step_fn(state, batch, jax.random.fold_in(key, s))
      done = s + 1
      pending.append((done, metrics))
      due_eval = eval_fn is not None and eval_every and (done % eval_every == 0 or done == total_steps)
      due_ckpt = done % ckpt_every == 0 or done == total_steps
      stop = guard.requested()
      if done % log_every == 0 or due_eval or due_ckpt or stop or done == total_steps:
        flush()  # also the non-finite check: never checkpoint a bad state
      if due_eval:
        row = writer.write(done, {f"eval_{k}": v for k, v in eval_fn(state).items()})
        rows.append(row)
      if due_ckpt or stop:
        ckpt.save(done, state, meta_fn(done))
      if stop and done < total_steps:
        ckpt.wait()
        writer.close()
        raise Preempted(f"{name}: preempted (SIGTERM) at step {done}; checkpoint saved, "
                        f"re-run the same command to continue")
  ckpt.wait()
  writer.close()
  progress.close()
  return state, rows
