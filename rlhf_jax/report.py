"""The run report: DIR/report.md plus PNG plots, built from the workdir's files alone.

  python -m rlhf_jax.report --workdir DIR [--out_dir DIR]

Reads DIR/<stage>/summary.json and metrics.jsonl (DESIGN.md section 3) and
writes one Markdown page: each stage's headline figures, training curves, and
the frontier plot of gold and proxy reward against d = sqrt(KL from SFT) for
PPO, best-of-n and best-of-K fine-tuning, with the Gao et al. (2022) scaling
law fits. A stage that is missing (or a key it lacks) skips its section and
the page says so; it never fails the run that produced the data.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import numpy as np

from rlhf_jax import best_of_k as bok_math

STAGES = ("pretrain", "sft", "label", "reward", "ppo", "best_of_k", "evaluate")
# Policy stages whose summaries hold `eval_points` (iteration, gold, proxy, kl) for the frontier.
POLICY_STAGES = ("ppo", "dpo", "grpo", "online")
FIGSIZE, DPI = (8, 5), 100  # 800 x 500 pixels


# ------------------------------------------------------------------ reading
def load_summary(workdir: str, name: str) -> dict | None:
  path = os.path.join(workdir, name, "summary.json")
  try:
    with open(path) as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return None
  return summary if isinstance(summary, dict) else None


def load_metrics(workdir: str, name: str) -> list[dict]:
  """Rows of DIR/<name>/metrics.jsonl; a torn last line (hard kill) is dropped."""
  rows = []
  try:
    with open(os.path.join(workdir, name, "metrics.jsonl")) as f:
      for line in f:
        try:
          row = json.loads(line)
        except ValueError:
          break
        if isinstance(row, dict) and "step" in row:
          rows.append(row)
  except OSError:
    pass
  return rows


def stage_metrics(workdir: str, name: str) -> list[dict]:
  """Like load_metrics; best_of_k's fine-tuning logs per round (best_of_k/round_R/), so its
  rounds are joined into one series, each round's steps offset past the previous round's."""
  rows = load_metrics(workdir, name)
  if rows or name != "best_of_k":
    return rows
  base = os.path.join(workdir, name)
  try:
    rounds = sorted((int(d.split("_")[1]), d) for d in os.listdir(base)
                    if d.startswith("round_") and d.split("_")[1].isdigit())
  except OSError:
    return []
  offset = 0
  for _, d in rounds:
    sub = load_metrics(base, d)
    rows += [dict(r, step=num(r["step"]) + offset) for r in sub]
    offset = max([offset] + [num(r["step"]) + offset for r in sub])
  return rows


def num(x) -> float:
  """A float, or nan for anything missing or non-numeric."""
  try:
    return float(x)
  except (TypeError, ValueError):
    return float("nan")


def fmt(x, digits: int = 3) -> str:
  """Compact number for a table; "—" for missing or non-finite."""
  v = num(x)
  if not math.isfinite(v):
    return "—"
  if v == int(v) and abs(v) < 1e6:
    return str(int(v))
  if abs(v) >= 1e5 or abs(v) < 1e-3:
    return f"{v:.3g}"
  return f"{v:.{digits}f}"


def series(rows: list[dict], key: str, eval_rows: bool | None = None):
  """(steps, values) of `key` over the rows that have a finite value for it."""
  xs, ys = [], []
  for r in rows:
    if eval_rows is not None and any(k.startswith("eval_") for k in r) != eval_rows:
      continue
    v = num(r.get(key))
    if math.isfinite(v):
      xs.append(num(r["step"]))
      ys.append(v)
  return np.asarray(xs), np.asarray(ys)


def has_gold(summary: dict) -> bool:
  """Gold figures exist (a gold scorer ran). Without one they are absent, and so are the
  report's gold rows and columns (not dashes, not 0)."""
  return math.isfinite(num(summary.get("gold_reward"))) or math.isfinite(num(summary.get("sft_gold_reward")))


def present_keys(keys: list[str], rows: list[dict]) -> list[str]:
  """The keys some row has a finite value for (gold columns vanish without a gold scorer)."""
  return [k for k in keys if any(math.isfinite(num(r.get(k))) for r in rows)]


def table(header: list[str], rows: list[list]) -> list[str]:
  out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
  return out + [""]


# ------------------------------------------------------------- frontier math
def sqrt_kl(kl) -> np.ndarray:
  """d = sqrt(KL); tiny negative KL estimates (sampling noise) are clipped to 0."""
  return np.sqrt(np.maximum(np.asarray(kl, dtype=np.float64), 0.0))


