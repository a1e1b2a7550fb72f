"""One code path from one device to a mesh: 8 fake CPU devices give the same numbers.

The device count is fixed when JAX starts, so the multi-device parts run in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8.
"""
import json
import math
import os

import pytest

import helpers

_STEP_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from rlhf_jax import config_lib as cl
from rlhf_jax.model.transformer import ModelConfig
from rlhf_jax.stages.common import lm_losses
from rlhf_jax.train import sharding as sh, state as st
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.step import compile_step, make_train_step

assert jax.device_count() == 8
cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, max_len=32)
opt_cfg = cl.optimizer(1e-2, weight_decay=0.01)
rng = np.random.default_rng(0)
B, L = 8, 16
tokens = rng.integers(0, 64, (B, L)).astype(np.int32)
mask = np.ones((B, L), bool)
mask[::2, 11:] = False  # some right padding
loss_mask = mask.astype(np.float32)
loss_mask[:, 0] = 0
batch = dict(tokens=tokens, mask=mask, loss_mask=loss_mask)

def train(mesh, params0):
  model = st.make_model(cfg, mesh)
  opt = make_optimizer(opt_cfg, 10)
  loss_fn, _ = lm_losses(model)
  fresh = lambda p: {"params": p, "opt_state": opt.init(p), "step": jnp.zeros((), jnp.int32)}
  init_state, abstract = st.jit_init(fresh, st.abstract_params(model))
  state = init_state(jax.device_put(params0, st.param_shardings(model)))
  step = compile_step(make_train_step(loss_fn, opt, grad_accum=2), mesh, st.shardings_of(abstract), batch)
  losses = []
  for i in range(3):
    state, m = step(state, sh.put_batch(batch, mesh), jax.random.key(i))
    losses.append(float(m["loss"]))
    if i == 0:  # copied now: the next step donates the state's buffers
      first = jax.tree.map(np.asarray, state["params"])
  return state, losses, first

mesh1 = sh.mesh_of((1, 1, 1), jax.devices()[:1])
mesh8 = sh.mesh_of((2, 2, 2), jax.devices())
key = jax.random.key(3)
params1 = st.init_params(st.make_model(cfg, mesh1), key)
params8 = st.init_params(st.make_model(cfg, mesh8), key)  # created sharded
mlp = params8["layer_0"]["mlp"]  # every MLP kernel: one axis over fsdp, one over tensor
init_diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(params1), jax.tree.leaves(params8)))
params0 = jax.tree.map(np.asarray, params1)
s1, l1, first1 = train(mesh1, params0)
s8, l8, first8 = train(mesh8, params0)

def param_diffs(t1, t8):
  out = {}
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(t1)[0], jax.tree.leaves(t8)):
    a, b = np.asarray(a), np.asarray(b)
    d, scale = np.abs(a - b), float(np.max(np.abs(a)))
    out[jax.tree_util.keystr(path)] = [float(d.max()), scale, int(np.sum(d > 1e-6 + 1e-5 * scale)), a.size]
  return out
