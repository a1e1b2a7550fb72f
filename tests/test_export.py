"""Hugging Face export: hf.save -> transformers loads the same model; the export CLI."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import helpers
from rlhf_jax import export, hf
from rlhf_jax.model.transformer import ModelConfig, architecture
from rlhf_jax.stages.common import ARCH
from rlhf_jax.stages.policy_eval import reward_scores
from rlhf_jax.train import state as st
from rlhf_jax.train.checkpoint import Checkpointer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
IDS = {"bos_id": 2, "eos_id": 3, "pad_id": 0}
# Ours: the default (Llama-style, tied) model rlhf_jax pretrains, small and with GQA.
OURS = ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_len=32)


def _batch(vocab):
  tokens = np.random.RandomState(0).randint(4, vocab, (2, 9)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  mask[1, 6:] = False
  tokens[~mask] = 0
  return tokens, mask


def _ours(model, params, tokens, mask):
  out = jax.jit(lambda p, t, m: model.apply({"params": p}, t, m, scalar=True))(params, tokens, mask)
  return np.asarray(out["logits"])


def _theirs(auto, path, tokens, mask):
  torch = pytest.importorskip("torch")
  m = auto.from_pretrained(path, dtype=torch.float32).eval()
  with torch.no_grad():
    return m(input_ids=torch.tensor(tokens, dtype=torch.long),
             attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()


def test_save_then_transformers_loads_the_same_causal_lm(tmp_path):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = st.make_model(OURS)
  params = st.init_params(model, jax.random.key(1))
  tokens, mask = _batch(OURS.vocab_size)
  cases = [("rlhf_jax", model, params, IDS, tokens, mask, _ours(model, params, tokens, mask))]
  for family in ("llama", "gemma2", "gpt2"):  # rope scaling, soft-capping, Conv1D/LayerNorm
    path = os.path.join(FIXTURES, family)
    m, p = hf.load(path)
    exp = load_file(os.path.join(path, "expected.safetensors"))  # our logits (test_hf)
    cases.append((family, m, p, {"bos_id": 1, "eos_id": 2, "pad_id": 0}, exp["tokens"],
                  exp["mask"].astype(bool), exp["logits"]))
  for name, m, p, ids, tokens, mask, ours in cases:
    out = str(tmp_path / name)
    hf.save(out, m, p, special_ids=ids)
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == ("llama" if name == "rlhf_jax" else name)
    theirs = _theirs(transformers.AutoModelForCausalLM, out, tokens, mask)
    diff = np.abs(ours - theirs)[mask].max()
    assert diff <= 1e-4, (name, diff)
    # and it reads back into the identical tree
    _, back = hf.load(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 {k: v for k, v in p.items() if k != "scalar_head"},
                 {k: v for k, v in back.items() if k != "scalar_head"})


def test_save_reward_model_scores_in_transformers(tmp_path):
  pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model = st.make_model(OURS)
  params = st.init_params(model, jax.random.key(2))  # random head kernel, zero bias
  out = str(tmp_path / "rm")
  hf.save(out, model, params, kind="reward", special_ids=IDS, reward_gain=2.0, reward_bias=-0.5)
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["architectures"] == ["LlamaForSequenceClassification"] and cfg["pad_token_id"] == 0
  assert (cfg["rlhf_jax_reward_gain"], cfg["rlhf_jax_reward_bias"]) == (2.0, -0.5)
  tokens, mask = _batch(OURS.vocab_size)
  _, raw = reward_scores(model, params, jnp.asarray(tokens), jnp.asarray(mask), 1.0, 0.0)
  theirs = _theirs(transformers.AutoModelForSequenceClassification, out, tokens, mask)[:, 0]
  np.testing.assert_allclose(np.asarray(raw), theirs, atol=1e-4)
  # an imported reward model reads back as one
  _, info = hf.read_config(out)
  assert info["is_reward"]


def test_reward_head_bias_must_be_zero(tmp_path):
  model = st.make_model(OURS)
  params = st.init_params(model, jax.random.key(2))
  params["scalar_head"]["bias"] = params["scalar_head"]["bias"] + 0.5
  with pytest.raises(hf.HFError, match="bias 0.5"):
    hf.save(str(tmp_path / "rm"), model, params, kind="reward", special_ids=IDS)


def _checkpoint(stage_dir, model, params, step=3):
  meta = {"model": {**dataclasses.asdict(model.cfg), "arch": ARCH}}
  ckpt = Checkpointer(os.path.join(stage_dir, "checkpoints"), async_save=False)
  ckpt.save(step, {"params": params, "step": jnp.int32(step)}, meta)
  ckpt.close()


def test_export_cli_writes_a_folder_hf_load_reads_back(tmp_path):
  """A workdir as the stages leave it (orbax checkpoints with the model in meta, the
  reward normalisation, the sentencepiece tokenizer) -> `python -m rlhf_jax.export`."""
  from rlhf_jax.data.tokenizer import Tokenizer
  work = tmp_path / "work"
  tok = Tokenizer.train([f"the cat {i} sat on the mat {i % 7}" for i in range(300)],
                        str(work / "tokenizer"), vocab_size=61)
  model = st.make_model(dataclasses.replace(OURS, vocab_size=tok.vocab_size, head_dim=0))
  sft = st.init_params(model, jax.random.key(3))
  _checkpoint(str(work / "sft"), model, sft)
  _checkpoint(str(work / "best_of_k" / "round_1"), model, st.init_params(model, jax.random.key(4)))
  rm = st.init_params(model, jax.random.key(5))
  _checkpoint(str(work / "best_of_k" / "round_2"), model, rm)
  _checkpoint(str(work / "reward"), model, rm)
  with open(work / "reward" / "checkpoints" / "normalization.json", "w") as f:
    json.dump({"gain": 1.5, "bias": 0.25}, f)

  out = tmp_path / "sft_hf"
  p = subprocess.run([sys.executable, "-m", "rlhf_jax.export", "--workdir", str(work), "--stage",
                      "sft", "--out", str(out)], cwd=helpers.REPO, env=helpers.env(),
                     capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-2000:]
  assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= set(
      os.listdir(out))
  assert json.load(open(out / "tokenizer_config.json"))["pad_token"] == "<pad>"
  cfg = json.load(open(out / "config.json"))
  assert (cfg["architectures"], cfg["tie_word_embeddings"]) == (["LlamaForCausalLM"], True)
  assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (2, 3, 0)
  back_model, back = hf.load(str(out))
  tokens, mask = _batch(model.cfg.vocab_size)
  np.testing.assert_allclose(_ours(back_model, back, tokens, mask), _ours(model, sft, tokens, mask),
                             atol=1e-6)

  # reward stage: kind defaults to reward, normalisation recorded; best_of_k: the last round
  assert export.main(["--workdir", str(work), "--stage", "reward", "--out", str(tmp_path / "rm")]) == 0
  rcfg = json.load(open(tmp_path / "rm" / "config.json"))
  assert rcfg["architectures"] == ["LlamaForSequenceClassification"]
  assert (rcfg["rlhf_jax_reward_gain"], rcfg["rlhf_jax_reward_bias"]) == (1.5, 0.25)
  assert export.main(["--workdir", str(work), "--stage", "best_of_k", "--out", str(tmp_path / "b")]) == 0
  emb = load_file(str(tmp_path / "b" / "model.safetensors"))["model.embed_tokens.weight"]
  np.testing.assert_array_equal(emb, np.asarray(rm["embed"]))


def test_export_of_lora_stages_writes_merged_full_weights(tmp_path, capsys):
  """LoRA stages' checkpoints hold adapters naming their base (issue 16): a QLoRA (NF4) SFT
  on pretrain, written scanned, and a LoRA DPO on that SFT, unrolled. Each exports as the
  next stage loads it: full weights, adapters merged onto the stored base, per layer; the
  HF folder reloads to the merged model's logits."""
  from rlhf_jax.model.stacking import stack_layers, unstack_layers
  from rlhf_jax.train import lora
  work = tmp_path / "work"
  model = st.make_model(OURS)
  pretrain = st.init_params(model, jax.random.key(3))
  _checkpoint(str(work / "pretrain"), model, pretrain)

  def lora_stage(name, base_name, m, base, quant, key):
    ft = lora.FineTune(m, lora.LoraSpec(rank=4, alpha=8.0, quant=quant))
    rng = np.random.RandomState(key)  # B = 0 at init: moved, as training would
    trained = jax.tree.map(lambda x: jnp.asarray(x + 0.1 * rng.randn(*x.shape).astype(np.float32)),
                           ft.init_trainable(base, jax.random.key(key)))
    meta = {"model": {**dataclasses.asdict(m.cfg), "arch": ARCH}, **ft.meta(base_name)}
    ckpt = Checkpointer(os.path.join(work, name, "checkpoints"), async_save=False)
    ckpt.save(2, {"params": trained, "step": jnp.int32(2)}, meta)
    ckpt.close()
    return ft.merged(trained, ft.store(base))

  scan = st.make_model(dataclasses.replace(OURS, scan_layers=True))
  sft = unstack_layers(lora_stage("sft", "pretrain", scan, stack_layers(pretrain), "nf4", 10))
  dpo = lora_stage("dpo", "sft", model, sft, "none", 20)
  tokens, mask = _batch(OURS.vocab_size)
  logits = jax.jit(lambda p: model.apply({"params": p}, tokens, mask)["logits"])
  for stage, merged in (("sft", sft), ("dpo", dpo)):
    out = str(tmp_path / stage)
    export.export(str(work), stage, out)
    back_model, back = hf.load(out)
    assert architecture(dataclasses.asdict(back_model.cfg)) == architecture(dataclasses.asdict(OURS))
    want = np.asarray(logits(merged))
    assert np.abs(want - np.asarray(logits(pretrain))).max() > 0.1  # the adapters matter
    np.testing.assert_allclose(np.asarray(logits(back)), want, atol=1e-5)
  # PPO's LoRA critic sits on the reward model, which the checkpoint does not name
  assert export.main(["--workdir", str(work), "--stage", "dpo", "--item", "critic_params",
                      "--out", str(tmp_path / "c")]) == 2
  assert "--item critic_params of a LoRA stage" in capsys.readouterr().err


def test_export_cli_errors_are_one_line_exit_2(tmp_path, capsys):
  work = tmp_path / "work"
  work.mkdir()
  assert export.main(["--workdir", str(work), "--stage", "ppo", "--out", str(tmp_path / "o")]) == 2
  assert export.main(["--workdir", str(work), "--stage", "label", "--out", str(tmp_path / "o")]) == 2
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 2, err
  assert "ppo/checkpoints: no checkpoint" in err[0] and "--stage 'label'" in err[1]
