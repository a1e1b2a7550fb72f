"""LoRA and QLoRA as a functional transform of the params pytree (no model change).

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"): a
target kernel W [in.., out..] is used as W + (alpha / r) * A @ B with A [in, r]
and B [r, out] trained, W frozen; B starts at zero, so at initialisation the
adapted model is exactly the base. Our attention has one fused qkv kernel
[d, kv_heads, group + 2, head_dim] and the MLP one fused gate/up kernel
[d, 2, d_ff]; each gets ONE rank-r update of the fused projection (out =
prod of its out dims), as PEFT does for GPT-2's fused `c_attn`.

QLoRA (Dettmers et al. 2023): the frozen base's layer kernels are stored in
int8 or NF4 (4-bit NormalFloat, the 16 quantiles of N(0, 1) scaled to [-1, 1],
paper appendix E) with one absmax scale per block of `block_size` values
along the kernel's last axis (block-wise quantisation; the paper's double
quantisation of the scales is not done). Embeddings, norms and heads stay
float32, as in bitsandbytes/PEFT. Adapters are float32.

Adapters are applied on the fly: a Flax method interceptor adds
`(x @ A) @ B * scale` to the output of each targeted Dense/DenseGeneral, so no
merged copy of the weights and no gradient of a frozen weight is ever formed;
gradients exist for the adapters only. The interceptor finds a layer's A and B as
extra `lora_a` / `lora_b` params of that Dense (`attach` puts them there for the
duration of one apply), so with `model.scan_layers` (kernels stacked [L, ...] under
`layers`, adapters stacked [L, in, r] alike) the scan hands each layer its own slice.
`merged_params` folds them into plain weights (export, the next stage, sampling with `lora.sampling=merge`).

Why not qwix (`qwix.LoraProvider`): it also intercepts dot_generals, but it
keeps the adapters inside the model's own variables (so every checkpoint and
abstract state would change shape with the method), quantises through its own
QArray/PTQ path, and would have to wrap the one Transformer that the HF work
edits. Here a stage only sees two pytrees, the trainable part and the frozen
base, and `apply_params` joins them; see docs/lora.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax.model.transformer import DTYPES

TARGETS = ("qkv", "o", "wi", "down", "lm_head")
QUANT = ("none", "bfloat16", "int8", "nf4")

# NF4 levels: QLoRA appendix E (bitsandbytes' table), ascending.
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
                0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  rank: int
  alpha: float
  targets: tuple[str, ...] = ("qkv", "o", "wi", "down")
  quant: str = "none"  # how the frozen base is stored
  block_size: int = 64
  heads: tuple[str, ...] = ()  # top-level params trained in full (a fresh scalar head)

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def spec_from_config(lcfg, stage: str, heads=()) -> LoraSpec | None:
  """config.lora -> a spec for `stage` (its root name: best_of_k/round_2 -> best_of_k), or
  None when the stage trains every weight (rank 0 or not in lora.stages)."""
  if lcfg is None:  # a config without a lora block
    return None
  root = stage.split("/")[0]
  stages = [s.strip() for s in lcfg.stages.split(",") if s.strip()]
  if lcfg.rank <= 0 or root not in stages:
    return None
  return LoraSpec(rank=int(lcfg.rank), alpha=float(lcfg.alpha),
                  targets=tuple(t.strip() for t in lcfg.targets.split(",") if t.strip()),
                  quant=lcfg.quant, block_size=int(lcfg.block_size), heads=tuple(heads))


# ------------------------------------------------------------------ quantised base

@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QTensor:
  """A block-quantised kernel: codes [.., last] (int8) or [.., last/2] (NF4, two per byte)
  and absmax scales [.., last/block]; the leading axes are the kernel's, so it keeps
  the kernel's sharding on them."""
  q: jax.Array
  scale: jax.Array
  kind: str = dataclasses.field(metadata=dict(static=True))
  block: int = dataclasses.field(metadata=dict(static=True))


def _block(last: int, block: int) -> int:
  return block if last % block == 0 else last  # odd widths: one block per row


