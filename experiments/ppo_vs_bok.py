"""Ablation: PPO, best-of-K, DPO / IPO and GRPO / RLOO / Dr. GRPO at matched compute.

  python -m experiments.ppo_vs_bok --workdir runs/ablation [--config configs/tiny.py] \
      [--seeds 3] [--match flops|tokens] [--budget N] [--arms all|ppo_kl0,dpo_b0.1,...] [--quick]

1. The shared stages (pretrain, sft, label, reward) run once, seed 0, in DIR/shared.
2. Every arm runs one policy stage in DIR/arms/<arm>/seed<S>/, a pipeline workdir whose
   pretrain/sft/label/reward dirs and tokenizer.model are symlinks to DIR/shared
   (its config.json is the arm's config; model/data must equal the shared ones).
   Arms come from the registry in experiments/arms.py (name pattern -> stage, config
   overrides, compute estimate): `ppo_kl<beta>`, `ppo_adaptive`, `bok_k<K>` (best-of-K
   fine-tuning; its stage also records the best-of-n curve of the SFT policy),
   `dpo_b<beta>`, `ipo_b<beta>`, `grpo_k<K>`, `rloo_k<K>`, `drgrpo_k<K>`, `ppo_online_r<R>`
   (iterated online RLHF: R rounds; its RM refreshes, labelling included, count against
   the budget and the budget sets its PPO iterations per round).
3. Matched compute: each arm's iterations / rounds / steps are chosen to spend
   about `--budget` FLOPs (or sampled tokens with --match tokens); the default budget
   is what 2 x config.ppo.iterations PPO iterations spend (BUDGET_SCALE): twice the
   pipeline's PPO, enough optimisation pressure for over-optimisation to show at KL 0.
   Both figures are reported. DPO samples nothing (its pairs come from the shared
   label stage, whose sampling is shown apart); its reference pass counts against it.
4. `--seeds N` runs each arm with config.seed = 0..N-1. config.seed only changes the
   arm's randomness (the stage's RNG key and batch order); the data (prompts,
   corpus, demonstrations, annotator noise) come from config.data.seed, and the
   shared stages stay at seed 0, so seeds differ only in the arm itself.
5. Reward-ensemble arms (`ppo_ens<N>_<agg>`, `bok_ens<N>_<agg>`, Coste et al. 2024) score
   with an N-member reward ensemble trained ONCE per N in DIR/shared_ens<N>/reward
   (its pretrain/sft/label are symlinks to DIR/shared) and shared by every arm of that N;
   N = 1 is DIR/shared's reward model. Reward-model training FLOPs are shown apart, like
   the label stage's: no arm's budget pays for them (every arm's scoring does count).
6. DIR/report.md: per arm peak gold and the KL where it peaked, final gold / proxy /
   KL, gold gain per PFLOP, FLOPs and sampled tokens (mean ± std over seeds), frontier
   plots of every method with Gao et al. (2022) fits, and which arms over-optimised
   (gold peaked while the proxy kept rising).

Default arms: DEFAULT_ARMS (sized for about 30 minutes on 2 CPU cores); `--arms all`
runs ALL_ARMS. Re-running the same command continues: finished arms are skipped.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import traceback
import warnings

import numpy as np

from experiments import arms as registry
from rlhf_jax import report as rp

SHARED_STAGES = ("pretrain", "sft", "label", "reward")
DEFAULT_ARMS = "ppo_kl0,ppo_kl0.02,ppo_adaptive,bok_k4,dpo_b0.1,ipo_b0.1,grpo_k4,rloo_k4"
ALL_ARMS = ("ppo_kl0,ppo_kl0.02,ppo_kl0.1,ppo_adaptive,bok_k4,bok_k16,dpo_b0.1,dpo_b0.5,ipo_b0.1,"
            "online_dpo_b0.1,grpo_k4,grpo_k8,rloo_k4,drgrpo_k4")
QUICK_ARMS = "ppo_kl0,ppo_adaptive,bok_k4"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------- config
def load_config(spec: str):
  """configs/NAME.py[:ARG] -> get_config(ARG), without absl flags."""
  path, _, arg = spec.partition(":")
  if not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
    path = os.path.join(REPO, path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--config: no such file {path}")
  mod_spec = importlib.util.spec_from_file_location(f"_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_arm(name: str) -> tuple[str, dict]:
  """Arm name -> (stage, {dotted config key: value}), from the registry in experiments/arms.py."""
  kind, overrides = registry.lookup(name)
  return kind.stage, overrides


def _set(cfg, dotted: str, value) -> None:
  *path, last = dotted.split(".")
  node = cfg
  for p in path:
    node = node[p]
  node[last] = value


def _get(cfg, dotted: str):
  node = cfg
  for p in dotted.split("."):
    node = node[p]
  return node


# ------------------------------------------------------- compute planning
ppo_compute, bok_compute = registry.ppo_compute, registry.bok_compute


BUDGET_SCALE = 2  # default budget, in units of the pipeline's PPO compute


def plan_arms(cfg, arms: list[str], model_cfg, *, match: str = "flops", budget: float | None = None,
              min_rounds: int = 2) -> tuple[float, list[dict]]:
  """Iterations (PPO) or rounds (best-of-K) per arm so each spends about `budget`.

  budget is in FLOPs (match="flops") or sampled tokens (match="tokens"); None
  means what config.ppo.iterations PPO iterations spend. Best-of-K gets at least
  `min_rounds` rounds (a frontier needs points), so at small budgets it may
  overspend: the plan's estimates say by how much. Returns (budget, plans).
  """
  if match not in ("flops", "tokens"):
    raise ValueError(f"--match must be flops or tokens, got {match!r}")
  unit = "flops" if match == "flops" else "tokens_sampled"
  if budget is None:
    budget = BUDGET_SCALE * cfg.ppo.iterations * ppo_compute(cfg, model_cfg)[unit]
  plans = []
  for name in arms:
    kind, overrides = registry.lookup(name)
    arm_cfg = cfg.copy_and_resolve_references()
    for k, v in overrides.items():
      _set(arm_cfg, k, v)
    per = kind.compute(arm_cfg, model_cfg)
    # Spent once before the first step (DPO's reference log-probs, online's RM refreshes)
    # counts against the budget.
    once = per.get(f"offline_{unit}", 0.0)
    min_steps = min_rounds if kind.stage == "best_of_k" else kind.min_steps
    steps = max(min_steps, int(round((budget - once) / per[unit])))
    overrides = {**overrides, kind.steps_key: steps}
    plans.append({"arm": name, "stage": kind.stage, "overrides": overrides, "steps": steps,
                  "unit": kind.unit,
                  "est_flops": steps * per["flops"] + per.get("offline_flops", 0.0),
                  "est_tokens_sampled": steps * per["tokens_sampled"]
                                        + per.get("offline_tokens_sampled", 0),
                  "budget_ratio": (steps * per[unit] + once) / budget})
  return budget, plans


def arm_config(base, plan: dict, seed: int):
  cfg = base.copy_and_resolve_references()
  with cfg.unlocked():
    for k, v in plan["overrides"].items():
      _set(cfg, k, type(_get(cfg, k))(v))
    cfg.stages = plan["stage"]
    cfg.seed = seed
  return cfg


def apply_override(cfg, item: str) -> None:
  """KEY=VALUE onto an existing field, VALUE parsed as a Python literal and cast to its type."""
  import ast
  key, sep, raw = item.partition("=")
  if not sep:
    raise ValueError(f"--set {item!r}: expected KEY=VALUE")
  try:
    old = _get(cfg, key)
  except (KeyError, AttributeError):
    raise ValueError(f"--set {item!r}: config has no field {key}") from None
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  _set(cfg, key, type(old)(value) if isinstance(old, (int, float, str, bool)) else value)


def ensemble_dir(workdir: str, n: int) -> str:
  """Where the N-member reward ensemble all arms with reward.ensemble = N share lives."""
  return os.path.join(workdir, "shared") if n == 1 else os.path.join(workdir, f"shared_ens{n}")


def train_ensembles(workdir: str, base, plans: list[dict]) -> None:
  """Train each reward ensemble the plans use once: DIR/shared_ens<N>, whose pretrain, sft
  and label stages are DIR/shared's (symlinks); only the reward stage runs there."""
  from rlhf_jax import pipeline
  shared = os.path.join(workdir, "shared")
  for n in sorted({registry.ensemble_of(p["overrides"]) for p in plans} - {1}):
    cfg = base.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.stages, cfg.seed, cfg.reward.ensemble = "reward", 0, n
    d = ensemble_dir(workdir, n)
    link_shared(shared, d, cfg, stages=("pretrain", "sft", "label"))
    print(f"[ppo_vs_bok] reward ensemble of {n}: {d}", flush=True)
    pipeline.run(cfg, d)


