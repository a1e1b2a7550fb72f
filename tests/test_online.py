"""The `online` stage (iterated online RLHF): rounds end to end, exact resume after a kill
inside round 2, config errors, and its ablation arm at matched compute."""
import glob
import json
import os
import shutil
import signal

import numpy as np
import pytest

import helpers as h
from test_reliability import OVERRIDES, copy_before, reference_run
from configs import tiny
from experiments import ppo_vs_bok as pvb
from rlhf_jax import config_lib
from rlhf_jax.model.transformer import ModelConfig

# One worker runs the module, so its module-scoped fixture runs once (pytest-xdist loadgroup).
pytestmark = [pytest.mark.xdist_group("online"), pytest.mark.reference_run]

# The suite's reference run's overrides (PPO checkpoints every iteration, so a kill lands
# inside round 2's PPO) and three PPO iterations per round.
SHARED = OVERRIDES + ("--config.ppo.eval_every=2", "--config.online.ppo_iterations=3")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The online stage on a copy of the suite's reference run up to its reward stage."""
  wd = tmp_path_factory.mktemp("online") / "wd"
  copy_before(reference_run(tmp_path_factory), "ppo", wd)
  p = h.run_cli(wd, *SHARED, "--config.stages=online")
  assert p.returncode == 0, p.stderr[-4000:]
  return str(wd)


def test_two_rounds_end_to_end(reference):
  s = h.read_json(os.path.join(reference, "online", "summary.json"))
  assert [r["round"] for r in s["rounds"]] == [1, 2]
  r1, r2 = s["rounds"]
  assert "rm_accuracy" not in r1  # round 1 optimises the reward stage's model
  for k in ("gold_reward", "proxy_reward", "kl", "rm_accuracy", "rm_gold_accuracy",
            "label_gold_agreement", "label_flops", "flops"):
    assert np.isfinite(r2[k]), k
  assert r2["label_flops"] > 0 and r1["label_flops"] == 0
  # Round 2's RM learnt from the label stage's comparisons and its own 16 prompts'.
  rm = h.read_json(os.path.join(reference, "online", "round_2", "reward", "summary.json"))
  shared = h.read_json(os.path.join(reference, "reward", "summary.json"))
  assert rm["train_comparisons"] + rm["eval_comparisons"] == (
      shared["train_comparisons"] + shared["eval_comparisons"] + 16)
  with open(os.path.join(reference, "online", "round_2", "label", "data", "train.jsonl")) as f:
    assert len(f.readlines()) == 16
  # Normalised on the round-1 policy's samples, not SFT's: another gain than the shared RM's.
  assert rm["reward_gain"] != shared["reward_gain"]
  pts = s["eval_points"]
  assert pts[0]["iteration"] == 0 and pts[0]["kl"] == 0.0
  assert [p["iteration"] for p in pts] == [0, 2, 3, 5, 6]
  flops = [p["flops"] for p in pts]
  assert flops == sorted(flops)
  # Compute between round 1's end and round 2's first point includes the RM refresh.
  per_it = s["flops_per_iteration"]
  assert flops[3] - flops[2] == pytest.approx(s["refresh_flops"] + 2 * per_it)
  assert s["total_flops"] == pytest.approx(6 * per_it + s["refresh_flops"]) == pts[-1]["flops"]
  assert s["label_flops"] == r2["label_flops"] and s["final_checkpoint"] == "online/round_2/ppo"
  for k in ("sft_gold_reward", "gold_reward", "proxy_reward", "kl"):
    assert np.isfinite(s[k]), k


def _dirs(wd):
  """Every online sub-stage dir holding a summary or checkpoints, relative to wd."""
  out = {os.path.relpath(os.path.dirname(p), wd)
         for p in glob.glob(os.path.join(wd, "online", "round_*", "*", "summary.json"))}
  return sorted(out)


