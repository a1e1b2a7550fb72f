"""model.scan_layers (one nn.scan over a stacked, remat'd Block): the same model as the
Python loop over `layer_i` for the same weights (rlhf_jax/model/stacking.py converts),
with LoRA / QLoRA adapters stacked too, the KV-cache sampler, and a LoRA train step."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rlhf_jax.model.stacking import stack_layers, to_layout, unstack_layers
from rlhf_jax.model.transformer import ModelConfig
from rlhf_jax.sampling import SampleConfig, generate
from rlhf_jax.train import lora
from rlhf_jax.train import state as st
from rlhf_jax.train.step import make_train_step

CFG = ModelConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_len=24, tie_embeddings=False)
# NF4 base: the stacked kernels go through _quantized_leaf's "layers" path too.
QSPEC = lora.LoraSpec(rank=4, alpha=8.0, targets=("qkv", "o", "wi", "down", "lm_head"), quant="nf4")


@pytest.fixture(scope="module")
def setup():
  flat = st.make_model(CFG)
  # remat changes no value; the scanned model uses it (the combination scan_layers is for)
  scan = st.make_model(dataclasses.replace(CFG, scan_layers=True, remat="full"))
  params = st.init_params(flat, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 10), 0, CFG.vocab_size)
  mask = jnp.arange(10)[None, :] >= jnp.array([0, 3, 5])[:, None]  # left padding
  return flat, scan, params, tokens, mask


@pytest.fixture(scope="module")
def qlora(setup):
  """(unrolled FineTune, scanned FineTune, fresh stacked adapters, stacked NF4 base)."""
  flat, scan, params = setup[:3]
  ft, sft = lora.FineTune(flat, QSPEC), lora.FineTune(scan, QSPEC)
  return (ft, sft) + sft.split(stack_layers(params), jax.random.key(2))


_JIT = {}  # one jitted forward per model object: calls with the same params layout share it


def _logits(model, params, tokens, mask):
  if id(model) not in _JIT:
    _JIT[id(model)] = (model, jax.jit(lambda p, t, m: model.apply({"params": p}, t, m)["logits"]))
  return np.asarray(_JIT[id(model)][1](params, tokens, mask))


def test_scanned_model_equals_unrolled_for_the_same_weights(setup):
  flat, scan, params, tokens, mask = setup
  stacked = stack_layers(params)
  assert set(stacked) == {"layers", "embed", "final_norm", "lm_head", "scalar_head"}
  # The scanned model's own params have this layout, shapes and layer-axis sharding.
  abstract = st.abstract_params(scan)
  assert jax.tree.structure(abstract) == jax.tree.structure(stacked)
  qkv = abstract["layers"]["attn"]["qkv"]["kernel"]
  assert qkv.shape[0] == CFG.n_layers and qkv.sharding.spec[0] is None  # "layers": no mesh axis
  ref = _logits(flat, params, tokens, mask)
  np.testing.assert_allclose(_logits(scan, stacked, tokens, mask), ref, atol=2e-6, rtol=1e-5)
  # Converters are exact inverses; to_layout picks the direction.
  back = unstack_layers(stacked)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), back, params)))
  assert jax.tree.structure(to_layout(back, True)) == jax.tree.structure(stacked)
  # A different layer order gives different logits: the test sees the layer wiring.
  swapped = dict(params, layer_0=params["layer_1"], layer_1=params["layer_0"])
  assert np.abs(_logits(scan, stack_layers(swapped), tokens, mask) - ref).max() > 1e-3


def test_scanned_qlora_is_base_at_init_and_matches_unrolled_lora(setup, qlora):
  flat, scan, params, tokens, mask = setup
  ft, sft, tr, fz = qlora
  a = tr["adapters"]["layers"]["mlp"]["wi"]["a"]
  assert a.shape == (CFG.n_layers, CFG.d_model, 4)  # adapters stacked like their kernels
  assert jax.tree.structure(sft.abstract_trainable()) == jax.tree.structure(tr)
  assert isinstance(fz["layers"]["mlp"]["wi"]["kernel"], lora.QTensor)  # stacked kernels quantised
  base = _logits(scan, lora.load_base(fz), tokens, mask)
  np.testing.assert_array_equal(_logits(sft.model, sft.apply_params(tr, fz), tokens, mask), base)
  # Trained (random) adapters: each layer reads its own slice, as the unrolled model does.
  tr = jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(3), x.shape), tr)
  want = _logits(ft.model, ft.apply_params(_unstack(tr), ft.store(params)), tokens, mask)
  got = _logits(sft.model, sft.apply_params(tr, fz), tokens, mask)
  assert np.abs(want - base).max() > 0.1
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  merged = _logits(scan, sft.merged(tr, fz), tokens, mask)
  np.testing.assert_allclose(merged, want, atol=2e-5, rtol=1e-5)


def test_greedy_sampling_with_scan_equals_without(setup):
  flat, scan, params, tokens, mask = setup
  sc = SampleConfig(max_new_tokens=6, eos_id=-1, pad_id=0, greedy=True)
  run = lambda m, p: jax.jit(lambda p: generate(m, p, tokens, mask, jax.random.key(0), sc))(p)
  want, got = run(flat, params), run(scan, stack_layers(params))
  np.testing.assert_array_equal(np.asarray(got["tokens"]), np.asarray(want["tokens"]))
  np.testing.assert_allclose(np.asarray(got["logprobs"]), np.asarray(want["logprobs"]), atol=1e-5)


def _unstack(trainable):
  return {"adapters": unstack_layers(trainable["adapters"])}


def _nll(logits, tokens, mask):  # next-token loss, numpy (the unrolled side needs no grad)
  logp = jax.nn.log_softmax(jnp.asarray(logits))
  nll = -jnp.take_along_axis(logp, jnp.roll(tokens, -1, axis=1)[..., None], -1)[..., 0]
  return float(jnp.sum(nll * mask) / jnp.sum(mask))


def test_qlora_train_step_with_scan_matches_unrolled(setup, qlora):
  """Two AdamW steps of the scanned QLoRA model (remat, deterministic=False: the training
  path); its losses equal the unrolled model's at the same (unstacked) adapters."""
  flat, scan, params, tokens, mask = setup
  ft, sft, tr, fz = qlora

  def loss_fn(p, b, rng):
    logits = scan.apply({"params": p}, b["x"], b["m"], deterministic=False)["logits"]
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, jnp.roll(b["x"], -1, axis=1)[..., None], -1)[..., 0]
    return jnp.sum(nll * b["m"]) / jnp.sum(b["m"]), {}

  opt = optax.adamw(1e-2)
  t_loss = sft.loss(loss_fn)
  step = jax.jit(make_train_step(lambda t, b, r: t_loss(t, b, r, fz), opt))
  state = {"params": tr, "opt_state": opt.init(tr), "step": jnp.int32(0)}
  frozen = ft.store(params)
  for i in range(2):
    want = _nll(_logits(ft.model, ft.apply_params(_unstack(state["params"]), frozen), tokens, mask),
                tokens, mask)
    state, m = step(state, {"x": tokens, "m": mask}, jax.random.key(i))
    np.testing.assert_allclose(float(m["loss"]), want, rtol=1e-5)
  moved = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state["params"], tr)
  assert min(jax.tree.leaves(moved)) > 0  # every stacked adapter trained (B of every layer)


