"""Throughput benchmark: `python -m rlhf_jax.bench --config configs/bench.py:PRESET --workdir DIR`.

Sections (config.sections): `train` (LM step), `reward` (reward-model step),
`sampler` (tokens generated per second at each batch size), `ppo` (one full
PPO iteration, fused as the PPO stage runs it, and its parts: rollout, scoring
forwards, update). Every function is compiled ahead of time (compile time is
reported, never timed), called `warmup` times, then timed over `steps` calls,
each ended with `jax.block_until_ready`. Writes DIR/bench.json and prints a
table. Random weights, random tokens. MFU = achieved model FLOP/s / peak, the
model FLOPs of `flops_per_token` (attention included, backward = 2x forward);
see docs/performance.md.
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from rlhf_jax import hostenv
from rlhf_jax.config_lib import ConfigError
from rlhf_jax.losses import lm_loss
from rlhf_jax.model.transformer import ModelConfig, flops_per_token, param_count
from rlhf_jax.sampling import SampleConfig, make_generate
from rlhf_jax.stages import reward as reward_stage
from rlhf_jax.stages.ppo_step import make_iteration
from rlhf_jax.train import sharding as sh
from rlhf_jax.train import state as st
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.step import compile_step, make_train_step

SECTIONS = ("train", "reward", "sampler", "ppo")

# device_kind substring (lower case; first match wins) -> dense bf16 FLOP/s per device,
# from the vendors' spec sheets (NVIDIA's "with sparsity" figures halved).
PEAK_FLOPS = (
    ("h100 pcie", 756e12), ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
    ("tpu v4", 275e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12), ("tpu v5", 459e12),
    ("tpu v6", 918e12),
)
# Measured bf16 matmul ceilings (this project's own measurement), reported next to the spec MFU.
CEILINGS = (("h200", 780e12),)


# ----------------------------------------------------------------------------- helpers

def _sections(config) -> list[str]:
  names = [s.strip() for s in config.sections.split(",") if s.strip()]
  for s in names:
    if s not in SECTIONS:
      raise ConfigError(f"config.sections: unknown section {s!r}; known: {','.join(SECTIONS)}")
  return names


def _batch_sizes(config) -> list[int]:
  try:
    sizes = [int(s) for s in str(config.sampler.batch_sizes).replace(" ", "").split(",") if s]
  except ValueError:
    raise ConfigError(f"config.sampler.batch_sizes: {config.sampler.batch_sizes!r} is not a "
                      f"comma-separated list of integers") from None
  if not sizes or min(sizes) <= 0:
    raise ConfigError("config.sampler.batch_sizes: give at least one positive batch size")
  return sizes


def validate(config, dp: int) -> None:
  """The checks that need no compilation; raises ConfigError naming the key."""
  names = _sections(config)
  m = config.model
  if m.vocab_size <= 0:
    raise ConfigError("config.model.vocab_size: the benchmark needs an explicit vocabulary size")
  if m.d_model % m.n_heads or m.n_heads % m.n_kv_heads:
    raise ConfigError(f"config.model.n_heads: {m.n_heads} heads / {m.n_kv_heads} kv heads do not "
                      f"divide d_model={m.d_model}")
  for key in ("warmup", "steps"):
    if config[key] < (0 if key == "warmup" else 1):
      raise ConfigError(f"config.{key}: must be positive, got {config[key]}")
  lengths = {"train": config.train.seq_len, "reward": config.reward.seq_len,
             "sampler": config.sampler.prompt_len + config.sampler.new_tokens,
             "ppo": config.ppo.prompt_len + config.ppo.response_len}
  for s in names:
    if lengths[s] > m.max_len:
      raise ConfigError(f"config.{s}: sequence of {lengths[s]} tokens exceeds "
                        f"model.max_len={m.max_len}")
  batches = {"train": [config.train.batch_size * 1], "reward": [config.reward.batch_size],
             "sampler": _batch_sizes(config),
             "ppo": [config.ppo.rollout_batch // config.ppo.minibatches]}
  for s in names:
    for b in batches[s]:
      if b <= 0 or b % dp:
        raise ConfigError(f"config.{s}: batch {b} is not a positive multiple of the "
                          f"{dp} data-parallel devices")
  if config.train.batch_size % config.train.grad_accum:
    raise ConfigError(f"config.train.grad_accum: {config.train.grad_accum} does not divide "
                      f"train.batch_size={config.train.batch_size}")
  if config.ppo.rollout_batch % config.ppo.minibatches:
    raise ConfigError(f"config.ppo.minibatches: {config.ppo.minibatches} does not divide "
                      f"ppo.rollout_batch={config.ppo.rollout_batch}")
  if config.ppo.ptx_coef:
    raise ConfigError("config.ppo.ptx_coef: PPO-ptx is not benchmarked; leave it at 0")
  if config.ppo.frozen_dtype not in ("float32", "bfloat16"):
    raise ConfigError(f"config.ppo.frozen_dtype: {config.ppo.frozen_dtype!r} is not float32 or "
                      f"bfloat16")


def _matmul_flops(dtype, n: int, reps: int = 3) -> float:
  f = jax.jit(lambda a, b: a @ b)
  a = jnp.ones((n, n), dtype)
  jax.block_until_ready(f(a, a))
  best = min(_timed(lambda: f(a, a)) for _ in range(reps))
  return 2 * n ** 3 / best


def detect_peak(override: float = 0.0) -> dict:
  """Peak FLOP/s per device for MFU, where it came from, and a measured ceiling if known."""
  dev = jax.devices()[0]
  kind = dev.device_kind.lower()
  ceiling = next((v for sub, v in CEILINGS if sub in kind), None)
  if override > 0:
    return {"peak_flops": float(override), "peak_source": "config.peak_flops", "ceiling_flops": ceiling}
  for sub, v in PEAK_FLOPS:
    if sub in kind:
      return {"peak_flops": v, "peak_source": f"spec sheet, bf16 dense, {dev.device_kind}",
              "ceiling_flops": ceiling}
  if dev.platform == "cpu":
    return {"peak_flops": _matmul_flops(jnp.float32, 2048),
            "peak_source": "measured: float32 2048x2048 matmul on this CPU", "ceiling_flops": None}
  return {"peak_flops": _matmul_flops(jnp.bfloat16, 8192),
          "peak_source": f"measured: bfloat16 8192x8192 matmul ({dev.device_kind} not in the table)",
          "ceiling_flops": None}


def _timed(fn) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def _measure(fn, warmup: int, steps: int) -> dict:
  """fn() runs one call; per-call seconds after `warmup` untimed calls.

  `cpu_s` is the process CPU time (all threads, user + system) per call: on a
  CPU shared with other jobs the wall time stretches with the load, while the
  CPU time stays close to the work the call does, so it is the figure to
  compare across runs on a busy machine (docs/performance.md, "Timing").
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  c0 = time.process_time()
  times = [_timed(fn) for _ in range(steps)]
  cpu = (time.process_time() - c0) / steps
  return {"step_s": statistics.median(times), "step_s_mean": statistics.fmean(times),
          "step_s_min": min(times), "cpu_s": cpu, "steps": steps}