def quantize(x, kind: str, block: int = 64) -> QTensor:
  last = x.shape[-1]
  b = _block(last, block)
  xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (last // b, b))
  absmax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  v = xb / safe
  if kind == "int8":
    q = jnp.round(v * 127).astype(jnp.int8).reshape(x.shape)
  elif kind == "nf4":
    if last % 2:
      raise ValueError(f"NF4 packs two codes per byte; last axis {last} is odd")
    mid = jnp.asarray((NF4[1:] + NF4[:-1]) / 2)
    idx = jnp.searchsorted(mid, v.reshape(x.shape)).astype(jnp.uint8)  # nearest level
    q = idx[..., 0::2] | (idx[..., 1::2] << 4)
  else:
    raise ValueError(f"unknown quantisation {kind!r}")
  return QTensor(q=q, scale=absmax[..., 0], kind=kind, block=b)


def dequantize(t: QTensor, dtype=jnp.float32):
  if t.kind == "int8":
    v = t.q.astype(jnp.float32) / 127
  else:
    idx = jnp.stack([t.q & 15, t.q >> 4], axis=-1).reshape(t.q.shape[:-1] + (-1,))
    v = jnp.asarray(NF4)[idx]
  vb = v.reshape(v.shape[:-1] + (-1, t.block)) * t.scale[..., None]
  return vb.reshape(v.shape).astype(dtype)


def _quantized_leaf(path) -> bool:
  """Layer kernels only (QLoRA quantises the linear layers; embeddings, norms, heads stay);
  `layers` is the stacked layout of model.scan_layers."""
  names = [getattr(k, "key", str(k)) for k in path]
  return (names[0].startswith("layer_") or names[0] == "layers") and names[-1] == "kernel"


def _n_stack(names) -> int:
  """Leading stacked-layer axes of a kernel at this path (1 under `layers`: scan_layers)."""
  return 1 if names[0] == "layers" else 0


def store_base(params, quant: str, block: int):
  """The frozen base as stored: float32 as is, bf16 matrices, or quantised layer kernels."""
  if quant == "none":
    return params
  if quant == "bfloat16":
    return jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.ndim >= 2 else x, params)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: quantize(x, quant, block) if _quantized_leaf(p) else x, params)


def load_base(base, dtype=jnp.float32):
  """Plain params from a stored base: quantised kernels dequantised straight into `dtype`
  (the compute dtype: no float32 copy of a bf16 model), bf16-stored matrices as `dtype`."""
  def one(x):
    if isinstance(x, QTensor):
      return dequantize(x, dtype)
    return x.astype(dtype) if x.dtype == jnp.bfloat16 else x
  return jax.tree.map(one, base, is_leaf=lambda x: isinstance(x, QTensor))


# ------------------------------------------------------------------ adapters

def _target_kernels(shapes, targets):
  """(path of the module, kernel shape without stacked axes, n_in, stacked axes) of every
  targeted kernel."""
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
    names = tuple(getattr(k, "key", str(k)) for k in path)
    if names[-1] == "kernel" and len(names) >= 2 and names[-2] in targets:
      # n_in: the kernel's contracted (input) axes. `o` contracts (heads, head_dim).
      n_in = 2 if names[-2] == "o" else 1
      k = _n_stack(names)
      out.append((names[:-1], leaf.shape[k:], n_in, leaf.shape[:k]))
  return out


def _set(tree: dict, path, value):
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def _get(tree, path):
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def init_adapters(shapes, spec: LoraSpec, rng):
  """A ~ N(0, 1/in) (Hu et al.: Gaussian A), B = 0, so the adapted model equals the base."""
  ad = {}
  kernels = _target_kernels(shapes, spec.targets)
  if not kernels:
    raise ValueError(f"lora.targets {spec.targets} match no kernel of the model")
  for i, (path, shape, n_in, lead) in enumerate(kernels):
    fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
    a = jax.random.normal(jax.random.fold_in(rng, i), lead + (fan_in, spec.rank), jnp.float32)
    _set(ad, path, {"a": a * fan_in ** -0.5, "b": jnp.zeros(lead + (spec.rank, fan_out), jnp.float32)})
  return ad


