"""Stage: best-of-n evaluation and rejection-sampling fine-tuning (best-of-K), PPO's alternative.

Part 1, best-of-n: N = `best_of_k.eval_pool` SFT samples per held-out prompt,
scored once; for n = 1, 2, 4, .. N/2 the unbiased estimate of the gold and
proxy score of the proxy-best of n (`rlhf_jax.best_of_k.bon_expected`, Gao et
al. 2022), against KL <= log n - (n-1)/n (`bon_kl`, an analytic upper bound,
labelled `kl_bound`; Stiennon et al. 2020).

Part 2, best-of-K fine-tuning (rejection sampling: Dong et al. 2023 "RAFT";
Touvron et al. 2023 "Llama 2" sec. 3.2.3): each round samples K responses per
RL prompt from the current policy, keeps the proxy-best one (`keep` rule),
and fine-tunes on the kept pairs with the SFT loss. Each round is its own
sub-stage `best_of_k/round_R/` (checkpoints, metrics.jsonl, summary.json), so
a finished round is skipped and an interrupted one resumes exactly: the
examples it kept are saved in `round_R/kept.json` before its fine-tuning
starts and read back on resume, never resampled (sampling need not repeat bit
for bit after a restart on other devices).

Choices (all visible here):
- Selection score = normalised RM score, with responses that never emitted EOS
  scored `ppo.missing_eos_penalty` when `ppo.use_eos_penalty` (Huang et al.
  2024): both arms optimise the same reward; ties among penalised samples are
  broken by the RM score. `proxy` figures report the RM score of the
  selected sample, as PolicyEvaluator does.
- Kept responses are trained from their sampled token ids (no decode/encode
  round trip). A response that ended keeps its EOS as a target. One that hit
  `ppo.response_len` without EOS (rare once penalised) is kept WITHOUT an EOS
  target: it was cut, and teaching the policy to stop there would teach it to
  stop mid-sentence (the same rule as `batching.sft_examples` truncation).
- The eval loss of each round's fine-tuning is the SFT held-out
  demonstration loss: fixed across rounds (comparable) and it shows drift
  away from the demonstrations; every kept sample is trained on.
- Fewer kept pairs than one batch (strict `threshold`) are repeated to fill it.
- Compute (cumulative, PPO's conventions in `ppo.compute_per_iteration`):
  sampling and RM scoring one forward per prompt+response token each, full
  response length; training 3 forwards per trained token (padding included).
"""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import best_of_k as bok
from rlhf_jax import pipeline
from rlhf_jax.data.batching import sft_examples
from rlhf_jax.model.transformer import flops_per_token
from rlhf_jax.sampling import make_generate
from rlhf_jax.stages import common
from rlhf_jax.stages.policy_eval import (PolicyEvaluator, RewardModel, SampleLog, sample_config,
                                         sample_rows)
from rlhf_jax.train import state as st


# ----------------------------------------------------------------- pure parts

def selection_scores(proxy, ended, missing_eos_penalty: float | None):
  """The score best-of-K maximises: proxy, or the penalty where no EOS (None = off)."""
  proxy = np.asarray(proxy, np.float64)
  if missing_eos_penalty is None:
    return proxy
  return np.where(np.asarray(ended, bool), proxy, missing_eos_penalty)


def lex_rank(primary, secondary):
  """Dense ranks (1 = lowest) of the pairs (primary, secondary) in lexicographic order."""
  p, s = np.ravel(primary), np.ravel(secondary)
  order = np.lexsort((s, p))
  ps, ss = p[order], s[order]
  new = np.r_[True, (ps[1:] != ps[:-1]) | (ss[1:] != ss[:-1])]
  rank = np.empty(len(p))
  rank[order] = np.cumsum(new)
  return rank.reshape(np.shape(primary))


