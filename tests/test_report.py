"""The run report and the PPO-vs-best-of-K ablation's planning, on fake workdirs (no training)."""
import json
import math
import os

import numpy as np
import pytest

from rlhf_jax import best_of_k as bok_math
from rlhf_jax import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(stage_dir, summary=None, metrics=()):
  os.makedirs(stage_dir, exist_ok=True)
  if summary is not None:
    with open(os.path.join(stage_dir, "summary.json"), "w") as f:
      json.dump(summary, f)
  with open(os.path.join(stage_dir, "metrics.jsonl"), "w") as f:
    for row in metrics:
      f.write(json.dumps(row) + "\n")


def _supervised(steps=100):
  rows = [{"step": s, "loss": 3.0 / (1 + s / 20)} for s in range(10, steps + 1, 10)]
  rows += [{"step": s, "eval_loss": 3.2 / (1 + s / 20)} for s in (50, 100)]
  return {"init_eval_loss": 5.5, "eval_loss": 1.2, "steps": steps, "skipped_updates": 0,
          "examples": 1000, "wall_seconds": 3.0}, rows


def _ppo_points(iters=10, kl_per_iter=0.8):
  """Gold rises then falls (over-optimisation), proxy keeps rising."""
  pts = [{"iteration": 0, "gold_reward": 0.5, "proxy_reward": 0.0, "kl": 0.0, "flops": 0.0,
          "tokens_sampled": 0}]
  for i in range(2, iters + 1, 2):
    kl = kl_per_iter * i
    d = math.sqrt(kl)
    pts.append({"iteration": i, "gold_reward": 0.5 + d * (0.3 - 0.3 * math.log(d)),
                "proxy_reward": 0.5 * d, "kl": kl, "win_rate_vs_sft": 0.6,
                "flops": i * 1e9, "tokens_sampled": i * 512})
  return pts


def fake_workdir(root, stages=("pretrain", "sft", "label", "reward", "ppo", "best_of_k", "evaluate")):
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "config.json"), "w") as f:
    json.dump({"stages": ",".join(stages), "seed": 0, "model": {"d_model": 32, "n_layers": 2},
               "ppo": {"kl_mode": "adaptive", "kl_coef": 0.05, "kl_target": 6.0, "kl_estimator": "k1"},
               "data": {"source": "synthetic"}}, f)
  for name in ("pretrain", "sft"):
    if name in stages:
      s, rows = _supervised()
      _write(os.path.join(root, name), {**s, "corpus_tokens": 12345} if name == "pretrain" else s, rows)
  if "label" in stages:
    _write(os.path.join(root, "label"), {"prompts": 64, "k": 4, "label_gold_agreement": 0.81,
                                         "label_gold_agreement_clear": 0.93,
                                         "sample_gold_mean": 0.4, "sample_gold_std": 0.7})
  if "reward" in stages:
    s, rows = _supervised()
    s.update(accuracy=0.7, gold_accuracy=0.68, gold_accuracy_clear=0.8, reward_gain=1.3,
             reward_bias=-0.2)
    rows = [dict(r, accuracy=0.6) for r in rows]
    _write(os.path.join(root, "reward"), s, rows)
  if "ppo" in stages:
    pts = _ppo_points()
    rows = [{"step": i, "proxy_reward": 0.05 * i, "gold_reward": 0.5 + 0.01 * i, "kl": 0.8 * i,
             "kl_coef": 0.05, "policy_loss": -0.01, "value_loss": 0.2, "loss": -0.01}
            for i in range(1, 11)]
    rows += [{"step": p["iteration"], "eval_gold_reward": p["gold_reward"],
              "eval_proxy_reward": p["proxy_reward"], "eval_kl": p["kl"]} for p in pts[1:]]
    rows.append({"step": 11, "proxy_reward": float("nan")})  # non-finite values are skipped
    _write(os.path.join(root, "ppo"), {
        "sft_gold_reward": 0.5, "sft_proxy_reward": 0.0, "gold_reward": pts[-1]["gold_reward"],
        "proxy_reward": pts[-1]["proxy_reward"], "kl": pts[-1]["kl"], "win_rate_vs_sft": 0.55,
        "kl_coef_final": 0.05, "iterations": 10, "flops_per_iteration": 1e9,
        "tokens_sampled_per_iteration": 512, "eval_points": pts}, rows)
  if "best_of_k" in stages:
    ns = [1, 2, 4, 8]
    kl = bok_math.bon_kl(ns)
    curve = [{"n": n, "kl_bound": float(k), "sqrt_kl": float(np.sqrt(k)),
              "gold": 0.5 + np.sqrt(k) * (0.8 - 0.4 * np.sqrt(k)), "proxy": 0.6 * np.sqrt(k)}
             for n, k in zip(ns, kl)]
    rounds = [{"round": r, "gold_reward": 0.5 + 0.1 * r, "proxy_reward": 0.3 * r, "kl": 0.5 * r,
               "win_rate_vs_sft": 0.6, "kept": 64, "tokens_sampled": 4096, "tokens_trained": 2048,
               "flops": 1e9 * r} for r in (1, 2, 3)]
    _write(os.path.join(root, "best_of_k"), {
        "bon_curve": curve, "rounds": rounds, "sft_gold_reward": 0.5, "gold_reward": 0.8,
        "proxy_reward": 0.9, "kl": 1.5}, [{"step": s, "loss": 1.0 / s} for s in range(1, 5)])
  if "evaluate" in stages:
    _write(os.path.join(root, "evaluate"), {"policies": [
        {"name": "sft", "gold_reward": 0.5, "proxy_reward": 0.0, "kl": 0.0, "win_rate_vs_sft": 0.5},
        {"name": "ppo", "gold_reward": 0.7, "proxy_reward": 1.2, "kl": 8.0, "win_rate_vs_sft": 0.6}],
        "frontier": {}})
  return root