def adapter_shardings(boxed, spec: LoraSpec, mesh, rules):
  """A's rows shard like the kernel's first input axis, B's columns like its first output
  axis (the major axis of the flattened dims, so a contiguous split matches)."""
  ad = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))[0]:
    names = tuple(getattr(k, "key", str(k)) for k in path)
    if names[-1] != "kernel" or len(names) < 2 or names[-2] not in spec.targets:
      continue
    k = _n_stack(names)  # stacked layer axes lead A and B as they lead the kernel
    axes = leaf.names
    n_in = 2 if names[-2] == "o" else 1
    to_mesh = lambda n: nn.logical_to_mesh_axes((n,), rules)[0] if n is not None else None
    lead = tuple(to_mesh(n) for n in axes[:k])
    _set(ad, names[:-1], {"a": NamedSharding(mesh, P(*lead, to_mesh(axes[k]), None)),
                          "b": NamedSharding(mesh, P(*lead, None, to_mesh(axes[k + n_in])))})
  return ad


def attach(params, adapters):
  """Plain params with each adapter's A and B added as `lora_a` / `lora_b` params of the
  Dense it adapts (what `adapters_on` reads; flax ignores params a module never declares).
  Riding in the params tree is what lets nn.scan slice stacked adapters per layer."""
  out = jax.tree.map(lambda x: x, params, is_leaf=lambda x: not isinstance(x, dict))  # new dicts
  for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    names = tuple(getattr(k, "key", str(k)) for k in path)
    mod = _get(out, names[:-1])
    if mod is None:
      raise ValueError(f"adapter {'/'.join(names)} has no module in the params "
                       "(scan_layers layout of the adapters and the base differ?)")
    mod[f"lora_{names[-1]}"] = leaf
  return out


@contextlib.contextmanager
def adapters_on(scale: float):
  """While tracing inside this context, every Dense/DenseGeneral whose params carry
  `lora_a` / `lora_b` (`attach`) adds the low-rank update to its output (on the fly, in
  the layer's compute dtype)."""

  def interceptor(next_fun, args, kwargs, context):
    y = next_fun(*args, **kwargs)
    mod = context.module
    if context.method_name != "__call__" or not isinstance(mod, (nn.Dense, nn.DenseGeneral)):
      return y
    if not mod.has_variable("params", "lora_a"):
      return y
    a, b = mod.get_variable("params", "lora_a"), mod.get_variable("params", "lora_b")
    x = args[0]
    n_in = len(mod.axis) if isinstance(mod, nn.DenseGeneral) and isinstance(mod.axis, tuple) else 1
    dt = y.dtype
    xf = x.reshape(x.shape[:x.ndim - n_in] + (-1,)).astype(dt)
    d = (xf @ a.astype(dt)) @ (b.astype(dt) * jnp.asarray(scale, dt))
    return y + d.reshape(y.shape)

  with nn.intercept_methods(interceptor):
    yield


# ------------------------------------------------------------------ the two parts

def apply_params(trainable, frozen):
  """What a LoRA stage passes to `LoraModel.apply`: the frozen base and the trainable part."""
  return {"base": frozen, **trainable}


def is_composite(params) -> bool:
  return isinstance(params, dict) and "adapters" in params and "base" in params


def unpack(params, dtype=jnp.float32):
  """Composite params -> (plain params with the fully trained heads, adapters)."""
  base = load_base(params["base"], dtype)
  return {**base, **params.get("full", {})}, params["adapters"]


def merged_params(trainable, frozen, spec: LoraSpec, dtype=None):
  """Plain params (any stage, the export) with the adapters folded into the kernels:
  W + scale * A @ B, computed on the dequantised base the adapters were trained with.
  dtype: matrices cast to it (the sampler's compute dtype: it would cast them anyway,
  and the merged copy is then half the size)."""
  base, ad = unpack(apply_params(trainable, frozen))

  def fold(path, w):
    names = tuple(getattr(k, "key", str(k)) for k in path)
    ab = _get(ad, names[:-1]) if names[-1] == "kernel" else None
    if ab is not None and "a" in ab:
      w = w + (spec.scale * (ab["a"] @ ab["b"])).reshape(w.shape).astype(w.dtype)
    return w.astype(dtype) if dtype is not None and w.ndim >= 2 and w.dtype == jnp.float32 else w

  return jax.tree_util.tree_map_with_path(fold, base)


class LoraModel:
  """The Transformer seen through LoRA: `apply` takes plain params (the model as is)
  or composite ones (`apply_params`), so the sampler, the losses and the scoring
  code run unchanged on either."""

  def __init__(self, model, spec: LoraSpec):
    self.inner, self.spec = model, spec
    self.cfg, self.mesh, self.rules = model.cfg, model.mesh, model.rules

  def apply(self, variables, *args, **kwargs):
    p = variables["params"]
    if not is_composite(p):
      return self.inner.apply(variables, *args, **kwargs)
    base, ad = unpack(p, DTYPES[self.cfg.dtype])
    with adapters_on(self.spec.scale):
      return self.inner.apply({**variables, "params": attach(base, ad)}, *args, **kwargs)


