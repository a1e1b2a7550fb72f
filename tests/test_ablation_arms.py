"""The ablation's arm registry (experiments/arms.py): every method's arm names, their
configs, matched compute, and the per-arm peak / final / per-PFLOP table."""
import json
import os

import pytest

from configs import tiny
from experiments import ppo_vs_bok as pvb
from rlhf_jax import config_lib
from rlhf_jax.model.transformer import ModelConfig


def _model_cfg(cfg):
  return ModelConfig.from_config(cfg.model, vocab_size=cfg.data.vocab_size)


def test_every_method_has_arms_that_make_valid_configs():
  cfg = tiny.get_config()
  assert pvb.parse_arm("dpo_b0.1") == ("dpo", {"dpo.loss_type": "sigmoid", "dpo.beta": 0.1})
  assert pvb.parse_arm("ipo_b0.5")[1]["dpo.loss_type"] == "ipo"
  assert pvb.parse_arm("grpo_k8")[1] == {"grpo.k": 8, "grpo.advantage": "grpo",
                                         "grpo.kl_mode": "loss", "grpo.loss_agg": "sequence"}
  assert pvb.parse_arm("rloo_k4")[1]["grpo.advantage"] == "rloo"
  assert pvb.parse_arm("drgrpo_k4")[1]["grpo.loss_agg"] == "constant"
  for bad in ("grpo_k1", "dpo_b0", "dpo", "sft_k3"):
    with pytest.raises(ValueError):
      pvb.parse_arm(bad)
  _, plans = pvb.plan_arms(cfg, pvb.ALL_ARMS.split(","), _model_cfg(cfg))
  for p in plans:
    arm = pvb.arm_config(cfg, p, seed=1)
    assert arm.stages == p["stage"]
    config_lib.validate(arm, 1)  # an arm never fails config validation after the shared stages
  args = pvb.parse_args(["--workdir", "x", "--arms", "all"])
  assert len(args.arms) == len(pvb.ALL_ARMS.split(",")) > len(pvb.DEFAULT_ARMS.split(","))


def test_new_arms_match_the_budget():
  """DPO's reference pass is paid for out of its budget; GRPO runs more iterations than PPO
  because it trains and runs no critic."""
  cfg = tiny.get_config()
  budget, plans = pvb.plan_arms(cfg, ["ppo_kl0", "dpo_b0.1", "grpo_k4", "grpo_k8"], _model_cfg(cfg))
  by = {p["arm"]: p for p in plans}
  for p in plans:
    assert p["est_flops"] == pytest.approx(budget, rel=0.05), p
  assert by["grpo_k4"]["steps"] > by["ppo_kl0"]["steps"]
  assert by["grpo_k8"]["steps"] < by["grpo_k4"]["steps"]  # twice the samples per prompt
  per = pvb.registry.dpo_compute(cfg, _model_cfg(cfg))
  assert by["dpo_b0.1"]["steps"] == round((budget - per["offline_flops"]) / per["flops"])


def _fake_policy_arm(root, stage, golds, kls, flops_per_step):
  os.makedirs(os.path.join(root, stage), exist_ok=True)
  pts = [{"iteration": i, "gold_reward": g, "proxy_reward": 0.3 * i, "kl": k,
          "flops": i * flops_per_step, "tokens_sampled": 0} for i, (g, k) in enumerate(zip(golds, kls))]
  s = {"sft_gold_reward": golds[0], "gold_reward": golds[-1], "proxy_reward": pts[-1]["proxy_reward"],
       "kl": kls[-1], "eval_points": pts}
  n = len(golds) - 1
  if stage == "dpo":
    s.update(steps=n, flops_per_step=flops_per_step, offline_flops=0.0, label_flops=7e9)
  else:
    s.update(iterations=n, flops_per_iteration=flops_per_step, tokens_sampled_per_iteration=64)
  with open(os.path.join(root, stage, "summary.json"), "w") as f:
    json.dump(s, f)


def test_report_gives_peak_gold_kl_at_peak_and_gold_per_pflop(tmp_path):
  cfg = tiny.get_config("test")
  arms = ["dpo_b0.1", "grpo_k4"]
  budget, plans = pvb.plan_arms(cfg, arms, _model_cfg(cfg))
  wd = str(tmp_path / "abl")
  # grpo over-optimises: gold peaks at 1.0 (KL 2) then falls while the proxy rises.
  _fake_policy_arm(os.path.join(wd, "arms", "grpo_k4", "seed0"), "grpo", [0.0, 0.6, 1.0, 0.2],
                   [0.0, 1.0, 2.0, 5.0], 1e14)
  _fake_policy_arm(os.path.join(wd, "arms", "dpo_b0.1", "seed0"), "dpo", [0.0, 0.4, 0.5],
                   [0.0, 0.5, 0.8], 1e14)
  args = pvb.parse_args(["--workdir", wd, "--arms", ",".join(arms)])
  md = open(pvb.write_report(wd, args, budget, plans, [0], failures=[])).read()
  row = next(l for l in md.splitlines() if l.startswith("| grpo_k4 |")).split("|")
  header = next(l for l in md.splitlines() if l.startswith("| arm |")).split("|")
  col = {h.strip(): i for i, h in enumerate(header)}
  assert float(row[col["peak gold"]]) == 1.0 and float(row[col["KL at peak"]]) == 2.0
  assert float(row[col["gold"]]) == pytest.approx(0.2)
  assert float(row[col["gold gain / PFLOP"]]) == pytest.approx(0.2 / 0.3, rel=1e-2)
  dpo = next(l for l in md.splitlines() if l.startswith("| dpo_b0.1 |")).split("|")
  assert dpo[col["label FLOPs"]].strip() != "—"
  assert "**grpo_k4: yes**" in md