def compiler_options(text: str) -> dict:
  """config.compiler_options "name=value,..." -> XLA options (ints, floats, bools or strings)."""
  out = {}
  for item in filter(None, (s.strip() for s in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"config.compiler_options: {item!r} is not name=value")
    low = value.lower()
    if low in ("true", "false"):
      out[name] = low == "true"
      continue
    for kind in (int, float):
      try:
        out[name] = kind(value)
        break
      except ValueError:
        pass
    else:
      out[name] = value
  return out


def _compile(jitted, *args, options: dict | None = None):
  """AOT-compile; (compiled, {compile_s, compiled_bytes: XLA's own memory analysis})."""
  t0 = time.perf_counter()
  compiled = jitted.lower(*args).compile(compiler_options=options or None)
  info = {"compile_s": time.perf_counter() - t0, "compiled_bytes": None}
  try:
    m = compiled.memory_analysis()
    info["compiled_bytes"] = {
        "arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
        "temp": int(m.temp_size_in_bytes), "alias": int(m.alias_size_in_bytes),
        "total": int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                     - m.alias_size_in_bytes)}
  except Exception:  # pylint: disable=broad-except  # not every backend reports it
    pass
  return compiled, info


def peak_bytes():
  """Device peak bytes in use since the process started (None where unsupported, e.g. CPU)."""
  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


@dataclasses.dataclass
class Env:
  config: object
  mesh: object
  model_cfg: ModelConfig
  model: object
  peak: dict
  rng: np.random.Generator

  def compile(self, jitted, *args):
    return _compile(jitted, *args, options=compiler_options(self.config.compiler_options))

  def steps(self, section_cfg) -> int:
    return int(section_cfg.get("steps", 0) or self.config.steps)

  def tokens(self, *shape):
    return self.rng.integers(0, self.model_cfg.vocab_size, shape, dtype=np.int32)

  def key(self, i: int):
    return jax.device_put(jax.random.key(self.config.seed + i), sh.replicated(self.mesh))

  def fwd(self, seq: float, head: bool = True) -> float:
    """Forward FLOPs per token at context `seq`; head=False skips the LM head (scalar models)."""
    f = flops_per_token(self.model_cfg, int(seq)) / 3
    return f if head else f - 2 * self.model_cfg.vocab_size * self.model_cfg.d_model

  def mfu(self, flops_per_s: float) -> dict:
    out = {"mfu": flops_per_s / self.peak["peak_flops"] / jax.device_count()}
    if self.peak["ceiling_flops"]:
      out["mfu_vs_ceiling"] = flops_per_s / self.peak["ceiling_flops"] / jax.device_count()
    return out


