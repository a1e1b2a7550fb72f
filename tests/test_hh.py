"""configs/hh.py:test: a Hugging Face model folder -> SFT on HH-RLHF chosen replies -> reward
model on the pairs -> PPO -> best-of-K -> evaluate, and a bad model folder failing early.

The model folder is a tiny random Llama written by `rlhf_jax.hf.save` with a sentencepiece
tokenizer trained on the dialogues, so the test needs no torch and no network."""
import json
import os

import jax
import numpy as np

from rlhf_jax import hf
from rlhf_jax.data import world
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.model.transformer import ModelConfig
from rlhf_jax.train import state as st
from tests.helpers import run_cli

CONFIG = "configs/hh.py:test"


def _dialogues(n: int, seed: int = 5) -> list[dict]:
  """HH-RLHF rows: multi-turn dialogues, some long enough that their prompt must be cut."""
  rng = np.random.default_rng(seed)
  prompts = world.make_prompts(seed, n)
  good, bad = world.make_responses(seed + 1, prompts, "demo"), world.make_responses(seed + 2, prompts, "mixed")
  rows = []
  for i, (p, a, b) in enumerate(zip(prompts, good, bad)):
    turns = "".join(f"\n\nHuman: {q}\n\nAssistant: {r}"
                    for q, r in zip(prompts[:int(rng.integers(0, 4))], good))
    head = f"{turns}\n\nHuman: {p}\n\nAssistant:"
    rows.append({"chosen": f"{head} {a}", "rejected": f"{head} {b}"})
  return rows


def _model_folder(root, texts) -> str:
  tok = Tokenizer.train(texts, str(root / "spm" / "tok"), 160)
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1,
                    d_ff=64, max_len=128)
  model = st.make_model(cfg)
  params = st.init_params(model, jax.random.key(0))
  out = str(root / "tiny-llama")
  hf.save(out, model, params, tokenizer=tok)
  return out


def test_hh_config_runs_from_a_hf_model(tmp_path):
  rows = _dialogues(96)
  data = tmp_path / "hh"
  data.mkdir()
  with open(data / "train.jsonl", "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  model_dir = _model_folder(tmp_path, [r["chosen"] for r in rows])
  work = tmp_path / "work"
  p = run_cli(work, f"--config.model.hf={model_dir}", f"--config.data.files.ranking={data}",
              config=CONFIG, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  saved = json.loads((work / "config.json").read_text())
  assert saved["model"]["d_model"] == 32 and saved["model"]["n_layers"] == 2  # from config.json
  for stage in ("sft", "reward", "ppo", "best_of_k", "evaluate"):
    assert (work / stage / "summary.json").exists(), stage
  sft = json.loads((work / "sft" / "summary.json").read_text())
  assert sft["eval_loss"] < sft["init_eval_loss"]
  ppo = json.loads((work / "ppo" / "summary.json").read_text())
  assert np.isfinite(ppo["proxy_reward"]) and np.isfinite(ppo["kl"])
  assert "gold_reward" not in ppo or ppo["gold_reward"] is None  # no gold scorer for real data
  assert (work / "report.md").exists()


def test_bad_model_folder_fails_before_compiling(tmp_path):
  folder = tmp_path / "broken"
  folder.mkdir()
  p = run_cli(tmp_path / "work", f"--config.model.hf={folder}",
              f"--config.data.files.ranking={tmp_path}", config=CONFIG, timeout=120)
  assert p.returncode == 2
  lines = [l for l in p.stderr.strip().splitlines() if l.startswith("rlhf_jax: error")]
  assert len(lines) == 1 and "config.json" in lines[0], p.stderr[-2000:]
  assert not os.path.exists(tmp_path / "work" / "sft")  # nothing started


def test_architecture_conflict_names_the_key(tmp_path):
  model_dir = _model_folder(tmp_path, [r["chosen"] for r in _dialogues(32)])
  p = run_cli(tmp_path / "work", f"--config.model.hf={model_dir}", "--config.model.d_model=64",
              f"--config.data.files.ranking={tmp_path}", config=CONFIG, timeout=120)
  assert p.returncode == 2
  assert "config.model.d_model" in p.stderr and "config.json" in p.stderr, p.stderr[-2000:]
