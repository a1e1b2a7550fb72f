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