def select_best(scores, keep: str = "best", threshold: float = 0.0, top_frac: float = 0.5,
                tiebreak=None):
  """scores [P, K] -> (best index per prompt [P], kept mask [P]).

  Ties in `scores` are broken by `tiebreak` [P, K] (the raw proxy: among
  penalised no-EOS samples the RM still prefers one), then by position.
  best: every prompt keeps its best; threshold: only if its score >
  threshold; top_frac: only the ceil(top_frac * P) prompts whose best is
  highest (ties by prompt order, so the count is exact).
  """
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.shape[1] < 1:
    raise ValueError(f"scores must be [prompts, K>=1], got shape {scores.shape}")
  key = scores if tiebreak is None else lex_rank(scores, tiebreak)
  rows = np.arange(len(scores))
  idx = np.argmax(key, axis=1)
  if keep == "best":
    kept = np.ones(len(scores), bool)
  elif keep == "threshold":
    kept = scores[rows, idx] > threshold
  elif keep == "top_frac":
    if not 0.0 < top_frac <= 1.0:
      raise ValueError(f"best_of_k.top_frac must be in (0, 1], got {top_frac}")
    n = math.ceil(top_frac * len(scores))
    kept = np.zeros(len(scores), bool)
    kept[np.argsort(-key[rows, idx], kind="stable")[:n]] = True
  else:
    raise ValueError(f"best_of_k.keep: unknown rule {keep!r} (best | threshold | top_frac)")
  return idx, kept


def build_examples(prompt, prompt_mask, response, response_mask, ended, *, bos_id: int | None,
                   eos_id: int, pad_id: int):
  """Sampled token ids -> SFT examples [M, P+N] (BOS prompt response [EOS]).

  Strips the prompt's left padding and BOS and the response's EOS/padding
  (sft_examples adds BOS and EOS back), then removes the EOS target again
  from rows that did not end (see the module docstring). Returns
  (examples, {'no_eos': n}).
  """
  prompts, responses = [], []
  for p, pm, r, rm, e in zip(prompt, prompt_mask, response, response_mask, ended):
    p = np.asarray(p)[np.asarray(pm, bool)]
    if len(p) and p[0] == bos_id:
      p = p[1:]
    r = np.asarray(r)[np.asarray(rm, bool)]
    if e and len(r) and r[-1] == eos_id:
      r = r[:-1]
    prompts.append(p.tolist())
    responses.append(r.tolist())
  width = np.shape(prompt)[1] + np.shape(response)[1]
  ex, counts = sft_examples(prompts, responses, width + 1, bos_id, eos_id, pad_id)
  if counts["dropped"] or counts["truncated"]:  # cannot happen: every row fits by construction
    raise AssertionError(f"kept samples do not fit in {width + 1} tokens: {counts}")
  ended = np.asarray(ended, bool)
  for i in np.flatnonzero(~ended):
    j = (bos_id is not None) + len(prompts[i]) + len(responses[i])  # the EOS sft_examples appended
    ex["tokens"][i, j], ex["mask"][i, j], ex["loss_mask"][i, j] = pad_id, False, 0.0
  # Exactly `width` wide, as the arms runner's compute plan assumes (arms.bok_compute): rows
  # are not cut to the longest kept sample (batching.padded_width), so planned = spent.
  ex = {k: np.pad(v[:, :width], ((0, 0), (0, max(0, width - v.shape[1]))),
                  constant_values=pad_id if k == "tokens" else 0) for k, v in ex.items()}
  return ex, {"no_eos": int((~ended).sum())}


def fill_batch(arrays: dict, batch_size: int) -> dict:
  """Repeat rows (in order) until there is at least one full batch."""
  n = len(next(iter(arrays.values())))
  if n >= batch_size:
    return arrays
  rows = np.arange(batch_size) % n
  return {k: v[rows] for k, v in arrays.items()}


def bon_curve(proxy, gold, select, pool: int) -> list[dict]:
  """[prompts, N] scores -> best-of-n points for n = 1, 2, 4, .., N/2 (averaged over prompts)."""
  points = []
  n = 1
  while n <= pool // 2:
    kl = float(bok.bon_kl(n))
    row = {"n": n, "kl_bound": kl, "sqrt_kl": math.sqrt(kl),
           "proxy": float(np.mean([bok.bon_expected(s, p, n) for s, p in zip(select, proxy)]))}
    if gold is not None:  # absent without a gold scorer
      row["gold"] = float(np.mean([bok.bon_expected(s, g, n) for s, g in zip(select, gold)]))
    points.append(row)
    n *= 2
  return points


