"""Runs the stages a config lists, in order, each handed to the next through checkpoints.

Contract (DESIGN.md section 3): DIR/<stage>/{checkpoints/, metrics.jsonl,
summary.json}. A stage with summary.json is finished and skipped; an
interrupted one resumes from its last checkpoint. DIR/<stage>/config.json
records the config a stage finished with, DIR/config.json the latest run's and
DIR/config_first.json the first run's: a later run that changes what a finished
stage's output depends on (model shape, tokenizer, the data it read) fails with
one clear line instead of a shape error inside orbax; other changes are listed
("changed since the last run: data.skip_bad False -> True") and run.
"""
from __future__ import annotations

import dataclasses
import glob
import importlib
import json
import os
import threading
import time
import zlib

import jax

from rlhf_jax import config_lib
from rlhf_jax.model.transformer import NOT_ARCHITECTURE, ModelConfig
from rlhf_jax.train import checkpoint, loop
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
    "online": ("sft", "label", "reward"),  # round 0: the label stage's rankings and its RM
    "evaluate": ("sft", "reward"),
}


@dataclasses.dataclass
class Context:
  """What every stage needs: config, workdir, mesh, data and the model shape."""
  config: object
  workdir: str
  mesh: object
  _sources: object = None
  _gold: object = None

  @property
  def sources(self):
    if self._sources is None:
      from rlhf_jax.data.sources import DataSources
      from rlhf_jax.stages.gold import WORLD, annotator
      self._sources = DataSources(self.config.data, self.workdir, self.config.seed,
                                  labelled=annotator(self.config) != WORLD)
    return self._sources

  @property
  def gold(self):
    """The gold scorer (`config.label.annotator`: the world or a reward model), built on
    first use: `.available`, `.name`, `.score(prompts, responses, ended)` (stages/gold.py)."""
    if self._gold is None:
      from rlhf_jax.stages import gold
      self._gold = gold.build(self)
    return self._gold

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
  if name == "sft" and config.model.hf:
    req = ()  # starts from the Hugging Face weights unless pretrain ran (stages/common.base_params)
  from rlhf_jax.stages.gold import WORLD, annotator
  if (name in ("reward", "dpo") and config.data.source == "files"
      and config.data.files.ranking  # real rankings instead of the label stage's
      and annotator(config) == WORLD):  # (a gold-RM annotator labels them: stages/gold.py)
    req = tuple(r for r in req if r != "label")
  return req


# What a finished (or started) stage's output depends on, besides the model and the
# tokenizer: the data keys it read. A change of one of these would make the stage's
# output disagree with the config, so it is refused; any other change (data.skip_bad,
# logging, the steps of a stage that has not run) is announced and allowed.
# Keys absent from every list (new fields) count as read by every stage: the safe side.
_CORPUS = ("source", "seed", "corpus_docs", "files.pretrain")
_PROMPTS = ("source", "seed", "files.sft", "prompt_len")
STAGE_DATA = {
    "pretrain": _CORPUS + ("seq_len",),
    "sft": ("source", "seed", "sft_examples", "files.sft", "max_len", "overlong"),
    "label": _PROMPTS + ("reward_prompts",),
    "reward": _PROMPTS + ("reward_prompts", "rl_prompts", "files.ranking", "files.ranking_format",
                          "max_len", "overlong"),
    "ppo": _PROMPTS + _CORPUS + ("rl_prompts", "eval_prompts", "seq_len"),  # ptx reads the corpus
    "best_of_k": _PROMPTS + ("rl_prompts", "eval_prompts", "sft_examples", "max_len", "overlong"),
    "evaluate": _PROMPTS + ("eval_prompts",),
    # Second-wave stages (checked when config_lib.STAGES lists them): their prompts and
    # rankings, as for the stages they replace.
    "dpo": _PROMPTS + ("reward_prompts", "rl_prompts", "eval_prompts", "files.ranking",
                       "files.ranking_format", "max_len", "overlong"),
    "grpo": _PROMPTS + ("rl_prompts", "eval_prompts"),
    # Labels, reward models and PPO in rounds: what those three read.
    "online": _PROMPTS + _CORPUS + ("reward_prompts", "rl_prompts", "eval_prompts", "seq_len",
                                    "max_len", "overlong"),
}
# Read by no stage's output: changing them never invalidates finished work.
_DATA_FREE = ("skip_bad",)
# Model fields that change how a model runs, not what its checkpoint holds
# (transformer.NOT_ARCHITECTURE): later stages read earlier ones through
# stages.common.load_params, which compares the architecture only and converts the layer
# layout (resuming an interrupted stage under the other layout is still refused, by
# stages.common.resume).
_MODEL_FREE = NOT_ARCHITECTURE


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _stage_started(workdir: str, name: str) -> bool:
  """A finished checkpoint of the stage (or of a best-of-K round) exists."""
  for d in glob.glob(os.path.join(workdir, name, "**", "checkpoints"), recursive=True):
    if any(e.isdigit() for e in os.listdir(d)):
      return True
  return False