def finite_xy(x, y):
  x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  return x[ok], y[ok]


def gao_fit(form: str, d, r) -> dict | None:
  """Fit R(d) (relative reward, r = reward - reward at d = 0) with Gao et al.'s form.

  form "bon": R = d (a - b d), peak at d* = a / 2b; "rl": R = d (a - b log d),
  peak at d* = exp(a / b - 1). Returns None with fewer than 3 finite points away
  from d = 0: both forms pass through (0, 0) whatever a and b are, so the d = 0
  anchor carries no information, and two parameters fit two points exactly.
  """
  d, r = finite_xy(d, r)
  if np.sum(d > 1e-9) < 3:
    return None
  a, b = (bok_math.fit_bon if form == "bon" else bok_math.fit_rl)(d, r)
  if not (math.isfinite(a) and math.isfinite(b)):
    return None
  peak = float("nan")  # no peak (b <= 0) or one far beyond the data: an extrapolation
  if b > 0:
    peak = a / (2 * b) if form == "bon" else math.exp(min(a / b - 1, 50.0))
    peak = peak if 0 < peak <= 10 * d.max() else float("nan")
  return {"form": form, "a": a, "b": b, "d_peak": peak, "d_max": float(d.max()), "n": int(len(d))}


def fit_kind(method: str, quantity: str, form: str) -> str:
  """Gao et al. (2022) derived R_bon for best-of-n and R_rl for RL, both for the gold reward.
  The same forms fitted to a proxy curve or to best-of-K fine-tuning rounds describe
  the shape of the points; they are not the scaling law."""
  gao = quantity == "gold" and (method, form) in (("best_of_n", "bon"), ("ppo", "rl"))
  return "Gao et al." if gao else "descriptive"


def gao_curve(fit: dict, d) -> np.ndarray:
  d = np.asarray(d, dtype=np.float64)
  if fit["form"] == "bon":
    return d * (fit["a"] - fit["b"] * d)
  logd = np.log(np.where(d > 0, d, 1.0))
  return d * (fit["a"] - fit["b"] * logd)


def detect_overoptimisation(gold, proxy, tol: float = 0.05) -> dict:
  """Did gold peak before the end while proxy kept rising? (points in training order)

  True when the last gold is more than `tol` below its peak, the peak is not
  the last point, and proxy at the end is more than `tol` above proxy at the
  gold peak: the policy kept pleasing the reward model after it stopped
  pleasing the gold scorer (Gao et al. 2022).
  """
  g, p = np.asarray(gold, dtype=np.float64), np.asarray(proxy, dtype=np.float64)
  ok = np.isfinite(g) & np.isfinite(p)
  g, p = g[ok], p[ok]
  out = {"overoptimised": False, "peak_index": None, "gold_drop": float("nan"),
         "proxy_gain_after_peak": float("nan")}
  if len(g) < 3:
    return out
  i = int(np.argmax(g))
  out.update(peak_index=i, gold_drop=float(g[i] - g[-1]), proxy_gain_after_peak=float(p[-1] - p[i]))
  out["overoptimised"] = bool(i < len(g) - 1 and g[i] - g[-1] > tol and p[-1] - p[i] > tol)
  return out


def first_finite(*values) -> float:
  for v in values:
    if math.isfinite(num(v)):
      return num(v)
  return float("nan")