def _assert_png(path):
  assert os.path.getsize(path) > 1000, path
  with open(path, "rb") as f:
    assert f.read(8) == PNG_MAGIC, path


def _pngs(md):
  import re
  return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_full_report_has_every_section_and_valid_pngs(tmp_path):
  wd = fake_workdir(str(tmp_path / "run"))
  path = report.build_report(wd)
  assert path == os.path.join(wd, "report.md")
  md = open(path).read()
  for heading in ("## Headline figures", "## Training curves", "## Frontier"):
    assert heading in md
  for stage in ("**pretrain**", "**sft**", "**label**", "**reward**", "**ppo**", "**best_of_k**",
                "**evaluate**"):
    assert stage in md, stage
  assert "5.500 → 1.200" in md  # eval loss before -> after
  assert "gold accuracy 0.680" in md
  assert "KL control `adaptive`, coefficient 0.050 (target 6)" in md
  assert "relative to the SFT policy" in md
  assert "Over-optimisation (ppo)" in md  # the fixture's PPO gold peaks while proxy rises
  pngs = _pngs(md)
  assert {"frontier.png", "loss_curves.png", "ppo_curves.png", "best_of_k_rounds.png"} <= set(pngs)
  for png in pngs:
    assert not os.path.isabs(png)
    _assert_png(os.path.join(wd, png))
  from PIL import Image
  assert Image.open(os.path.join(wd, "frontier.png")).size == (800, 500)


def test_report_skips_missing_stages_and_cli_writes_elsewhere(tmp_path):
  wd = fake_workdir(str(tmp_path / "run"), stages=("pretrain", "sft"))
  out = str(tmp_path / "out")
  assert report.main(["--workdir", wd, "--out_dir", out]) == 0
  md = open(os.path.join(out, "report.md")).read()
  assert "Not in this workdir (sections skipped): label, reward, ppo, best_of_k, evaluate" in md
  assert "no frontier to plot" in md
  for png in _pngs(md):
    _assert_png(os.path.join(out, png))
  assert report.main(["--workdir", str(tmp_path / "nope")]) == 2


def test_gao_fits_recover_parameters():
  d = np.linspace(0.1, 4, 20)
  fit = report.gao_fit("bon", d, d * (0.8 - 0.2 * d))
  assert fit["a"] == pytest.approx(0.8) and fit["b"] == pytest.approx(0.2)
  assert fit["d_peak"] == pytest.approx(2.0)
  fit = report.gao_fit("rl", d, d * (0.5 - 0.25 * np.log(d)))
  assert fit["a"] == pytest.approx(0.5) and fit["b"] == pytest.approx(0.25)
  assert fit["d_peak"] == pytest.approx(math.exp(1.0))
  assert report.gao_fit("rl", [0.0, 1.0], [0.0, 1.0]) is None  # too few points
  assert report.gao_fit("rl", [1.0, np.nan, 2.0, 3.0], [0.1, 0.2, np.nan, 0.3]) is None


def test_detect_overoptimisation():
  assert report.detect_overoptimisation([0, 1, 2, 1.5, 1.0], [0, 1, 2, 3, 4])["overoptimised"]
  det = report.detect_overoptimisation([0, 1, 2, 3], [0, 1, 2, 3])
  assert not det["overoptimised"] and det["peak_index"] == 3
  # gold fell but the proxy fell too: the policy got worse, not over-optimised
  assert not report.detect_overoptimisation([0, 2, 1], [0, 2, 1])["overoptimised"]
  assert not report.detect_overoptimisation([0, np.nan], [0, 1])["overoptimised"]