def _fresh_state(model, optimizer, params):
  fresh = lambda p: {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32)}
  init, abstract = st.jit_init(fresh, st.abstract_params(model))
  return (init(params) if params is not None else None), abstract


def _step_section(env: Env, name: str, loss_fn, batch: dict, tokens: int, flops_per_tok: float,
                  grad_accum: int = 1) -> dict:
  """Compile and time one generic train step (`make_train_step` + `compile_step`)."""
  c = env.config
  optimizer = make_optimizer(c.opt, 1_000)
  step = make_train_step(loss_fn, optimizer, grad_accum=grad_accum)
  params = None if c.compile_only else st.init_params(env.model, jax.random.key(c.seed))
  state, abstract = _fresh_state(env.model, optimizer, params)
  batch = sh.put_batch(batch, env.mesh)
  jitted = compile_step(step, env.mesh, st.shardings_of(abstract), batch)
  compiled, info = env.compile(jitted, abstract, _abstract(batch), _abstract(env.key(0)))
  res = {"tokens_per_step": tokens, "flops_per_token": flops_per_tok, **info}
  if c.compile_only:
    return res
  rng = env.key(1)
  holder = {"state": state}

  def one():
    holder["state"], m = compiled(holder["state"], batch, rng)
    return m["loss"]

  res.update(_measure(one, c.warmup, env.steps(c[name])))
  res["tokens_per_s"] = tokens / res["step_s"]
  res["tokens_per_cpu_s"] = tokens / res["cpu_s"]
  res.update(env.mfu(res["tokens_per_s"] * flops_per_tok))
  res["peak_bytes"] = peak_bytes()
  return res


# ---------------------------------------------------------------------------- sections

def bench_train(env: Env) -> dict:
  t, model = env.config.train, env.model
  b, n = t.batch_size, t.seq_len

  def loss_fn(params, batch, rng=None):
    del rng
    out = model.apply({"params": params}, batch["tokens"], batch.get("mask"))
    return lm_loss(out["logits"], batch["tokens"], batch["loss_mask"])

  batch = {"tokens": env.tokens(b, n), "loss_mask": np.ones((b, n), bool)}
  if not t.packed:
    batch["mask"] = np.ones((b, n), bool)
  res = _step_section(env, "train", loss_fn, batch, b * n, flops_per_token(env.model_cfg, n),
                      t.grad_accum)
  return {"batch_size": b, "seq_len": n, "packed": bool(t.packed), **res}


def bench_reward(env: Env) -> dict:
  r = env.config.reward
  b, k, n = r.batch_size, r.k, r.seq_len
  loss_fn, _ = reward_stage.make_losses(env.model)
  batch = {"tokens": env.tokens(b, k, n), "mask": np.ones((b, k, n), bool),
           "ranks": np.broadcast_to(np.arange(k, dtype=np.int32), (b, k)).copy(),
           "valid": np.ones((b, k), bool)}
  # The reward model reads a scalar head: no LM-head FLOPs.
  res = _step_section(env, "reward", loss_fn, batch, b * k * n, 3 * env.fwd(n, head=False))
  return {"batch_size": b, "k": k, "seq_len": n, **res}


def _sample_config(env: Env, new_tokens: int, temperature: float) -> SampleConfig:
  # min_new_tokens = max_new_tokens: EOS is masked, no early stop, exact token counts.
  return SampleConfig(max_new_tokens=new_tokens, eos_id=1, pad_id=0, temperature=temperature,
                      min_new_tokens=new_tokens)


def _sample_flops(env: Env, b: int, p: int, n: int) -> float:
  """Prefill of the prompt plus N decode steps at mean context p + n/2."""
  return b * p * env.fwd(p) + b * n * env.fwd(p + n / 2)


def bench_sampler(env: Env) -> dict:
  c, s = env.config, env.config.sampler
  p, n = s.prompt_len, s.new_tokens
  sc = _sample_config(env, n, s.temperature)
  gen = make_generate(env.model, sc, env.mesh, st.param_shardings(env.model))
  params = None if c.compile_only else st.init_params(env.model, jax.random.key(c.seed))
  runs = []
  for b in _batch_sizes(c):
    prompt = sh.put_batch({"p": env.tokens(b, p), "m": np.ones((b, p), bool)}, env.mesh)
    args = (params, prompt["p"], prompt["m"], env.key(2))
    compiled, info = env.compile(gen, st.abstract_params(env.model), *map(_abstract, args[1:]))
    run = {"batch_size": b, "tokens_per_call": b * n, **info}
    if not c.compile_only:
      out = compiled(*args)
      run["tokens_generated"] = int(jnp.sum(out["lengths"]))  # = b * n: nothing stops early
      del out
      run.update(_measure(lambda: compiled(*args)["tokens"], c.warmup, env.steps(s)))
      run["tokens_per_s"] = b * n / run["step_s"]
      run["tokens_per_cpu_s"] = b * n / run["cpu_s"]
      run.update(env.mfu(_sample_flops(env, b, p, n) / run["step_s"]))
      run["peak_bytes"] = peak_bytes()
    runs.append(run)
  return {"prompt_len": p, "new_tokens": n, "temperature": s.temperature, "runs": runs}


