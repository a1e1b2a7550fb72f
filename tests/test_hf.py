"""Hugging Face import: every family matches transformers' forward pass and greedy decoding.

The fixtures (tests/fixtures/hf/<family>/, written by tests/make_hf_fixtures.py) hold a
tiny random transformers model and what transformers computed with it, so these run
without torch; test_live_* redo the comparison against transformers when it imports.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from rlhf_jax import hf
from rlhf_jax.model.transformer import param_count
from rlhf_jax.sampling import SampleConfig, generate

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gpt2")


def _our_logits(model, params, tokens, mask):
  return np.asarray(jax.jit(lambda p, t, m: model.apply({"params": p}, t, m)["logits"])(
      params, jnp.asarray(tokens), jnp.asarray(mask)))


@pytest.mark.parametrize("family", FAMILIES)
def test_fixture_logits_and_greedy_match_transformers(family):
  path = os.path.join(FIXTURES, family)
  exp = load_file(os.path.join(path, "expected.safetensors"))
  model, params = hf.load(path)
  # param_count (MFU, reports) agrees with the tree for every family's shapes
  assert param_count(model.cfg) == sum(x.size for x in jax.tree.leaves(params))
  mask = exp["mask"].astype(bool)
  logits = _our_logits(model, params, exp["tokens"], mask)
  diff = np.abs(logits - exp["logits"])[mask].max()  # padded positions are free
  print(f"{family}: max abs logit diff {diff:.2e}")
  assert diff <= 1e-4, family
  sc = SampleConfig(max_new_tokens=16, eos_id=-1, pad_id=0, greedy=True)  # eos -1: never stops
  out = jax.jit(lambda p, x, m: generate(model, p, x, m, jax.random.key(0), sc))(
      params, jnp.asarray(exp["prompt"]), jnp.asarray(exp["prompt_mask"].astype(bool)))
  np.testing.assert_array_equal(np.asarray(out["response"]), exp["greedy"], err_msg=family)


def test_reward_fixture_scores_match_transformers():
  path = os.path.join(FIXTURES, "llama_reward")
  exp = load_file(os.path.join(path, "expected.safetensors"))
  cfg, info = hf.read_config(path)
  assert info["is_reward"] and info["pad_id"] == 0
  model, params = hf.load(path)
  from rlhf_jax.stages.policy_eval import reward_scores
  _, raw = jax.jit(lambda p, t, m: reward_scores(model, p, t, m, 1.0, 0.0))(
      params, jnp.asarray(exp["tokens"]), jnp.asarray(exp["mask"].astype(bool)))
  np.testing.assert_allclose(np.asarray(raw), exp["scores"], atol=1e-4)


def test_read_config_facts():
  cfg, info = hf.read_config(os.path.join(FIXTURES, "llama"))
  assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_original_max_len) == ("llama3", 8.0, 16)
  assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings) == (3, 1, 16, False)
  assert (info["bos_id"], info["eos_id"], info["pad_id"], info["is_reward"]) == (1, 2, 0, False)
  assert info["max_position_embeddings"] == cfg.max_len == 64
  q3, _ = hf.read_config(os.path.join(FIXTURES, "qwen3"))
  assert q3.head_dim == 20 and q3.d_model == 48 and q3.qk_norm


def _copy(tmp_path, family="llama"):
  dst = tmp_path / family
  shutil.copytree(os.path.join(FIXTURES, family), dst)
  return str(dst)


def _edit_config(path, **kw):
  p = os.path.join(path, "config.json")
  with open(p) as f:
    c = json.load(f)
  c.update(kw)
  with open(p, "w") as f:
    json.dump(c, f)


def _rewrite_tensors(path, fn):
  r = hf._Reader(path)
  tensors = fn({k: r.get(k) for k in r.entries})
  hf._write_safetensors(os.path.join(path, "model.safetensors"), tensors)


def _error(path, **kw) -> str:
  with pytest.raises(hf.HFError) as e:
    hf.load(path, **kw)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_bad_folders_fail_with_one_line_naming_file_and_field(tmp_path):
  assert issubclass(hf.HFError, __import__("rlhf_jax.config_lib").config_lib.ConfigError)
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "config.json: missing" in _error(str(empty))

  p = _copy(tmp_path)
  _rewrite_tensors(p, lambda t: {k: v for k, v in t.items() if "layers.1.mlp.up_proj" not in k})
  msg = _error(p)
  assert p in msg and "missing tensor model.layers.1.mlp.up_proj.weight" in msg

  shutil.rmtree(p)
  p = _copy(tmp_path)
  _edit_config(p, intermediate_size=41)
  msg = _error(p)
  assert "model.safetensors" in msg and "mlp.gate_proj.weight" in msg and "[41, 48]" in msg

  shutil.rmtree(p)
  p = _copy(tmp_path)
  _rewrite_tensors(p, lambda t: {**t, "model.layers.0.mlp.gate_proj.bias": np.zeros(40, np.float32)})
  assert "unexpected tensor model.layers.0.mlp.gate_proj.bias" in _error(p)

  cases = [
      (dict(model_type="falcon"), "model_type 'falcon'"),
      (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
       "rope_parameters.rope_type 'yarn'"),
      (dict(hidden_act="relu2"), "hidden_act 'relu2'"),
      (dict(quantization_config={"quant_method": "gptq"}), "quantization_config"),
  ]
  for edit, want in cases:
    shutil.rmtree(p)
    p = _copy(tmp_path)
    _edit_config(p, **edit)
    msg = _error(p)
    assert "config.json" in msg and want in msg, msg

  m = _copy(tmp_path, "mistral")
  _edit_config(m, sliding_window=32)
  assert "sliding_window=32 is shorter than the context max_len=64" in _error(m)
  hf.load(m, max_len=32)  # fine when no sequence is longer than the window


def test_pad_id_outside_the_vocabulary_gives_finite_values():
  """Tokenizers without a PAD token pad with id = vocab size: no embedding row, and JAX's
  default gather would fill NaN there, which masks (NaN * 0) do not remove."""
  from rlhf_jax.losses import lm_loss, token_logprobs
  from rlhf_jax.model.transformer import ModelConfig
  from rlhf_jax.stages.policy_eval import seq_logprobs
  from rlhf_jax.train import state as st
  model = st.make_model(ModelConfig(vocab_size=61, d_model=32, n_heads=2, n_kv_heads=2, d_ff=64))
  params = st.init_params(model, jax.random.key(0))
  tokens = np.full((2, 10), 61, np.int32)  # pad = vocab_size
  tokens[0, :10], tokens[1, :6] = np.arange(1, 11), np.arange(1, 7)
  mask = tokens != 61

  @jax.jit
  def run(p):
    logits = model.apply({"params": p}, tokens, mask)["logits"]
    loss, _ = lm_loss(logits, tokens, mask)
    return logits, loss, token_logprobs(logits, tokens), seq_logprobs(model, p, tokens, mask, 3, 1.0)
  logits, loss, lp, slp = run(params)
  for x in (logits, loss, lp, slp):
    assert np.isfinite(np.asarray(x)).all()
  # Real positions are unaffected by what the pad id is.
  ref = model.apply({"params": params}, np.where(mask, tokens, 0), mask)["logits"]
  np.testing.assert_allclose(np.asarray(logits)[mask], np.asarray(ref)[mask], atol=1e-5)


def test_config_validation_of_family_switches():
  from rlhf_jax.config_lib import ConfigError, validate
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "tiny", os.path.join(os.path.dirname(FIXTURES), "..", "..", "configs", "tiny.py"))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  for key, value, want in (("head_dim", 15, "model.head_dim: head_dim=15 must be even"),
                           ("act", "relu", "model.act: 'relu' is not one of"),
                           ("rope_scaling", "yarn", "model.rope_scaling: 'yarn'")):
    c = tiny.get_config("test")
    c.model[key] = value
    with pytest.raises(ConfigError, match=want):
      validate(c, 1)


# --- live comparisons (need torch + transformers) ---------------------------------


def test_live_transformers_still_computes_the_fixtures():
  """Load every fixture with the installed transformers: its logits must still be the
  fixture's (which ours match, above), or the fixtures are stale for this version."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  for family in FAMILIES + ("llama_reward",):
    path = os.path.join(FIXTURES, family)
    exp = load_file(os.path.join(path, "expected.safetensors"))
    auto = (transformers.AutoModelForSequenceClassification if family == "llama_reward"
            else transformers.AutoModelForCausalLM)
    ref = auto.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
      theirs = ref(input_ids=torch.tensor(exp["tokens"], dtype=torch.long),
                   attention_mask=torch.tensor(exp["mask"], dtype=torch.long)).logits.numpy()
    if family == "llama_reward":
      np.testing.assert_allclose(theirs[:, 0], exp["scores"], atol=1e-5)
      continue
    mask = exp["mask"].astype(bool)
    assert np.abs(exp["logits"] - theirs)[mask].max() <= 1e-5, f"{family}: fixture is stale"