# ----------------------------------------------------- experiments/ppo_vs_bok.py pieces
def _tiny(arg="test"):
  from experiments import ppo_vs_bok as pvb
  return pvb, pvb.load_config(f"configs/tiny.py:{arg}" if arg else "configs/tiny.py")


def _model_cfg(cfg):
  from rlhf_jax.model.transformer import ModelConfig
  return ModelConfig.from_config(cfg.model, vocab_size=cfg.data.vocab_size)


def test_arm_names_parse_and_configs_apply():
  pvb, cfg = _tiny()
  assert pvb.parse_arm("ppo_kl0") == ("ppo", {"ppo.kl_mode": "fixed", "ppo.kl_coef": 0.0})
  assert pvb.parse_arm("ppo_kl0.02")[1]["ppo.kl_coef"] == 0.02
  assert pvb.parse_arm("ppo_adaptive") == ("ppo", {"ppo.kl_mode": "adaptive"})
  assert pvb.parse_arm("bok_k16") == ("best_of_k", {"best_of_k.k": 16})
  with pytest.raises(ValueError, match="unknown arm"):
    pvb.parse_arm("dpo")
  _, plans = pvb.plan_arms(cfg, ["ppo_kl0", "bok_k4"], _model_cfg(cfg))
  arm = pvb.arm_config(cfg, plans[0], seed=2)
  assert (arm.stages, arm.seed, arm.ppo.kl_coef, arm.ppo.kl_mode) == ("ppo", 2, 0.0, "fixed")
  assert isinstance(arm.ppo.kl_coef, float) and arm.ppo.iterations == plans[0]["steps"]
  arm = pvb.arm_config(cfg, plans[1], seed=0)
  assert (arm.stages, arm.best_of_k.k, arm.best_of_k.rounds) == ("best_of_k", 4, plans[1]["steps"])
  assert cfg.stages != "ppo" and cfg.seed == 0  # the base config is untouched
  # Data come from config.data.seed, so arms with different config.seed see the same data.
  from rlhf_jax.data.sources import DataSources
  a, b = DataSources(arm.data, "/nonexistent", 0), DataSources(arm.data, "/nonexistent", 7)
  assert a.prompts("rl") == b.prompts("rl")


def test_compute_matching():
  pvb, cfg = _tiny(None)
  mcfg = _model_cfg(cfg)
  arms = ["ppo_kl0", "ppo_adaptive", "bok_k4", "bok_k16"]
  budget, plans = pvb.plan_arms(cfg, arms, mcfg)
  per_iter = pvb.ppo_compute(cfg, mcfg)
  assert budget == pytest.approx(pvb.BUDGET_SCALE * cfg.ppo.iterations * per_iter["flops"])
  by = {p["arm"]: p for p in plans}
  assert by["ppo_kl0"]["steps"] == pvb.BUDGET_SCALE * cfg.ppo.iterations  # default budget
  for p in plans:  # every arm within half a step of the budget
    per = p["est_flops"] / p["steps"]
    assert abs(p["est_flops"] - budget) <= per / 2 + 1e-6 * budget, p
  assert by["bok_k16"]["steps"] < by["bok_k4"]["steps"]  # K=16 costs more per round
  # Matching sampled tokens instead: tokens = rounds * prompts_per_round * K * response_len.
  budget_t, plans_t = pvb.plan_arms(cfg, arms, mcfg, match="tokens", budget=4 * 256 * 4 * 32)
  by = {p["arm"]: p for p in plans_t}
  assert by["bok_k4"]["steps"] == 4 and by["bok_k4"]["est_tokens_sampled"] == budget_t
  assert by["bok_k16"]["steps"] == 2  # min_rounds: a frontier needs points
  assert by["ppo_kl0"]["est_tokens_sampled"] == pytest.approx(budget_t, rel=0.5)


def test_bok_compute_matches_the_stage():
  from types import SimpleNamespace
  from rlhf_jax.stages import best_of_k as stage
  pvb, cfg = _tiny(None)
  mcfg = _model_cfg(cfg)
  ours = pvb.bok_compute(cfg, mcfg)
  theirs = stage._round_compute(SimpleNamespace(config=cfg, model_cfg=mcfg),
                                cfg.best_of_k.prompts_per_round * cfg.best_of_k.k,
                                cfg.data.prompt_len + cfg.ppo.response_len)
  for k in ("tokens_sampled", "tokens_trained", "flops"):
    assert ours[k] == pytest.approx(theirs[k]), k


