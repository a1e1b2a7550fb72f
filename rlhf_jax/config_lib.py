"""Config building blocks and validation.

Configs are `ml_collections.ConfigDict`s built in `configs/*.py`; the blocks
here keep those files short. `validate` runs before anything compiles and
raises `ConfigError` with one line naming the offending key.
"""
from __future__ import annotations

import math

import ml_collections as mlc

STAGES = ("pretrain", "sft", "label", "reward", "ppo", "best_of_k", "dpo", "grpo", "online",
          "evaluate")


class ConfigError(ValueError):
  pass


def optimizer(lr: float, *, warmup_steps: int = 0, schedule: str = "cosine", end_lr_frac: float = 0.1,
              b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, weight_decay: float = 0.0,
              clip_norm: float = 1.0) -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(lr=lr, warmup_steps=warmup_steps, schedule=schedule,
                             end_lr_frac=end_lr_frac, b1=b1, b2=b2, eps=eps,
                             weight_decay=weight_decay, clip_norm=clip_norm))


def train(steps: int, batch_size: int, lr: float, *, grad_accum: int = 1, log_every: int = 10,
          eval_every: int = 0, eval_batches: int = 4, ckpt_every: int = 100,
          nonfinite: str = "stop", **opt) -> mlc.ConfigDict:
  return mlc.ConfigDict(dict(
      steps=steps, batch_size=batch_size, grad_accum=grad_accum, log_every=log_every,
      eval_every=eval_every or steps, eval_batches=eval_batches, ckpt_every=ckpt_every,
      nonfinite=nonfinite,  # stop | skip: what a NaN/Inf loss or gradient does
      opt=optimizer(lr, **opt)))


def model(**kw) -> mlc.ConfigDict:
  base = dict(hf="",  # a local Hugging Face model folder: its config.json sets the architecture
              vocab_size=0,  # 0 = take it from the tokenizer
              d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=512, max_len=128,
              rope_theta=10000.0, tie_embeddings=True, dropout=0.0, dtype="float32",
              remat="none", attention="xla", norm_eps=1e-5,
              # One nn.scan over the layers (params stacked under "layers"): the backward
              # recomputes one layer at a time; see docs/performance.md (memory).
              scan_layers=False,
              # Family switches (rlhf_jax/model/transformer.py ModelConfig; set by
              # rlhf_jax.hf from a checkpoint's config.json). Defaults = Llama-style.
              head_dim=0,  # 0 = d_model // n_heads
              norm="rms", norm_offset=False, qkv_bias=False, o_bias=False, mlp="gated",
              mlp_bias=False, act="silu", positions="rope", qk_norm=False, embed_scale=False,
              rope_scaling="none", rope_factor=1.0, rope_low_freq_factor=1.0,
              rope_high_freq_factor=4.0, rope_original_max_len=8192,
              attn_scale=0.0, attn_softcap=0.0, final_softcap=0.0, sandwich_norm=False)
  base.update(kw)
  return mlc.ConfigDict(base)


# Stages that can train adapters; pretraining has no base to adapt, and the online stage
# trains every weight (stages/online.py).
LORA_STAGES = ("sft", "reward", "ppo", "best_of_k", "dpo", "grpo")


def lora(rank: int = 0, alpha: float = 16.0, dropout: float = 0.0, targets: str = "qkv,o,wi,down",
         stages: str = "sft,reward,ppo,best_of_k,dpo,grpo", quant: str = "none", block_size: int = 64,
         lr_scale: float = 10.0, sampling: str = "merge") -> mlc.ConfigDict:
  """LoRA (Hu et al. 2021) / QLoRA (Dettmers et al. 2023); rank 0 = full fine-tuning.

  targets: kernels that get adapters (qkv, o, wi, down, lm_head); stages: the stages that
  train adapters instead of every weight; quant: how the frozen base is stored (none |
  bfloat16 | int8 | nf4, block-wise absmax over block_size values); lr_scale: multiplies a
  LoRA stage's learning rate (adapters want a larger one, Hu et al. 2021 sec. 5);
  sampling: PPO / GRPO / online DPO rollouts on weights with the adapters merged once per
  iteration (merge) or applied in every decode step (on_the_fly). See docs/lora.md."""
  return mlc.ConfigDict(dict(rank=rank, alpha=alpha, dropout=dropout, targets=targets,
                             stages=stages, quant=quant, block_size=block_size,
                             lr_scale=lr_scale, sampling=sampling))


def _fail(key: str, msg: str):
  raise ConfigError(f"config.{key}: {msg}")


