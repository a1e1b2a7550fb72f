"""The real command, small: pretrain then SFT on configs/tiny.py:test."""
import json
import math

import helpers


def test_pretrain_then_sft(tmp_path):
  p = helpers.run_cli(tmp_path, "--config.stages=pretrain,sft", timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  for stage in ("pretrain", "sft"):
    d = tmp_path / stage
    s = helpers.read_json(d / "summary.json")
    assert math.isfinite(s["init_eval_loss"]) and math.isfinite(s["eval_loss"]), s
    assert s["eval_loss"] < s["init_eval_loss"], (stage, s)
    lines = (d / "metrics.jsonl").read_text().splitlines()
    assert lines
    rows = [json.loads(l) for l in lines]  # every line is one JSON object
    assert all(isinstance(r, dict) and isinstance(r["step"], int) for r in rows)
    assert any("loss" in r for r in rows) and any("eval_loss" in r for r in rows)
    assert max(r["step"] for r in rows) == s["steps"]
    assert helpers.finished_steps(d / "checkpoints"), "no checkpoint"
  # SFT starts from the pretrained weights: its initial loss is far below a random model's.
  pre = helpers.read_json(tmp_path / "pretrain" / "summary.json")
  sft = helpers.read_json(tmp_path / "sft" / "summary.json")
  assert sft["init_eval_loss"] < pre["init_eval_loss"]


def test_sft_without_pretrain_names_the_missing_stage(tmp_path):
  p = helpers.run_cli(tmp_path, "--config.stages=sft", timeout=120)
  assert p.returncode == 2, p.stderr[-3000:]
  lines = helpers.stderr_lines(p.stderr)
  assert len(lines) == 1, p.stderr[-3000:]
  assert lines[0].startswith("rlhf_jax: error:") and "pretrain" in lines[0], lines[0]
  assert not (tmp_path / "sft").exists()


def test_stage_keys_are_distinct_per_name():
  """Every stage / best-of-K round gets its own RNG key (round_12 and round_21 once shared one)."""
  import types
  import jax
  import numpy as np
  from rlhf_jax.pipeline import Context
  ctx = types.SimpleNamespace(config=types.SimpleNamespace(seed=0))
  names = ["pretrain", "sft", "label", "reward", "reward_norm", "ppo", "best_of_k", "evaluate"]
  names += [f"best_of_k/round_{r}" for r in range(1, 100)]
  keys = {tuple(np.asarray(jax.random.key_data(Context.key(ctx, n))).tolist()) for n in names}
  assert len(keys) == len(names)
