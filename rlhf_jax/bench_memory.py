"""Memory of one PPO iteration: full fine-tuning vs LoRA vs QLoRA, by XLA's compile-only
analysis (abstract shapes: nothing is allocated, so it runs on a CPU for a 7B model).

  python -m rlhf_jax.bench_memory --sizes 1b,7b --out bench_memory.json
  python -m rlhf_jax.bench_memory --sizes 7b --fsdp 8   # 8 (virtual CPU) devices, FSDP
  python -m rlhf_jax.bench_memory --sizes 7b --methods lora --score_chunks 1,8
  python -m rlhf_jax.bench_memory --sizes 7b --methods lora --scan_layers true --exact

--scan_layers true compiles model.scan_layers (one nn.scan over the layers): its program
does not grow with depth, so --exact compiles the 32-layer model in about a minute on CPU.

Each row compiles `ppo_step.make_iteration` (rollout with the KV-cache sampler, the four
forward passes, epochs x minibatches of policy and critic updates) exactly as
`stages/ppo.py` jits it, and reports XLA's per-device figures: arguments (params,
optimizer state, frozen models), temp (activations, KV cache, gradients), and
`total` = arguments + outputs + temp - aliased (the donated state). On GPU/TPU the
same analysis comes from that backend's compiler; the CPU figures are labelled so.

The CPU backend runs bf16 dots in f32 and keeps f32 copies a GPU would not (7B LoRA scan:
temp 82 GB on CPU, 48 GB for an H100). --target h100|h200 compiles for that GPU without one
(`rlhf_jax.aot`: deviceless XLA:GPU, no autotuning; --fsdp n gives n such devices):

  pip install jax-cuda13-plugin==$JAXV jax-cuda13-pjrt==$JAXV   # $JAXV: the installed jax version
  JAX_PLATFORMS=cpu python -m rlhf_jax.bench_memory --target h100 --sizes 7b \
      --methods lora_bf16 --scan_layers true --exact

--target v5e-8|v4-8 does the same for a TPU slice with libtpu's compile-only topology
(pip install "jax[tpu]==$JAXV"; --fsdp must divide the slice's 8 / 4 devices).

With --sampling both, it also times rollouts with adapters merged once vs applied on the
fly (`sampling_speed`, a small model, wall-clock on this machine).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

from rlhf_jax import aot  # no jax at import: XLA_FLAGS below still take effect

SIZES = {
    # TinyLlama-1.1B's shape (Zhang et al. 2024) and Llama-2-7B's (Touvron et al. 2023).
    "1b": dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632),
    "7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008),
    "test": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128),
}
METHODS = {  # name -> (lora rank, how the frozen base is stored)
    "full": (0, "none"), "lora": (16, "none"), "lora_bf16": (16, "bfloat16"),
    "qlora_int8": (16, "int8"), "qlora_nf4": (16, "nf4"),
}


def ppo_memory_extrapolated(size: str, method: str, layers=(4, 6), **kw) -> dict:
  """`ppo_memory` at two shallow depths, extrapolated linearly to the model's depth.

  Compiling 32 unrolled layers x ~10 model passes takes many CPU minutes; every figure
  here (params, optimizer state, KV cache, remat-saved activations, gradients) grows
  linearly with depth and the rest (embeddings, logits) does not, so two shallow compiles
  give the deep one's per-device bytes (labelled `extrapolated_from_layers`), provided the
  peak sits in the same phase at both depths. At 1 and 2 layers it does not: the scoring
  passes' logits (depth-independent) set the peak there, the update's backward (about 10 GB
  per layer at 7B on CPU) from 4 layers on, so the default is 4 and 6 (7B LoRA, CPU: temp
  48.1 / 69.7 GB at 4 / 6 layers, 10.8 GB per layer, as from 2 to 4)."""
  depth = SIZES[size]["n_layers"]
  lo, hi = layers
  one, two = (ppo_memory(size, method, n_layers=n, **kw) for n in (lo, hi))
  if one["per_device_bytes"] is None or two["per_device_bytes"] is None:
    return dict(two, extrapolated_from_layers=None)  # a TPU refused a shallow one: no line to draw
  row = dict(two, extrapolated_from_layers=[lo, hi], compile_s=one["compile_s"] + two["compile_s"])
  lin = lambda a, b: int(a + (depth - lo) * (b - a) / (hi - lo))
  for k in ("params", "trainable_params", "state_bytes", "frozen_bytes"):
    row[k] = lin(one[k], two[k])
  row["per_device_bytes"] = {k: lin(one["per_device_bytes"][k], two["per_device_bytes"][k])
                             for k in one["per_device_bytes"]}
  row["per_device_bytes_at_layers"] = {lo: one["per_device_bytes"], hi: two["per_device_bytes"]}
  return row


def ppo_memory(size: str, method: str, *, remat: str = "full", fsdp: int = 1, rollout_batch: int = 64,
               prompt_len: int = 256, response_len: int = 256, minibatches: int = 4,
               score_chunks: int = 1, n_layers: int | None = None, scan_layers: bool = False,
               lora_sampling: str = "merge", target: str = "host") -> dict:
  """Compile one PPO iteration for abstract inputs; XLA's memory analysis per device.
  `target`: `host` compiles for this machine's backend, `h100` / `h200` for that GPU
  without one (`rlhf_jax.aot`: deviceless XLA:GPU compile, needs the CUDA plugin), `v5e-8` /
  `v4-8` for that TPU slice (libtpu); a TPU that refuses the program for want of HBM gives
  a row with `does_not_fit` (XLA:TPU's message) and no per-device figures."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from configs import tiny
  from rlhf_jax.bench import _compile
  from rlhf_jax.model.transformer import ModelConfig
  from rlhf_jax.sampling import SampleConfig
  from rlhf_jax.stages.ppo import lora_views, optimizers
  from rlhf_jax.stages.ppo_step import Views, make_iteration
  from rlhf_jax.train import lora, state as st
  from rlhf_jax.train import sharding as sh

  rank, quant = METHODS[method]
  dims = dict(SIZES[size], **({"n_layers": n_layers} if n_layers else {}))
  cfg = ModelConfig(**dims, max_len=prompt_len + response_len, tie_embeddings=False,
                    dtype="bfloat16", remat=remat, scan_layers=scan_layers)
  devs = aot.devices(target, fsdp)  # first: a missing plugin fails before any tracing
  mesh = sh.mesh_of((1, fsdp, 1), devs)
  model = st.make_model(cfg, mesh)
  pc = tiny.get_config().ppo.copy_and_resolve_references()
  with pc.unlocked():  # score_chunks is optional in configs
    pc.update(rollout_batch=rollout_batch, minibatches=minibatches, epochs=1,
              response_len=response_len, score_chunks=score_chunks)
  spec = lora.LoraSpec(rank=rank, alpha=2.0 * rank, quant=quant) if rank else None
  policy_ft = lora.FineTune(model, spec)
  critic_ft = lora.FineTune(model, None if spec is None else
                            lora.LoraSpec(rank=rank, alpha=2.0 * rank, quant=quant, heads=("scalar_head",)))
  popt, copt = optimizers(pc)
  sc = SampleConfig(max_new_tokens=response_len, eos_id=2, pad_id=0)
  iteration = make_iteration(policy_ft.model, critic_ft.model, popt, copt, pc, sc, prompt_len,
                             views=lora_views(policy_ft, lora_sampling) if spec else Views)

  def fresh(policy, critic):
    return {"params": policy, "opt_state": popt.init(policy), "critic_params": critic,
            "critic_opt_state": copt.init(critic), "step": jnp.zeros((), jnp.int32),
            "kl_coef": jnp.float32(0.05), "skipped": jnp.zeros((), jnp.int32)}

  row = {"size": size, "method": method, "lora_rank": rank, "base_storage": quant, "remat": remat,
         "scan_layers": scan_layers, "lora_sampling": lora_sampling if rank else None,
         "fsdp": fsdp, "target": target, "devices": aot.label(devs),
         "rollout": f"{rollout_batch} x ({prompt_len} prompt + {response_len} response)",
         "minibatches": minibatches, "score_chunks": score_chunks}
  try:
    _, a_state = st.jit_init(fresh, policy_ft.abstract_trainable(), critic_ft.abstract_trainable())
  except Exception as e:  # pylint: disable=broad-except
    if not _refused(e, target):
      raise
    # The fresh train state alone (params and AdamW moments) is over the chip's HBM.
    return dict(row, per_device_bytes=None, does_not_fit="train state: " + _first_line(e))
  a_params = st.abstract_params(model)
  a_base = _abstract_stored(a_params, policy_ft)
  rep = sh.replicated(mesh)
  a_frozen = {"ref": a_base, "reward": a_base, "gain": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
              "bias": jax.ShapeDtypeStruct((), jnp.float32, sharding=rep)}
  b2 = sh.batch_sharding(mesh, 2)
  a_batch = {"prompt": jax.ShapeDtypeStruct((rollout_batch, prompt_len), jnp.int32, sharding=b2),
             "prompt_mask": jax.ShapeDtypeStruct((rollout_batch, prompt_len), bool, sharding=b2),
             "index": jax.ShapeDtypeStruct((rollout_batch,), jnp.int32, sharding=sh.batch_sharding(mesh, 1))}
  a_rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep)
  state_sh = st.shardings_of(a_state)
  fused = jax.jit(iteration, in_shardings=(state_sh, jax.tree.map(lambda x: x.sharding, a_frozen),
                                           jax.tree.map(lambda x: x.sharding, a_batch), rep),
                  out_shardings=(state_sh, rep), donate_argnums=(0,))
  t0 = time.perf_counter()
  try:
    _, info = _compile(fused, a_state, a_frozen, a_batch, a_rng)
  except Exception as e:  # pylint: disable=broad-except
    # XLA:TPU checks the program against the chip's HBM and refuses to compile it: that
    # refusal (with XLA's figure of what it needed) is this row's answer.
    if not _refused(e, target):
      raise
    info = {"compile_s": time.perf_counter() - t0, "compiled_bytes": None, "does_not_fit": _first_line(e)}
  nbytes = lambda t: int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(t)))
  return {**row, "params": lora.count(a_params),
          "trainable_params": lora.count(a_state["params"]) + lora.count(a_state["critic_params"]),
          "state_bytes": nbytes(a_state), "frozen_bytes": nbytes(a_frozen),
          "compile_s": round(info["compile_s"], 1), "per_device_bytes": info["compiled_bytes"],
          **({"does_not_fit": info["does_not_fit"]} if "does_not_fit" in info else {})}