def _choice(cfg, key: str, options):
  value = cfg
  for part in key.split("."):
    value = value[part]
  if value not in options:
    _fail(key, f"{value!r} is not one of {', '.join(map(str, options))}")


def _positive(cfg, key: str, allow_zero: bool = False):
  value = cfg
  for part in key.split("."):
    value = value[part]
  if value < 0 or (value == 0 and not allow_zero):
    _fail(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(config, n_devices: int, n_processes: int = 1) -> None:
  """Everything that can be checked before compiling; raises ConfigError."""
  stages = [s.strip() for s in config.stages.split(",") if s.strip()]
  if not stages:
    _fail("stages", "empty; name at least one of " + ",".join(STAGES))
  for s in stages:
    if s not in STAGES:
      _fail("stages", f"unknown stage {s!r}; known: {','.join(STAGES)}")
  from rlhf_jax.train.sharding import resolve_mesh_shape
  try:
    mesh = resolve_mesh_shape(config.mesh, n_devices)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  dp = mesh[0] * mesh[1]
  tp = mesh[2]
  m = config.model
  for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_len"):
    _positive(config, f"model.{key}")
  _validate_model_family(config)
  if m.n_heads % m.n_kv_heads:
    _fail("model.n_kv_heads", f"{m.n_kv_heads} does not divide model.n_heads={m.n_heads}")
  if m.n_kv_heads % tp:
    _fail("model.n_kv_heads", f"{m.n_kv_heads} is not divisible by mesh.tensor={tp}")
  if m.d_ff % tp:
    _fail("model.d_ff", f"{m.d_ff} is not divisible by mesh.tensor={tp}")
  if m.d_model % mesh[1]:
    _fail("model.d_model", f"{m.d_model} is not divisible by mesh.fsdp={mesh[1]}")
  _choice(config, "model.dtype", ("float32", "bfloat16", "float16"))
  _choice(config, "model.remat", ("none", "full", "dots"))
  if not isinstance(m.get("scan_layers", False), bool):
    _fail("model.scan_layers", f"must be true or false, got {m.scan_layers!r}")
  _choice(config, "model.attention", ("xla", "cudnn"))
  if not 0.0 <= m.dropout < 1.0:
    _fail("model.dropout", f"must be in [0, 1), got {m.dropout}")
  _choice(config, "data.source", ("synthetic", "files"))
  for key in ("seq_len", "max_len", "prompt_len"):
    _positive(config, f"data.{key}")
  if config.data.seq_len > m.max_len:
    _fail("data.seq_len", f"{config.data.seq_len} exceeds model.max_len={m.max_len}")
  if config.data.max_len > m.max_len:
    _fail("data.max_len", f"{config.data.max_len} exceeds model.max_len={m.max_len}")
  if config.data.prompt_len >= config.data.max_len:
    _fail("data.prompt_len", f"{config.data.prompt_len} leaves no room for a response within "
          f"data.max_len={config.data.max_len}")
  d = config.data
  for key in ("max_prompt_len", "max_response_len"):
    if key in d:
      _positive(config, f"data.{key}", allow_zero=True)
  prompt_budget = d.get("max_prompt_len", 0) or d.prompt_len
  if prompt_budget >= d.max_len:
    _fail("data.max_prompt_len", f"a prompt budget of {prompt_budget} leaves no room for a "
          f"response within data.max_len={d.max_len}")
  if d.get("max_response_len", 0) and prompt_budget + d.max_response_len > d.max_len:
    _fail("data.max_response_len", f"{d.max_response_len} + the prompt budget {prompt_budget} "
          f"exceeds data.max_len={d.max_len}: rows are data.max_len wide")
  if prompt_budget + config.ppo.response_len > m.max_len:
    _fail("data.max_prompt_len", f"generation needs the prompt budget {prompt_budget} + "
          f"ppo.response_len={config.ppo.response_len} <= model.max_len={m.max_len}")
  _choice(config, "data.overlong", ("truncate", "drop"))
  for stage in ("pretrain", "sft", "reward"):
    _validate_train(config, stage, dp, n_processes)
  _validate_rl(config, dp, n_processes, stages)
  if "lora" in config:
    _validate_lora(config)
  _validate_ensemble(config)


def _validate_ensemble(config) -> None:
  """reward.ensemble / aggregate / uwo_coef / ensemble_data / member (stages/ensemble.py)."""
  rc = config.reward
  if "ensemble" not in rc:
    return
  if not isinstance(rc.ensemble, int) or rc.ensemble < 1:
    _fail("reward.ensemble", f"must be an integer >= 1 (members), got {rc.ensemble!r}")
  _choice(config, "reward.aggregate", ("mean", "wco", "uwo"))
  _choice(config, "reward.ensemble_data", ("shuffle", "bootstrap"))
  if not rc.uwo_coef >= 0:
    _fail("reward.uwo_coef", f"must be >= 0, got {rc.uwo_coef}")
  if rc.member != -1 and not (rc.ensemble > 1 and 0 <= rc.member < rc.ensemble):
    _fail("reward.member", f"-1 (every member) or a member 0..reward.ensemble-1 of an ensemble "
          f"(reward.ensemble > 1), got {rc.member} with reward.ensemble={rc.ensemble}")
  lc = config.get("lora")
  if (rc.ensemble > 1 and lc is not None and lc.rank > 0
      and {"reward", "ppo"} & {s.strip() for s in lc.stages.split(",")}):
    _fail("reward.ensemble", "ensembles train and score full weights: remove reward and ppo "
          "from lora.stages (LoRA reward ensembles are not supported)")
  if rc.ensemble > 1 and "online" in {s.strip() for s in config.stages.split(",")}:
    _fail("reward.ensemble", "the online stage retrains one reward model per round; an ensemble "
          "would score only its first round (run ensembles with ppo / best_of_k)")


def _validate_model_family(config) -> None:
  m = config.model
  head_dim = m.get("head_dim", 0)
  if head_dim < 0:
    _fail("model.head_dim", f"must be >= 0 (0 = d_model // n_heads), got {head_dim}")
  if not head_dim and m.d_model % m.n_heads:
    _fail("model.n_heads", f"{m.n_heads} does not divide model.d_model={m.d_model}")
  head_dim = head_dim or m.d_model // m.n_heads
  if m.get("positions", "rope") == "rope" and head_dim % 2:
    _fail("model.head_dim" if m.get("head_dim", 0) else "model.n_heads",
          f"head_dim={head_dim} must be even for rotary embeddings")
  for key, options in (("norm", ("rms", "layer")), ("mlp", ("gated", "plain")),
                       ("act", ("silu", "gelu_tanh", "gelu")), ("positions", ("rope", "learned")),
                       ("rope_scaling", ("none", "linear", "llama3"))):
    if key in m:
      _choice(config, f"model.{key}", options)
  if m.get("rope_scaling", "none") != "none" and m.rope_factor <= 0:
    _fail("model.rope_factor", f"must be > 0, got {m.rope_factor}")
  if m.get("rope_scaling", "none") == "llama3":
    if m.rope_high_freq_factor <= m.rope_low_freq_factor:
      _fail("model.rope_high_freq_factor", f"{m.rope_high_freq_factor} must exceed "
            f"model.rope_low_freq_factor={m.rope_low_freq_factor}")
    _positive(config, "model.rope_original_max_len")
  for key in ("attn_scale", "attn_softcap", "final_softcap"):
    if m.get(key, 0.0) < 0:
      _fail(f"model.{key}", f"must be >= 0 (0 = off/default), got {m[key]}")


def _validate_lora(config) -> None:
  lc = config.lora
  _positive(config, "lora.rank", allow_zero=True)
  if lc.rank == 0:
    return
  _positive(config, "lora.alpha")
  _positive(config, "lora.lr_scale")
  if lc.dropout != 0.0:
    _fail("lora.dropout", "adapter dropout is not implemented; use 0.0")
  from rlhf_jax.train.lora import TARGETS, QUANT
  targets = [t.strip() for t in lc.targets.split(",") if t.strip()]
  if not targets:
    _fail("lora.targets", f"empty; name some of {','.join(TARGETS)}")
  for t in targets:
    if t not in TARGETS:
      _fail("lora.targets", f"unknown target {t!r}; known: {','.join(TARGETS)}")
  if "lm_head" in targets and config.model.tie_embeddings:
    _fail("lora.targets", "lm_head: the model ties its embeddings (model.tie_embeddings=True), "
          "so there is no lm_head kernel to adapt")
  for s in (s.strip() for s in lc.stages.split(",") if s.strip()):
    if s not in LORA_STAGES:
      _fail("lora.stages", f"{s!r} cannot train adapters; choose from {','.join(LORA_STAGES)} "
            "(pretraining has no base to adapt; the online stage trains every weight)")
  _choice(config, "lora.quant", QUANT)
  _choice(config, "lora.sampling", ("merge", "on_the_fly"))
  _positive(config, "lora.block_size")
  if lc.quant == "nf4" and lc.block_size % 2:
    _fail("lora.block_size", f"NF4 packs two values per byte; use an even size, got {lc.block_size}")


def _validate_train(config, stage: str, dp: int, n_processes: int) -> None:
  t = config[stage]
  for key in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
    _positive(config, f"{stage}.{key}")
  _check_batch(config, f"{stage}.batch_size", t.batch_size, dp * t.grad_accum, n_processes)
  _choice(config, f"{stage}.nonfinite", ("stop", "skip"))
  _validate_opt(config, f"{stage}.opt")


def _validate_opt(config, key: str) -> None:
  o = config
  for part in key.split("."):
    o = o[part]
  _positive(config, f"{key}.lr")
  _positive(config, f"{key}.eps")
  _positive(config, f"{key}.warmup_steps", allow_zero=True)
  _choice(config, f"{key}.schedule", ("cosine", "linear", "constant"))
  if not (0 <= o.b1 < 1 and 0 <= o.b2 < 1):
    _fail(f"{key}.b1", "Adam betas must be in [0, 1)")


def _check_batch(config, key: str, value: int, multiple: int, n_processes: int) -> None:
  if value % multiple:
    _fail(key, f"{value} is not divisible by {multiple} (data-parallel size x grad_accum/minibatches)")
  if value % n_processes:
    _fail(key, f"{value} is not divisible by the {n_processes} processes")


def _score_chunks(config, key: str, rows: int, dp: int) -> None:
  """`ppo.score_chunks` / `grpo.score_chunks` (optional, default 1): the scoring passes
  run over rows / chunks rows at a time, each chunk split over the data-parallel devices."""
  section, field = key.split(".")
  n = config[section].get(field, 1)
  if not isinstance(n, int) or isinstance(n, bool) or n < 1:
    _fail(key, f"must be a positive integer, got {n!r}")
  if rows % (n * dp):
    _fail(key, f"{n} chunks of the rollout's {rows} rows must each hold a multiple of the "
          f"data-parallel size {dp} (rows % (score_chunks x {dp}) != 0)")


def _validate_rl(config, dp: int, n_processes: int, stages=()) -> None:
  lab = config.label
  if not 2 <= lab.k <= 9:
    _fail("label.k", f"K must be between 2 and 9 (InstructGPT used 4 to 9), got {lab.k}")
  _check_batch(config, "label.batch_size", lab.batch_size, dp, n_processes)
  p = config.ppo
  for key in ("iterations", "rollout_batch", "minibatches", "epochs", "response_len"):
    _positive(config, f"ppo.{key}")
  _check_batch(config, "ppo.rollout_batch", p.rollout_batch, dp * p.minibatches, n_processes)
  _score_chunks(config, "ppo.score_chunks", p.rollout_batch, dp)
  if p.ptx_coef < 0:
    _fail("ppo.ptx_coef", f"must be >= 0, got {p.ptx_coef}")
  if p.ptx_coef > 0:
    _positive(config, "ppo.ptx_batch")
    _check_batch(config, "ppo.ptx_batch", p.ptx_batch, dp, n_processes)
  if config.data.prompt_len + p.response_len > config.model.max_len:
    _fail("ppo.response_len", f"data.prompt_len + ppo.response_len = "
          f"{config.data.prompt_len + p.response_len} exceeds model.max_len={config.model.max_len}")
  _choice(config, "ppo.kl_mode", ("fixed", "adaptive"))
  _choice(config, "ppo.kl_estimator", ("k1", "k3"))
  _choice(config, "ppo.critic", ("separate", "shared"))
  _choice(config, "ppo.nonfinite", ("stop", "skip"))
  if p.temperature <= 0:
    _fail("ppo.temperature", f"must be > 0, got {p.temperature}")
  if not (0 < p.gae_gamma <= 1 and 0 <= p.gae_lambda <= 1):
    _fail("ppo.gae_gamma", "gamma must be in (0, 1] and lambda in [0, 1]")
  _validate_opt(config, "ppo.opt")
  b = config.best_of_k
  if b.eval_pool < 2 or b.eval_pool & (b.eval_pool - 1):
    _fail("best_of_k.eval_pool", f"pool size N must be a power of two >= 2, got {b.eval_pool}")
  _positive(config, "best_of_k.k")
  _choice(config, "best_of_k.keep", ("best", "threshold", "top_frac"))
  _check_batch(config, "best_of_k.sample_batch", b.sample_batch, dp, n_processes)
  _check_batch(config, "best_of_k.train.batch_size", b.train.batch_size, dp * b.train.grad_accum,
               n_processes)
  _validate_opt(config, "best_of_k.train.opt")
  _check_batch(config, "evaluate.batch_size", config.evaluate.batch_size, dp, n_processes)
  for name, check in (("dpo", _validate_dpo), ("grpo", _validate_grpo), ("online", _validate_online)):
    if name in config:
      check(config, dp, n_processes)
    elif name in stages:
      _fail("stages", f"stage {name} is listed but the config has no `{name}` section "
            f"(see configs/tiny.py)")
  if math.isnan(config.ppo.missing_eos_penalty):
    _fail("ppo.missing_eos_penalty", "must be a number")


def _response_len(config, key: str) -> None:
  _positive(config, key)
  section, field = key.split(".")
  total = config.data.prompt_len + config[section][field]
  if total > config.model.max_len:
    _fail(key, f"data.prompt_len + {key} = {total} exceeds model.max_len={config.model.max_len}")


def _validate_dpo(config, dp: int, n_processes: int) -> None:
  _validate_train(config, "dpo", dp, n_processes)
  d = config.dpo
  _positive(config, "dpo.beta")
  _choice(config, "dpo.loss_type", ("sigmoid", "ipo"))
  _choice(config, "dpo.pairs", ("all", "best_vs_rest"))
  if not 0.0 <= d.label_smoothing < 0.5:
    _fail("dpo.label_smoothing", f"must be in [0, 0.5) (the flip probability), got {d.label_smoothing}")
  if d.loss_type == "ipo" and d.label_smoothing:
    _fail("dpo.label_smoothing", "applies to loss_type=sigmoid only (cDPO); IPO has no labels to smooth")
  if not 0.0 < d.eval_frac < 1.0:
    _fail("dpo.eval_frac", f"must be in (0, 1), got {d.eval_frac}")
  _response_len(config, "dpo.response_len")


def _validate_grpo(config, dp: int, n_processes: int) -> None:
  g = config.grpo
  for key in ("iterations", "prompts_per_iteration", "minibatches", "epochs", "log_every",
              "ckpt_every"):
    _positive(config, f"grpo.{key}")
  if g.k < 2:
    _fail("grpo.k", f"a group needs K >= 2 samples per prompt (the baseline), got {g.k}")
  n = g.prompts_per_iteration * g.k  # sequences per rollout
  if n % (dp * g.minibatches) or g.prompts_per_iteration % n_processes:
    _fail("grpo.prompts_per_iteration", f"prompts_per_iteration x k = {n} must be divisible by "
          f"data-parallel size x minibatches = {dp * g.minibatches}, and prompts_per_iteration "
          f"by the {n_processes} processes")
  _response_len(config, "grpo.response_len")
  _score_chunks(config, "grpo.score_chunks", n, dp)
  _choice(config, "grpo.advantage", ("grpo", "rloo", "dr_grpo"))
  _choice(config, "grpo.kl_mode", ("loss", "reward"))
  _choice(config, "grpo.loss_agg", ("token", "sequence", "constant"))
  _choice(config, "grpo.nonfinite", ("stop", "skip"))
  _positive(config, "grpo.kl_coef", allow_zero=True)
  _positive(config, "grpo.clip_eps")
  if g.temperature <= 0:
    _fail("grpo.temperature", f"must be > 0, got {g.temperature}")
  if math.isnan(g.missing_eos_penalty):
    _fail("grpo.missing_eos_penalty", "must be a number")
  _validate_opt(config, "grpo.opt")


def _validate_online(config, dp: int, n_processes: int) -> None:
  o = config.online
  for key in ("rounds", "ppo_iterations"):
    _positive(config, f"online.{key}")
  for key in ("prompts_per_round", "reward_steps"):
    _positive(config, f"online.{key}", allow_zero=True)
  _choice(config, "online.rm_init", ("continue", "sft"))
  if o.prompts_per_round > config.data.reward_prompts and config.data.source == "synthetic":
    _fail("online.prompts_per_round", f"{o.prompts_per_round} exceeds data.reward_prompts="
          f"{config.data.reward_prompts} (0 = all of them)")
  stages = [s.strip() for s in config.stages.split(",")]
  if "online" in stages and config.data.source != "synthetic":
    _fail("data.source", f"{config.data.source!r}: the online stage needs annotators for its "
          "policy's samples, which only the synthetic world's gold scorer plays")
