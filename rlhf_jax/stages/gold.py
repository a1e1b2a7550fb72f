"""The gold scorer: the synthetic world's, or a reward model (`config.label.annotator`).

Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization") replace human
labels with a large "gold" reward model: it labels the comparisons a smaller proxy
RM learns from, and it scores every policy, so proxy-vs-gold over-optimisation can
be measured on real prompts. `label.annotator` picks who plays that role:

  "world"            the synthetic world's scorer (data.source=synthetic only; default)
  DIR or DIR/reward  the reward stage of another rlhf_jax workdir: its config.json gives
                     the model shape, its tokenizer (data.tokenizer or DIR/tokenizer.model)
                     and prompt format, its reward summary the gain/bias (the normalised
                     score the proxy RMs of that workdir were used with)
  HF_DIR             a Hugging Face *ForSequenceClassification folder (config.json,
                     *.safetensors, tokenizer files); raw scores (no normalisation)

A reward-model gold scores TEXT: prompt + response (+ EOS where the response ended,
as the proxy RM sees it) re-tokenized with its own tokenizer, so it may differ from
the policy in size and vocabulary. Stages use `ctx.gold` (pipeline.Context):
`.available`, `.name` and `.score(prompts, responses, ended) -> np.ndarray | None`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import types

import jax
import ml_collections
import numpy as np

from rlhf_jax.config_lib import ConfigError
from rlhf_jax.data import world
from rlhf_jax.data.batching import fit_row
from rlhf_jax.model.transformer import ModelConfig, param_count
from rlhf_jax.train import sharding as sh
from rlhf_jax.train import state as st

WORLD = "world"
_KEY = "config.label.annotator"


def annotator(config) -> str:
  """The configured annotator (configs written before the field existed: the world)."""
  return config.label.get("annotator", WORLD) or WORLD


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{_KEY}: {path}: cannot read ({e})") from None


@dataclasses.dataclass
class Spec:
  """Where an annotator reward model lives. kind: "workdir" | "hf"."""
  kind: str
  path: str  # the workdir's reward stage dir, or the HF folder
  workdir: str = ""
  config: dict | None = None  # the workdir's config (the reward stage's, as it finished)


def resolve(value: str) -> Spec | None:
  """`label.annotator` -> None for the world, else where the reward model is.
  A bad value raises ConfigError naming label.annotator and the path."""
  if value == WORLD:
    return None
  path = os.path.abspath(os.path.expanduser(value))
  if not os.path.isdir(path):
    raise ConfigError(f"{_KEY}: {value!r} is neither \"world\" nor an existing folder "
                      f"(an rlhf_jax workdir with a finished reward stage, or a Hugging Face "
                      f"*ForSequenceClassification folder)")
  if os.path.isfile(os.path.join(path, "reward", "summary.json")):
    stage_dir, workdir = os.path.join(path, "reward"), path
  elif (os.path.isfile(os.path.join(path, "summary.json"))
        and os.path.isdir(os.path.join(path, "checkpoints"))):
    stage_dir, workdir = path, os.path.dirname(path)
  elif os.path.isfile(os.path.join(path, "config.json")) and not os.path.isdir(
      os.path.join(path, "reward")):
    info = _read_json(os.path.join(path, "config.json"))
    archs = info.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
      raise ConfigError(f"{_KEY}: {path}/config.json: architectures {archs} has no "
                        f"*ForSequenceClassification: not a reward model")
    return Spec("hf", path)
  else:
    raise ConfigError(f"{_KEY}: {path}: no finished reward stage ({path}/reward/summary.json "
                      f"missing: run --config.stages=...,reward there first) and not a Hugging "
                      f"Face *ForSequenceClassification folder")
  summary = _read_json(os.path.join(stage_dir, "summary.json"))
  for k in ("reward_gain", "reward_bias"):
    if k not in summary:
      raise ConfigError(f"{_KEY}: {stage_dir}/summary.json has no {k}: not a reward stage")
  cfg_path = os.path.join(stage_dir, "config.json")
  if not os.path.isfile(cfg_path):
    cfg_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg_path):
    raise ConfigError(f"{_KEY}: {workdir}/config.json missing: cannot tell the reward "
                      f"model's shape")
  return Spec("workdir", stage_dir, workdir, _read_json(cfg_path))


def check(config, mesh_shape=None) -> None:
  """Fail before compilation on a bad `label.annotator` (called by pipeline.setup)."""
  spec = resolve(annotator(config))
  if spec is None:
    return
  if spec.kind == "workdir":
    m, data = spec.config.get("model", {}), spec.config.get("data", {})
    tok = data.get("tokenizer") or os.path.join(spec.workdir, "tokenizer.model")
    if not os.path.exists(os.path.expanduser(tok)):
      raise ConfigError(f"{_KEY}: {spec.workdir}: its tokenizer {tok} does not exist")
  else:
    from rlhf_jax import hf
    try:
      cfg, _ = hf.read_config(spec.path, max_len=config.model.max_len)
    except ConfigError as e:  # HFError: name the key that pointed there
      raise ConfigError(f"{_KEY}: {e}") from None
    m = dataclasses.asdict(cfg)
    if not any(os.path.isfile(os.path.join(spec.path, f))
               for f in ("tokenizer.json", "tokenizer.model")):
      raise ConfigError(f"{_KEY}: {spec.path}: no tokenizer.json or tokenizer.model; the gold "
                        f"reward model scores text with its own tokenizer")
  if mesh_shape is not None:  # the gold RM is sharded on the run's mesh like the policy
    _, fsdp, tp = mesh_shape
    for key, div, axis in (("n_kv_heads", tp, "tensor"), ("d_ff", tp, "tensor"),
                           ("d_model", fsdp, "fsdp")):
      if key in m and m[key] % div:
        raise ConfigError(f"{_KEY}: {spec.path}: its model.{key}={m[key]} is not divisible "
                          f"by mesh.{axis}={div}")


class WorldGold:
  """The synthetic world's scorer (none for real data: data.source=files)."""

  def __init__(self, ctx):
    self.available = ctx.config.data.source == "synthetic"
    self.name = WORLD

  def score(self, prompts, responses, ended=None):
    if not self.available:
      return None
    return world.gold_score(list(prompts), list(responses),
                            None if ended is None else np.asarray(ended, bool))