def _same(ref, got):
  strip = lambda o: json.dumps({k: v for k, v in o.items() if k != "wall_seconds"}, sort_keys=True)
  subs = _dirs(ref)
  assert subs == _dirs(got) and len(subs) == 4  # round_1/ppo, round_2/{label,reward,ppo}
  for sub in subs + ["online"]:
    a, b = os.path.join(ref, sub), os.path.join(got, sub)
    assert strip(h.read_json(f"{a}/summary.json")) == strip(h.read_json(f"{b}/summary.json")), sub
    if os.path.exists(f"{a}/metrics.jsonl"):
      assert h.read_jsonl(f"{a}/metrics.jsonl") == h.read_jsonl(f"{b}/metrics.jsonl"), sub
    if h.finished_steps(f"{a}/checkpoints"):
      ca, cb = h.restore_all(a), h.restore_all(b)
      assert ca["step"] == cb["step"] and sorted(ca["arrays"]) == sorted(cb["arrays"]), sub
      for k, x in ca["arrays"].items():
        assert np.array_equal(x, cb["arrays"][k]), f"{sub}: {k} differs"
  rel = "online/round_2/label/data/train.jsonl"
  with open(os.path.join(ref, rel), "rb") as f, open(os.path.join(got, rel), "rb") as g:
    assert f.read() == g.read()


def test_killed_inside_round_2_resumes_bit_identical(reference, tmp_path):
  """The workdir as a run killed after round 1 left it (round 2 not started, no stage summary);
  that run continues, is killed inside round 2's PPO, and a re-run ends bit-identical."""
  wd = str(tmp_path / "wd")
  online = os.path.join(reference, "online")
  shutil.copytree(reference, wd, ignore=lambda d, names: [
      n for n in names if (os.path.abspath(d) == os.path.abspath(reference)
                           and (n == "report.md" or n.endswith(".png")))
      or (os.path.abspath(d) == os.path.abspath(online) and n != "round_1")])
  ppo2 = os.path.join(wd, "online", "round_2", "ppo")
  proc = h.start_cli(wd, *SHARED, "--config.stages=online", log_path=str(tmp_path / "killed"))
  try:
    h.wait_until(lambda: h.finished_steps(os.path.join(ppo2, "checkpoints")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert not os.path.exists(os.path.join(ppo2, "summary.json")), "round 2 finished before the kill"
  step = max(h.finished_steps(os.path.join(ppo2, "checkpoints")))
  p = h.run_cli(wd, *SHARED, "--config.stages=online")
  assert p.returncode == 0, p.stderr[-4000:]
  assert "online/round_1/ppo finished earlier; skipping" in p.stdout
  assert "online/round_2/label finished earlier; skipping" in p.stdout
  assert "online/round_2/reward finished earlier; skipping" in p.stdout
  assert f"resuming from iteration {step}" in p.stdout, p.stdout[-3000:]
  _same(reference, wd)


def _cfg(**online):
  c = tiny.get_config("test")
  c.stages = "pretrain,sft,label,reward,online"
  c.online.update(online)
  return c


def _error(c) -> str:
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, 1)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_bad_online_config_fails_naming_the_key():
  config_lib.validate(_cfg(), 1)
  assert _error(_cfg(rounds=0)).startswith("config.online.rounds:")
  assert _error(_cfg(ppo_iterations=0)).startswith("config.online.ppo_iterations:")
  assert _error(_cfg(rm_init="scratch")).startswith("config.online.rm_init:")
  assert _error(_cfg(prompts_per_round=10_000)).startswith("config.online.prompts_per_round:")
  assert _error(_cfg(reward_steps=-1)).startswith("config.online.reward_steps:")
  c = _cfg()
  c.data.source = "files"
  assert _error(c).startswith("config.data.source:")


def test_online_arm_spends_the_budget_with_its_rm_refreshes():
  cfg = tiny.get_config()
  model_cfg = ModelConfig.from_config(cfg.model, vocab_size=cfg.data.vocab_size)
  budget, plans = pvb.plan_arms(cfg, ["ppo_kl0.05", "ppo_online_r1", "ppo_online_r3"], model_cfg)
  by = {p["arm"]: p for p in plans}
  assert by["ppo_online_r3"]["stage"] == "online"
  assert by["ppo_online_r1"]["steps"] == by["ppo_kl0.05"]["steps"]  # one round = one-shot PPO
  r3 = by["ppo_online_r3"]
  assert r3["est_flops"] == pytest.approx(budget, rel=0.1)
  # Three rounds, two RM refreshes: fewer PPO iterations in all than the one-shot arm.
  assert 3 * r3["steps"] < by["ppo_kl0.05"]["steps"]
  arm = pvb.arm_config(cfg, r3, seed=0)
  assert arm.online.rounds == 3 and arm.online.ppo_iterations == r3["steps"]
  config_lib.validate(arm, 1)