def fixed_keys(config_flat: dict, stage: str) -> set[str]:
  """Flat config keys whose change invalidates `stage`'s output (its model, tokenizer, data)."""
  data_listed = {k for keys in STAGE_DATA.values() for k in keys} | set(_DATA_FREE)
  keys = {k for k in config_flat if k.startswith("model.") and k[6:] not in _MODEL_FREE}
  keys |= {"data.tokenizer", "data.vocab_size"}
  if not config_flat.get("data.tokenizer"):  # a tokenizer trained into DIR from the corpus
    keys |= {"data." + k for k in _CORPUS}
  keys |= {"data." + k for k in STAGE_DATA.get(stage, ())}
  keys |= {k for k in config_flat if k.startswith("data.") and k[5:] not in data_listed}
  if stage not in ("pretrain", "sft"):  # who labels (and scores gold): label and after
    keys.add("label.annotator")
  return keys


def _defaults(flat: dict) -> dict:
  """Fields that configs written before them lacked, at the behaviour they had then."""
  return {"label.annotator": "world", **flat}


def _diff(old: dict, new: dict, keys) -> dict:
  return {k: (old.get(k), new.get(k)) for k in sorted(keys) if old.get(k) != new.get(k)}


def _show(diff: dict) -> str:
  return ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())


def check_workdir_config(config, workdir: str) -> dict:
  """Refuse a config that contradicts finished work; return what changed since the last run.

  Compared per stage: the model (shape fields; `model.hf` included), the tokenizer
  and the data the stage read, against DIR/<stage>/config.json (what the stage ran
  with; DIR/config.json, the previous run's, for stages without one). Stages with
  checkpoints but no summary are held to the same rule: their resume would mix data.
  Pure reading: every process can run it before anyone writes.
  """
  current = _defaults(_flat(json.loads(config.to_json_best_effort())))
  last = _read_json(os.path.join(workdir, "config.json"))
  last = _defaults(_flat(last)) if isinstance(last, dict) else None
  for name in config_lib.STAGES:
    done = os.path.exists(os.path.join(workdir, name, "summary.json"))
    if not (done or _stage_started(workdir, name)):
      continue
    saved = _read_json(os.path.join(workdir, name, "config.json"))
    saved = _flat(saved) if isinstance(saved, dict) else last
    if saved is None:
      continue
    saved = _defaults(saved)
    # Keys the saved config predates (fields added since, at their old behaviour) are skipped.
    bad = _diff(saved, current, (fixed_keys(saved, name) | fixed_keys(current, name)) & set(saved))
    if bad:
      what = "finished" if done else "has checkpoints"
      raise CheckpointMismatch(
          f"{workdir}/{name}: stage {name} {what} with a different config (then -> now): "
          f"{_show(bad)}; use a fresh --workdir, the original values, or delete "
          f"{workdir}/{name} (and the stages after it) to redo it")
  if last is not None and os.path.exists(os.path.join(workdir, "tokenizer.model")):
    keys = {"data.tokenizer", "data.vocab_size"}
    if not last.get("data.tokenizer"):  # trained from the corpus into DIR
      keys |= {"data." + k for k in _CORPUS}
    bad = _diff(last, current, keys)
    if bad:  # a trained tokenizer is reused, so a new vocab_size would be ignored silently
      raise CheckpointMismatch(
          f"{workdir}/tokenizer.model was made with a different config (then -> now): "
          f"{_show(bad)}; use a fresh --workdir")
  # The stage list, the cache folder and concurrency are how a run is invoked, not what it
  # computes.
  return {} if last is None else _diff(last, current, (set(last) | set(current))
                                       - {"stages", "compile_cache", "concurrent_stages"})


def _record_config(config, workdir: str) -> None:
  """DIR/config.json: the latest run's config; DIR/config_first.json: the first run's."""
  os.makedirs(workdir, exist_ok=True)
  first = os.path.join(workdir, "config_first.json")
  latest = os.path.join(workdir, "config.json")
  if not os.path.exists(first):  # workdirs from before config_first.json: config.json was the first
    write_json(first, _read_json(latest) or json.loads(config.to_json_best_effort()))
  write_json(latest, json.loads(config.to_json_best_effort()))