class RewardModelGold:
  """A frozen reward model from another workdir or a Hugging Face folder, scoring text."""

  available = True

  def __init__(self, ctx, spec: Spec):
    from rlhf_jax.data.tokenizer import load_tokenizer
    self.mesh = ctx.mesh
    self.batch_size = ctx.config.label.batch_size  # validated: a multiple of the data-parallel size
    if spec.kind == "workdir":
      cfg = ml_collections.ConfigDict(spec.config)
      tok_path = cfg.data.get("tokenizer") or os.path.join(spec.workdir, "tokenizer.model")
      self.tokenizer = load_tokenizer(os.path.expanduser(tok_path))
      model_cfg = ModelConfig.from_config(
          cfg.model, vocab_size=cfg.model.get("vocab_size") or self.tokenizer.vocab_size)
      self.model = st.make_model(model_cfg, ctx.mesh)
      # The reward stage's params as that workdir's later stages load them (LoRA merged).
      from rlhf_jax.stages import common
      other = types.SimpleNamespace(config=cfg, model_cfg=model_cfg,
                                    stage_dir=lambda n: os.path.join(spec.workdir, n))
      self.params, _ = common.load_params(other, os.path.basename(spec.path), self.model)
      summary = _read_json(os.path.join(spec.path, "summary.json"))
      self.gain, self.bias = float(summary["reward_gain"]), float(summary["reward_bias"])
      d = cfg.data
      self.synthetic = d.get("source", "synthetic") == "synthetic"
      self.width = d.max_len
      self.max_prompt_len = d.get("max_prompt_len", 0) or d.prompt_len
      self.max_response_len = d.get("max_response_len", 0)
    else:
      from rlhf_jax import hf
      self.tokenizer = load_tokenizer(spec.path)
      d = ctx.config.data
      model_cfg, info = hf.read_config(spec.path, max_len=ctx.config.model.max_len)
      self.model = st.make_model(model_cfg, ctx.mesh)
      self.params = hf.load_params(spec.path, self.model, info)
      self.gain, self.bias = 1.0, 0.0  # raw: the HF head's own units
      self.synthetic = False
      self.width = min(d.max_len, model_cfg.max_len)  # the run's budgets, in the RM's tokens
      self.max_prompt_len = d.get("max_prompt_len", 0) or d.prompt_len
      self.max_response_len = d.get("max_response_len", 0)
    self.name = (f"{spec.path} ({'HF ' if spec.kind == 'hf' else ''}RM, {model_cfg.n_layers} "
                 f"layers x d_model {model_cfg.d_model}, {param_count(model_cfg) / 1e6:.3g}M params)")
    from rlhf_jax.stages.policy_eval import reward_scores
    self._score = jax.jit(functools.partial(reward_scores, self.model, gain=self.gain,
                                            bias=self.bias))

  def rows(self, prompts, responses, ended) -> dict:
    """Right-padded rows [BOS] prompt response [EOS if ended] in the RM's tokens and budgets."""
    tok = self.tokenizer
    p_ids = tok.encode_batch([p + world.SEP.rstrip() if self.synthetic else p for p in prompts])
    r_ids = tok.encode_batch(list(responses))
    tokens = np.full((len(p_ids), self.width), tok.pad_id, np.int32)
    mask = np.zeros(tokens.shape, bool)
    for i, (p, r, e) in enumerate(zip(p_ids, r_ids, ended)):
      head, tail, _, _ = fit_row(p, r, bool(e), self.width, tok.bos_id, tok.eos_id,
                                 self.max_prompt_len, self.max_response_len)
      row = head + tail
      tokens[i, :len(row)], mask[i, :len(row)] = row, True
    return {"tokens": tokens, "mask": mask}

  def score(self, prompts, responses, ended=None) -> np.ndarray:
    n = len(responses)
    if n == 0:
      return np.zeros(0, np.float32)
    ended = np.ones(n, bool) if ended is None else np.asarray(ended, bool)
    out = []
    # Fixed [batch_size, width] batches (the last one wrapped around): compiled once.
    for _, keep, host in sh.global_batches(self.rows(prompts, responses, ended),
                                           self.batch_size, self.mesh):
      b = sh.put_batch(host, self.mesh)
      out.append(sh.to_host(self._score(self.params, b["tokens"], b["mask"])[0])[:keep])
    return np.concatenate(out).astype(np.float64)


def build(ctx):
  """The gold scorer `config.label.annotator` names (pipeline.Context.gold builds it once)."""
  spec = resolve(annotator(ctx.config))
  return WorldGold(ctx) if spec is None else RewardModelGold(ctx, spec)
