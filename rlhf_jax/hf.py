"""Hugging Face model folders in and out: Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma 2, GPT-2.

Each family is a handful of `ModelConfig` switches on the one transformer
(rlhf_jax/model/transformer.py) plus a table from checkpoint tensor names to our
parameter tree (the shape of Tunix's `models/*/params.py`); transformers'
`modeling_*.py` is the reference the tests hold us to (tests/test_hf.py).

    model, params = load("path/to/Qwen2.5-0.5B")      # config.json + *.safetensors
    logits = model.apply({"params": params}, tokens, mask)["logits"]
    save("out/", model, params, tokenizer, kind="causal_lm")   # or kind="reward"

Everything that can be wrong with a folder (missing config.json or tensor, a shape
that disagrees with config.json, a config value we would otherwise ignore) raises
HFError, one line naming the file and the field or tensor, before anything compiles.
Tensors are read one at a time (memory-mapped) and placed straight onto the
parameter shardings with `jax.make_array_from_callback`, so each device receives
only its shard and no device ever holds the whole model.
"""
from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import safetensors.numpy

from rlhf_jax.config_lib import ConfigError
from rlhf_jax.model import stacking
from rlhf_jax.model.hf_families import FAMILIES, HFError, family_of, parse_config, specs, to_hf_config
from rlhf_jax.model.transformer import DTYPES, NOT_ARCHITECTURE, ModelConfig
from rlhf_jax.train import state as st

__all__ = ["HFError", "load", "save", "read_config", "load_params", "architecture_fields",
           "FAMILIES"]
_ = ConfigError  # HFError subclasses it, so main exits 2 on a bad folder

# Tensors a checkpoint may hold that are not parameters: GPT-2's causal-mask buffers,
# old Llama exports' rotary tables (recomputed from config.json).
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")