def link_shared(shared: str, arm_dir: str, cfg, stages=SHARED_STAGES, reward_from: str | None = None) -> None:
  """The arm's workdir reuses the shared stages through relative symlinks (the reward
  stage from `reward_from`, a DIR/shared_ens<N>, when given).

  Its config.json is the arm's own config (so its report shows the arm's
  settings); the pipeline checks later runs against its model/data sections,
  which must equal the shared stages' (checked here, once).
  """
  os.makedirs(arm_dir, exist_ok=True)
  for name in tuple(stages) + ("tokenizer.model", "tfds"):
    src, dst = os.path.join(reward_from if name == "reward" and reward_from else shared, name), \
        os.path.join(arm_dir, name)
    if os.path.exists(src) and not os.path.lexists(dst):
      os.symlink(os.path.relpath(src, arm_dir), dst)
  path = os.path.join(arm_dir, "config.json")
  if not os.path.exists(path):
    mine = json.loads(cfg.to_json_best_effort())
    with open(os.path.join(shared, "config.json")) as f:
      theirs = json.load(f)
    for section in ("model", "data"):
      if mine[section] != theirs[section]:
        raise ValueError(f"{arm_dir}: config.{section} differs from the shared stages' "
                         f"({shared}/config.json); use a fresh --workdir")
    with open(path + ".tmp", "w") as f:
      json.dump(mine, f, indent=2)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------- results
