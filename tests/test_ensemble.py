"""Reward-model ensembles (issue 17; Coste et al. 2024): aggregation, one vmapped program
whose members equal members trained alone, ensemble scoring in PPO, config errors."""
import os

import jax
import numpy as np
import pytest

import helpers
from configs import tiny
from rlhf_jax import config_lib, pipeline, rl
from rlhf_jax.pipeline import Context
from rlhf_jax.stages import common
from rlhf_jax.stages.policy_eval import RewardModel
from rlhf_jax.train import sharding as sh
from rlhf_jax.train import state as st

# One worker runs the module, so its module-scoped fixture runs once (pytest-xdist loadgroup).
pytestmark = [pytest.mark.xdist_group("ensemble"), pytest.mark.reference_run]


def test_aggregate_rewards_matches_numpy():
  s = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
  np.testing.assert_allclose(rl.aggregate_rewards(s, "mean"), s.mean(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(rl.aggregate_rewards(s, "wco"), s.min(0), rtol=1e-6)
  np.testing.assert_allclose(rl.aggregate_rewards(s, "uwo", 0.5), s.mean(0) - 0.5 * s.var(0),
                             rtol=1e-5, atol=1e-6)
  for how in rl.AGGREGATES:  # one member: its own scores, whatever the aggregation
    np.testing.assert_allclose(rl.aggregate_rewards(s[:1], how), s[0], rtol=1e-6)
  with pytest.raises(ValueError, match="max"):
    rl.aggregate_rewards(s, "max")


@pytest.mark.parametrize("key,value", [("reward.ensemble", 0), ("reward.aggregate", "max"),
                                       ("reward.ensemble_data", "jackknife"),
                                       ("reward.uwo_coef", -1.0), ("reward.member", 2)])
def test_bad_ensemble_config_names_the_key(key, value):
  cfg = tiny.get_config("test").copy_and_resolve_references()
  cfg.reward.ensemble = 2
  section, name = key.split(".")
  cfg[section][name] = value
  with pytest.raises(config_lib.ConfigError, match=f"config.{key}"):
    config_lib.validate(cfg, 1)


def test_lora_reward_ensemble_is_refused():
  cfg = tiny.get_config("test").copy_and_resolve_references()
  cfg.reward.ensemble = 3
  cfg.lora.rank = 4
  with pytest.raises(config_lib.ConfigError, match="config.reward.ensemble.*lora.stages"):
    config_lib.validate(cfg, 1)
  cfg.lora.stages = "sft"
  config_lib.validate(cfg, 1)


def _cfg(stages, **reward):
  """configs/tiny.py:test, shorter still: the weights' quality does not matter here."""
  cfg = tiny.get_config("test").copy_and_resolve_references()
  cfg.stages, cfg.compile_cache = stages, ""
  cfg.pretrain.update(steps=2, eval_every=2, ckpt_every=2, log_every=1)
  cfg.sft.update(steps=2, eval_every=2, ckpt_every=2, log_every=1)
  cfg.ppo.update(iterations=1, eval_every=1, ckpt_every=1)
  cfg.reward.update(steps=4, ckpt_every=2, eval_every=4, log_every=2, **reward)
  cfg.reward.normalize_samples = 16
  return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The suite's reference run up to its label stage, and from it: an ensemble of 2
  (bootstrap data, WCO) trained then used by PPO, and its member 1 trained alone."""
  from test_reliability import copy_before, reference_run
  root = tmp_path_factory.mktemp("ens")
  base, ens, alone = reference_run(tmp_path_factory), str(root / "ens"), str(root / "alone")
  copy_before(base, "reward", ens)
  copy_before(base, "reward", alone)
  kw = dict(ensemble=2, aggregate="wco", ensemble_data="bootstrap")
  pipeline.run(_cfg("reward,ppo", **kw), ens)
  pipeline.run(_cfg("reward", member=1, **kw), alone)
  return base, ens, alone, _cfg("reward", **kw)


def _stacked(stage_dir, cfg, n):
  ctx = Context(cfg, os.path.dirname(stage_dir), sh.make_mesh(cfg.mesh))
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  return common.load_params(ctx, "reward", model)[0]


def test_member_in_the_ensemble_equals_the_member_trained_alone(runs):
  _, ens, alone, cfg = runs
  both = _stacked(os.path.join(ens, "reward"), cfg, 2)
  one = _stacked(os.path.join(alone, "reward"), cfg, 1)
  assert jax.tree.leaves(both)[0].shape[0] == 2 and jax.tree.leaves(one)[0].shape[0] == 1
  flat = jax.tree_util.tree_flatten_with_path(both)[0]
  for (path, a), b in zip(flat, jax.tree.leaves(one)):
    if jax.tree_util.keystr(path) == "['scalar_head']['bias']":
      # The head's bias cancels in every pairwise loss: its gradient is round-off, which
      # Adam scales to lr-sized steps, so it is noise in both runs (and the normalisation
      # removes it). Every other weight must agree to float32 round-off.
      continue
    np.testing.assert_allclose(np.asarray(a[1]), np.asarray(b[0]), rtol=1e-5, atol=1e-6)
  # The members differ (own head init and bootstrap rows) and training moved the heads.
  h = np.asarray(both["scalar_head"]["kernel"])
  assert np.abs(h[0] - h[1]).max() > 1e-3
  s_ens = helpers.read_json(os.path.join(ens, "reward", "summary.json"))
  s_one = helpers.read_json(os.path.join(alone, "reward", "summary.json"))
  assert s_ens["ensemble"] == 2 and len(s_ens["member_accuracy"]) == 2
  assert len(s_ens["member_gold_accuracy"]) == 2 and "gold_accuracy" in s_ens
  assert s_one["ensemble_members"] == [1]
  np.testing.assert_allclose(s_ens["member_accuracy"][1], s_one["member_accuracy"][0], atol=1e-6)
  np.testing.assert_allclose(s_ens["reward_gain"][1], s_one["reward_gain"][0], rtol=1e-4)


def test_ensemble_scores_aggregate_and_ppo_runs(runs):
  _, ens, _, cfg = runs
  ppo = helpers.read_json(os.path.join(ens, "ppo", "summary.json"))
  assert ppo["iterations"] == 1 and np.isfinite(ppo["proxy_reward"])
  ctx = Context(cfg, ens, sh.make_mesh(cfg.mesh))
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  rm = RewardModel(ctx, model)
  assert rm.ensemble == 2 and rm.aggregation.how == "wco"
  tokens = np.random.default_rng(1).integers(3, 200, (8, 20)).astype(np.int32)
  mask = np.arange(20)[None] < np.array([20, 15, 12, 20, 9, 17, 20, 11])[:, None]
  got = np.asarray(rm.score(tokens, mask))
  members = []
  for m in range(2):  # each member alone, normalised with its own gain / bias
    params = jax.tree.map(lambda x: x[m], rm.params)
    out = model.apply({"params": params}, tokens, mask, logits=False, scalar=True)["scalar"]
    raw = np.asarray(out)[np.arange(8), mask.sum(1) - 1]
    members.append(rm.gain[m] * raw + rm.bias[m])
  np.testing.assert_allclose(got, np.min(members, 0), rtol=1e-4, atol=1e-5)
  assert np.abs(members[0] - members[1]).max() > 1e-3  # the min is not trivially either
  # The same frozen pytree PPO uses, under another aggregation, gives that aggregation.
  with cfg.unlocked():
    cfg.reward.aggregate = "uwo"
  rm2 = RewardModel(Context(cfg, ens, ctx.mesh), model)
  np.testing.assert_allclose(np.asarray(rm2.score(tokens, mask)),
                             np.mean(members, 0) - np.var(members, 0), rtol=1e-4, atol=1e-5)
  # PPO's critic: member 0's params with the normalised head (unstacked).
  crit = rm.normalized_params()
  assert crit["scalar_head"]["kernel"].shape == rm.params["scalar_head"]["kernel"].shape[1:]


def test_ensemble_arms_share_one_reward_model_per_size(tmp_path):
  from experiments import ppo_vs_bok as pvb
  from rlhf_jax.model.transformer import ModelConfig
  cfg = tiny.get_config()
  assert pvb.parse_arm("ppo_ens4_uwo") == ("ppo", {"reward.ensemble": 4, "reward.aggregate": "uwo"})
  assert pvb.parse_arm("bok_ens2_wco")[0] == "best_of_k"
  for bad in ("ppo_ens0_mean", "ppo_ens4_max", "bok_ens4"):
    with pytest.raises(ValueError):
      pvb.parse_arm(bad)
  arms = ["ppo_ens1_mean", "ppo_ens4_mean", "ppo_ens4_wco", "bok_ens4_uwo"]
  _, plans = pvb.plan_arms(cfg, arms, ModelConfig.from_config(cfg.model, vocab_size=cfg.data.vocab_size))
  by = {p["arm"]: p for p in plans}
  # Scoring with 4 members costs 3 more reward forwards per sample: fewer iterations.
  assert by["ppo_ens4_mean"]["steps"] < by["ppo_ens1_mean"]["steps"]
  for p in plans:
    config_lib.validate(pvb.arm_config(cfg, p, seed=0), 1)
  dirs = {pvb.ensemble_dir(str(tmp_path), pvb.registry.ensemble_of(p["overrides"])) for p in plans}
  assert dirs == {str(tmp_path / "shared"), str(tmp_path / "shared_ens4")}
  # An ensemble arm's reward stage is the shared ensemble's; the rest are DIR/shared's.
  for d in ("shared/pretrain", "shared/reward", "shared_ens4/reward"):
    os.makedirs(tmp_path / d)
  (tmp_path / "shared" / "config.json").write_text(cfg.to_json_best_effort())
  arm = tmp_path / "arms" / "ppo_ens4_wco" / "seed0"
  pvb.link_shared(str(tmp_path / "shared"), str(arm), pvb.arm_config(cfg, by["ppo_ens4_wco"], 0),
                  reward_from=str(tmp_path / "shared_ens4"))
  real = lambda p: os.path.realpath(str(p))
  assert real(arm / "reward") == real(tmp_path / "shared_ens4" / "reward")
  assert real(arm / "pretrain") == real(tmp_path / "shared" / "pretrain")