def ppo_parts(model, policy_opt, critic_opt, pc, prompt_len: int, sc):
  """`score(params, critic_params, frozen, g)` and `update(state, scored, rng) -> state`:
  the pieces of `ppo_step.make_iteration` after the rollout, timed separately."""
  it = make_iteration(model, model, policy_opt, critic_opt, pc, sc, prompt_len)

  def score(params, critic_params, frozen, g):
    return it.score({"params": params, "critic_params": critic_params}, frozen, g)

  def update(state, ro, rng):
    return it.update(state, ro, {}, rng)[0]

  return score, update


def _ppo_flops(env: Env, pc, p: int, n: int) -> dict:
  """Model FLOPs of each part of one iteration (full-length responses: nothing stops early)."""
  b, t = pc.rollout_batch, p + n
  shared = pc.critic == "shared"
  lm, scalar = env.fwd(t), env.fwd(t, head=False)
  scoring = b * t * ((2 * lm + scalar) if shared else (2 * lm + 2 * scalar))
  update = pc.epochs * b * t * 3 * (lm if shared else lm + scalar)
  return {"rollout": _sample_flops(env, b, p, n), "scoring": scoring, "update": update}


def bench_ppo(env: Env) -> dict:
  c, pc, model, mesh = env.config, env.config.ppo, env.model, env.mesh
  p, n, b = pc.prompt_len, pc.response_len, pc.rollout_batch
  # PPO samples from the full policy (no EOS ban): with random weights EOS is one token
  # in the vocabulary, so the loop still runs all n steps unless every row ends early.
  sc = SampleConfig(max_new_tokens=n, eos_id=1, pad_id=0, temperature=pc.temperature)
  policy_opt = make_optimizer(c.ppo.opt, 1_000)
  critic_cfg = c.ppo.opt.copy_and_resolve_references()
  critic_cfg.lr = pc.critic_lr
  critic_opt = make_optimizer(critic_cfg, 1_000)
  shared = pc.critic == "shared"

  def fresh_state(policy, critic):
    s = {"params": policy, "opt_state": policy_opt.init(policy), "step": jnp.zeros((), jnp.int32),
         "kl_coef": jnp.float32(pc.kl_coef)}
    if not shared:
      s.update(critic_params=critic, critic_opt_state=critic_opt.init(critic))
    return s

  abstract_p = st.abstract_params(model)
  init_state, abstract_state = st.jit_init(fresh_state, abstract_p, abstract_p)
  fdt = jnp.dtype(pc.frozen_dtype)
  cast = jax.jit(lambda t: jax.tree.map(lambda x: x.astype(fdt), t))
  abstract_f = jax.eval_shape(cast, abstract_p)
  abstract_f = jax.tree.map(lambda s, a: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=a.sharding),
                            abstract_f, abstract_p)
  scalar_sh = sh.replicated(mesh)
  f32 = jax.ShapeDtypeStruct((), jnp.float32, sharding=scalar_sh)
  abstract_frozen = {"ref": abstract_f, "reward": abstract_f, "gain": f32, "bias": f32}
  host = {"prompt": env.tokens(b, p), "prompt_mask": np.ones((b, p), bool),
          "index": np.arange(b, dtype=np.int32)}
  batch = sh.put_batch(host, mesh)
  rng = env.key(3)
  a_batch, a_rng = _abstract(batch), _abstract(rng)

  iteration = make_iteration(model, model, policy_opt, critic_opt, pc, sc, p)
  state_sh = st.shardings_of(abstract_state)
  fused = jax.jit(iteration, in_shardings=(state_sh, jax.tree.map(lambda x: x.sharding, abstract_frozen),
                                           jax.tree.map(lambda x: x.sharding, a_batch), scalar_sh),
                  out_shardings=(state_sh, scalar_sh), donate_argnums=(0,))
  score_fn, update_fn = ppo_parts(model, policy_opt, critic_opt, pc, p, sc)
  rollout = make_generate(model, sc, mesh, st.param_shardings(model))
  score = jax.jit(score_fn)
  update = jax.jit(update_fn, out_shardings=state_sh, donate_argnums=(0,))

  compiled, info = {}, {}
  compiled["iteration"], info["iteration"] = env.compile(fused, abstract_state, abstract_frozen, a_batch, a_rng)
  compiled["rollout"], info["rollout"] = env.compile(rollout, abstract_p, a_batch["prompt"],
                                                  a_batch["prompt_mask"], a_rng)
  a_g = jax.eval_shape(rollout, abstract_p, a_batch["prompt"], a_batch["prompt_mask"], a_rng)
  a_g = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), a_g,
                     compiled["rollout"].output_shardings)
  critic_abstract = abstract_state.get("critic_params", abstract_p)
  compiled["scoring"], info["scoring"] = env.compile(score, abstract_p, critic_abstract, abstract_frozen, a_g)
  a_ro = jax.eval_shape(score, abstract_p, critic_abstract, abstract_frozen, a_g)
  a_ro = jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), a_ro,
                      compiled["scoring"].output_shardings)
  compiled["update"], info["update"] = env.compile(update, abstract_state, a_ro, a_rng)

  flops = _ppo_flops(env, pc, p, n)
  res = {"rollout_batch": b, "prompt_len": p, "response_len": n, "epochs": pc.epochs,
         "minibatches": pc.minibatches, "critic": pc.critic, "frozen_dtype": pc.frozen_dtype,
         "sampled_tokens": b * n, "compile_s": {k: v["compile_s"] for k, v in info.items()},
         "compiled_bytes": {k: v["compiled_bytes"] for k, v in info.items()}}
  if c.compile_only:
    return res

  keys = jax.random.split(jax.random.key(c.seed), 4)
  params = [st.init_params(model, k) for k in keys]
  state = init_state(params[0], params[1])
  frozen = {"ref": cast(params[2]), "reward": cast(params[3]),
            "gain": jax.device_put(jnp.float32(1.0), scalar_sh),
            "bias": jax.device_put(jnp.float32(0.0), scalar_sh)}
  del params
  warmup, steps = c.warmup, env.steps(pc)
  holder = {"state": state}
  del state

  def fused_call():
    holder["state"], m = compiled["iteration"](holder["state"], frozen, batch, rng)
    return m["kl"]

  # The fused iteration first, so its peak memory is not that of the parts.
  t_iter = _measure(fused_call, warmup, steps)
  iter_peak = peak_bytes()
  prompt, pmask = batch["prompt"], batch["prompt_mask"]
  t = {"rollout": _measure(lambda: compiled["rollout"](holder["state"]["params"], prompt, pmask, rng),
                           warmup, steps)}
  g = compiled["rollout"](holder["state"]["params"], prompt, pmask, rng)
  critic = holder["state"].get("critic_params", holder["state"]["params"])
  t["scoring"] = _measure(lambda c=critic, g=g: compiled["scoring"](holder["state"]["params"], c,
                                                                      frozen, g), warmup, steps)
  ro = compiled["scoring"](holder["state"]["params"], critic, frozen, g)
  del g, critic

  def update_call():
    holder["state"] = compiled["update"](holder["state"], ro, rng)
    return holder["state"]["step"]

  t["update"] = _measure(update_call, warmup, steps)
  parts = {}
  for k, v in t.items():
    parts[k] = {"s": v["step_s"], "s_min": v["step_s_min"], "flops": flops[k],
                **env.mfu(flops[k] / v["step_s"])}
  total = sum(v["s"] for v in parts.values())
  res.update(
      parts=parts, parts_total_s=total, iteration_s=t_iter["step_s"],
      iteration_s_min=t_iter["step_s_min"], steps=steps,
      rollout_fraction=parts["rollout"]["s"] / total,
      rollout_fraction_of_iteration=parts["rollout"]["s"] / t_iter["step_s"],
      sampled_tokens_per_s=b * n / t_iter["step_s"], iteration_flops=sum(flops.values()),
      **env.mfu(sum(flops.values()) / t_iter["step_s"]),
      iteration_peak_bytes=iter_peak, peak_bytes=peak_bytes())
  return res