def arm_result(workdir: str, stage: str) -> dict | None:
  """Final figures and the curve (training order, starting at the SFT policy) of one run."""
  s = rp.load_summary(workdir, stage)
  if s is None:
    return None
  if stage != "best_of_k":  # the policy stages: PPO-shaped eval_points with cumulative compute
    pts = sorted(s.get("eval_points") or [], key=lambda p: rp.num(p.get("iteration")))
    if stage == "dpo":  # offline: reference log-probs once, no sampling (the label stage's is shared)
      flops = rp.num(s.get("offline_flops")) + rp.num(s.get("flops_per_step")) * rp.num(s.get("steps"))
      tokens = rp.num(s.get("tokens_sampled_per_step", 0.0)) * rp.num(s.get("steps"))  # online
    elif stage == "online":  # PPO rounds plus the RM refreshes (labelling included)
      flops, tokens = rp.num(s.get("total_flops")), rp.num(s.get("total_tokens_sampled"))
    else:
      iters = rp.num(s.get("iterations"))
      flops = rp.num(s.get("flops_per_iteration")) * iters
      tokens = rp.num(s.get("tokens_sampled_per_iteration")) * iters
    curve = [(p.get("kl"), p.get("gold_reward"), p.get("proxy_reward"), p.get("flops")) for p in pts]
  else:
    rounds = sorted(s.get("rounds") or [], key=lambda r: rp.num(r.get("round")))
    flops = rp.num(s.get("total_flops", rounds[-1].get("flops") if rounds else None))
    tokens = rp.num(s.get("total_tokens_sampled", rounds[-1].get("tokens_sampled") if rounds else None))
    bon1 = (s.get("bon_curve") or [{}])[0]  # n = 1: the SFT policy's own samples
    curve = [(0.0, rp.first_finite(s.get("sft_gold_reward"), bon1.get("gold")),
              rp.first_finite(s.get("sft_proxy_reward"), bon1.get("proxy")), 0.0)]
    curve += [(r.get("kl"), r.get("gold_reward"), r.get("proxy_reward"), r.get("flops")) for r in rounds]
  c = np.array([[rp.num(v) for v in row] for row in curve], dtype=np.float64).reshape(-1, 4)
  gold = np.where(np.isfinite(c[:, 1]), c[:, 1], -np.inf)
  peak = int(np.argmax(gold)) if len(gold) else 0
  return {"peak_gold": rp.num(c[peak, 1]) if len(c) else float("nan"),
          "kl_at_peak": rp.num(c[peak, 0]) if len(c) else float("nan"),
          "sft_gold": rp.num(c[0, 1]) if len(c) else float("nan"),
          "label_flops": rp.num(s.get("label_flops")) if stage in ("dpo", "online") else 0.0,
          "gold": rp.num(s.get("gold_reward")), "proxy": rp.num(s.get("proxy_reward")),
          "kl": rp.num(s.get("kl")), "flops": flops, "tokens_sampled": tokens,
          "d": rp.sqrt_kl(c[:, 0]), "curve_gold": c[:, 1], "curve_proxy": c[:, 2],
          "curve_flops": c[:, 3], "bon_curve": s.get("bon_curve") if stage == "best_of_k" else None}


