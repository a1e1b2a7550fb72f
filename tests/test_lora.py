"""LoRA / QLoRA (rlhf_jax/train/lora.py): exact at init, adapters-only training, merge,
quantisation error, a toy PPO run with LoRA (tests/test_ppo_toy.py's reward), and the
GRPO / online-DPO / offline-DPO steps with LoRA (reference = the SFT base, adapters off).
The dpo and grpo stages with LoRA end to end: tests/test_reliability.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from rlhf_jax.model.transformer import ModelConfig
from rlhf_jax.train import lora
from rlhf_jax.train import state as st
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.step import make_train_step

CFG = ModelConfig(vocab_size=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                  max_len=32)


# One worker runs the module, so its module-scoped fixture runs once (pytest-xdist loadgroup).
pytestmark = pytest.mark.xdist_group("lora")

@pytest.fixture(scope="module")
def setup():
  model = st.make_model(CFG)
  params = st.init_params(model, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, CFG.vocab_size)
  mask = jnp.arange(12)[None, :] < jnp.array([12, 9, 7, 12])[:, None]
  return model, params, tokens, mask


def _logits(model, params, tokens, mask):
  return jax.jit(lambda p: model.apply({"params": p}, tokens, mask)["logits"])(params)


def _perturbed(tree, scale=0.05):
  leaves, tdef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return jax.tree.unflatten(tdef, [x + scale * jax.random.normal(k, x.shape)
                                   for x, k in zip(leaves, keys)])


def test_lora_at_init_is_exactly_the_base_and_merge_matches_adapters(setup):
  model, params, tokens, mask = setup
  ft = lora.FineTune(model, lora.LoraSpec(rank=4, alpha=8.0))
  tr, fz = ft.split(params, jax.random.key(2))
  base = _logits(model, params, tokens, mask)
  at_init = _logits(ft.model, ft.apply_params(tr, fz), tokens, mask)
  np.testing.assert_array_equal(np.asarray(at_init), np.asarray(base))  # B = 0: bit-identical
  # Trained adapters (random here) change the model; merged weights give the same logits.
  tr2 = _perturbed(tr)
  adapted = _logits(ft.model, ft.apply_params(tr2, fz), tokens, mask)
  merged = _logits(model, ft.merged(tr2, fz), tokens, mask)
  assert float(jnp.max(jnp.abs(adapted - base))) > 0.5
  np.testing.assert_allclose(np.asarray(merged), np.asarray(adapted), atol=2e-5, rtol=1e-5)
  # Every targeted kernel got one adapter of the fused projection (qkv, o, wi, down per layer).
  assert sum(1 for _ in jax.tree.leaves(tr)) == 2 * 4 * CFG.n_layers
  assert lora.count(tr) < 0.2 * lora.count(params)


@pytest.mark.parametrize("quant,tol", [("bfloat16", 0.01), ("int8", 0.02), ("nf4", 0.3)])
def test_qlora_logits_within_tolerance_of_the_float_base(setup, quant, tol):
  """Relative RMS error of the logits with the base stored quantised (block 64). NF4 stores
  4 bits a weight: 9% RMS error per Gaussian weight (block 64), ~22% on these random logits."""
  model, params, tokens, mask = setup
  ft = lora.FineTune(model, lora.LoraSpec(rank=4, alpha=8.0, quant=quant))
  tr, fz = ft.split(params, jax.random.key(2))
  if quant in ("int8", "nf4"):
    kernel = fz["layer_0"]["mlp"]["wi"]["kernel"]
    assert isinstance(kernel, lora.QTensor) and kernel.q.dtype in (jnp.int8, jnp.uint8)
    bytes_ = kernel.q.size * kernel.q.dtype.itemsize
    assert bytes_ == params["layer_0"]["mlp"]["wi"]["kernel"].size // (1 if quant == "int8" else 2)
  base = _logits(model, params, tokens, mask)
  q = _logits(ft.model, ft.apply_params(tr, fz), tokens, mask)
  rel = float(jnp.sqrt(jnp.mean((q - base) ** 2) / jnp.mean(base ** 2)))
  print(f"{quant}: relative RMS logit error {rel:.4f}")
  assert 0 < rel < tol


def test_nf4_roundtrip_picks_the_nearest_level():
  x = jax.random.normal(jax.random.key(0), (3, 128))
  t = lora.quantize(x, "nf4", 64)
  back = lora.dequantize(t)
  xb = np.asarray(x).reshape(3, 2, 64)
  absmax = np.abs(xb).max(-1, keepdims=True)
  levels = lora.NF4[None, None, None, :] * absmax[..., None]
  want = np.take_along_axis(levels, np.abs(levels - xb[..., None]).argmin(-1)[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(back).reshape(3, 2, 64), want, rtol=1e-6, atol=1e-6)


def test_a_step_changes_only_adapters_and_the_reference_is_the_base(setup):
  model, params, tokens, mask = setup
  spec = lora.LoraSpec(rank=4, alpha=8.0)
  ft = lora.FineTune(model, spec)
  before = jax.tree.map(np.asarray, params)
  tr, fz = ft.split(params, jax.random.key(3))

  def loss_fn(p, batch, rng):
    logits = model.apply({"params": p}, batch["tokens"], batch["mask"])["logits"]
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 5]), {}

  opt = make_optimizer(tiny.get_config("test").sft.opt, 10)
  t_loss = ft.loss(loss_fn)
  step = jax.jit(lambda s, b, r, f: make_train_step(lambda t, b2, r2: t_loss(t, b2, r2, f), opt)(s, b, r))
  state = {"params": tr, "opt_state": opt.init(tr), "step": jnp.zeros((), jnp.int32)}
  # The optimizer state covers the adapters only: AdamW's two moments of each (+ 2 step counters).
  assert lora.count(state["opt_state"]) == 2 * lora.count(tr) + 2
  batch = {"tokens": tokens, "mask": mask}
  for i in range(3):
    state, m = step(state, batch, jax.random.key(i), fz)
  new = state["params"]
  assert all(float(jnp.max(jnp.abs(b))) > 0 for b in jax.tree.leaves(
      jax.tree.map(lambda ab: ab["b"], new["adapters"], is_leaf=lambda x: "b" in x)))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, fz), before)  # base untouched
  # Adapters switched off = the SFT (base) model, bit for bit; switched on, the model moved.
  off = _logits(ft.model, lora.apply_params({"adapters": {}}, fz), tokens, mask)
  np.testing.assert_array_equal(np.asarray(off), np.asarray(_logits(model, params, tokens, mask)))
  on = _logits(ft.model, ft.apply_params(new, fz), tokens, mask)
  assert float(jnp.mean(jax.nn.log_softmax(on)[..., 5])) > float(jnp.mean(jax.nn.log_softmax(off)[..., 5]))


def test_heads_train_in_full_and_adapters_shard_like_their_kernels(setup):
  model, params, _, _ = setup
  ft = lora.FineTune(model, lora.LoraSpec(rank=4, alpha=8.0, heads=("scalar_head",)))
  abstract = ft.abstract_trainable()
  assert set(abstract) == {"adapters", "full"}
  assert abstract["full"]["scalar_head"]["kernel"].shape == params["scalar_head"]["kernel"].shape
  qkv = abstract["adapters"]["layer_0"]["attn"]["qkv"]
  assert qkv["a"].shape == (64, 4) and qkv["b"].shape == (4, 2 * (2 + 2) * 16)
  # qkv's in axis is `embed` (-> fsdp), its out axis `kv_heads` (-> tensor).
  assert tuple(qkv["a"].sharding.spec) == ("fsdp", None)
  assert tuple(qkv["b"].sharding.spec) == (None, "tensor")


def test_config_lora_is_validated():
  from rlhf_jax.config_lib import ConfigError, validate
  for key, value, words in (("stages", "pretrain,sft", "pretraining"), ("quant", "int4", "int4"),
                            ("stages", "sft,online", "'online'.*the online stage trains every weight"),
                            ("targets", "qkv,nope", "nope"), ("dropout", 0.1, "dropout")):
    c = tiny.get_config("test")
    with c.unlocked():
      c.lora.rank = 8
      c.lora[key] = value
    with pytest.raises(ConfigError, match=f"config.lora.{key}:.*{words}"):
      validate(c, 1)
  c = tiny.get_config("test")
  with c.unlocked():
    c.lora.update(rank=8, stages="dpo,grpo")  # every fine-tuning stage trains adapters
  validate(c, 1)


def test_ppo_with_lora_raises_the_toy_reward():
  """test_ppo_toy's token-7 reward, with a LoRA policy on the frozen SFT (= reference)
  weights and a LoRA critic on a frozen reward model: only adapters and heads train."""
  from test_ppo_toy import toy_score
  from rlhf_jax.sampling import SampleConfig
  from rlhf_jax.stages.ppo import lora_views
  from rlhf_jax.stages.ppo_step import make_iteration
  pc = tiny.get_config("test").ppo.copy_and_resolve_references()
  pc.update(rollout_batch=32, minibatches=2, epochs=2, response_len=8, kl_coef=0.01,
            use_eos_penalty=False, critic_lr=3e-2)
  pc.opt.update(lr=3e-2)
  cfg = ModelConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64,
                    max_len=32)
  model = st.make_model(cfg)
  sft, rm = st.init_params(model, jax.random.key(0)), st.init_params(model, jax.random.key(1))
  spec = lora.LoraSpec(rank=8, alpha=16.0)
  policy_ft = lora.FineTune(model, spec)
  critic_ft = lora.FineTune(model, lora.LoraSpec(rank=8, alpha=16.0, heads=("scalar_head",)))
  policy, critic = policy_ft.init_trainable(sft, jax.random.key(2)), critic_ft.init_trainable(rm, jax.random.key(3))
  popt, copt = make_optimizer(pc.opt, 100), make_optimizer(pc.opt, 100)
  sc = SampleConfig(max_new_tokens=pc.response_len, eos_id=3, pad_id=0, temperature=1.0)
  iteration = jax.jit(make_iteration(policy_ft.model, critic_ft.model, popt, copt, pc, sc, 4,
                                     score_fn=toy_score, views=lora_views(policy_ft, "merge")))
  state = {"params": policy, "opt_state": popt.init(policy), "critic_params": critic,
           "critic_opt_state": copt.init(critic), "step": jnp.zeros((), jnp.int32),
           "kl_coef": jnp.float32(pc.kl_coef)}
  frozen = {"ref": sft, "reward": rm, "gain": jnp.float32(1.0), "bias": jnp.float32(0.0)}
  rng = np.random.default_rng(0)
  scores = []
  for i in range(16):  # the toy dips first (KL and critic settling), then climbs
    prompt = np.concatenate([np.full((32, 1), 2), rng.integers(4, 16, (32, 3))], 1)
    batch = {"prompt": jnp.asarray(prompt, jnp.int32), "prompt_mask": jnp.ones((32, 4), bool),
             "index": jnp.arange(32, dtype=jnp.int32)}
    state, m = iteration(state, frozen, batch, jax.random.key(i))
    scores.append(float(m["score"]))
    assert bool(m["finite_loss"]) and bool(m["finite_grads"])
  print("token-7 frequency per iteration (LoRA):", np.round(scores, 3))
  assert scores[0] < 0.2
  assert np.mean(scores[-3:]) > scores[0] + 0.25, scores
  assert float(m["kl"]) > 0
  assert lora.count(state["params"]) < 0.5 * lora.count(sft)  # rank 8 of d=32: 35%


SMALL = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64,
                    max_len=16)  # test_grpo's model: one layer, seconds to compile


def _adapters_only_moved(new, fresh, frozen, before):
  """The frozen base is bit-identical to the SFT params; the trainable part is adapters
  only, and every B (zero at init) moved."""
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, frozen), before)
  assert set(new) == {"adapters"} and jax.tree.structure(new) == jax.tree.structure(fresh)
  bs = [ab["b"] for ab in jax.tree.leaves(new["adapters"], is_leaf=lambda x: "b" in x)]
  assert bs and all(float(jnp.max(jnp.abs(b))) > 0 for b in bs)


def test_grpo_and_online_dpo_with_lora_train_adapters_against_the_sft_base():
  """GRPO (and online DPO) through their real steps with LoRA views: only adapters train
  (optimizer state for adapters only), the frozen SFT base stays bit-identical, and the
  reference log-probs are the SFT model's while the policy has moved."""
  from test_grpo import toy_score
  from rlhf_jax.sampling import SampleConfig
  from rlhf_jax.stages import common, grpo, online_dpo
  from rlhf_jax.stages.rollout import response_logprobs
  model = st.make_model(SMALL)
  sft = st.init_params(model, jax.random.key(0))
  before = jax.tree.map(np.asarray, sft)
  ft = lora.FineTune(model, lora.LoraSpec(rank=4, alpha=8.0))
  views = common.lora_views(ft, "merge")
  fresh = ft.init_trainable(sft, jax.random.key(1))
  frozen = {"ref": ft.store(sft)}  # unquantised: the SFT params themselves, one copy
  sc = SampleConfig(max_new_tokens=8, eos_id=3, pad_id=0, temperature=1.0)
  prompts = lambda i: {"prompt": jax.random.randint(jax.random.key(100 + i), (8, 4), 4, 16),
                       "prompt_mask": jnp.ones((8, 4), bool), "index": jnp.arange(8)}

  gc = tiny.get_config("test").grpo.copy_and_resolve_references()
  gc.update(prompts_per_iteration=8, k=2, minibatches=2, epochs=1, response_len=8, kl_coef=0.01,
            use_eos_penalty=False)
  gc.opt.update(lr=3e-2)
  opt = make_optimizer(gc.opt, 10)
  it = grpo.make_iteration(ft.model, opt, gc, sc, 4, score_fn=toy_score, views=views)
  state = {"params": fresh, "opt_state": opt.init(fresh), "step": jnp.zeros((), jnp.int32),
           "skipped": jnp.zeros((), jnp.int32)}
  # AdamW's two moments of each adapter weight and nothing of the base (+ its counters).
  assert lora.count(state["opt_state"]) == 2 * lora.count(fresh) + lora.count(opt.init({}))
  state, m = jax.jit(it)(state, frozen, prompts(0), jax.random.key(0))
  assert bool(m["finite_grads"]) and float(m["kl"]) == 0.0  # rolled out at B = 0: policy = ref
  _adapters_only_moved(state["params"], fresh, frozen["ref"], before)
  # The iteration's scoring pass on fixed sequences (no second sampler to compile).
  tokens = jax.random.randint(jax.random.key(5), (8, 12), 4, 16)
  g = {"tokens": tokens, "mask": jnp.ones((8, 12), bool), "response": tokens[:, 4:],
       "response_mask": jnp.ones((8, 8), bool), "ended": jnp.ones((8,), bool)}
  ro = jax.jit(it.score)(state, frozen, g)
  sft_logp = jax.jit(lambda p: response_logprobs(model, p, tokens, g["mask"], 4, 1.0)[1])(sft)
  np.testing.assert_array_equal(np.asarray(ro["ref_logp"]), np.asarray(sft_logp))
  assert float(jnp.max(jnp.abs(ro["old_logp"] - ro["ref_logp"]))) > 1e-3  # the policy moved

  dc = tiny.get_config("test").dpo.copy_and_resolve_references()
  dc.update(beta=0.1, batch_size=8, response_len=8)
  dc.opt.update(lr=3e-2, warmup_steps=0)
  opt = make_optimizer(dc.opt, 10)
  rc = tiny.get_config("test").ppo.copy_and_resolve_references()
  rc.use_eos_penalty = False
  step = jax.jit(online_dpo.make_step(ft.model, opt, dc, rc, sc, 4, score_fn=toy_score, views=views))
  state = {"params": fresh, "opt_state": opt.init(fresh), "step": jnp.zeros((), jnp.int32),
           "skipped": jnp.zeros((), jnp.int32)}
  for i in range(2):
    state, m = step(state, frozen, prompts(i), jax.random.key(i))
  _adapters_only_moved(state["params"], fresh, frozen["ref"], before)
  assert float(m["kl"]) > 0  # step 2 rolls out the moved policy, KL to the SFT base


