"""Stage: the final evaluation, every arm on one gold/proxy-vs-KL frontier.

The SFT policy, the final policies of PPO, DPO, GRPO, online RLHF and best-of-K
(whichever of `ppo` / `dpo` / `grpo` / `online` / `best_of_k` finished) are sampled by ONE PolicyEvaluator on the
held-out prompts: same prompts, key, temperature and response length, so
the `policies` table compares like with like. The `frontier` gathers the
points each arm recorded on the way (PPO's periodic evaluations, the
best-of-n curve, best-of-K's rounds) with d = sqrt(KL), the axis Gao et al.
2022 plot and fit against (their sec. 3: R_bon(d) = d (a - b d),
R_rl(d) = d (a - b log d), with R the gold gain over the d = 0 policy).
"""
from __future__ import annotations

import math
import os

from rlhf_jax import best_of_k as bok
from rlhf_jax.stages import common
from rlhf_jax.stages.policy_eval import PolicyEvaluator, RewardModel, SampleLog
from rlhf_jax.train import state as st

_FIGURES = ("gold_reward", "proxy_reward", "kl", "win_rate_vs_sft")


def _d(kl) -> float:
  return math.sqrt(max(float(kl), 0.0))  # a k1 KL estimate can come out slightly negative


def _point(label: str, value, gold, proxy, kl, **extra) -> dict:
  """One frontier point; gold_reward is absent without a gold scorer."""
  return {label: value, **({} if gold is None else {"gold_reward": gold}), "proxy_reward": proxy,
          "kl": kl, "d": _d(kl), **extra}


# Policy stages whose summaries hold PPO-shaped `eval_points`; each is one more policy.
POLICY_STAGES = ("ppo", "dpo", "grpo", "online")


def frontier(ppo: dict | None, bok_summary: dict | None, **policy_stages: dict | None) -> dict:
  """Per-arm lists of points from the arms' summaries (None = the arm did not run)."""
  out = {}
  for name, s in {"ppo": ppo, **policy_stages}.items():
    if s is not None:
      out[name] = [_point("iteration", p["iteration"], p.get("gold_reward"), p["proxy_reward"],
                          p["kl"], flops=p.get("flops"), tokens_sampled=p.get("tokens_sampled"))
                   for p in s.get("eval_points", [])]
  if bok_summary is not None:
    out["best_of_n"] = [_point("n", p["n"], p.get("gold"), p["proxy"], p["kl_bound"], kl_is_bound=True)
                        for p in bok_summary["bon_curve"]]
    start = _point("round", 0, bok_summary.get("sft_gold_reward"), bok_summary["sft_proxy_reward"], 0.0,
                   flops=0.0, tokens_sampled=0, tokens_trained=0)
    out["best_of_k"] = [start] + [
        _point("round", r["round"], r.get("gold_reward"), r["proxy_reward"], r["kl"],
               flops=r["flops"], tokens_sampled=r["tokens_sampled"],
               tokens_trained=r["tokens_trained"]) for r in bok_summary["rounds"]]
  return out


def fits(points: dict) -> dict:
  """Gao et al. 2022 functional forms fitted to gold gain vs d: R_bon to best-of-n, R_rl to
  PPO, where they were derived. Needs 3 points besides the d = 0 anchor (each form passes
  through it, so it constrains nothing; two parameters fit two points exactly)."""
  out = {}
  for arm, fit in (("best_of_n", bok.fit_bon),) + tuple((n, bok.fit_rl) for n in POLICY_STAGES):
    pts = [p for p in points.get(arm, []) if p.get("gold_reward") is not None
           and math.isfinite(p["gold_reward"])]
    if sum(p["d"] > 1e-9 for p in pts) < 3:
      continue
    base = pts[0]["gold_reward"]  # n = 1 / iteration 0: the SFT policy, d = 0
    a, b = fit([p["d"] for p in pts], [p["gold_reward"] - base for p in pts])
    out[arm] = {"a": a, "b": b, "points": len(pts)}
  return out


def run(ctx) -> dict:
  cfg = ctx.config
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  reward = RewardModel(ctx, model)
  sft_params, _ = common.load_params(ctx, "sft", model)
  evaluator = PolicyEvaluator(ctx, model, reward, sft_params, response_len=cfg.ppo.response_len,
                              temperature=cfg.evaluate.temperature, batch_size=cfg.evaluate.batch_size,
                              log=SampleLog(os.path.join(ctx.stage_dir("evaluate"), "samples.jsonl")))
  pol = {n: ctx.summary(n) if ctx.is_done(n) else None for n in POLICY_STAGES}
  ppo = pol["ppo"]
  bok_summary = ctx.summary("best_of_k") if ctx.is_done("best_of_k") else None
  # A stage's final policy is its checkpoint, or the sub-stage it names (online's last round).
  checkpoints = [("sft", "sft")] + [(n, pol[n].get("final_checkpoint", n))
                                    for n in POLICY_STAGES if pol[n] is not None]
  if bok_summary is not None:
    checkpoints.append(("best_of_k", bok_summary.get("final_checkpoint", "sft")))

  policies = []
  for name, stage in checkpoints:
    params = sft_params if stage == "sft" else common.load_params(ctx, stage, model)[0]
    ev = evaluator.evaluate(params, {"policy": name})
    figures = {k: ev[k] for k in _FIGURES if k in ev}  # no gold figures without a gold scorer
    policies.append({"name": name, "checkpoint": stage, **figures,
                     "response_length": ev["response_length"], "no_eos_frac": ev["no_eos_frac"]})
    print(f"[evaluate] {name}: " + ", ".join(f"{k}={v:.4g}" for k, v in figures.items()), flush=True)

  points = frontier(ppo, bok_summary, **{n: pol[n] for n in POLICY_STAGES[1:]})
  summary = {"policies": policies, "frontier": points, "fits": fits(points),
             "arms": [p["name"] for p in policies]}
  for p in policies:  # flat figures for the pipeline's one-line report
    if "gold_reward" in p:
      summary[f"{p['name']}_gold_reward"] = p["gold_reward"]
    summary[f"{p['name']}_proxy_reward"] = p["proxy_reward"]
    summary[f"{p['name']}_kl"] = p["kl"]
  return summary