def frontier_points(workdir: str) -> dict:
  """Per method: arrays d, gold, proxy, x (iteration / n / round) in order, and the
  SFT baselines gold0, proxy0 (the values at d = 0) the Gao fits are relative to."""
  out = {}
  bk = load_summary(workdir, "best_of_k") or {}
  for stage in POLICY_STAGES:  # stages whose summary carries PPO-shaped eval_points
    ppo = load_summary(workdir, stage) or {}
    pts = sorted([p for p in ppo.get("eval_points") or [] if isinstance(p, dict)],
                 key=lambda p: num(p.get("iteration")))
    if pts:
      at0 = pts[0] if num(pts[0].get("kl")) == 0 else {}
      out[stage] = dict(
          d=sqrt_kl([num(p.get("kl")) for p in pts]),
          gold=np.array([num(p.get("gold_reward")) for p in pts]),
          proxy=np.array([num(p.get("proxy_reward")) for p in pts]),
          x=np.array([num(p.get("iteration")) for p in pts]),
          gold0=first_finite(at0.get("gold_reward"), ppo.get("sft_gold_reward")),
          proxy0=first_finite(at0.get("proxy_reward"), ppo.get("sft_proxy_reward")),
          label=f"{stage.upper()} (held-out evals)", form="rl")
  curve = sorted([c for c in bk.get("bon_curve") or [] if isinstance(c, dict)],
                 key=lambda c: num(c.get("n")))
  n1 = curve[0] if curve and num(curve[0].get("n")) == 1 else {}
  if curve:
    out["best_of_n"] = dict(
        d=np.array([first_finite(c.get("sqrt_kl"), math.sqrt(max(num(c.get("kl_bound")), 0.0))
                                  if math.isfinite(num(c.get("kl_bound"))) else None)
                    for c in curve]),
        gold=np.array([num(c.get("gold")) for c in curve]),
        proxy=np.array([num(c.get("proxy")) for c in curve]),
        x=np.array([num(c.get("n")) for c in curve]),
        gold0=first_finite(n1.get("gold"), bk.get("sft_gold_reward")),
        proxy0=first_finite(n1.get("proxy"), bk.get("sft_proxy_reward")),
        label="best-of-n (KL = log n - (n-1)/n)", form="bon")
  rounds = sorted([r for r in bk.get("rounds") or [] if isinstance(r, dict)],
                  key=lambda r: num(r.get("round")))
  if rounds:
    # Round 0 is the SFT policy. The proxy is normalised to mean 0 on SFT samples
    # (reward stage), the fallback when no held-out SFT proxy figure is recorded.
    g0 = first_finite(bk.get("sft_gold_reward"), n1.get("gold"))
    p0 = first_finite(bk.get("sft_proxy_reward"), n1.get("proxy"), 0.0)
    out["best_of_k"] = dict(
        d=np.concatenate([[0.0], sqrt_kl([num(r.get("kl")) for r in rounds])]),
        gold=np.array([g0] + [num(r.get("gold_reward")) for r in rounds]),
        proxy=np.array([p0] + [num(r.get("proxy_reward")) for r in rounds]),
        x=np.array([0.0] + [num(r.get("round")) for r in rounds]), gold0=g0, proxy0=p0,
        label="best-of-K fine-tuning (rounds)", form="rl")
  return out


# ------------------------------------------------------------------ plotting
def new_figure(ncols: int = 1, nrows: int = 1):
  from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg via savefig
  fig = Figure(figsize=FIGSIZE, dpi=DPI)
  axes = fig.subplots(nrows, ncols, squeeze=False)
  return fig, axes


def save(fig, out_dir: str, name: str) -> str:
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, name), dpi=DPI)
  return name


COLORS = {"ppo": "C0", "best_of_n": "C1", "best_of_k": "C2", "dpo": "C3", "grpo": "C4",
          "online": "C5"}


def plot_frontier(methods: dict, out_dir: str, name: str = "frontier.png",
                  title: str = "") -> tuple[str, list]:
  """Gold (left) and proxy (right) vs d = sqrt(KL), one colour per method, Gao fits dashed.

  methods[key]: d, gold, proxy, gold0, proxy0, label, form, and optionally
  gold_std / proxy_std (spread over seeds, drawn as error bars) and color.
  """
  # No gold scorer (data.source=files): the proxy panel alone.
  quantities = [q for q in ("gold", "proxy")
                if any(len(finite_xy(m["d"], m[q])[0]) for m in methods.values())] or ["proxy"]
  fig, axes = new_figure(ncols=len(quantities))
  fits = []
  for i, (key, m) in enumerate(methods.items()):
    c = m.get("color") or COLORS.get(key) or f"C{i % 10}"
    for ax, q in zip(axes[0], quantities):
      d, y = finite_xy(m["d"], m[q])
      if not len(d):
        continue
      std = m.get(q + "_std")
      if std is not None:
        d_all, y_all, s_all = (np.asarray(v, dtype=np.float64) for v in (m["d"], m[q], std))
        ok = np.isfinite(d_all) & np.isfinite(y_all)
        ax.errorbar(d_all[ok], y_all[ok], yerr=np.nan_to_num(s_all[ok]), fmt="o-", color=c, ms=4,
                    lw=1.2, capsize=2, label=m["label"])
      else:
        ax.plot(d, y, "o-", color=c, ms=4, lw=1.2, label=m["label"])
      base = num(m.get(q + "0"))
      if not math.isfinite(base):
        continue
      fit = gao_fit(m["form"], m.get("fit_d", m["d"]), np.asarray(m.get("fit_" + q, m[q])) - base)
      if fit is None:
        continue
      kind = fit_kind(key, q, fit["form"])
      fits.append({"method": key, "quantity": q, "kind": kind, **fit})
      grid = np.linspace(0, max(float(d.max()), 1e-6) * 1.05, 100)
      ax.plot(grid, base + gao_curve(fit, grid), "--" if kind == "Gao et al." else ":", color=c,
              lw=1, label=f"fit R_{fit['form']}" + ("" if kind == "Gao et al." else f" ({kind})")
              + f": a={fit['a']:.2f}, b={fit['b']:.2f}")
  for ax, q in zip(axes[0], quantities):
    ax.set_xlabel("d = sqrt(KL(policy || SFT))  [sqrt nats]")
    ax.set_ylabel(f"{q} reward")
    ax.set_title(f"{q.capitalize()} reward vs distance from SFT", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6)
  if title:
    fig.suptitle(title)
  save(fig, out_dir, name)
  return name, fits