def test_load_onto_a_device_mesh_shards_each_tensor():
  """On 2 devices with fsdp=2 every tensor goes straight to its shard and the model
  still computes transformers' logits."""
  import helpers
  code = f"""
import json, numpy as np, jax, jax.numpy as jnp
from safetensors.numpy import load_file
from rlhf_jax import hf
from rlhf_jax.train import sharding as sh
mesh = sh.mesh_of((1, 2, 1), jax.devices())
path = {os.path.join(FIXTURES, "qwen2")!r}
model, params = hf.load(path, mesh=mesh)
exp = load_file(path + "/expected.safetensors")
mask = exp["mask"].astype(bool)
logits = jax.jit(lambda p, t, m: model.apply({{"params": p}}, t, m)["logits"])(params, exp["tokens"], mask)
k = params["layer_0"]["mlp"]["wi"]["kernel"]
print(json.dumps({{"diff": float(np.abs(np.asarray(logits) - exp["logits"])[mask].max()),
                  "shard": list(k.addressable_shards[0].data.shape), "full": list(k.shape)}}))
"""
  out = helpers.run_script(code, devices=2)
  assert out["diff"] <= 1e-4
  assert out["full"] == [48, 2, 40] and out["shard"] == [24, 2, 40]  # embed split over fsdp


def test_sharded_checkpoint_through_its_index(tmp_path):
  """Large models ship as model-0000x-of-0000n.safetensors + model.safetensors.index.json."""
  p = _copy(tmp_path, "qwen2")
  r = hf._Reader(p)
  names = sorted(r.entries)
  parts = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for fname, part in parts.items():
    hf._write_safetensors(os.path.join(p, fname), {k: r.get(k) for k in part})
  os.remove(os.path.join(p, "model.safetensors"))
  with open(os.path.join(p, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": {k: fname for fname, part in parts.items() for k in part}}, f)
  _, sharded = hf.load(p)
  _, single = hf.load(os.path.join(FIXTURES, "qwen2"))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, single)
  os.remove(os.path.join(p, "model-00002-of-00002.safetensors"))
  assert "model-00002-of-00002.safetensors: missing" in _error(p)