# ------------------------------------------------------------------ HF transformers baseline

def hf_spec(config, sections: list[str]) -> dict:
  m = config.model
  return {"model": {k: m[k] for k in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                                      "d_ff", "max_len", "rope_theta", "tie_embeddings", "norm_eps")},
          "bf16": m.dtype == "bfloat16", "seed": config.seed, "warmup": config.warmup,
          "threads": int(config.hf_threads),
          "steps": int(config.train.steps or config.steps),
          "train": ({"batch_size": config.train.batch_size, "seq_len": config.train.seq_len}
                    if "train" in sections else None),
          "sampler": ({"batch_sizes": _batch_sizes(config), "prompt_len": config.sampler.prompt_len,
                       "new_tokens": config.sampler.new_tokens,
                       "temperature": config.sampler.temperature,
                       "steps": int(config.sampler.steps or config.steps)}
                      if "sampler" in sections else None)}


def hf_bench(spec: dict) -> dict:
  """LlamaForCausalLM with our dims: an AdamW train step and `generate` (do_sample=True)."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  dev = "cuda" if torch.cuda.is_available() else "cpu"
  m = spec["model"]
  torch.manual_seed(spec["seed"])
  conf = transformers.LlamaConfig(
      vocab_size=m["vocab_size"], hidden_size=m["d_model"], intermediate_size=m["d_ff"],
      num_hidden_layers=m["n_layers"], num_attention_heads=m["n_heads"],
      num_key_value_heads=m["n_kv_heads"], max_position_embeddings=m["max_len"],
      rms_norm_eps=m["norm_eps"], rope_theta=m["rope_theta"], tie_word_embeddings=m["tie_embeddings"],
      hidden_act="silu", attention_bias=False, mlp_bias=False, bos_token_id=2, eos_token_id=1,
      pad_token_id=0)
  model = transformers.LlamaForCausalLM(conf).to(dev)  # float32 weights, as ours
  autocast = lambda: torch.autocast(dev, dtype=torch.bfloat16, enabled=spec["bf16"])
  sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
  peak = lambda: int(torch.cuda.max_memory_allocated()) if dev == "cuda" else None

  cpu = {}

  def measure(fn, steps):
    for _ in range(spec["warmup"]):
      fn()
    sync()
    times = []
    c0 = time.process_time()
    for _ in range(steps):
      t0 = time.perf_counter()
      fn()
      sync()
      times.append(time.perf_counter() - t0)
    cpu["s"] = (time.process_time() - c0) / steps  # per call, all threads (see _measure)
    return statistics.median(times)

  if dev == "cpu" and spec.get("threads"):
    torch.set_num_threads(spec["threads"])
  out = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
         "threads": torch.get_num_threads(),
         "torch": torch.__version__, "transformers": transformers.__version__,
         "attn_implementation": getattr(conf, "_attn_implementation", None)}
  if spec["train"]:
    b, t = spec["train"]["batch_size"], spec["train"]["seq_len"]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1,
                            fused=dev == "cuda")
    x = torch.randint(0, m["vocab_size"], (b, t), device=dev)

    def step():
      with autocast():
        loss = model(input_ids=x, labels=x).loss
      loss.backward()
      opt.step()
      opt.zero_grad(set_to_none=True)

    if dev == "cuda":
      torch.cuda.reset_peak_memory_stats()
    s = measure(step, spec["steps"])
    out["train"] = {"batch_size": b, "seq_len": t, "step_s": s, "tokens_per_s": b * t / s,
                    "cpu_s": cpu["s"], "tokens_per_cpu_s": b * t / cpu["s"], "peak_bytes": peak()}
    del opt
    model.zero_grad(set_to_none=True)
  if spec["sampler"]:
    sp = spec["sampler"]
    model.eval()
    runs = []
    for b in sp["batch_sizes"]:
      p, n = sp["prompt_len"], sp["new_tokens"]
      prompt = torch.randint(3, m["vocab_size"], (b, p), device=dev)
      kw = dict(attention_mask=torch.ones_like(prompt), do_sample=True,
                temperature=sp["temperature"], top_k=0, top_p=1.0, max_new_tokens=n,
                min_new_tokens=n, pad_token_id=0, eos_token_id=1)

      def gen():
        with torch.no_grad(), autocast():
          return model.generate(prompt, **kw)

      try:
        if dev == "cuda":
          torch.cuda.reset_peak_memory_stats()
        produced = int(gen().shape[1] - p)
        s = measure(gen, sp["steps"])
        runs.append({"batch_size": b, "step_s": s, "tokens_per_s": b * produced / s,
                     "new_tokens": produced, "peak_bytes": peak()})
      except Exception as e:  # pylint: disable=broad-except  # e.g. out of memory at a large batch
        runs.append({"batch_size": b, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
    out["sampler"] = runs
  return out


def run_hf(config, sections: list[str], workdir: str) -> dict:
  """HF baseline in a child process (it must not share the accelerator's memory with JAX)."""
  missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
  if missing:
    return {"status": "skipped: torch/transformers not installed"}
  spec = hf_spec(config, sections)
  if not (spec["train"] or spec["sampler"]):
    return {"status": "skipped: no train or sampler section"}
  path = os.path.join(workdir, "hf.json")
  code = ("import json, sys; from rlhf_jax.bench import hf_bench; "
          f"json.dump(hf_bench(json.load(sys.stdin)), open({path!r}, 'w'))")
  proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(spec), text=True,
                        capture_output=True, check=False)
  if proc.returncode:
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"status": f"failed: {tail[0][:300]}"}
  with open(path) as f:
    return {"status": "ok", **json.load(f)}