def plot_loss_curves(workdir: str, out_dir: str, stages) -> str | None:
  """Training (solid) and eval (markers) loss per supervised stage."""
  data = {s: stage_metrics(workdir, s) for s in stages}
  present = [s for s, rows in data.items()
             if len(series(rows, "loss")[0]) or len(series(rows, "eval_loss")[0])]
  if not present:
    return None
  ncols = len(present) if len(present) <= 2 else math.ceil(len(present) / 2)
  fig, axes = new_figure(ncols=ncols, nrows=1 if len(present) <= 2 else 2)
  flat = [ax for row in axes for ax in row]
  for ax in flat[len(present):]:
    ax.set_visible(False)
  for ax, s in zip(flat, present):
    x, y = series(data[s], "loss", eval_rows=False)
    if len(x):
      ax.plot(x, y, "-", lw=1.2, label="train loss")
    x, y = series(data[s], "eval_loss")
    if len(x):
      ax.plot(x, y, "s--", ms=4, label="eval loss")
    ax.set_title(s if s != "best_of_k" else "best_of_k (rounds joined; eval: SFT demos)", fontsize=9)
    ax.set_xlabel("step", fontsize=8)
    ax.set_ylabel("loss", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  fig.suptitle("Training curves (loss per stage)")
  return save(fig, out_dir, "loss_curves.png")


def plot_ppo_curves(workdir: str, out_dir: str) -> str | None:
  rows = load_metrics(workdir, "ppo")
  if not rows:
    return None
  # Held-out points: the summary's eval_points start at iteration 0 (the SFT policy).
  pts = (load_summary(workdir, "ppo") or {}).get("eval_points")
  if isinstance(pts, list) and pts:
    evals = [{"step": p.get("iteration"), "eval_gold_reward": p.get("gold_reward"),
              "eval_proxy_reward": p.get("proxy_reward"), "eval_kl": p.get("kl")}
             for p in pts if isinstance(p, dict)]
    rows = [r for r in rows if not any(k.startswith("eval_") for k in r)] + evals
  fig, axes = new_figure(ncols=2, nrows=2)
  panels = [(axes[0][0], "reward per iteration", [("proxy_reward", "proxy (rollouts)", "C0"),
                                                  ("gold_reward", "gold (rollouts)", "C3"),
                                                  ("eval_proxy_reward", "proxy (held-out)", "C0"),
                                                  ("eval_gold_reward", "gold (held-out)", "C3")]),
            (axes[0][1], "KL from SFT [nats]", [("kl", "KL (rollouts, k1)", "C2"),
                                                ("eval_kl", "KL (held-out)", "C2")]),
            (axes[1][0], "KL coefficient beta", [("kl_coef", "kl_coef", "C4")]),
            (axes[1][1], "losses", [("policy_loss", "policy loss", "C0"),
                                    ("value_loss", "value loss", "C1")])]
  for ax, title, keys in panels:
    for key, label, color in keys:
      x, y = series(rows, key)
      if len(x):
        ax.plot(x, y, "o--" if key.startswith("eval_") else "-", color=color, ms=4, lw=1.2,
                alpha=1.0 if key.startswith("eval_") else 0.7, label=label)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("PPO iteration")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=6)
  fig.suptitle("PPO training (solid: rollouts each iteration; dashed: held-out evaluations)")
  return save(fig, out_dir, "ppo_curves.png")