def test_offline_dpo_with_lora_reference_is_the_sft_model():
  """Offline DPO's reference log-probs from the LoRA base with adapters switched off equal
  the SFT model's (bit for bit), also for a QLoRA base within its quantisation error;
  a step trains adapters only."""
  from test_dpo import _toy_pairs
  from rlhf_jax.stages.dpo import make_loss, sequence_logps
  model = st.make_model(SMALL)
  sft = st.init_params(model, jax.random.key(0))
  before = jax.tree.map(np.asarray, sft)
  pairs = _toy_pairs(np.random.default_rng(0), 16)
  logp = jax.jit(lambda m, p: sequence_logps(m, p, pairs["chosen_tokens"], pairs["chosen_mask"],
                                             pairs["chosen_loss_mask"]), static_argnums=0)
  sft_lp = logp(model, sft)
  ft = lora.FineTune(model, lora.LoraSpec(rank=4, alpha=8.0))
  trainable, frozen = ft.split(sft, jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(logp(ft.model, ft.base_view(frozen))), np.asarray(sft_lp))
  q = lora.FineTune(model, lora.LoraSpec(rank=4, alpha=8.0, quant="int8"))
  q_lp = logp(q.model, q.base_view(q.store(sft)))
  assert 0 < float(jnp.max(jnp.abs(q_lp - sft_lp))) < 0.05 * float(jnp.max(jnp.abs(sft_lp)))
  for side in ("chosen", "rejected"):
    pairs[f"ref_{side}"] = sequence_logps(model, sft, pairs[f"{side}_tokens"], pairs[f"{side}_mask"],
                                          pairs[f"{side}_loss_mask"])
  dc = tiny.get_config("test").dpo.copy_and_resolve_references()
  dc.opt.update(lr=3e-2, warmup_steps=0)
  opt = make_optimizer(dc.opt, 10)
  t_loss = ft.loss(make_loss(model, dc))
  step = jax.jit(lambda s, b, r, f: make_train_step(lambda t, b2, r2: t_loss(t, b2, r2, f), opt)(
      s, b, r))
  state = {"params": trainable, "opt_state": opt.init(trainable), "step": jnp.zeros((), jnp.int32)}
  assert lora.count(state["opt_state"]) == 2 * lora.count(trainable) + lora.count(opt.init({}))
  state, m = step(state, pairs, jax.random.key(0), frozen)
  assert float(m["loss"]) == pytest.approx(np.log(2), abs=1e-6)  # policy = reference at step 0
  _adapters_only_moved(state["params"], trainable, frozen, before)