def _nanmean(x) -> float:
  x = np.asarray(x, dtype=np.float64)
  return float(x[np.isfinite(x)].mean()) if np.isfinite(x).any() else float("nan")


def mean_std(values) -> tuple[float, float]:
  v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
  if not len(v):
    return float("nan"), float("nan")
  return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def pm(values, digits: int = 3) -> str:
  m, s = mean_std(values)
  if not math.isfinite(m):
    return "—"
  return rp.fmt(m, digits) + (f" ± {rp.fmt(s, digits)}" if s > 0 else "")


def aggregate(results: list[dict], form: str, label: str) -> dict | None:
  """Seeds -> one frontier method for report.plot_frontier: mean curve (truncated to the
  shortest seed), std as error bars, and every seed's points pooled for the Gao fit."""
  results = [r for r in results if r is not None and len(r["d"])]
  if not results:
    return None
  n = min(len(r["d"]) for r in results)
  stack = {k: np.stack([r[k][:n] for r in results]) for k in ("d", "curve_gold", "curve_proxy")}
  gold0 = np.array([r["curve_gold"][0] for r in results])
  proxy0 = np.array([r["curve_proxy"][0] for r in results])
  g0, p0 = _nanmean(gold0), _nanmean(proxy0)
  # Pool every seed's points, each relative to its own d = 0 value, re-based on the mean.
  fit_gold = np.concatenate([r["curve_gold"] - r["curve_gold"][0] for r in results]) + g0
  fit_proxy = np.concatenate([r["curve_proxy"] - r["curve_proxy"][0] for r in results]) + p0
  with warnings.catch_warnings():  # all-NaN columns (a figure no seed recorded) stay NaN
    warnings.simplefilter("ignore", RuntimeWarning)
    return {"d": np.nanmean(stack["d"], 0), "gold": np.nanmean(stack["curve_gold"], 0),
            "proxy": np.nanmean(stack["curve_proxy"], 0),
            "gold_std": np.nanstd(stack["curve_gold"], 0), "proxy_std": np.nanstd(stack["curve_proxy"], 0),
            "gold0": g0, "proxy0": p0, "fit_d": np.concatenate([r["d"] for r in results]),
            "fit_gold": fit_gold, "fit_proxy": fit_proxy, "form": form, "label": label,
            "flops": np.nanmean(np.stack([r["curve_flops"][:n] for r in results]), 0)}


def bon_method(results: list[dict]) -> dict | None:
  """Best-of-n of the SFT policy, from the best-of-K arms' stages (mean over runs)."""
  curves = [r["bon_curve"] for r in results if r is not None and r.get("bon_curve")]
  if not curves:
    return None
  n = min(len(c) for c in curves)
  arr = lambda key: np.array([[rp.num(c[i].get(key)) for i in range(n)] for c in curves])
  gold, proxy, kl = arr("gold"), arr("proxy"), arr("kl_bound")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    return {"d": rp.sqrt_kl(kl[0]), "gold": np.nanmean(gold, 0), "proxy": np.nanmean(proxy, 0),
            "gold_std": np.nanstd(gold, 0), "proxy_std": np.nanstd(proxy, 0),
            "gold0": _nanmean(gold[:, 0]), "proxy0": _nanmean(proxy[:, 0]),
            "n": [curves[0][i].get("n") for i in range(n)], "form": "bon",
            "label": "best-of-n of SFT (KL bound)"}