def _hf_ratios(results: dict, hf: dict) -> dict:
  """ours / HF tokens per second (> 1: we are faster); adds the HF train step's MFU."""
  ratios = {}
  ours_train = results.get("train", {})
  if "train" in hf and "tokens_per_s" in ours_train:
    ratios["train_tokens_per_s"] = ours_train["tokens_per_s"] / hf["train"]["tokens_per_s"]
    if "tokens_per_cpu_s" in hf["train"]:
      ratios["train_tokens_per_cpu_s"] = (ours_train["tokens_per_cpu_s"]
                                          / hf["train"]["tokens_per_cpu_s"])
    peak = results.get("peak", {}).get("peak_flops")
    if peak:
      hf["train"]["mfu"] = hf["train"]["tokens_per_s"] * ours_train["flops_per_token"] / peak
  ours = {r["batch_size"]: r for r in results.get("sampler", {}).get("runs", [])}
  for r in hf.get("sampler", []):
    o = ours.get(r["batch_size"], {})
    if "tokens_per_s" in r and "tokens_per_s" in o:
      ratios[f"sampler_tokens_per_s_b{r['batch_size']}"] = o["tokens_per_s"] / r["tokens_per_s"]
  return ratios


# -------------------------------------------------------------------------------- driver

BENCHES = {"train": bench_train, "reward": bench_reward, "sampler": bench_sampler, "ppo": bench_ppo}