# ------------------------------------------------------------------ the stage

def _pool(ctx, gen, params, prompts: dict, k: int, batch: int, key, reward):
  """K samples per row of `prompts`, as [P, K] arrays (host)."""
  rep = np.repeat(np.arange(len(prompts["prompt"])), k)
  s = sample_rows(ctx, gen, params, {n: v[rep] for n, v in prompts.items()}, batch, key, reward)
  s["prompt"], s["prompt_mask"] = prompts["prompt"][rep], prompts["prompt_mask"][rep]
  return s


def _eos_penalty(cfg):
  return cfg.ppo.missing_eos_penalty if cfg.ppo.use_eos_penalty else None


def _best_of_n(ctx, gen, reward, sft_params) -> list[dict]:
  """Best-of-n curve of the SFT policy (cached in bon_curve.json: a resume does not resample)."""
  path = os.path.join(ctx.stage_dir("best_of_k"), "bon_curve.json")
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  bc, pool = ctx.config.best_of_k, ctx.config.best_of_k.eval_pool
  texts, prompts = ctx.sources.prompt_set("eval")
  s = _pool(ctx, gen, sft_params, prompts, pool, bc.sample_batch,
            jax.random.fold_in(ctx.key("best_of_k"), 0), reward)  # round 0 = the SFT pool
  prompt_texts = [texts[i] for i in np.repeat(prompts["index"], pool)]
  gold = ctx.gold.score(prompt_texts, s["texts"], s["ended"])
  shape = (len(texts), pool)
  select = selection_scores(s["proxy"], s["ended"], _eos_penalty(ctx.config))
  select = lex_rank(select, s["proxy"]).reshape(shape)  # the order select_best uses
  curve = bon_curve(s["proxy"].reshape(shape), None if gold is None else gold.reshape(shape),
                    select, pool)
  pipeline.write_json(path, curve)
  return curve


def _round_compute(ctx, n_samples: int, train_width: int) -> dict:
  cfg = ctx.config
  seq = cfg.data.prompt_len + cfg.ppo.response_len
  fwd = flops_per_token(ctx.model_cfg, seq) / 3
  trained = cfg.best_of_k.train.steps * cfg.best_of_k.train.batch_size * train_width
  return {"tokens_sampled": n_samples * cfg.ppo.response_len, "tokens_trained": trained,
          "flops": (1 + cfg.reward.get("ensemble", 1)) * n_samples * seq * fwd  # sample + RM score(s)
                   + trained * flops_per_token(ctx.model_cfg, train_width)}


# The fields of config.best_of_k that decide which samples a round keeps.
_SAMPLING = ("k", "prompts_per_round", "sample_batch", "temperature", "keep", "threshold", "top_frac")


def _kept_samples(ctx, r: int, gen, reward, prev_params):
  """The round's kept examples and their figures: sampled, or read back after an interruption.

  They are saved in round_R/kept.json (atomic) before training starts, so a resumed
  round trains on exactly what it selected, whether or not sampling would come out
  bit for bit the same after a restart (another device count, batch layout or
  library version). A change of the sampling settings since then is announced.
  """
  bc = ctx.config.best_of_k
  path = os.path.join(ctx.stage_dir(f"best_of_k/round_{r}"), "kept.json")
  sampling = {k: bc[k] for k in _SAMPLING}
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    changed = {k: (v, sampling.get(k)) for k, v in saved["sampling"].items() if sampling.get(k) != v}
    print(f"[best_of_k] round {r}: reusing the {saved['stats']['kept']} samples it kept before the "
          f"interruption ({path})" + ("; drawn with " + ", ".join(
              f"best_of_k.{k} {a} (now {b})" for k, (a, b) in changed.items()) if changed else ""),
          flush=True)
    ex = {k: np.asarray(v, dtype=_DTYPES[k]) for k, v in saved["examples"].items()}
    return ex, saved["stats"]
  ex, stats = _select(ctx, r, gen, reward, prev_params)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  pipeline.write_json(path, {"round": r, "sampling": sampling, "stats": stats,
                             "examples": {k: v.tolist() for k, v in ex.items()}})
  return ex, stats