def barrier(name: str) -> None:
  """Every process waits here until all arrive (files written before it are visible after it)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _check_workdir_config(config, workdir: str) -> None:
  """Every process checks the files as they were, then process 0 records the new config.

  The barriers order the reads before the write and the write before any later read:
  a process never sees a file another one is writing (issue 19 item 15).
  """
  changed = check_workdir_config(config, workdir)
  barrier("config_checked")
  if changed and jax.process_index() == 0:
    print(f"changed since the last run: {_show(changed)}", flush=True)
  _record_config(config, workdir)
  barrier("config_written")


def write_json(path: str, obj) -> None:
  """Atomic write (tmp + rename) on process 0: a reader sees the old file or the whole
  new one, never a half-written one; a kill never leaves a torn file."""
  if jax.process_index() != 0:
    return
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, default=float)
  os.replace(tmp, path)


def apply_hf_model(config) -> None:
  """`config.model.hf = DIR`: DIR/config.json defines the architecture.

  Architecture fields (`hf.architecture_fields`: all but transformer.NOT_ARCHITECTURE
  and, with rotary positions, max_len) still at `config_lib.model()`'s defaults
  are replaced by the checkpoint's; one set to anything else that disagrees fails with
  one line naming the key. Learned positions (GPT-2) fix max_len to the checkpoint's
  table. The model folder's tokenizer is used unless `data.tokenizer` is set. Runs
  before validation, so the recorded workdir config holds the imported architecture.
  """
  if not config.model.hf:
    return
  from rlhf_jax import hf
  path = os.path.expanduser(config.model.hf)
  imported, info = hf.read_config(path, max_len=config.model.max_len)
  defaults = config_lib.model()
  for key, value in hf.architecture_fields(imported).items():
    current = config.model[key]
    if key != "max_len" and current != value and current != defaults[key]:
      raise config_lib.ConfigError(
          f"config.model.{key}: {current!r} conflicts with {path}/config.json ({value!r}); "
          f"with model.hf set, leave the architecture to the checkpoint")
    config.model[key] = value
  limit = info.get("max_position_embeddings")
  if limit and config.model.max_len > limit:
    raise config_lib.ConfigError(
        f"config.model.max_len: {config.model.max_len} exceeds {path}/config.json "
        f"max_position_embeddings={limit}")
  if not config.data.tokenizer:
    config.data.tokenizer = path


def setup(config):
  """Distributed init, compilation cache, validation, mesh: all before any compile."""
  sh.maybe_initialize_distributed(config.distributed)
  if config.compile_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compile_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  apply_hf_model(config)
  config_lib.validate(config, jax.device_count(), jax.process_count())
  from rlhf_jax.stages import gold
  gold.check(config, sh.resolve_mesh_shape(config.mesh, jax.device_count()))
  return sh.make_mesh(config.mesh)


def run(config, workdir: str) -> None:
  workdir = os.path.abspath(workdir)
  mesh = setup(config)
  _check_workdir_config(config, workdir)
  ctx = Context(config, workdir, mesh)
  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  with loop.PreemptionGuard() as guard:
    _run_stages(ctx, stages, guard)


def _has_gold_figures(obj) -> bool:
  """A number under a key naming gold, anywhere in a summary (eval points, curves)."""
  if isinstance(obj, dict):
    return any(("gold" in k and isinstance(v, (int, float)) and not isinstance(v, bool)
                and v == v) or _has_gold_figures(v) for k, v in obj.items())
  if isinstance(obj, list):
    return any(_has_gold_figures(v) for v in obj)
  return False


# Policy stages that read only earlier stages' finished outputs (sft, label, reward) and
# write only their own folder. Listed next to each other, they can run at once: on the
# 2-core default CPU run, one stage keeps 1.5-1.7 cores busy (its compiles and small decode
# ops run on one), so running ppo and best_of_k together took 71 s instead of 94 s
# (docs/performance.md). Each stage's results are the same as when it runs alone: its RNG
# key comes from its name (Context.key), and the tests compare the kill-and-resume runs of
# each stage alone with the reference run, which runs them at once.
INDEPENDENT = ("ppo", "best_of_k", "dpo", "grpo")


def stage_groups(stages, concurrent: bool) -> list[list[str]]:
  """The listed stages in order; with `concurrent`, consecutive INDEPENDENT ones form one group."""
  groups: list[list[str]] = []
  for name in stages:
    if (concurrent and groups and name in INDEPENDENT
        and all(s in INDEPENDENT for s in groups[-1])):
      groups[-1].append(name)
    else:
      groups.append([name])
  return groups


def runs_concurrently(config) -> bool:
  """config.concurrent_stages on a one-process, one-device CPU run. Not on accelerators
  (two stages' models at once could exhaust device memory where one stage fits) nor across
  devices or hosts (two programs' collectives interleaved on the same devices can wait on
  each other; every host must issue them in the same order)."""
  return (bool(config.get("concurrent_stages", False)) and jax.process_count() == 1
          and jax.device_count() == 1 and jax.default_backend() == "cpu")


def _run_stages(ctx, stages, guard) -> None:
  config = ctx.config
  groups = stage_groups(stages, runs_concurrently(config))
  for g, group in enumerate(groups):
    todo = []
    for name in group:
      if ctx.is_done(name):
        print(f"[{name}] finished earlier ({ctx.stage_dir(name)}/summary.json); skipping", flush=True)
        continue
      for dep in _stage_requires(config, name):
        if not ctx.is_done(dep):
          raise FileNotFoundError(
              f"stage {name} needs the output of stage {dep}, but {ctx.stage_dir(dep)}/summary.json "
              f"does not exist; run it first (add it to --config.stages)")
      todo.append(name)
    if len(todo) > 1:
      _run_at_once(ctx, todo, guard)
    elif todo:
      _run_stage(ctx, todo[0])
    if todo and guard.requested() and g != len(groups) - 1:
      raise loop.Preempted(f"{', '.join(todo)}: finished and saved, then preempted (SIGTERM); "
                           f"re-run the same command to continue with the next stage")
  if "evaluate" in stages or set(stages) >= {"ppo", "best_of_k"} or set(stages) & {"dpo", "grpo", "online"}:
    from rlhf_jax import report
    report.write_report(ctx)


def _run_stage(ctx, name: str) -> None:
  """Run one stage; its config.json, then its summary.json (which marks it finished)."""
  config = ctx.config
  os.makedirs(ctx.stage_dir(name), exist_ok=True)
  t0 = time.time()
  print(f"[{name}] starting", flush=True)
  module = importlib.import_module(f"rlhf_jax.stages.{name}")
  summary = module.run(ctx)
  if _has_gold_figures(summary):  # every gold figure names its scorer (label.annotator)
    summary["gold_scorer"] = ctx.gold.name
  summary["wall_seconds"] = round(time.time() - t0, 2)
  # What the stage ran with, before the summary that marks it finished: later runs
  # are checked against it (check_workdir_config).
  write_json(os.path.join(ctx.stage_dir(name), "config.json"),
             json.loads(config.to_json_best_effort()))
  write_json(os.path.join(ctx.stage_dir(name), "summary.json"), summary)
  barrier(f"{name} finished")  # the next stage may read what process 0 wrote (label data)
  print(f"[{name}] done in {summary['wall_seconds']:.1f}s: "
        + ", ".join(f"{k}={v:.4g}" for k, v in summary.items()
                    if isinstance(v, (int, float)) and k != "wall_seconds"), flush=True)


def _join(threads) -> None:
  """Wait for the threads, waking every 0.1 s. Python runs a signal's handler in the main
  thread only, and the kernel may deliver the signal to any thread (XLA's, a stage's): a main
  thread blocked in a plain join() would then run the SIGTERM handler only once a stage ends,
  so the other stages would miss the preemption notice (seen: exit 0 after a SIGTERM)."""
  for t in threads:
    while t.is_alive():
      t.join(timeout=0.1)


def _run_at_once(ctx, names: list[str], guard) -> None:
  """Run INDEPENDENT stages in threads of this process (one JAX runtime, one device).

  A failing stage does not stop the others: they finish (or save and stop on SIGTERM or
  Ctrl-C), then the first error, in listed order, is raised; if every error is a
  preemption, one Preempted names each stage's step. What the stages share is
  built here first, so the threads never race to build it: the tokenizer (trained into
  the workdir on a first run), the gold scorer, the stage modules. Checkpoint saves take
  turns (orbax keeps per-save state process-wide, train/checkpoint.py)."""
  print(f"[{', '.join(names)}] running at once (config.concurrent_stages: one CPU device)",
        flush=True)
  ctx.sources.tokenizer  # pylint: disable=pointless-statement
  ctx.gold  # pylint: disable=pointless-statement
  for name in names:
    importlib.import_module(f"rlhf_jax.stages.{name}")
  errors: dict = {}

  def work(name):
    try:
      _run_stage(ctx, name)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised below, in order)
      errors[name] = e

  threads = [threading.Thread(target=work, args=(n,), name=f"stage {n}") for n in names]
  with checkpoint.exclusive_saves():  # orbax saves one at a time (train/checkpoint.py)
    for t in threads:
      t.start()
    try:
      _join(threads)
    except KeyboardInterrupt:
      guard.flag.set()  # the stages save and stop at their next step, as on SIGTERM
      _join(threads)
      raise
  failed = [(n, errors[n]) for n in names if n in errors]
  if failed and all(isinstance(e, loop.Preempted) for _, e in failed):
    # Every stage that stopped saved first: one line naming where each will resume.
    raise loop.Preempted("; ".join(
        str(e) if str(e).split(":")[0].split("/")[0] == n else f"{n}: {e}" for n, e in failed))
  for _, e in failed:  # a real failure before a preemption
    if not isinstance(e, loop.Preempted):
      raise e