def _child_sections(config, sections, workdir, argv) -> dict:
  """Each section in its own process (config.isolate): peak memory is per section."""
  results = {}
  for s in sections:
    sub = os.path.join(workdir, s)
    cmd = [sys.executable, "-m", "rlhf_jax.bench", *argv, f"--workdir={sub}",
           f"--config.sections={s}", "--config.isolate=False", "--config.hf=False"]
    proc = subprocess.run(cmd, check=False)
    path = os.path.join(sub, "bench.json")
    if proc.returncode or not os.path.exists(path):
      results[s] = {"error": f"section process exited with status {proc.returncode}"}
      continue
    with open(path) as f:
      child = json.load(f)
    results[s] = child[s]
    for k in ("device", "peak", "model", "mesh", "jax_version"):
      results.setdefault("_" + k, child[k])
  return results


def run(config, workdir: str, argv: list[str] | None = None) -> dict:
  """Run the selected sections; writes workdir/bench.json and returns its contents."""
  sections = _sections(config)
  compiler_options(config.compiler_options)  # fail early on a malformed value
  os.makedirs(workdir, exist_ok=True)
  hf = {"status": "off (config.hf=False)"}
  if config.hf:  # before JAX touches the accelerator
    hf = run_hf(config, sections, workdir)
  report = {"preset": config.preset, "date": datetime.date.today().isoformat(),
            "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()[0],
            "sections": sections, "compile_only": bool(config.compile_only),
            "isolated": bool(config.isolate and argv is not None)}
  if config.isolate and argv is not None:
    validate(config, 1)
    res = _child_sections(config, sections, workdir, argv)
    for k in ("device", "peak", "model", "mesh", "jax_version"):
      if "_" + k in res:
        report[k] = res.pop("_" + k)
    report.update(res)
  else:
    mesh = sh.make_mesh(config.mesh)
    validate(config, sh.data_parallel_size(mesh))
    model_cfg = ModelConfig.from_config(config.model)
    dev = jax.devices()[0]
    env = Env(config, mesh, model_cfg, st.make_model(model_cfg, mesh), detect_peak(config.peak_flops),
              np.random.default_rng(config.seed))
    report.update(
        device={"kind": dev.device_kind, "platform": dev.platform, "count": jax.device_count()},
        jax_version=jax.__version__, peak=env.peak, mesh=dict(mesh.shape),
        model={**dataclasses.asdict(model_cfg), "params": param_count(model_cfg),
               "params_non_embedding": param_count(model_cfg, with_embeddings=False)})
    for s in sections:
      report[s] = BENCHES[s](env)
  report["hf"] = hf
  report["load_avg_end"] = os.getloadavg()[0]  # 1-min load: wall times are only comparable near 0
  if hf.get("status") == "ok":
    hf["ratios_ours_over_hf"] = _hf_ratios(report, hf)
  with open(os.path.join(workdir, "bench.json"), "w") as f:
    json.dump(report, f, indent=1)
  print(format_table(report), flush=True)
  return report


def _fmt(x, unit=""):
  if x is None:
    return "n/a"
  if isinstance(x, float):
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
      if abs(x) >= div:
        return f"{x / div:.3g}{suffix}{unit}"
    return f"{x:.3g}{unit}"
  return f"{x}{unit}"


def _gib(x):
  return "n/a" if x is None else f"{x / 2**30:.2f} GiB"


def _compiled(d: dict) -> str:
  b = d.get("compiled_bytes") or {}
  return (f"compiled in {d.get('compile_s', 0):.1f} s; XLA memory analysis: arguments "
          f"{_gib(b.get('arguments'))}, temp {_gib(b.get('temp'))}, total {_gib(b.get('total'))}")