def overoptimisation(results: list[dict], tol: float = 0.05) -> dict:
  """Per arm: detection on the seed-mean curve and the number of seeds that show it alone."""
  results = [r for r in results if r is not None and len(r["d"])]
  agg = aggregate(results, "rl", "")
  mean = rp.detect_overoptimisation(agg["gold"], agg["proxy"], tol) if agg else {"overoptimised": False}
  per_seed = [rp.detect_overoptimisation(r["curve_gold"], r["curve_proxy"], tol)["overoptimised"]
              for r in results]
  return {**mean, "seeds_flagged": int(sum(per_seed)), "seeds": len(results)}


def plot_compute(methods: dict, out_dir: str) -> str | None:
  fig, axes = rp.new_figure(ncols=2)
  drawn = False
  for i, (arm, m) in enumerate(methods.items()):
    if "flops" not in m:
      continue
    for ax, q in zip(axes[0], ("gold", "proxy")):
      x, y = rp.finite_xy(m["flops"], m[q])
      if len(x):
        ax.plot(x, y, "o-", ms=3, color=m.get("color"), label=arm)
        drawn = True
  if not drawn:
    return None
  for ax, q in zip(axes[0], ("gold", "proxy")):
    ax.set_xlabel("cumulative FLOPs (estimate)")
    ax.set_ylabel(f"{q} reward")
    ax.set_title(f"{q.capitalize()} reward vs compute spent", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  return rp.save(fig, out_dir, "compute.png")


EXPLANATION = (
    "What drives over-optimisation here: the synthetic world's gold score (`rlhf_jax/data/world.py`) "
    "rewards topic, attribute and positive adjectives but penalises disfluency (-2.0 x (1 - fluency)), "
    "repeated words (-0.5 each), length beyond 25 words (-0.1 per word) and unfinished responses. "
    "The reward model learns from rankings of SFT samples, which almost never repeat, ramble or break "
    "the grammar, so it sees little of those penalties and mostly learns \"more positive words is "
    "better\". A policy that piles on adjectives and repeats them keeps raising that proxy while gold "
    "falls. The KL penalty to the SFT policy is the only thing holding the policy where the proxy is "
    "still accurate: with `ppo_kl0` nothing does, so the policy is free to drift as far as the budget "
    "allows; larger coefficients (and the adaptive controller, which targets a KL) stop earlier on the "
    "frontier. Best-of-K's selection moves the distribution it imitates by at most log K - (K-1)/K "
    "nats per round, though fine-tuning on the kept samples can carry the policy further than that; "
    "its selection uses the same proxy, so with enough rounds it over-optimises as well.")


def reward_lines(workdir: str, plans: list[dict]) -> list[str]:
  """The shared reward models (single and ensembles): trained once, their FLOPs apart."""
  out = []
  for n in sorted({registry.ensemble_of(p["overrides"]) for p in plans} | {1}):
    s = rp.load_summary(ensemble_dir(workdir, n), "reward")
    if s is None:
      continue
    users = [p["arm"] for p in plans if registry.ensemble_of(p["overrides"]) == n]
    gold = f", gold accuracy {rp.fmt(s.get('gold_accuracy'))}" if "gold_accuracy" in s else ""
    members = (f"; members' accuracy {', '.join(rp.fmt(a) for a in s['member_accuracy'])}"
               if "member_accuracy" in s else "")
    out.append(f"- reward model, {n} member(s) (`{os.path.basename(ensemble_dir(workdir, n))}/reward`, "
               f"aggregate as each arm sets): training {rp.fmt(s.get('train_flops'))} FLOPs, "
               f"held-out accuracy {rp.fmt(s.get('accuracy'))}{gold}{members}; used by "
               f"{', '.join(users) or 'the non-ensemble arms'}")
  if out:
    out = ["**Reward models** (trained once and shared; their training FLOPs are not in any "
           "arm's budget, like the label stage's sampling; an ensemble's accuracy aggregates its "
           "members with the base config's reward.aggregate):", ""] + out + [""]
  return out


def write_report(workdir: str, args, budget: float, plans: list[dict], seeds: list[int],
                 failures: list[str]) -> str:
  results = {p["arm"]: [arm_result(os.path.join(workdir, "arms", p["arm"], f"seed{s}"), p["stage"])
                        for s in seeds] for p in plans}
  unit = "FLOPs" if args.match == "flops" else "sampled tokens"
  md = ["# RLHF methods at matched compute: PPO, best-of-K, DPO / IPO, GRPO / RLOO / Dr. GRPO", "",
        f"Config `{args.config}`, seeds {seeds}, matched on {unit}: budget {rp.fmt(budget)} per arm "
        "(estimates: each stage's own accounting, `experiments/arms.py`; DPO's reference "
        "log-probs, computed once, count against its budget). Shared stages (pretrain, sft, label, reward) ran once at seed 0 in `shared/`; "
        "config.seed changes only the arm's RL randomness, the data come from config.data.seed.", ""]
  rows = []
  for p in plans:
    rs = [r for r in results[p["arm"]] if r is not None]
    what = f"{p['steps']} {p.get('unit') or ('iterations' if p['stage'] == 'ppo' else 'rounds')}"
    if not rs:
      rows.append([p["arm"], what, "—", "—", "—", "—", "—", "—", rp.fmt(p["est_flops"]),
                   rp.fmt(p["est_tokens_sampled"]), "—", "0"])
      continue
    per_pflop = [(r["gold"] - r["sft_gold"]) / (r["flops"] / 1e15) if r["flops"] > 0 else float("nan")
                 for r in rs]
    rows.append([p["arm"], what, pm([r["peak_gold"] for r in rs]), pm([r["kl_at_peak"] for r in rs]),
                 pm([r["gold"] for r in rs]), pm([r["proxy"] for r in rs]),
                 pm([r["kl"] for r in rs]), pm(per_pflop), pm([r["flops"] for r in rs]),
                 pm([r["tokens_sampled"] for r in rs]),
                 pm([r["label_flops"] for r in rs]) if p["stage"] in ("dpo", "online") else "—",
                 str(len(rs))])
  bon = bon_method([r for p in plans if p["stage"] == "best_of_k" for r in results[p["arm"]]])
  if bon is not None:
    rows.append([f"best-of-n, n={bon['n'][-1]}", "SFT samples", "—", "—", rp.fmt(bon["gold"][-1]),
                 rp.fmt(bon["proxy"][-1]), rp.fmt(bon["d"][-1] ** 2) + " (bound)", "—", "—",
                 "—", "—", "—"])
  md += ["## Final figures (held-out prompts; mean ± std over seeds)", ""]
  md += rp.table(["arm", "spent", "peak gold", "KL at peak", "gold", "proxy", "KL from SFT",
                  "gold gain / PFLOP", "FLOPs", "tokens sampled", "label FLOPs", "seeds"], rows)
  md += ["Peak gold: the best held-out evaluation on the arm's way (SFT included), with the KL "
         "where it was reached; gold gain / PFLOP: (final gold - SFT gold) per 10^15 FLOPs. "
         "DPO's FLOPs include its reference pass; the label stage's sampling (K SFT samples per "
         "reward prompt, shared with the reward model every arm uses) is shown apart; an online "
         "arm's label FLOPs are its own rounds' labelling of policy samples, included in its FLOPs "
         "with its reward-model retraining.", ""]
  sft_gold = [r["curve_gold"][0] for rs in results.values() for r in rs if r is not None]
  md += [f"SFT policy: gold {pm(sft_gold)}. FLOPs and tokens are the stages' own accounting "
         "(upper bounds: full response length); planned vs budget: "
         + ", ".join(f"{p['arm']} x{p['budget_ratio']:.2f}" for p in plans) + ".", ""]
  if failures:
    md += ["**Failed runs** (see the console for the error; re-run to retry): " + ", ".join(failures), ""]
  md += reward_lines(workdir, plans)

  methods = {}
  for i, p in enumerate(plans):
    m = aggregate(results[p["arm"]], "rl", p["arm"])
    if m is not None:
      methods[p["arm"]] = {**m, "color": f"C{i % 10}"}
  if bon is not None:
    methods["best_of_n"] = {**bon, "color": "black"}
  md += ["## Frontier", ""]
  if methods:
    png, fits = rp.plot_frontier(methods, workdir, "frontier.png",
                                 title="Every method: mean over seeds (bars: std)")
    md += [f"![frontier]({png})", "",
           "d = sqrt(KL(policy || SFT)) on held-out prompts (best-of-n: the bound log n - (n-1)/n). "
           "Dashed: Gao et al. (2022) fits to every seed's points, relative to the SFT policy "
           "(reward - reward at d = 0): R_rl(d) = d (a - b log d) for the trained policies "
           "(PPO, best-of-K fine-tuning, DPO, GRPO), R_bon(d) = d (a - b d) for best-of-n.", ""]
    if fits:
      md += rp.table(["arm", "quantity", "form", "a", "b", "peak d*", "max d seen", "points"],
                     [[f["method"], f["quantity"], f["form"], rp.fmt(f["a"]), rp.fmt(f["b"]),
                       rp.fmt(f["d_peak"]), rp.fmt(f["d_max"]), f["n"]] for f in fits])
    png = plot_compute(methods, workdir)
    if png:
      md += [f"![compute]({png})", ""]
  else:
    md += ["No arm finished; nothing to plot.", ""]

  md += ["## Over-optimisation", ""]
  flagged = []
  for p in plans:
    rs = [r for r in results[p["arm"]] if r is not None]
    if not rs:
      continue
    det = overoptimisation(rs)
    if det["overoptimised"]:
      flagged.append(p["arm"])
      md.append(f"- **{p['arm']}: yes** — mean gold peaked at eval point {det['peak_index']} and then "
                f"fell by {rp.fmt(det['gold_drop'])} while the proxy rose by "
                f"{rp.fmt(det['proxy_gain_after_peak'])} ({det['seeds_flagged']}/{det['seeds']} seeds "
                "show it on their own).")
    else:
      md.append(f"- {p['arm']}: no (gold did not peak before the end while the proxy kept rising; "
                f"{det['seeds_flagged']}/{det['seeds']} seeds show it on their own).")
  md += [""]
  if not flagged:
    md += ["No arm over-optimised at this budget; a larger `--budget` (or more PPO iterations) "
           "pushes the unconstrained arms further from SFT.", ""]
  md += [EXPLANATION, ""]
  md += ["Each run's own report (stage figures, PPO curves, its frontier): "
         + ", ".join(f"[{p['arm']}/seed{s}](arms/{p['arm']}/seed{s}/report.md)" for p in plans
                     for s in seeds if results[p["arm"]][seeds.index(s)] is not None) + ".", ""]
  path = os.path.join(workdir, "report.md")
  with open(path + ".tmp", "w") as f:
    f.write("\n".join(md))
  os.replace(path + ".tmp", path)
  with open(os.path.join(workdir, "plan.json"), "w") as f:
    json.dump({"budget": budget, "match": args.match, "seeds": seeds, "plans": plans,
               "overoptimised": flagged}, f, indent=2)
  return path


# ----------------------------------------------------------------- main
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--config", default="configs/tiny.py", help="configs/NAME.py[:ARG]")
  p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default 1; e.g. 3 to show the spread)")
  p.add_argument("--match", choices=("flops", "tokens"), default="flops")
  p.add_argument("--budget", type=float, default=None,
                 help="per-arm FLOPs (or sampled tokens with --match tokens); "
                      "default: what 2 x config.ppo.iterations PPO iterations spend")
  p.add_argument("--arms", default=None,
                 help=f"comma-separated, or 'all' ({ALL_ARMS}); default {DEFAULT_ARMS}")
  p.add_argument("--min_rounds", type=int, default=2, help="fewest best-of-K rounds per arm")
  p.add_argument("--quick", action="store_true",
                 help=f"smoke test: configs/tiny.py:test sizes, arms {QUICK_ARMS}, 1 seed")
  p.add_argument("--report_only", action="store_true", help="rewrite report.md from finished runs")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field for every run, e.g. --set ppo.response_len=24 "
                      "(model/data overrides change the shared stages too)")
  a = p.parse_args(argv)
  if a.quick and ":" not in a.config:
    a.config += ":test"
  a.seeds = a.seeds if a.seeds is not None else 1
  if a.arms == "all":
    a.arms = ALL_ARMS
  a.arms = [s.strip() for s in (a.arms or (QUICK_ARMS if a.quick else DEFAULT_ARMS)).split(",") if s.strip()]
  if a.seeds < 1:
    p.error("--seeds must be >= 1")
  for arm in a.arms:
    try:
      parse_arm(arm)
    except ValueError as e:
      p.error(str(e))
  return a


