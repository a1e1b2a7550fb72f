"""Runs the stages a config lists, in order, each handed to the next through checkpoints.

Contract (DESIGN.md section 3): DIR/<stage>/{checkpoints/, metrics.jsonl,
summary.json}. A stage with summary.json is finished and skipped; an
interrupted one resumes from its last checkpoint. DIR/config.json records the
config of the first run so a later run with a different model shape fails
with a clear message instead of a shape error inside orbax.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
import zlib

import jax

from rlhf_jax import config_lib
from rlhf_jax.model.transformer import ModelConfig
from rlhf_jax.train import loop
from rlhf_jax.train import sharding as sh
from rlhf_jax.train.checkpoint import CheckpointMismatch

# What each stage reads from earlier stages (their summary.json must exist).
REQUIRES = {
    "pretrain": (),
    "sft": ("pretrain",),
    "label": ("sft",),
    "reward": ("sft", "label"),
    "ppo": ("sft", "reward"),
    "best_of_k": ("sft", "reward"),
    "dpo": ("sft", "label", "reward"),  # label's rankings; the reward model for held-out proxy
    "grpo": ("sft", "reward"),
    "evaluate": ("sft", "reward"),
}


@dataclasses.dataclass
class Context:
  """What every stage needs: config, workdir, mesh, data and the model shape."""
  config: object
  workdir: str
  mesh: object
  _sources: object = None

  @property
  def sources(self):
    if self._sources is None:
      from rlhf_jax.data.sources import DataSources
      self._sources = DataSources(self.config.data, self.workdir, self.config.seed)
    return self._sources

  @property
  def model_cfg(self) -> ModelConfig:
    vocab = self.config.model.vocab_size or self.sources.tokenizer.vocab_size
    return ModelConfig.from_config(self.config.model, vocab_size=vocab)

  def stage_dir(self, name: str) -> str:
    return os.path.join(self.workdir, name)

  def key(self, name: str):
    """A stage's base RNG key: independent of the order stages run in, distinct per name
    (a CRC-32 of it; a sum of character codes made best_of_k/round_12 and round_21 equal)."""
    return jax.random.fold_in(jax.random.key(self.config.seed), zlib.crc32(name.encode()) >> 1)

  def summary(self, name: str) -> dict:
    with open(os.path.join(self.stage_dir(name), "summary.json")) as f:
      return json.load(f)

  def is_done(self, name: str) -> bool:
    return os.path.exists(os.path.join(self.stage_dir(name), "summary.json"))


def _stage_requires(config, name: str):
  req = REQUIRES[name]
  if (name in ("reward", "dpo") and config.data.source == "files"
      and config.data.files.ranking):  # real rankings instead of the label stage
    req = tuple(r for r in req if r != "label")
  return req


def _check_workdir_config(config, workdir: str) -> None:
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    for section in ("model", "data"):
      fixed = {k: v for k, v in current[section].items() if k not in ("tokenizer",)}
      old = {k: saved.get(section, {}).get(k) for k in fixed}
      diff = {k: (old[k], v) for k, v in fixed.items() if old[k] != v}
      if diff:
        raise CheckpointMismatch(
            f"{path}: this workdir was written with a different config.{section} "
            f"(workdir, now): {json.dumps(diff)}; use a fresh --workdir or the original config")
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump(current, f, indent=2)


def write_json(path: str, obj) -> None:
  """Atomic write (tmp + rename): a kill never leaves a half-written summary."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=float)
  os.replace(tmp, path)


def setup(config):
  """Distributed init, compilation cache, validation, mesh: all before any compile."""
  sh.maybe_initialize_distributed(config.distributed)
  if config.compile_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compile_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  config_lib.validate(config, jax.device_count(), jax.process_count())
  return sh.make_mesh(config.mesh)


def run(config, workdir: str) -> None:
  workdir = os.path.abspath(workdir)
  mesh = setup(config)
  _check_workdir_config(config, workdir)
  ctx = Context(config, workdir, mesh)
  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  with loop.PreemptionGuard() as guard:
    _run_stages(ctx, stages, guard)


def _run_stages(ctx, stages, guard) -> None:
  config = ctx.config
  for name in stages:
    if ctx.is_done(name):
      print(f"[{name}] finished earlier ({ctx.stage_dir(name)}/summary.json); skipping", flush=True)
      continue
    for dep in _stage_requires(config, name):
      if not ctx.is_done(dep):
        raise FileNotFoundError(
            f"stage {name} needs the output of stage {dep}, but {ctx.stage_dir(dep)}/summary.json "
            f"does not exist; run it first (add it to --config.stages)")
    os.makedirs(ctx.stage_dir(name), exist_ok=True)
    t0 = time.time()
    print(f"[{name}] starting", flush=True)
    module = importlib.import_module(f"rlhf_jax.stages.{name}")
    summary = module.run(ctx)
    summary["wall_seconds"] = round(time.time() - t0, 2)
    write_json(os.path.join(ctx.stage_dir(name), "summary.json"), summary)
    print(f"[{name}] done in {summary['wall_seconds']:.1f}s: "
          + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()
                      if isinstance(v, (int, float)) and k != "wall_seconds"), flush=True)
    if guard.requested() and name != stages[-1]:
      raise loop.Preempted(f"{name}: finished and saved, then preempted (SIGTERM); re-run the "
                           f"same command to continue with the next stage")
  if "evaluate" in stages or set(stages) >= {"ppo", "best_of_k"} or set(stages) & {"dpo", "grpo"}:
    from rlhf_jax import report
    report.write_report(ctx)