_DTYPES = {"tokens": np.int32, "mask": bool, "loss_mask": np.float32}


def _select(ctx, r: int, gen, reward, prev_params):
  """Sample K per prompt, keep the best (keep rule); returns (examples, figures)."""
  cfg, bc = ctx.config, ctx.config.best_of_k
  texts, prompts = ctx.sources.prompt_set("rl")
  rows = (np.arange(bc.prompts_per_round) + (r - 1) * bc.prompts_per_round) % len(texts)
  s = _pool(ctx, gen, prev_params, {k: v[rows] for k, v in prompts.items()}, bc.k,
            bc.sample_batch, jax.random.fold_in(ctx.key("best_of_k"), r), reward)
  shape = (len(rows), bc.k)
  select = selection_scores(s["proxy"], s["ended"], _eos_penalty(cfg)).reshape(shape)
  idx, kept = select_best(select, bc.keep, bc.threshold, bc.top_frac,
                          tiebreak=s["proxy"].reshape(shape))
  if not kept.any():
    raise ValueError(f"best_of_k round {r}: the keep rule {bc.keep!r} kept no sample "
                     f"(best score {select.max():.3g}); lower best_of_k.threshold")
  flat = (np.arange(len(rows)) * bc.k + idx)[kept]
  ex, stats = build_examples(s["prompt"][flat], s["prompt_mask"][flat], s["response"][flat],
                             s["response_mask"][flat], s["ended"][flat],
                             bos_id=ctx.sources.tokenizer.bos_id,
                             eos_id=ctx.sources.tokenizer.eos_id, pad_id=ctx.sources.tokenizer.pad_id)
  gold = ctx.gold.score([texts[i] for i in prompts["index"][rows][kept]],
                        [s["texts"][i] for i in flat], s["ended"][flat])
  ex = {k: np.asarray(v, dtype=_DTYPES[k]) for k, v in ex.items()}
  return ex, {"kept": int(kept.sum()), "kept_no_eos": stats["no_eos"], "samples": len(rows) * bc.k,
              "pool_proxy": float(np.mean(s["proxy"])), "kept_proxy": float(np.mean(s["proxy"][flat])),
              **({} if gold is None else {"kept_gold": float(np.mean(gold))})}


def _run_round(ctx, r: int, model, gen, reward, prev_params, evaluator, sft_eval_arrays, spent):
  bc = ctx.config.best_of_k
  ex, stats = _kept_samples(ctx, r, gen, reward, prev_params)
  width = ex["tokens"].shape[1]
  loss, _ = common.lm_losses(model)
  copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p))  # the train state is donated; prev is not ours
  train_summary, state = common.train_supervised(
      ctx, f"best_of_k/round_{r}", bc.train, model=model, loss_fn=loss, eval_loss=loss,
      train_arrays=fill_batch(ex, bc.train.batch_size), eval_arrays=sft_eval_arrays,
      init_params=lambda: copy(prev_params), tokens_per_example=width,
      # The round's examples are saved in kept.json (a resume trains on them, whatever the
      # sampling settings say now), so the settings need no checkpoint check here.
      base="sft" if r == 1 else f"best_of_k/round_{r - 1}")
  compute = _round_compute(ctx, stats["samples"], width)
  total = {k: spent[k] + v for k, v in compute.items()}
  ev = evaluator.evaluate(state["params"], {"policy": "best_of_k", "round": r})
  # Gold figures only where there is a gold scorer (absent, not 0, for data.source=files).
  summary = {"round": r, **{k: ev[k] for k in ("gold_reward", "win_rate_vs_sft") if k in ev},
             "proxy_reward": ev["proxy_reward"], "kl": ev["kl"],
             "response_length": ev["response_length"], "no_eos_frac": ev["no_eos_frac"],
             **{k: v for k, v in stats.items() if k != "samples"}, **total, **{f"round_{k}": v for k, v in compute.items()},
             "train": train_summary}
  pipeline.write_json(os.path.join(ctx.stage_dir(f"best_of_k/round_{r}"), "summary.json"), summary)
  print(f"[best_of_k] round {r}: "
        + (f"gold={ev['gold_reward']:.4g} " if "gold_reward" in ev else "")
        + f"proxy={ev['proxy_reward']:.4g} kl={ev['kl']:.4g} kept={stats['kept']}", flush=True)
  return summary, state["params"]