def test_hf_import_stacks_and_export_unstacks(tmp_path):
  """Hugging Face folders are per layer: a scanned model imports them stacked and exports
  them per layer again, the same tensors as the unrolled model's."""
  import os
  from rlhf_jax import hf
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf", "llama")
  model, params = hf.load(path)
  scan = st.make_model(dataclasses.replace(model.cfg, scan_layers=True))
  stacked = hf.load_params(path, scan)
  same = lambda a, b: all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x == y).all()), a, b)))
  assert same(stacked, stack_layers(params))
  hf.save(str(tmp_path), scan, stacked, special_ids={"bos_id": 1, "eos_id": 2, "pad_id": 0})
  back_model, back = hf.load(str(tmp_path))
  assert not back_model.cfg.scan_layers and same(back, params)
  # config.model.hf fixes the architecture, not the layout: scan_layers=true is kept
  import ml_collections
  from rlhf_jax import config_lib, pipeline
  c = ml_collections.ConfigDict({"data": {"tokenizer": ""}, "model": config_lib.model(
      hf=path, max_len=32, scan_layers=True, remat="full")})
  pipeline.apply_hf_model(c)
  assert (c.model.scan_layers, c.model.remat, c.model.d_model) == (True, "full", model.cfg.d_model)


def test_load_params_converts_a_checkpoint_of_the_other_layout(setup, tmp_path, capsys):
  """An earlier stage written unrolled loads into a scanned model, stacked (and back), also
  when the later stage runs with other compute settings (model.remat, dtype, dropout: what
  pipeline.fixed_keys lets change between runs); an architecture change fails naming the
  field."""
  import os
  import types
  from rlhf_jax.stages import common
  from rlhf_jax.train.checkpoint import Checkpointer, CheckpointMismatch
  flat, _, params = setup[:3]
  scan = st.make_model(dataclasses.replace(flat.cfg, scan_layers=True, remat="full",
                                           dtype="bfloat16", dropout=0.1))
  ctx = types.SimpleNamespace(stage_dir=lambda s: os.path.join(tmp_path, s), model_cfg=flat.cfg)
  ck = Checkpointer(os.path.join(tmp_path, "sft", "checkpoints"), async_save=False)
  ck.save(1, {"params": params}, common.model_meta(ctx))
  ctx.model_cfg = scan.cfg  # a later run with model.scan_layers=true
  got, _ = common.load_params(ctx, "sft", scan)
  want = stack_layers(params)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x == y).all()), got, want)))
  assert got["layers"]["mlp"]["wi"]["kernel"].sharding == st.param_shardings(scan)["layers"]["mlp"]["wi"]["kernel"]
  assert got["layers"]["mlp"]["wi"]["kernel"].dtype == jnp.float32  # params stay float32
  wider = st.make_model(dataclasses.replace(flat.cfg, d_ff=96, remat="full"))
  with pytest.raises(CheckpointMismatch, match=r'different model .*"d_ff": \[64, 96\]') as e:
    common.load_params(ctx, "sft", wider)
  assert "remat" not in str(e.value)
  # An interrupted stage resumes under another model.remat / dtype (announced), not under
  # the other layout (its state is restored as saved).
  ctx.model_cfg = scan.cfg
  meta = {**common.model_meta(ctx), "run": {"seed": 0}}
  with pytest.raises(CheckpointMismatch, match='"scan_layers": \\[false, true\\]'):
    common.resume(ck, {"params": st.abstract_params(scan)}, "sft", meta)
  ctx.model_cfg = dataclasses.replace(scan.cfg, scan_layers=False)
  meta = {**common.model_meta(ctx), "run": {"seed": 0}}
  state, _ = common.resume(ck, {"params": st.abstract_params(flat)}, "sft", meta)
  assert all(jax.tree.leaves(jax.tree.map(lambda x, y: bool((x == y).all()), state["params"], params)))
  ck.close()
  assert "model.remat none -> full" in capsys.readouterr().out
