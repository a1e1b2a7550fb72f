"""Metrics to DIR/<stage>/metrics.jsonl and TensorBoard event files, plus a progress line."""
from __future__ import annotations

import json
import math
import os
import sys
import time

import jax
import numpy as np

from rlhf_jax.train.tb_events import ScalarWriter


def _plain(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class MetricsWriter:
  """Appends one JSON object per logged step; only process 0 writes.

  On resume, lines for steps after the restored checkpoint are dropped first,
  so an interrupted-and-resumed run leaves the same file as an uninterrupted one.
  """

  def __init__(self, stage_dir: str, resume_step: int = 0, tensorboard: bool = True):
    self.path = os.path.join(stage_dir, "metrics.jsonl")
    self.active = jax.process_index() == 0
    self._tb = None
    if not self.active:
      return
    os.makedirs(stage_dir, exist_ok=True)
    if os.path.exists(self.path):
      keep = []
      with open(self.path) as f:
        for line in f:
          try:
            if json.loads(line)["step"] <= resume_step:
              keep.append(line if line.endswith("\n") else line + "\n")
          except (ValueError, KeyError):
            break  # a torn last line from a hard kill
      tmp = self.path + ".tmp"  # a kill during the rewrite keeps the old file whole
      with open(tmp, "w") as f:
        f.writelines(keep)
      os.replace(tmp, self.path)
    if tensorboard:
      self._tb = ScalarWriter(os.path.join(stage_dir, "tensorboard"))

  def write(self, step: int, metrics: dict) -> dict:
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    if not self.active:
      return row
    with open(self.path, "a") as f:
      f.write(json.dumps(row) + "\n")
    if self._tb is not None:
      self._tb.add_scalars(step, {k: v for k, v in row.items() if k != "step"
                                  and isinstance(v, (int, float)) and math.isfinite(v)})
    return row

  def close(self):
    if self._tb is not None:
      self._tb.close()


class Progress:
  """A progress line: step, loss, tokens/s, ETA (tqdm on a terminal, plain lines otherwise)."""

  def __init__(self, name: str, start: int, total: int):
    self.name, self.start, self.total = name, start, total
    self.t0 = time.time()
    self.tokens = 0
    self._bar = None
    if sys.stderr.isatty() and jax.process_index() == 0:
      from tqdm import tqdm
      self._bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True)
    self._last = start

  def update(self, step: int, row: dict, tokens_per_step: int = 0):
    self.tokens += tokens_per_step * (step - self._last)
    elapsed = max(time.time() - self.t0, 1e-9)
    tps = self.tokens / elapsed
    done = step - self.start
    eta = elapsed / max(done, 1) * (self.total - step)
    loss = row.get("loss", float("nan"))
    if self._bar is not None:
      self._bar.update(step - self._last)
      self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}")
    elif jax.process_index() == 0:
      print(f"[{self.name}] step {step}/{self.total} loss {loss:.4f} "
            f"tok/s {tps:,.0f} eta {eta:.0f}s", flush=True)
    self._last = step
    return tps

  def close(self):
    if self._bar is not None:
      self._bar.close()