def count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


class FineTune:
  """What a stage trains, whichever method: `split(params)` -> (trainable, frozen);
  `apply_params(trainable, frozen)` is what `model.apply` takes; `merged` gives plain
  weights. With spec None (rank 0) the trainable part is the whole model and frozen is {}."""

  def __init__(self, model, spec: LoraSpec | None):
    self.base_model, self.spec = model, spec
    self.lora = spec is not None
    self.model = LoraModel(model, spec) if self.lora else model

  def _shapes(self):
    from rlhf_jax.train import state as st
    return st.abstract_params(self.base_model)

  def trainable_shardings(self):
    from rlhf_jax.train import state as st
    full = st.param_shardings(self.base_model)
    if not self.lora:
      return full
    import functools
    boxed = jax.eval_shape(functools.partial(st._init_boxed, self.base_model), jax.random.key(0))
    out = {"adapters": adapter_shardings(boxed, self.spec, self.base_model.mesh, self.base_model.rules)}
    if self.spec.heads:
      out["full"] = {h: full[h] for h in self.spec.heads}
    return out

  def abstract_trainable(self):
    shapes = self._shapes()
    if not self.lora:
      return shapes
    sd = jax.eval_shape(self._fresh, shapes, jax.random.key(0))
    return jax.tree.map(lambda s, d: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=d), sd,
                        self.trainable_shardings())

  def _fresh(self, params, rng):
    out = {"adapters": init_adapters(params, self.spec, rng)}
    if self.spec.heads:
      out["full"] = {h: jax.tree.map(jnp.copy, params[h]) for h in self.spec.heads}
    return out

  def split(self, params, rng):
    """(trainable, frozen) from full params; fresh adapters from `rng`. The frozen base is
    `params` itself when stored unquantised (no copy), so callers must not donate it."""
    if not self.lora:
      return params, {}
    return self.init_trainable(params, rng), self.store(params)

  def init_trainable(self, params, rng):
    """Fresh adapters (B = 0) and copies of the fully trained heads."""
    return jax.jit(self._fresh, out_shardings=self.trainable_shardings())(params, rng)

  def store(self, params):
    if not self.lora or self.spec.quant == "none":
      return params
    return jax.jit(lambda p: store_base(p, self.spec.quant, self.spec.block_size))(params)

  def apply_params(self, trainable, frozen):
    return apply_params(trainable, frozen) if self.lora else trainable

  def base_view(self, frozen):
    """What `model.apply` takes for the frozen base with adapters switched off (a policy
    stage's reference: the SFT weights as stored); full fine-tuning: `frozen` as is."""
    return apply_params({"adapters": {}}, frozen) if self.lora else frozen

  def merged(self, trainable, frozen):
    if not self.lora:
      return trainable
    return jax.jit(lambda t, f: merged_params(t, f, self.spec))(trainable, frozen)

  def loss(self, loss_fn):
    """loss_fn(params, batch, rng) -> loss(trainable, batch, rng, frozen), gradients for the
    trainable part only (the frozen base is an argument, not differentiated)."""
    if not self.lora:
      return lambda t, b, r, f: loss_fn(t, b, r)

    dt = DTYPES[self.base_model.cfg.dtype]  # a quantised base dequantises straight into it

    def wrapped(t, b, r, f):
      base, ad = unpack(apply_params(t, f), dt)
      with adapters_on(self.spec.scale):
        return loss_fn(attach(base, ad), b, r)
    return wrapped

  def meta(self, base: str) -> dict:
    """Checkpoint metadata: a LoRA checkpoint holds adapters, and names its base stage."""
    if not self.lora:
      return {}
    spec = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.spec).items()}
    return {"lora": {"base": base, **spec}}  # lists: the saved JSON compares equal on resume


def spec_from_meta(m: dict) -> LoraSpec:
  return LoraSpec(rank=m["rank"], alpha=m["alpha"], targets=tuple(m["targets"]), quant=m["quant"],
                  block_size=m["block_size"], heads=tuple(m["heads"]))