def _refused(err: Exception, target: str) -> bool:
  """XLA:TPU refused to compile for want of HBM: the row's answer, not a failure."""
  return target in aot.TPUS and "RESOURCE_EXHAUSTED" in str(err)


def _first_line(err: Exception) -> str:
  return str(err).strip().splitlines()[0]


def _abstract_stored(a_params, ft):
  """Abstract frozen base as `ft.store` keeps it, each part sharded like its kernel."""
  import jax
  from rlhf_jax.train import lora
  if not ft.lora:
    return a_params
  shapes = jax.eval_shape(lambda p: lora.store_base(p, ft.spec.quant, ft.spec.block_size), a_params)

  def place(path, s):
    kernel = a_params
    for k in path:
      name = getattr(k, "key", getattr(k, "name", None))
      if isinstance(kernel, dict) and name in kernel:
        kernel = kernel[name]
    return jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=kernel.sharding)
  return jax.tree_util.tree_map_with_path(place, shapes)


def sampling_speed(batch: int = 64, response_len: int = 32, rank: int = 8, quant: str = "none",
                   repeats: int = 5) -> dict:
  """Rollout wall time with the adapters merged once per call vs applied on the fly, on
  configs/tiny.py's default model (this machine; CPU numbers are what this measures)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from configs import tiny
  from rlhf_jax.model.transformer import ModelConfig
  from rlhf_jax.sampling import SampleConfig, generate
  from rlhf_jax.train import lora, state as st
  c = tiny.get_config()
  cfg = ModelConfig.from_config(c.model, vocab_size=c.data.vocab_size)
  model = st.make_model(cfg)
  params = st.init_params(model, jax.random.key(0))
  spec = lora.LoraSpec(rank=rank, alpha=2.0 * rank, quant=quant)
  ft = lora.FineTune(model, spec)
  tr, fz = ft.split(params, jax.random.key(1))
  tr = jax.tree.map(lambda x: x + 0.01, tr)  # non-zero B
  sc = SampleConfig(max_new_tokens=response_len, eos_id=-1, pad_id=0)  # no EOS: full length
  prompt = jnp.asarray(np.random.default_rng(0).integers(4, cfg.vocab_size, (batch, c.data.prompt_len)),
                       jnp.int32)
  pmask = jnp.ones_like(prompt, bool)
  fns = {
      "merge": jax.jit(lambda t, f, r: generate(model, lora.merged_params(t, f, spec), prompt, pmask, r, sc)),
      "on_the_fly": jax.jit(lambda t, f, r: generate(ft.model, lora.apply_params(t, f), prompt, pmask, r, sc)),
  }
  out = {"model": f"d={cfg.d_model} L={cfg.n_layers}", "batch": batch, "response_len": response_len,
         "rank": rank, "quant": quant, "device": jax.devices()[0].platform}
  for name, fn in fns.items():
    jax.block_until_ready(fn(tr, fz, jax.random.key(0)))
    times = []
    for i in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(tr, fz, jax.random.key(i)))
      times.append(time.perf_counter() - t0)
    out[f"{name}_s"] = float(np.median(times))
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--sizes", default="1b,7b")
  ap.add_argument("--methods", default="full,lora,qlora_nf4")
  ap.add_argument("--remat", default="full")
  ap.add_argument("--score_chunks", default="1",
                  help="comma-separated ppo.score_chunks values (rows of the scoring passes at a time)")
  ap.add_argument("--minibatches", type=int, default=4, help="ppo.minibatches (rows per update: 64 / it)")
  ap.add_argument("--fsdp", type=int, default=1, help="devices on the fsdp axis (CPU: virtual)")
  ap.add_argument("--sampling", action="store_true", help="also time merge vs on-the-fly rollouts")
  ap.add_argument("--exact", action="store_true",
                  help="compile every layer (slow on CPU) instead of extrapolating")
  ap.add_argument("--layers", default="4,6", help="the two depths to extrapolate from")
  ap.add_argument("--scan_layers", default="false",
                  help="comma-separated model.scan_layers values (false,true compares both)")
  ap.add_argument("--lora_sampling", default="merge", choices=("merge", "on_the_fly"),
                  help="lora.sampling: rollouts on merged bf16 weights or adapters applied per step")
  ap.add_argument("--target", default="host", choices=aot.TARGETS,
                  help="compile for this host's backend, or deviceless for that GPU (CUDA plugin) or "
                       "TPU slice (libtpu; --fsdp must divide its chips: 8 for v5e-8, 4 for v4-8)")
  ap.add_argument("--out", default="")
  a = ap.parse_args(argv)
  if a.target == "host" and a.fsdp > 1 and "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={a.fsdp}"
  scans = [{"true": True, "false": False}[v.strip().lower()] for v in a.scan_layers.split(",")]
  try:  # before anything compiles: a GPU target without the CUDA plugin is one line, not a traceback
    aot.devices(a.target, a.fsdp)
  except aot.AotError as e:
    print(f"rlhf_jax.bench_memory: error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  rows = []
  if a.sampling:
    for quant in ("none", "nf4"):
      rows.append(sampling_speed(quant=quant))
      print(json.dumps(rows[-1]), flush=True)
  for size in a.sizes.split(","):
    for method in a.methods.split(","):
      for remat in a.remat.split(","):
        for chunks, scan in itertools.product(map(int, a.score_chunks.split(",")), scans):
          kw = dict(remat=remat, fsdp=a.fsdp, score_chunks=chunks, minibatches=a.minibatches,
                    scan_layers=scan, lora_sampling=a.lora_sampling, target=a.target)
          if a.exact:
            rows.append(ppo_memory(size, method, **kw))
          else:
            rows.append(ppo_memory_extrapolated(size, method, tuple(map(int, a.layers.split(","))), **kw))
          print(json.dumps(rows[-1]), flush=True)
          if a.out:
            with open(a.out, "w") as f:
              json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