def test_ablation_report_from_fake_arms(tmp_path):
  """write_report on fake arm workdirs: table, plots, over-optimisation verdicts."""
  pvb, cfg = _tiny()
  arms = ["ppo_kl0", "ppo_kl0.1", "bok_k4"]
  budget, plans = pvb.plan_arms(cfg, arms, _model_cfg(cfg))
  wd = str(tmp_path / "abl")
  for seed in (0, 1):
    fake_workdir(os.path.join(wd, "arms", "ppo_kl0", f"seed{seed}"), stages=("ppo",))
    fake_workdir(os.path.join(wd, "arms", "bok_k4", f"seed{seed}"), stages=("best_of_k",))
  # ppo_kl0.1 seed 0: gold keeps rising with the proxy (no over-optimisation); seed 1 missing
  root = fake_workdir(os.path.join(wd, "arms", "ppo_kl0.1", "seed0"), stages=("ppo",))
  s = report.load_summary(root, "ppo")
  for p in s["eval_points"]:
    p["gold_reward"] = 0.5 + 0.1 * p["iteration"]
  _write(os.path.join(root, "ppo"), s)
  args = pvb.parse_args(["--workdir", wd, "--quick", "--seeds", "2", "--arms", ",".join(arms)])
  path = pvb.write_report(wd, args, budget, plans, [0, 1], failures=["ppo_kl0.1/seed1"])
  md = open(path).read()
  assert "| ppo_kl0 |" in md and "| bok_k4 |" in md and "best-of-n, n=8" in md
  assert "**ppo_kl0: yes**" in md and "2/2 seeds" in md
  assert "- ppo_kl0.1: no" in md
  assert "Failed runs" in md and "ppo_kl0.1/seed1" in md
  assert "penalises disfluency" in md or "disfluency" in md
  for png in _pngs(md):
    _assert_png(os.path.join(wd, png))
  assert json.load(open(os.path.join(wd, "plan.json")))["overoptimised"] == ["ppo_kl0"]


@pytest.mark.reference_run
def test_ppo_vs_bok_quick_end_to_end(tmp_path, tmp_path_factory):
  """The real script at tiny:test size. Its shared stages are the suite's reference run
  (same config and seed), so the runner finds them finished and goes on to the arms."""
  import subprocess
  import sys
  import helpers
  from test_reliability import copy_before, reference_run
  wd = tmp_path / "abl"
  copy_before(reference_run(tmp_path_factory), "ppo", wd / "shared")
  p = subprocess.run([sys.executable, "-m", "experiments.ppo_vs_bok", "--workdir", str(wd), "--quick",
                      "--arms", "ppo_kl0,bok_k2", "--set", f"compile_cache={helpers.CACHE_DIR}"],
                     cwd=helpers.REPO, env=helpers.env(), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "[pretrain] finished earlier" in p.stdout and "[reward] finished earlier" in p.stdout, p.stdout[-3000:]
  md = (wd / "report.md").read_text()
  from experiments import ppo_vs_bok
  iters = ppo_vs_bok.BUDGET_SCALE * 3  # the :test config's PPO runs 3 iterations
  assert f"| ppo_kl0 | {iters} iterations |" in md and "| bok_k2 | 3 rounds |" in md
  assert "## Over-optimisation" in md and "best-of-n, n=2" in md
  for png in _pngs(md):
    _assert_png(wd / png)
  arm = wd / "arms" / "ppo_kl0" / "seed0"
  assert (arm / "sft").is_symlink() and (arm / "ppo" / "summary.json").exists()
  assert (arm / "report.md").exists()
  plan = json.loads((wd / "plan.json").read_text())
  assert [p["arm"] for p in plan["plans"]] == ["ppo_kl0", "bok_k2"]


def test_report_survives_missing_gold_and_odd_values(tmp_path):
  """data.source=files has no gold scorer: gold figures are None; other keys may be absent."""
  wd = fake_workdir(str(tmp_path / "run"), stages=("ppo", "best_of_k"))
  s = report.load_summary(wd, "ppo")
  for p in s["eval_points"]:
    p["gold_reward"] = None
  s["eval_points"].append({"iteration": "bad", "kl": float("nan")})
  s.pop("sft_gold_reward")
  _write(os.path.join(wd, "ppo"), s, [{"step": 1, "kl": None, "proxy_reward": 0.1}, {"nostep": 1}])
  b = report.load_summary(wd, "best_of_k")
  for c in b["bon_curve"]:
    c["gold"] = None
  b["rounds"] = []
  _write(os.path.join(wd, "best_of_k"), b)
  with open(os.path.join(wd, "ppo", "metrics.jsonl"), "a") as f:
    f.write('{"step": 2, "kl": 0.')  # a torn last line
  md = open(report.build_report(wd)).read()
  assert "## Frontier" in md and "| best_of_n | proxy |" in md and "| ppo | gold |" not in md
  for png in _pngs(md):
    _assert_png(os.path.join(wd, png))