def _read_json(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise HFError(f"{path}: not valid JSON ({e})") from None


def read_config(path: str, max_len: int | None = None) -> tuple[ModelConfig, dict]:
  """ModelConfig and facts about a Hugging Face folder, from its config.json alone.

  max_len: the context rlhf_jax will use (default: max_position_embeddings); a
  sliding attention window shorter than it is an error (we attend over the whole
  context). info: model_type, family, architectures, is_reward, bos_id, eos_id,
  eos_ids, pad_id, max_position_embeddings.
  """
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise HFError(f"{cfg_path}: missing; a Hugging Face model folder needs config.json "
                  f"and *.safetensors")
  raw = _read_json(cfg_path)
  kw, info = parse_config(raw, cfg_path, max_len)
  gen_path = os.path.join(path, "generation_config.json")
  gen = _read_json(gen_path) if os.path.isfile(gen_path) else {}
  ids = {}
  for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
    v = raw.get(key)
    ids[key] = v if v is not None else gen.get(key)
  eos = ids["eos_token_id"]
  eos_ids = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
  gen_eos = gen.get("eos_token_id")
  for e in ([] if gen_eos is None else gen_eos if isinstance(gen_eos, list) else [gen_eos]):
    if e not in eos_ids:
      eos_ids.append(e)
  info.update(bos_id=ids["bos_token_id"], eos_id=eos_ids[0] if eos_ids else None, eos_ids=eos_ids,
              pad_id=ids["pad_token_id"], config_path=cfg_path,
              scalar_head_init="score.weight" if info["is_reward"] else "zeros")
  return ModelConfig(**kw), info


# --- reading safetensors ------------------------------------------------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64,
              "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def _np_dtype(code: str, where: str):
  if code == "BF16":  # numpy has no bfloat16; ml_dtypes (a jax dependency) does
    import ml_dtypes
    return ml_dtypes.bfloat16
  if code not in _ST_DTYPES:
    raise HFError(f"{where}: dtype {code} is not supported (quantized checkpoints are not)")
  return _ST_DTYPES[code]


class _Reader:
  """Tensor names -> (file, header entry) over one or several .safetensors files.

  Reads the safetensors header itself and memory-maps the data: safetensors'
  numpy framework cannot return BF16 tensors (safe_open: "data type 'bfloat16' not
  understood"), the dtype of most released checkpoints, and a memory map reads only the
  bytes a tensor occupies. Writing goes through safetensors itself (`_write_safetensors`).
  """

  def __init__(self, path: str):
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
      files = sorted(set(_read_json(index).get("weight_map", {}).values()))
      if not files:
        raise HFError(f"{index}: weight_map is empty")
    elif os.path.isfile(single):
      files = ["model.safetensors"]
    else:
      found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
      if not found:
        raise HFError(f"{path}: no model.safetensors or model.safetensors.index.json "
                      f"(PyTorch .bin checkpoints are not read: pickle)")
      files = found
    self.entries = {}  # name -> (file path, data start, header entry)
    for name in files:
      fp = os.path.join(path, name)
      if not os.path.isfile(fp):
        raise HFError(f"{fp}: missing (listed in {index})")
      with open(fp, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
          header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
          raise HFError(f"{fp}: not a safetensors file (bad header)") from None
      for k, v in header.items():
        if k != "__metadata__":
          self.entries[k] = (fp, 8 + n, v)

  def resolve(self, name: str) -> str | None:
    # GPT-2 checkpoints on the Hub name tensors without the "transformer." prefix.
    for cand in (name, name.removeprefix("transformer.")):
      if cand in self.entries:
        return cand
    return None

  def shape(self, name: str) -> tuple:
    return tuple(self.entries[name][2]["shape"])

  def where(self, name: str) -> str:
    return self.entries[name][0]

  def get(self, name: str) -> np.ndarray:
    fp, start, e = self.entries[name]
    dtype = _np_dtype(e["dtype"], f"{fp}: tensor {name}")
    lo, hi = e["data_offsets"]
    shape = tuple(e["shape"])
    if hi == lo:
      return np.zeros(shape, dtype)
    arr = np.memmap(fp, dtype=dtype, mode="r", offset=start + lo, shape=shape)
    return np.asarray(arr, dtype=np.float32)


def _check_tensors(reader: _Reader, plan, path: str, tied: bool) -> dict:
  """Every tensor present with the shape config.json implies; nothing left over."""
  resolved = {}
  for spec in plan:
    for name, shape in zip(spec.names, spec.shapes):
      found = reader.resolve(name)
      if found is None:
        raise HFError(f"{path}: missing tensor {name} (expected shape {list(shape)})")
      if reader.shape(found) != tuple(shape):
        raise HFError(f"{reader.where(found)}: tensor {found} has shape {list(reader.shape(found))}, "
                      f"config.json implies {list(shape)}")
      resolved[name] = found
  used = set(resolved.values())
  for name in reader.entries:
    if name in used or name.endswith(_BUFFERS):
      continue
    if tied and name.endswith("lm_head.weight"):  # a tied head saved anyway
      continue
    raise HFError(f"{reader.where(name)}: unexpected tensor {name}: a part of the model that "
                  f"config.json does not describe, which rlhf_jax would silently drop")
  return resolved


def _set(tree: dict, path: tuple, value) -> None:
  for p in path[:-1]:
    tree = tree.setdefault(p, {})
  tree[path[-1]] = value


def load_params(path: str, model, info: dict | None = None) -> dict:
  """The folder's weights as our parameter tree, each placed on st.param_shardings(model).

  For a *ForSequenceClassification folder the scalar head comes from score.weight
  (bias 0: HF's score layer has none); for a causal LM the scalar head is zeros,
  which the reward stage and the critic replace.
  """
  cfg = model.cfg
  if cfg.scan_layers:  # HF folders are per layer: read the unrolled layout, then stack
    flat = st.make_model(dataclasses.replace(cfg, scan_layers=False), model.mesh, model.rules)
    return jax.jit(stacking.stack_layers, out_shardings=st.param_shardings(model))(
        load_params(path, flat, info))
  if info is None:
    _, info = read_config(path, cfg.max_len)
  reader = _Reader(path)
  plan = specs(cfg, info["family"], "reward" if info["is_reward"] else "causal_lm")
  resolved = _check_tensors(reader, plan, path, cfg.tie_embeddings)
  abstract = st.abstract_params(model)
  shardings = st.param_shardings(model)
  flat_abs = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
  flat_sh = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(shardings)}
  planned = {s.path for s in plan}
  # Heads a checkpoint does not hold start at zero: the scalar head of a causal LM (the
  # reward stage and the critic replace it) and a reward model's unused untied LM head.
  zero = ("scalar_head", "lm_head") if info["is_reward"] else ("scalar_head",)
  missing = [p for p in flat_abs if p not in planned and p[0] not in zero]
  if missing:  # a ModelConfig switch without a checkpoint mapping: our bug, not the user's
    raise HFError(f"{path}: no tensor mapping for parameter {'/'.join(missing[0])} "
                  f"(family {info['family']})")
  params = {}
  for p, a in flat_abs.items():
    if p in planned:
      continue
    _set(params, p, jax.make_array_from_callback(a.shape, flat_sh[p], lambda idx, a=a: np.zeros(
        a.shape, np.float32)[idx]))
  for spec in plan:
    host = np.asarray(spec.to_ours(*[reader.get(resolved[n]) for n in spec.names]), np.float32)
    a = flat_abs[spec.path]
    if host.shape != a.shape:
      raise HFError(f"{path}: {'/'.join(spec.path)} built as {list(host.shape)}, model expects "
                    f"{list(a.shape)}")
    # Each addressable device gets only its slice; the host copy is freed after.
    _set(params, spec.path, jax.make_array_from_callback(a.shape, flat_sh[spec.path],
                                                         lambda idx, h=host: h[idx]))
    del host
  return params


def load(path: str, mesh=None, dtype=None, max_len: int | None = None):
  """(model, params) from a local Hugging Face folder; params are float32.

  dtype: the compute dtype ("float32", "bfloat16" or a jnp dtype; default float32);
  parameters stay float32 as in every rlhf_jax train state. mesh: shard the
  parameters over it (default: one device). max_len: see read_config.
  """
  cfg, info = read_config(path, max_len)
  if dtype is not None:
    try:
      name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    except TypeError:
      name = str(dtype)
    if name not in DTYPES:
      raise HFError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    cfg = dataclasses.replace(cfg, dtype=name)
  model = st.make_model(cfg, mesh)
  return model, load_params(path, model, info)


# --- writing ------------------------------------------------------------------

def _host(x) -> np.ndarray:
  from rlhf_jax.train.sharding import to_host
  return to_host(x)


def save(out_dir: str, model, params, tokenizer=None, kind: str = "causal_lm", *,
         model_type: str | None = None, reward_gain: float | None = None,
         reward_bias: float | None = None, special_ids: dict | None = None) -> str:
  """Write a Hugging Face folder: config.json, model.safetensors, generation_config.json
  and, with `tokenizer`, its files (tokenizer.save(out_dir)).

  kind="causal_lm": *ForCausalLM; kind="reward": *ForSequenceClassification with
  num_labels=1 (score.weight) and pad_token_id set, so transformers reads the score
  at the last real token as our reward model does. Our scalar head's bias has no
  place there; the ranking loss is translation invariant, so it stays ~0 after reward
  training, and it is checked (HFError if |bias| > 1e-4) and folded into the recorded
  normalisation. reward_gain / reward_bias (the reward stage's normalization.json)
  go into config.json as `rlhf_jax_reward_gain` / `rlhf_jax_reward_bias`:
  normalised score = gain * HF score + bias.
  model_type: the HF family to write (default: inferred from the switches; models
  rlhf_jax pretrained are Llama). special_ids: bos/eos/pad ids when no tokenizer.
  Parameters are written float32 unless they are bfloat16. Returns out_dir.
  Multi-host: every process must call it (gathers), process 0 writes.
  """
  if kind not in ("causal_lm", "reward"):
    raise HFError(f"save: kind {kind!r} is not one of causal_lm, reward")
  if model.cfg.scan_layers:  # HF folders are per layer (model.layers.{i}.*)
    params = stacking.unstack_layers(params)
    model = st.make_model(dataclasses.replace(model.cfg, scan_layers=False), model.mesh, model.rules)
  cfg = model.cfg
  family = model_type or family_of(cfg)
  if family not in FAMILIES:
    raise HFError(f"save: model_type {family!r} is not one of {', '.join(FAMILIES)}")
  ids = dict(special_ids or {})
  if tokenizer is not None:
    for k in ("bos_id", "eos_id", "pad_id"):
      if getattr(tokenizer, k, None) is not None:
        ids.setdefault(k, int(getattr(tokenizer, k)))
  hf_cfg = to_hf_config(cfg, family, kind, ids)
  # Parse what we wrote back: a switch the family's config.json cannot express fails here.
  back, _ = parse_config(json.loads(json.dumps(hf_cfg)), f"{out_dir}/config.json", cfg.max_len)
  _same_architecture(cfg, ModelConfig(**back), family)
  if kind == "reward":
    if ids.get("pad_id") is None:
      raise HFError("save: kind='reward' needs a pad id (tokenizer or special_ids['pad_id']): "
                    "transformers finds the last real token through pad_token_id")
    b = float(_host(params["scalar_head"]["bias"]).reshape(-1)[0])
    if abs(b) > 1e-4:
      raise HFError(f"save: the reward model's scalar head has bias {b:.3g}; "
                    f"*ForSequenceClassification has none and a trained one should be ~0")
    gain = 1.0 if reward_gain is None else float(reward_gain)
    hf_cfg["rlhf_jax_reward_gain"] = gain
    hf_cfg["rlhf_jax_reward_bias"] = (0.0 if reward_bias is None else float(reward_bias)) + gain * b
    hf_cfg["rlhf_jax_reward_note"] = ("normalised reward = rlhf_jax_reward_gain * score + "
                                      "rlhf_jax_reward_bias (score read at the last non-pad token)")
  tensors = {}
  dtype = np.float32
  leaves = {tuple(k.key for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(params)}
  if any(getattr(v, "dtype", None) == DTYPES["bfloat16"] for v in leaves.values()):
    import ml_dtypes
    dtype = ml_dtypes.bfloat16
  for spec in specs(cfg, family, kind):
    if spec.path not in leaves:
      raise HFError(f"save: params have no {'/'.join(spec.path)}")
    arrs = spec.to_hf(np.asarray(_host(leaves[spec.path]), np.float32))
    for name, arr in zip(spec.names, arrs):
      tensors[name] = np.ascontiguousarray(arr).astype(dtype)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    _write_safetensors(os.path.join(out_dir, "model.safetensors"), tensors)
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = "bfloat16" if dtype != np.float32 else "float32"
    with open(os.path.join(out_dir, "config.json"), "w") as f:
      json.dump(hf_cfg, f, indent=2, sort_keys=True)
    gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_cfg}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
      json.dump(gen, f, indent=2)
    if tokenizer is not None and hasattr(tokenizer, "save"):
      tokenizer.save(out_dir)
  return out_dir


def _write_safetensors(path: str, tensors: dict) -> None:
  """safetensors' own writer (float32, or bfloat16 through ml_dtypes), atomically."""
  tmp = path + ".tmp"
  safetensors.numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
                              metadata={"format": "pt"})
  os.replace(tmp, path)


def architecture_fields(cfg: ModelConfig) -> dict:
  """The config.model keys a checkpoint fixes (all but transformer.NOT_ARCHITECTURE: how
  the model runs and its layer layout, which load_params converts; and max_len where
  positions are rotary): what the pipeline records from config.json and compares with a
  user's config.model.*."""
  skip = NOT_ARCHITECTURE + (("max_len",) if cfg.positions == "rope" else ())
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(ModelConfig) if f.name not in skip}


def _same_architecture(cfg: ModelConfig, back: ModelConfig, family: str) -> None:
  for f in dataclasses.fields(ModelConfig):
    if f.name in NOT_ARCHITECTURE or (f.name == "max_len" and cfg.positions == "rope"):
      continue
    a, b = getattr(cfg, f.name), getattr(back, f.name)
    if a != b and not (isinstance(a, float) and abs(a - b) <= 1e-6 * max(1.0, abs(a))):
      raise HFError(f"save: model.{f.name}={a!r} cannot be written as a {family} config.json "
                    f"(it would read back as {b!r})")