diffs1, diffs = param_diffs(first1, first8), param_diffs(s1["params"], s8["params"])
shards = lambda tree: {jax.tree_util.keystr(p): [list(x.shape), list(x.addressable_shards[0].data.shape),
                                                  str(x.sharding.spec), x.sharding.is_fully_replicated]
                        for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
print(json.dumps(dict(
    losses1=l1, losses8=l8, diffs1=diffs1, diffs=diffs, init_diff=init_diff,
    mlp=shards(mlp), trained_mlp=shards(s8["params"]["layer_0"]["mlp"]),
    # AdamW's first and second moments of those kernels, after the steps.
    moments=shards([s for s in jax.tree.leaves(s8["opt_state"], is_leaf=lambda x: hasattr(x, "mu"))
                    if hasattr(s, "mu")][0]),
    embed_shard=list(params8["embed"].addressable_shards[0].data.shape),
    step8=int(s8["step"]), n_devices=len(params8["embed"].sharding.device_set))))
"""


def test_sharded_train_step_matches_one_device():
  r = helpers.run_script(_STEP_SCRIPT, devices=8, timeout=300)
  # (b) parameters really are split over the mesh, at init and after a step.
  assert r["mlp"] and r["mlp"].keys() == r["trained_mlp"].keys()
  for tree in (r["mlp"], r["trained_mlp"]):  # at init and after the jitted step
    for name, (shape, shard, spec, replicated) in tree.items():
      assert not replicated, (name, spec)
      assert math.prod(shard) * 4 == math.prod(shape), (name, shape, shard, spec)  # fsdp=2 x tensor=2
  # Optimizer moments are split like their params (they were replicated: every FSDP
  # device held both AdamW moments of the whole model).
  moments = {k: v for k, v in r["moments"].items() if "['layer_0']['mlp']" in k}
  assert len(moments) == 2 * len(r["mlp"]), sorted(r["moments"])
  for name, (shape, shard, spec, replicated) in moments.items():
    assert not replicated and math.prod(shard) * 4 == math.prod(shape), (name, shape, shard, spec)
  assert r["embed_shard"] == [32, 16], r  # vocab over tensor, embed over fsdp
  assert r["n_devices"] == 8
  # Sharded init gives the same random weights as single-device init.
  assert r["init_diff"] < 1e-6, r["init_diff"]
  # (a) same losses and same updated parameters (float32 tolerance).
  assert r["step8"] == 3
  for a, b in zip(r["losses1"], r["losses8"]):
    assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (r["losses1"], r["losses8"])
  assert r["losses1"][-1] < r["losses1"][0]  # the steps did train
  # Parameters agree to float32 precision, except on the rare element whose gradient
  # nearly cancels to ~eps (1e-8): there Adam's g / (|g| + eps) turns float32 reduction-order
  # noise into a visible fraction of a step (seen: one MLP element, gradient 2.1e-8 vs
  # 2.3e-8, moved 2% of lr = 1e-2 apart). A sharding bug (a missing reduction, a wrong
  # shard) moves most elements by whole steps, so: at most 1% of a tensor's elements
  # outside float32 tolerance (seen: 6 of 2048 after three steps, the rows fed by that
  # element), none by more than a tenth of a step.
  for diffs in (r["diffs1"], r["diffs"]):  # after the first and the third step
    for name, (diff, scale, n_off, size) in diffs.items():
      assert n_off <= max(1, size // 100) and diff <= 0.1 * 1e-2, (name, diff, scale, n_off, size)


_MESH = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]


def _reference(tmp_path_factory):
  from test_reliability import OVERRIDES, reference_run
  return reference_run(tmp_path_factory), OVERRIDES


@pytest.mark.reference_run
def test_pretrain_cli_on_mesh_matches_one_device(tmp_path, tmp_path_factory):
  """The suite's reference pretraining (one device) run again on data=2,fsdp=2,tensor=2."""
  from configs import tiny
  from rlhf_jax import config_lib
  c = tiny.get_config("test")
  c.mesh.update(data=2, fsdp=2, tensor=2)
  config_lib.validate(c, 8)  # the overrides below form a valid 8-device config
  ref, overrides = _reference(tmp_path_factory)
  eight = helpers.run_cli(tmp_path / "eight", *overrides, "--config.stages=pretrain", *_MESH, devices=8,
                          timeout=300)
  assert eight.returncode == 0, eight.stderr[-3000:]
  s1 = helpers.read_json(os.path.join(ref, "pretrain", "summary.json"))
  s8 = helpers.read_json(tmp_path / "eight" / "pretrain" / "summary.json")
  rel = abs(s1["eval_loss"] - s8["eval_loss"]) / abs(s1["eval_loss"])
  print(f"eval_loss 1 device {s1['eval_loss']!r}, 8 devices {s8['eval_loss']!r}, rel diff {rel:.2e}")
  assert rel < 1e-4, (s1["eval_loss"], s8["eval_loss"])
  assert math.isclose(s1["init_eval_loss"], s8["init_eval_loss"], rel_tol=1e-5)
  assert s8["eval_loss"] < s8["init_eval_loss"]
  # The 8-device checkpoint was written from sharded arrays and holds full-size params.
  a1 = helpers.restore_all(os.path.join(ref, "pretrain"))["arrays"]
  a8 = helpers.restore_all(str(tmp_path / "eight" / "pretrain"))["arrays"]
  assert a1.keys() == a8.keys()
  for k in a1:
    assert a1[k].shape == a8[k].shape, k


@pytest.mark.reference_run
def test_ppo_iteration_on_mesh_matches_one_device(tmp_path, tmp_path_factory):
  """PPO (rollouts, four forwards, GAE, updates, adaptive KL, evaluations) on
  data=2,fsdp=2,tensor=2 matches the reference run's one-device PPO, starting from the
  same SFT / reward checkpoints."""
  from test_reliability import copy_before
  ref, overrides = _reference(tmp_path_factory)
  eight = copy_before(ref, "ppo", tmp_path / "eight")
  p = helpers.run_cli(eight, *overrides, "--config.stages=ppo", *_MESH, devices=8, timeout=400)
  assert p.returncode == 0, p.stderr[-3000:]
  r1 = [json.loads(l) for l in open(os.path.join(ref, "ppo", "metrics.jsonl"))]
  r8 = [json.loads(l) for l in open(os.path.join(eight, "ppo", "metrics.jsonl"))]
  assert [r["step"] for r in r1] == [r["step"] for r in r8]
  worst = 0.0
  for a, b in zip(r1, r8):
    for k in ("proxy_reward", "kl", "kl_coef", "policy_loss", "value_loss", "explained_variance",
              "response_length", "gold_reward", "eval_gold_reward", "eval_kl"):
      if k in a:
        worst = max(worst, abs(a[k] - b[k]) / max(abs(a[k]), 1e-3))
        assert math.isclose(a[k], b[k], rel_tol=1e-3, abs_tol=1e-4), (k, a[k], b[k])
  print(f"PPO, 1 vs 8 devices: largest relative difference {worst:.2e}")
  s1 = helpers.read_json(os.path.join(ref, "ppo", "summary.json"))
  s8 = helpers.read_json(os.path.join(eight, "ppo", "summary.json"))
  assert math.isclose(s1["gold_reward"], s8["gold_reward"], rel_tol=1e-4, abs_tol=1e-5)


_GRPO_SCRIPT = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from configs import tiny
from rlhf_jax.model.transformer import ModelConfig
from rlhf_jax.sampling import SampleConfig
from rlhf_jax.stages.grpo import make_iteration
from rlhf_jax.train import sharding as sh, state as st
from rlhf_jax.train.optim import make_optimizer

assert jax.device_count() == 8
cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, max_len=16)
gc = tiny.get_config("test").grpo.copy_and_resolve_references()
gc.update(prompts_per_iteration=4, k=2, minibatches=2, epochs=2, response_len=6, kl_coef=0.05,
          use_eos_penalty=False)