def plot_bok_rounds(bk: dict, out_dir: str) -> str | None:
  rounds = sorted([r for r in bk.get("rounds") or [] if isinstance(r, dict)],
                  key=lambda r: num(r.get("round")))
  if not rounds:
    return None
  fig, axes = new_figure()
  ax = axes[0][0]
  x = [num(r.get("round")) for r in rounds]
  for key, label in (("gold_reward", "gold"), ("proxy_reward", "proxy"), ("kl", "KL from SFT")):
    xs, ys = finite_xy(x, [num(r.get(key)) for r in rounds])
    if len(xs):
      ax.plot(xs, ys, "o-", label=label)
  if math.isfinite(num(bk.get("sft_gold_reward"))):
    ax.axhline(num(bk["sft_gold_reward"]), color="gray", ls=":", label="SFT gold")
  ax.set_xlabel("round")
  ax.set_ylabel("reward / KL [nats]")
  ax.set_title("Best-of-K fine-tuning: held-out figures after each round")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  return save(fig, out_dir, "best_of_k_rounds.png")


# ------------------------------------------------------------------ sections
def _config(workdir: str, name: str = "config.json") -> dict:
  """DIR/config.json: the latest run's config (config_first.json: the first run's)."""
  try:
    with open(os.path.join(workdir, name)) as f:
      cfg = json.load(f)
    return cfg if isinstance(cfg, dict) else {}
  except (OSError, ValueError):
    return {}


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