def format_table(r: dict) -> str:
  rows = []
  peak = r.get("peak", {})
  rows.append(("device", f"{r.get('device', {}).get('kind')} x{r.get('device', {}).get('count')}"))
  if "load_avg_end" in r:
    rows.append(("load average (1 min)", f"{r['load_avg_start']:.1f} at start, "
                                         f"{r['load_avg_end']:.1f} at end, {r['cpu_count']} CPUs"))
  rows.append(("peak FLOP/s used for MFU", f"{_fmt(peak.get('peak_flops'))} ({peak.get('peak_source')})"))
  if peak.get("ceiling_flops"):
    rows.append(("measured matmul ceiling", _fmt(peak["ceiling_flops"])))
  pct = lambda d: f"{100 * d['mfu']:.1f}%" + (f" ({100 * d['mfu_vs_ceiling']:.1f}% of ceiling)"
                                              if "mfu_vs_ceiling" in d else "")
  for name in ("train", "reward"):
    d = r.get(name)
    if d and "tokens_per_s" in d:
      rows.append((f"{name} step", f"{_fmt(d['tokens_per_s'])} tok/s, MFU {pct(d)}, "
                                   f"{d['step_s'] * 1e3:.1f} ms/step, {d['cpu_s'] * 1e3:.1f} ms CPU/step, "
                                   f"peak {_gib(d['peak_bytes'])}"))
    elif d:
      rows.append((f"{name} step", d.get("error") or _compiled(d)))
  for run_ in r.get("sampler", {}).get("runs", []):
    if "compiled_bytes" in run_ and "tokens_per_s" not in run_:
      rows.append((f"sampler b={run_['batch_size']}", _compiled(run_)))
    if "tokens_per_s" in run_:
      rows.append((f"sampler b={run_['batch_size']}",
                   f"{_fmt(run_['tokens_per_s'])} tok/s ({run_['tokens_generated']} tokens/call), "
                   f"MFU {pct(run_)}, peak {_gib(run_['peak_bytes'])}"))
  d = r.get("ppo")
  if d and "parts" in d:
    rows.append(("ppo iteration (fused)", f"{d['iteration_s']:.3f} s, MFU {pct(d)}, "
                                          f"peak {_gib(d['iteration_peak_bytes'])}"))
    for k, v in d["parts"].items():
      rows.append((f"  {k}", f"{v['s']:.3f} s, MFU {pct(v)}"))
    rows.append(("  rollout fraction", f"{d['rollout_fraction']:.2f} of parts, "
                                       f"{d['rollout_fraction_of_iteration']:.2f} of the fused iteration"))
  elif d:
    rows.append(("ppo", d.get("error") or ""))
    for k, v in d.get("compiled_bytes", {}).items():
      rows.append((f"  {k}", _compiled({"compiled_bytes": v, "compile_s": d["compile_s"][k]})))
  hf = r.get("hf", {})
  rows.append(("hf transformers", hf.get("status")))
  if "train" in hf:
    mfu = f", MFU {100 * hf['train']['mfu']:.1f}%" if "mfu" in hf["train"] else ""
    cpu_ = (f", {hf['train']['cpu_s'] * 1e3:.1f} ms CPU/step ({hf.get('threads')} threads)"
            if "cpu_s" in hf["train"] else "")
    rows.append(("  hf train step", f"{_fmt(hf['train']['tokens_per_s'])} tok/s{mfu}{cpu_}"))
  for run_ in hf.get("sampler", []):
    rows.append((f"  hf sampler b={run_['batch_size']}",
                 f"{_fmt(run_['tokens_per_s'])} tok/s" if "tokens_per_s" in run_ else run_["error"]))
  for k, v in hf.get("ratios_ours_over_hf", {}).items():
    rows.append((f"  ours/hf {k}", f"{v:.2f}x"))
  width = max(len(a) for a, _ in rows)
  return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def _argv_without_workdir(argv: list[str]) -> list[str]:
  """The command line minus --workdir, for the per-section child processes."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in ("--workdir", "-workdir"):
      skip = True
    elif not a.lstrip("-").startswith("workdir="):
      out.append(a)
  return out


def cli():
  hostenv.cpu_defaults()  # the allocator the pipeline runs with (before JAX's backend starts)
  # Flags are defined here, not at import, so importing this module next to
  # rlhf_jax.main (which defines --config too) does not clash.
  config = config_flags.DEFINE_config_file("config", None, "configs/bench.py:PRESET", lock_config=True)
  workdir = flags.DEFINE_string("workdir", None, "Where bench.json goes.")
  flags.mark_flags_as_required(["config", "workdir"])

  def main(argv):
    del argv
    try:
      run(config.value, workdir.value, argv=_argv_without_workdir(sys.argv[1:]))
    except ConfigError as e:
      print(f"rlhf_jax.bench: error: {e}", file=sys.stderr, flush=True)
      sys.exit(2)

  app.run(main)


if __name__ == "__main__":
  cli()