def run(ctx) -> dict:
  cfg, bc = ctx.config, ctx.config.best_of_k
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  reward = RewardModel(ctx, model)
  sft_params, _ = common.load_params(ctx, "sft", model)
  # Samples of finished rounds are final; the SFT policy's are written again each run.
  log = SampleLog(os.path.join(ctx.stage_dir("best_of_k"), "samples.jsonl"),
                  keep=lambda row: row.get("policy") == "best_of_k"
                  and ctx.is_done(f"best_of_k/round_{row.get('round')}"))
  evaluator = PolicyEvaluator(ctx, model, reward, sft_params, response_len=cfg.ppo.response_len,
                              temperature=cfg.evaluate.temperature, batch_size=cfg.evaluate.batch_size,
                              log=log)
  sft_eval = evaluator.evaluate(sft_params, {"policy": "sft"})
  eval_gen = make_generate(model, sample_config(ctx, cfg.ppo.response_len, cfg.evaluate.temperature),
                           ctx.mesh, st.param_shardings(model))
  curve = _best_of_n(ctx, eval_gen, reward, sft_params)

  gen = (eval_gen if bc.temperature == cfg.evaluate.temperature else
         make_generate(model, sample_config(ctx, cfg.ppo.response_len, bc.temperature), ctx.mesh,
                       st.param_shardings(model)))
  (_, sft_eval_arrays), _ = ctx.sources.sft()
  rounds, params = [], sft_params
  spent = {"tokens_sampled": 0, "tokens_trained": 0, "flops": 0.0}
  for r in range(1, bc.rounds + 1):
    name = f"best_of_k/round_{r}"
    if ctx.is_done(name):
      print(f"[best_of_k] round {r} finished earlier; skipping", flush=True)
      summary, params = ctx.summary(name), None
    else:
      if params is None:  # the previous round finished in an earlier run
        params, _ = common.load_params(ctx, f"best_of_k/round_{r - 1}", model)
      summary, params = _run_round(ctx, r, model, gen, reward, params, evaluator,
                                   sft_eval_arrays, spent)
    spent = {k: summary[k] for k in spent}
    rounds.append({k: summary[k] for k in ("round", "gold_reward", "proxy_reward", "kl",
                                           "win_rate_vs_sft", "kept", "tokens_sampled",
                                           "tokens_trained", "flops") if k in summary})

  final = rounds[-1] if rounds else {**sft_eval, "kl": 0.0}
  top = curve[-1]
  gold = {} if top.get("gold") is None else {
      "sft_gold_reward": sft_eval["gold_reward"], "gold_reward": final["gold_reward"],
      "win_rate_vs_sft": final["win_rate_vs_sft"], "bon_gold_max_n": top["gold"]}
  return {
      **gold, "sft_proxy_reward": sft_eval["proxy_reward"],
      "proxy_reward": final["proxy_reward"], "kl": final["kl"],
      "bon_curve": curve, "bon_max_n": top["n"],
      "bon_proxy_max_n": top["proxy"], "bon_kl_bound_max_n": top["kl_bound"],
      "rounds": rounds, "final_checkpoint": f"best_of_k/round_{bc.rounds}" if rounds else "sft",
      **{f"total_{k}": v for k, v in spent.items()},
      **common.param_figures(common.fine_tune(ctx, "best_of_k", model).abstract_trainable(), model),
  }