def _config_section(workdir: str) -> list[str]:
  """The latest run's config and what changed since the first run (the stages that ran,
  with their wall times, follow on the next line)."""
  cfg = _config(workdir)
  if not cfg:
    return ["(no config.json in the workdir)", ""]
  m, data = cfg.get("model") or {}, cfg.get("data") or {}
  md = [f"Latest run: stages `{cfg.get('stages')}`, seed {cfg.get('seed')}, model "
        f"d_model={m.get('d_model')} x {m.get('n_layers')} layers, data source `{data.get('source')}`"
        + (f", data.skip_bad={data.get('skip_bad')}" if data.get("skip_bad") else "") + ".", ""]
  first = _config(workdir, "config_first.json")
  if first:
    a, b = _flat(first), _flat(cfg)
    diff = [f"`{k}` {a.get(k)} → {b.get(k)}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and k not in ("stages", "compile_cache")]
    md += [("Changed since the first run: " + ", ".join(diff) + ".") if diff
           else "Same config as the first run (apart from the stages listed).", ""]
  return md


def _before_after(s: dict, key: str) -> str:
  return f"{fmt(s.get('init_eval_' + key))} → {fmt(s.get('eval_' + key))}"


def gold_scorer(workdir: str) -> str | None:
  """Who scored the gold figures (summaries' `gold_scorer`: "world" or a reward model,
  config.label.annotator); None when no stage has gold figures."""
  for name in ("label", "reward", "ppo", "best_of_k", "dpo", "grpo", "evaluate"):
    s = load_summary(workdir, name)
    if s is not None and s.get("gold_scorer"):
      return s["gold_scorer"]
  return None


def _headline(workdir: str, missing: list) -> list[str]:
  md = ["## Headline figures", ""]
  scorer = gold_scorer(workdir)
  if scorer:
    md += [f"Gold figures: gold = {scorer}" + (" (the synthetic world's scorer)" if scorer == "world"
           else " (a reward model playing the annotators and the gold scorer, Gao et al. 2022)")
           + ".", ""]
  for name in ("pretrain", "sft"):
    s = load_summary(workdir, name)
    if s is None:
      continue
    md += [f"**{name}**: eval loss {_before_after(s, 'loss')} over {fmt(s.get('steps'))} steps"
           + (f", {fmt(s.get('skipped_updates'))} skipped updates" if s.get("skipped_updates") else "")
           + (f"; corpus {fmt(s.get('corpus_tokens'))} tokens" if "corpus_tokens" in s else "")
           + (f"; {fmt(s.get('examples'))} training examples" if "examples" in s else "") + ".", ""]
  s = load_summary(workdir, "label")
  if s is not None:
    md += [f"**label**: {fmt(s.get('prompts'))} prompts x K={fmt(s.get('k'))} SFT samples ranked by the "
           f"simulated annotators (gold = {s.get('gold_scorer', 'world')}); pairwise agreement with gold {fmt(s.get('label_gold_agreement'))} "
           f"(pairs with gold gap > 0.25: {fmt(s.get('label_gold_agreement_clear'))}); "
           f"sample gold {fmt(s.get('sample_gold_mean'))} ± {fmt(s.get('sample_gold_std'))}.", ""]
  s = load_summary(workdir, "reward")
  if s is not None:
    gold = (f"gold accuracy {fmt(s.get('gold_accuracy'))} (agrees with the gold scorer; "
            f"clear pairs {fmt(s.get('gold_accuracy_clear'))}); " if "gold_accuracy" in s else "")
    ens = ""
    if "member_accuracy" in s:  # an ensemble: gains / biases are per member
      ens = (f"an ensemble of {len(s['member_accuracy'])} ({s.get('aggregate')}; members' accuracy "
             f"{', '.join(fmt(a) for a in s['member_accuracy'])}): ")
    norm = (lambda k: fmt(s.get(k)) if not isinstance(s.get(k), list)
            else "[" + ", ".join(fmt(v) for v in s[k]) + "]")
    md += [f"**reward**: {ens}held-out ranking accuracy {fmt(s.get('accuracy'))} (agrees with the labels), "
           f"{gold}eval loss {_before_after(s, 'loss')}; "
           f"normalisation gain {norm('reward_gain')}, bias {norm('reward_bias')} "
           "(SFT samples score mean 0, std 1).", ""]
  s = load_summary(workdir, "ppo")
  if s is not None:
    md += ["**ppo** (held-out prompts, vs the SFT policy):", ""]
    rows = [["gold reward", fmt(s.get("sft_gold_reward")), fmt(s.get("gold_reward"))],
            ["proxy reward (RM)", fmt(s.get("sft_proxy_reward")), fmt(s.get("proxy_reward"))],
            ["KL from SFT [nats]", "0", fmt(s.get("kl"))],
            ["win rate vs SFT (gold)", "0.5", fmt(s.get("win_rate_vs_sft"))],
            ["response length", "—", fmt(s.get("response_length"))]]
    md += table(["", "SFT", "PPO"], [r for r in rows if "gold" not in r[0] or has_gold(s)])
    kl_cfg = _config(workdir).get("ppo") or {}
    if kl_cfg:
      md += [f"KL control `{kl_cfg.get('kl_mode')}`, coefficient {fmt(kl_cfg.get('kl_coef'))}"
             + (f" (target {fmt(kl_cfg.get('kl_target'))})" if kl_cfg.get("kl_mode") == "adaptive" else "")
             + f", {kl_cfg.get('kl_estimator')} estimator.", ""]
    md += [f"{fmt(s.get('iterations'))} iterations, final KL coefficient {fmt(s.get('kl_coef_final'))}, "
           f"{fmt(num(s.get('flops_per_iteration')) * num(s.get('iterations')))} FLOPs, "
           f"{fmt(num(s.get('tokens_sampled_per_iteration')) * num(s.get('iterations')))} tokens sampled.", ""]
  s = load_summary(workdir, "best_of_k")
  if s is not None:
    gold = (f"SFT gold {fmt(s.get('sft_gold_reward'))} → gold {fmt(s.get('gold_reward'))}, "
            if has_gold(s) else "")
    md += [f"**best_of_k**: {gold}proxy {fmt(s.get('proxy_reward'))}, KL {fmt(s.get('kl'))}.", ""]
    rounds = [r for r in s.get("rounds") or [] if isinstance(r, dict)]
    if rounds:
      keys = present_keys(["round", "gold_reward", "proxy_reward", "kl", "win_rate_vs_sft", "kept",
                           "tokens_sampled", "tokens_trained", "flops"], rounds)
      md += table(keys, [[fmt(r.get(k)) for k in keys] for r in rounds])
    curve = [c for c in s.get("bon_curve") or [] if isinstance(c, dict)]
    if curve:
      md += ["Best-of-n on held-out prompts (unbiased estimate from one pool per prompt):", ""]
      keys = present_keys(["n", "kl_bound", "sqrt_kl", "gold", "proxy"], curve)
      md += table(keys, [[fmt(c.get(k)) for k in keys] for c in curve])
  for name in POLICY_STAGES[1:]:
    s = load_summary(workdir, name)
    if s is not None:
      md += [f"**{name}**: SFT gold {fmt(s.get('sft_gold_reward'))} → gold {fmt(s.get('gold_reward'))}, "
             f"proxy {fmt(s.get('proxy_reward'))}, KL {fmt(s.get('kl'))}, win rate vs SFT "
             f"{fmt(s.get('win_rate_vs_sft'))}.", ""]
      rounds = [r for r in s.get("rounds") or [] if isinstance(r, dict)]
      if rounds:  # online: per round, the RM refresh then PPO (flops cumulative)
        keys = present_keys(["round", "gold_reward", "proxy_reward", "kl", "rm_accuracy",
                             "rm_gold_accuracy", "label_gold_agreement", "round_label_flops",
                             "flops"], rounds)
        md += table(keys, [[fmt(r.get(k)) for k in keys] for r in rounds])
  s = load_summary(workdir, "evaluate")
  if s is not None:
    pols = [p for p in s.get("policies") or [] if isinstance(p, dict)]
    if pols:
      md += ["**evaluate** (same held-out prompts for every policy):", ""]
      keys = present_keys(["gold_reward", "proxy_reward", "kl", "win_rate_vs_sft"], pols)
      md += table(["policy"] + keys, [[p.get("name", "?")] + [fmt(p.get(k)) for k in keys] for p in pols])
    else:
      md += ["**evaluate**: summary has no `policies` list.", ""]
  if missing:
    md += [f"Not in this workdir (sections skipped): {', '.join(missing)}.", ""]
  return md


def _frontier_section(workdir: str, out_dir: str) -> list[str]:
  md = ["## Frontier: reward vs distance from SFT", ""]
  methods = frontier_points(workdir)
  if not methods:
    return md + ["No PPO evaluation points, best-of-n curve or best-of-K rounds in this workdir; "
                 "no frontier to plot.", ""]
  png, fits = plot_frontier(methods, out_dir)
  md += [f"![frontier]({png})", "",
         "x: d = sqrt(KL(policy || SFT)) (best-of-n uses its analytic bound log n - (n-1)/n). "
         "Dashed: Gao et al. (2022) fits, R_bon(d) = d (a - b d) for best-of-n and "
         "R_rl(d) = d (a - b log d) for PPO and best-of-K fine-tuning, fitted to the reward "
         "*relative to the SFT policy* (gold - gold at d = 0, likewise proxy) and drawn shifted "
         "back by that value. Fits need 3+ points besides d = 0 (every form passes through it). "
         "Gao et al. derived these forms for the gold reward of best-of-n and of RL; fits to proxy "
         "curves and to best-of-K rounds are labelled *descriptive* (dotted): a summary of the "
         "points' shape, not the scaling law. Peak d*: where the fit is highest (a / 2b for "
         "R_bon, exp(a/b - 1) for R_rl); — when the fit has no peak within 10x the largest d seen.", ""]
  if fits:
    md += table(["method", "quantity", "form", "kind", "a", "b", "peak d*", "max d seen", "points"],
                [[f["method"], f["quantity"], f["form"], f["kind"], fmt(f["a"]), fmt(f["b"]),
                  fmt(f["d_peak"]), fmt(f["d_max"]), f["n"]] for f in fits])
  for key, m in methods.items():
    det = detect_overoptimisation(m["gold"], m["proxy"])
    if det["overoptimised"]:
      md += [f"**Over-optimisation ({key})**: gold peaked at point {det['peak_index']} and fell by "
             f"{fmt(det['gold_drop'])} while proxy rose by {fmt(det['proxy_gain_after_peak'])}.", ""]
  return md


def load_samples(workdir: str, name: str) -> list[dict]:
  """Rows of DIR/<name>/samples.jsonl (PolicyEvaluator's log); a torn last line is dropped."""
  rows = []
  try:
    with open(os.path.join(workdir, name, "samples.jsonl")) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except ValueError:
          break
  except OSError:
    pass
  return [r for r in rows if isinstance(r, dict) and "policy" in r and "prompt_index" in r]


def _cell(text, limit: int = 240, tail: bool = False) -> str:
  """Sample text on one Markdown line, no table or HTML syntax; a long prompt keeps its
  end (the turn being answered), a long response its start."""
  t = str(text).strip().replace("\n", " ⏎ ").replace("|", "\\|").replace("<", "&lt;")
  if len(t) > limit:
    t = ("… " + t[-limit:]) if tail else (t[:limit] + " …")
  return t or "(empty)"


def _samples_section(workdir: str, n_prompts: int = 3) -> list[str]:
  """For a few held-out prompts: the SFT response and each trained policy's latest one."""
  source = "evaluate"
  rows = load_samples(workdir, "evaluate")
  if not rows:  # no evaluate stage: the arms' own logs
    source = "ppo, best_of_k"
    rows = load_samples(workdir, "ppo") + load_samples(workdir, "best_of_k")
  if not rows:
    return []
  latest = {}  # policy -> (step, rows of that evaluation)
  for r in rows:
    step = num(r.get("iteration", r.get("round", 0)))
    have = latest.get(r["policy"])
    if have is None or step > have[0]:
      latest[r["policy"]] = (step, [r])
    elif step == have[0]:
      have[1].append(r)
  order = sorted(latest, key=lambda p: p != "sft")  # SFT first, then as evaluated
  first = latest[order[0]][1]
  prompts = sorted({r["prompt_index"] for r in first})[:n_prompts]
  gold = any("gold" in r for r in rows)
  md = ["## Samples", "",
        f"Responses to the first {len(prompts)} held-out prompts, one per policy at the same "
        f"sampling key (from `{source}`; every evaluation's samples are in "
        "DIR/<stage>/samples.jsonl). Read them before trusting a curve.", ""]
  for i in prompts:
    by = {p: next((r for r in latest[p][1] if r["prompt_index"] == i), None) for p in order}
    text = next(r["prompt"] for r in by.values() if r is not None)
    md += [f"**Prompt {i}**: {_cell(text, tail=True)}", ""]
    header = ["policy", "response", "proxy"] + (["gold"] if gold else [])
    lines = []
    for p, r in by.items():
      if r is None:
        continue
      step = ("" if "iteration" not in r and "round" not in r else
              f" (iteration {r['iteration']})" if "iteration" in r else f" (round {r['round']})")
      lines.append([p + step, _cell(r["response"]) + ("" if r.get("ended", True) else " [no EOS]"),
                    fmt(r.get("proxy"))] + ([fmt(r.get("gold"))] if gold else []))
    md += table(header, lines)
  return md


def build_report(workdir: str, out_dir: str | None = None) -> str:
  """Writes report.md and its PNGs into out_dir (default: workdir); returns report.md's path."""
  workdir = os.path.abspath(workdir)
  out_dir = os.path.abspath(out_dir or workdir)
  os.makedirs(out_dir, exist_ok=True)
  present = [s for s in STAGES if load_summary(workdir, s) is not None]
  missing = [s for s in STAGES if s not in present]
  md = [f"# RLHF run report: `{os.path.basename(workdir)}`", ""]
  md += _config_section(workdir)
  walls = [f"{s} {fmt(load_summary(workdir, s).get('wall_seconds'), 1)}s" for s in present]
  md += ["Finished stages: " + (", ".join(walls) if walls else "none") + ".", ""]
  md += _headline(workdir, missing)

  md += ["## Training curves", ""]
  png = plot_loss_curves(workdir, out_dir, [s for s in ("pretrain", "sft", "reward", "best_of_k")])
  md += [f"![loss curves]({png})", ""] if png else ["No loss curves (no metrics.jsonl with `loss`).", ""]
  png = plot_ppo_curves(workdir, out_dir)
  md += ([f"![PPO curves]({png})", "",
          "Rollout figures each logged iteration; held-out (`eval_`) points every `ppo.eval_every`.", ""]
         if png else ["No PPO metrics.", ""])
  bk = load_summary(workdir, "best_of_k")
  png = plot_bok_rounds(bk, out_dir) if bk else None
  if png:
    md += [f"![best-of-K rounds]({png})", ""]
  md += _frontier_section(workdir, out_dir)
  md += _samples_section(workdir)
  path = os.path.join(out_dir, "report.md")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write("\n".join(md))
  os.replace(tmp, path)
  return path


def write_report(ctx) -> str | None:
  """The pipeline's last step. A failure here loses no stage's work, so it warns instead of failing."""
  import jax
  if jax.process_index() != 0:
    return None
  try:
    path = build_report(ctx.workdir)
  except Exception as e:  # pylint: disable=broad-except
    print(f"[report] could not write the report ({type(e).__name__}: {e}); the stages' outputs are "
          f"complete: retry with python -m rlhf_jax.report --workdir {ctx.workdir}", file=sys.stderr,
          flush=True)
    return None
  print(f"[report] {path}", flush=True)
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--out_dir", default=None, help="where report.md and the PNGs go (default: workdir)")
  a = p.parse_args(argv)
  if not os.path.isdir(a.workdir):
    print(f"rlhf_jax.report: error: {a.workdir} is not a directory", file=sys.stderr)
    return 2
  print(build_report(a.workdir, a.out_dir))
  return 0


if __name__ == "__main__":
  sys.exit(main())