def main(argv=None) -> int:
  args = parse_args(argv)
  from rlhf_jax import pipeline
  from rlhf_jax.model.transformer import ModelConfig
  from rlhf_jax.train.loop import Preempted
  workdir = os.path.abspath(args.workdir)
  base = load_config(args.config)
  for item in args.set:
    apply_override(base, item)
  shared = os.path.join(workdir, "shared")
  if not args.report_only:
    shared_cfg = base.copy_and_resolve_references()
    with shared_cfg.unlocked():
      shared_cfg.stages, shared_cfg.seed = ",".join(SHARED_STAGES), 0
    pipeline.run(shared_cfg, shared)
  vocab = base.model.vocab_size or (rp.load_summary(shared, "pretrain") or {}).get("vocab_size") \
      or base.data.vocab_size
  model_cfg = ModelConfig.from_config(base.model, vocab_size=vocab)
  budget, plans = plan_arms(base, args.arms, model_cfg, match=args.match, budget=args.budget,
                            min_rounds=args.min_rounds)
  if not args.report_only:
    train_ensembles(workdir, base, plans)
  seeds = list(range(args.seeds))
  for p in plans:
    print(f"[ppo_vs_bok] {p['arm']}: {p['steps']} {p['stage']} steps, est. {p['est_flops']:.3g} FLOPs, "
          f"{p['est_tokens_sampled']:.3g} tokens sampled (x{p['budget_ratio']:.2f} budget)", flush=True)
  failures = []
  if not args.report_only:
    for p in plans:
      for seed in seeds:
        arm_dir = os.path.join(workdir, "arms", p["arm"], f"seed{seed}")
        cfg = arm_config(base, p, seed)
        n = registry.ensemble_of(p["overrides"])
        link_shared(shared, arm_dir, cfg, reward_from=ensemble_dir(workdir, n) if n > 1 else None)
        print(f"[ppo_vs_bok] arm {p['arm']} seed {seed}: {arm_dir}", flush=True)
        try:
          pipeline.run(cfg, arm_dir)
          rp.build_report(arm_dir)
        except (KeyboardInterrupt, Preempted):
          raise  # re-run the same command to continue
        except Exception as e:  # pylint: disable=broad-except  (other arms still run)
          failures.append(f"{p['arm']}/seed{seed}")
          print(f"[ppo_vs_bok] arm {p['arm']} seed {seed} failed: {type(e).__name__}: {e}",
                file=sys.stderr, flush=True)
          if os.environ.get("RLHF_JAX_TRACEBACK"):
            traceback.print_exc()
  path = write_report(workdir, args, budget, plans, seeds, failures)
  print(f"[ppo_vs_bok] report: {path}", flush=True)
  if failures:
    print(f"ppo_vs_bok: error: {len(failures)} run(s) failed: {', '.join(failures)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  from rlhf_jax import hostenv
  from rlhf_jax.train.loop import Preempted
  hostenv.cpu_defaults()  # device count and allocator, as `rlhf_jax.main` (before JAX starts)
  try:
    sys.exit(main())
  except Preempted as e:  # SIGTERM: finished stages and arms are kept
    print(f"ppo_vs_bok: error: {e}", file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except KeyboardInterrupt:
    print("ppo_vs_bok: error: interrupted; re-run the same command to continue", file=sys.stderr)
    sys.exit(130)