gc.opt.update(lr=1e-2)
sc = SampleConfig(max_new_tokens=6, eos_id=3, pad_id=0)
score = lambda tokens, mask, r, rm, ended: jnp.sum((r == 7) & rm, -1) / jnp.maximum(jnp.sum(rm, -1), 1)
host = {"prompt": np.random.default_rng(0).integers(4, 16, (4, 4)).astype(np.int32),
        "prompt_mask": np.ones((4, 4), bool), "index": np.arange(4, dtype=np.int32)}

def one_iteration(mesh, params0):
  model = st.make_model(cfg, mesh)
  opt = make_optimizer(gc.opt, 10)
  fresh = lambda p: {"params": p, "opt_state": opt.init(p), "step": jnp.zeros((), jnp.int32),
                     "skipped": jnp.zeros((), jnp.int32)}
  init_state, abstract = st.jit_init(fresh, st.abstract_params(model))
  psh = st.param_shardings(model)
  state = init_state(jax.device_put(params0, psh))
  frozen = {"ref": jax.device_put(params0, psh)}
  batch = sh.put_batch(host, mesh)
  it = jax.jit(make_iteration(model, opt, gc, sc, 4, score_fn=score),
               in_shardings=(st.shardings_of(abstract), {"ref": psh},
                             jax.tree.map(lambda x: sh.batch_sharding(mesh, x.ndim), host),
                             sh.replicated(mesh)),
               out_shardings=(st.shardings_of(abstract), sh.replicated(mesh)))
  state, m = it(state, frozen, batch, jax.random.key(1))
  figs = {k: float(v) for k, v in m.items() if not k.startswith("_") and np.ndim(v) == 0}
  return figs, np.asarray(m["_response"]), jax.tree.map(np.asarray, state["params"])

mesh1 = sh.mesh_of((1, 1, 1), jax.devices()[:1])
mesh8 = sh.mesh_of((2, 2, 2), jax.devices())
params0 = jax.tree.map(np.asarray, st.init_params(st.make_model(cfg, mesh1), jax.random.key(3)))
f1, r1, p1 = one_iteration(mesh1, params0)
f8, r8, p8 = one_iteration(mesh8, params0)
moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params0)))
diff = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)))
print(json.dumps(dict(f1=f1, f8=f8, same_samples=bool(np.array_equal(r1, r8)), moved=moved, diff=diff)))
"""


def test_grpo_iteration_on_mesh_matches_one_device():
  """One GRPO iteration (K samples per prompt, group advantages, epochs x minibatches of
  clipped updates with the k3 term) on data=2,fsdp=2,tensor=2 matches one device."""
  r = helpers.run_script(_GRPO_SCRIPT, devices=8, timeout=300)
  assert r["same_samples"], "the 8-device rollout sampled different responses"
  for k in ("score", "kl", "policy_loss", "kl_loss", "loss", "group_std", "response_length"):
    assert math.isclose(r["f1"][k], r["f8"][k], rel_tol=1e-3, abs_tol=1e-5), (k, r["f1"][k], r["f8"][k])
  assert r["moved"] > 1e-3  # the updates did change the policy ...
  assert r["diff"] < 0.1 * 1e-2, r["diff"]  # ... the same way (within a tenth of a step at lr 1e-2)
  print(f"GRPO iteration, 1 vs 8 devices: largest parameter difference {r['diff']:.2e}")
