"""Stage: the reward model (InstructGPT step 2).

Initialised from SFT with a fresh scalar head (std 1/sqrt(d_model + 1),
lm-human-preferences); the reward is read at the last real token: EOS where the
response ended, its last token where it did not (a cut or unfinished sample, issue 19
item 7), exactly where PPO reads it (`policy_eval.last_index`).
Every prompt's K responses sit in one batch element and are forwarded once;
the loss is the mean over its C(K,2) untied pairs of -log sigmoid(r_better -
r_worse), then the mean over prompts (`losses.ranking_loss`; InstructGPT
sec. 3.5). Missing responses (mixed K) are masked.

After training, a gain and bias make the rewards of SFT-policy samples on RL
prompts mean 0, std 1 (Ziegler et al. 2019; InstructGPT adds a bias so the
SFT demonstrations score 0). They are stored in summary.json and in
checkpoints/normalization.json and applied whenever the model scores.

Ensembles (`reward.ensemble = N`; Coste et al. 2024, Eisenstein et al. 2023): N
members, each SFT + its own fresh head (key fold_in(head key, m)) and its own data
(`reward.ensemble_data`: all comparisons in its own order, or a bootstrap resample),
trained in one vmapped program (`train.ensemble`); the checkpoint holds the params
stacked on a leading member axis, and the gain/bias are per member (lists). The
summary gives each member's accuracy and gold accuracy and the ensemble's, with the
normalised member scores combined by `reward.aggregate` (`rl.aggregate_rewards`).
`reward.member = m` trains member m alone (a 1-member ensemble).
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.sources import stream_seed
from rlhf_jax.losses import ranking_loss
from rlhf_jax.model.transformer import flops_per_token
from rlhf_jax.rl import aggregate_rewards
from rlhf_jax.sampling import make_generate
from rlhf_jax.stages import common
from rlhf_jax.stages.policy_eval import last_index, sample_config, sample_rows
from rlhf_jax.train import ensemble as ens
from rlhf_jax.train import sharding as sh
from rlhf_jax.train import state as st


def response_rewards(model, params, tokens, mask, rng=None):
  """[B, K, L] -> [B, K] raw rewards, each response forwarded once (dropout with `rng`)."""
  b, k, l = tokens.shape
  out = model.apply({"params": params}, tokens.reshape(b * k, l), mask.reshape(b * k, l),
                    logits=False, scalar=True, **common.dropout_args(rng))
  flat_mask = mask.reshape(b * k, l)
  r = jnp.take_along_axis(out["scalar"], last_index(flat_mask)[:, None], axis=-1)[:, 0]
  return r.reshape(b, k)


def make_losses(model):
  def loss(params, batch, rng=None):
    r = response_rewards(model, params, batch["tokens"], batch["mask"], rng)
    return ranking_loss(r, batch["ranks"], batch["valid"])
  return loss, loss


def _fresh_head(model, params, key):
  """SFT backbone + a newly initialised scalar head."""
  fresh = st.init_params(model, key)
  return dict(params, scalar_head=fresh["scalar_head"])


def members_of(ctx, n_train: int) -> ens.Members | None:
  """The members the reward stage trains: None for one reward model (reward.ensemble = 1),
  all reward.ensemble of them, or reward.member alone. Member m's bootstrap rows are a
  pure function of config.seed and m, so it sees the same rows with or without the others."""
  rc = ctx.config.reward
  if rc.get("ensemble", 1) == 1:
    return None
  ids = tuple(range(rc.ensemble)) if rc.member < 0 else (int(rc.member),)
  rows = None
  if rc.ensemble_data == "bootstrap":
    rows = tuple(ens.bootstrap_rows(n_train, stream_seed(ctx.config.seed, "bootstrap", f"reward/member{m}"))
                 for m in ids)
  return ens.Members(ids, rows)


def _member_params(model, sft_params, key, ids):
  """The SFT backbone with member m's fresh head (key fold_in(key, m)), stacked over `ids`."""
  heads = [_fresh_head(model, sft_params, jax.random.fold_in(key, m))["scalar_head"] for m in ids]
  shardings = st.shardings_of(ens.stack_abstract(st.abstract_params(model), len(ids)))
  stack = lambda p, hs: jax.tree.map(lambda *x: jnp.stack(x), *[dict(p, scalar_head=h) for h in hs])
  return jax.jit(stack, out_shardings=shardings)(sft_params, heads)


def _rewards_of(ctx, model, params, arrays: dict, batch_size: int, members: int = 0) -> np.ndarray:
  """Raw rewards [rows, K]; of stacked params (`members` of them) [rows, members, K]."""
  fn = functools.partial(response_rewards, model)
  if members:
    one = fn
    fn = lambda p, t, m: jnp.moveaxis(jax.vmap(one, in_axes=(0, None, None))(p, t, m), 0, 1)
  fn = jax.jit(fn)
  inputs = {k: arrays[k] for k in ("tokens", "mask")}
  out = []
  for _, keep, host in sh.global_batches(inputs, batch_size, ctx.mesh):
    b = sh.put_batch(host, ctx.mesh)
    out.append(sh.to_host(fn(params, b["tokens"], b["mask"]))[:keep])
  return np.concatenate(out)


def _gold_of(ctx, raw):
  """Gold scores of the held-out comparisons' responses, one list per comparison (one
  batched call: a reward-model gold scores them in fixed batches)."""
  if not ctx.gold.available or raw is None:
    return None
  flat = [(p, r, e) for p, rs, es in raw for r, e in zip(rs, es)]
  scores = ctx.gold.score([f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat])
  out, i = [], 0
  for _, rs, _ in raw:
    out.append(scores[i:i + len(rs)])
    i += len(rs)
  return out


def _gold_accuracy(rewards, arrays, gold, min_gap: float):
  """Pairwise agreement of the RM with the gold order (`ctx.gold`, scores from `_gold_of`)
  on held-out comparisons. rewards [rows, K] -> a float; [M, rows, K] (M score sets:
  ensemble members) -> M floats; None without a gold scorer."""
  if gold is None:
    return None
  sets = np.asarray(rewards)
  single = sets.ndim == 2
  sets = sets[None] if single else sets
  agree, total = np.zeros(len(sets)), 0
  for row, (valid, g) in enumerate(zip(arrays["valid"], gold)):
    r = sets[:, row]
    k = int(valid.sum())
    for i in range(k):
      for j in range(i + 1, k):
        if abs(g[i] - g[j]) > min_gap:
          agree += (r[:, i] > r[:, j]) == (g[i] > g[j])
          total += 1
  acc = agree / max(total, 1)
  return float(acc[0]) if single else [float(a) for a in acc]


def normalization(ctx, model, params, members: int = 0, policy_params=None, key=None) -> tuple:
  """Gain/bias so samples of the policy `policy_params` (default: SFT) on RL prompts score
  mean 0, std 1 (Ziegler et al. 2019); of stacked params (`members` of them), one per
  member (lists). key: the sampling key (default the reward stage's); the online stage
  normalises each round's model on that round's current policy."""
  cfg = ctx.config
  if policy_params is None:
    policy_params, _ = common.load_params(ctx, "sft", model)
  _, prompts = ctx.sources.prompt_set("rl")
  n = min(cfg.reward.normalize_samples, len(prompts["prompt"]))
  prompts = {k: v[:n] for k, v in prompts.items()}
  gen = make_generate(model, sample_config(ctx, cfg.ppo.response_len, cfg.ppo.temperature),
                      ctx.mesh, st.param_shardings(model))
  s = sample_rows(ctx, gen, policy_params, prompts, cfg.label.batch_size,
                  ctx.key("reward_norm") if key is None else key)
  # Score the exact sampled sequences (prompt + response) as PPO will.
  tokens = np.concatenate([prompts["prompt"], s["response"]], axis=1)
  mask = np.concatenate([prompts["prompt_mask"], s["response_mask"]], axis=1)
  raw = _rewards_of(ctx, model, params, {"tokens": tokens[:, None], "mask": mask[:, None]},
                    cfg.label.batch_size, members)[..., 0]
  if members:  # the same samples, each member normalised on its own
    std = np.where(raw.std(0) > 0, raw.std(0), 1.0)
    gain, bias = 1.0 / std, -raw.mean(0) / std
    return ([float(g) for g in gain], [float(b) for b in bias],
            {"sft_raw_reward_mean": [float(m) for m in raw.mean(0)],
             "sft_raw_reward_std": [float(s) for s in std]})
  std = float(raw.std()) or 1.0
  gain = 1.0 / std
  bias = -float(raw.mean()) * gain
  return gain, bias, {"sft_raw_reward_mean": float(raw.mean()), "sft_raw_reward_std": std}


def run(ctx) -> dict:
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  sft = lambda: common.load_params(ctx, "sft", model)[0]
  head_key = jax.random.fold_in(ctx.key("reward"), 7)
  data = [os.path.join(ctx.stage_dir("label"), "data")]
  rankings = load_rankings(ctx, data, ctx.config.reward.eval_frac)  # read once, trained below
  members = members_of(ctx, len(rankings[0][0]["ranks"]))  # bootstrap rows need the size
  if members is None:
    init = lambda: _fresh_head(model, sft(), head_key)
  else:
    init = lambda: _member_params(model, sft(), head_key, members.ids)
  return train_reward_model(ctx, "reward", ctx.config.reward, model, data, init_params=init,
                            base="sft", members=members, rankings=rankings)


def load_rankings(ctx, data_dirs: list[str], eval_frac: float):
  """The K-way rankings of several label outputs, each split (last eval_frac held out) and
  then joined: ((train, eval) arrays, raw eval rows, summed counts)."""
  parts = [ctx.sources.rankings(d, max_k=None, eval_frac=eval_frac) for d in data_dirs]
  if len(parts) == 1:
    return parts[0]
  ks = {p[0][0]["tokens"].shape[1] for p in parts}
  if len(ks) > 1:  # label.k changed between rounds: pad all to the largest K (masked)
    parts = [ctx.sources.rankings(d, max_k=max(ks), eval_frac=eval_frac) for d in data_dirs]
  join = lambda arrays: {k: np.concatenate([a[k] for a in arrays]) for k in arrays[0]}
  train = join([p[0][0] for p in parts])
  evals = join([p[0][1] for p in parts])
  raw = [row for p in parts for row in p[1]]
  counts = {k: sum(p[2][k] for p in parts) for k in parts[0][2]}
  return (train, evals), raw, counts


def train_reward_model(ctx, name: str, rc, model, data_dirs: list[str], *, init_params, base: str,
                       policy_params=None, norm_key=None, members=None, rankings=None) -> dict:
  """Train the reward model `name` (a stage dir) on the rankings in `data_dirs`, measure it
  on their held-out comparisons, and normalise it on `policy_params`' samples (default SFT).
  rc: the training settings (config.reward or a copy with other steps); init_params()
  and base: where training starts (see common.train_supervised); members: an ensemble's
  (`members_of`), trained as one vmapped program; rankings: `load_rankings`' output when the
  caller has already read `data_dirs`. Returns the summary, with reward_gain / reward_bias,
  which `policy_eval.RewardModel` reads."""
  (train, evals), raw_eval, counts = rankings or load_rankings(ctx, data_dirs, rc.eval_frac)
  loss, eval_loss = make_losses(model)
  summary, state = common.train_supervised(
      ctx, name, rc, model=model, loss_fn=loss, eval_loss=eval_loss,
      train_arrays=train, eval_arrays=evals, init_params=init_params,
      tokens_per_example=int(np.prod(train["tokens"].shape[1:])),  # K x length per comparison
      base=base, heads=("scalar_head",),  # LoRA: the fresh head trains in full
      members=members)
  params = state["params"]
  # Training FLOPs (3 forwards per token, every member): the arms runner shows them apart.
  seq = int(train["tokens"].shape[-1])
  summary["train_flops"] = float((len(members) if members else 1) * rc.steps * rc.batch_size
                                 * int(np.prod(train["tokens"].shape[1:]))
                                 * flops_per_token(ctx.model_cfg, seq))
  gold = _gold_of(ctx, raw_eval)
  if members is not None:
    return _ensemble_summary(ctx, model, params, members, evals, gold, train, counts, summary)
  rewards = _rewards_of(ctx, model, params, evals, rc.batch_size)
  ev_loss, ev = jax.jit(ranking_loss)(rewards, evals["ranks"], evals["valid"])
  gold_acc = _gold_accuracy(rewards, evals, gold, 0.0)
  gold_acc_clear = _gold_accuracy(rewards, evals, gold, 0.25)
  gain, bias, norm_stats = normalization(ctx, model, params, 0, policy_params, norm_key)
  norm_path = os.path.join(ctx.stage_dir(name), "checkpoints", "normalization.json")
  if jax.process_index() == 0:
    with open(norm_path, "w") as f:
      json.dump({"gain": gain, "bias": bias}, f)
  summary.update(
      accuracy=float(ev["accuracy"]), loss=float(ev_loss), margin=float(ev["margin"]),
      eval_comparisons=int(len(evals["ranks"])), train_comparisons=int(len(train["ranks"])),
      reward_gain=gain, reward_bias=bias, **norm_stats, **counts)
  if gold_acc is not None:
    summary.update(gold_accuracy=gold_acc, gold_accuracy_clear=gold_acc_clear,
                   gold_scorer=ctx.gold.name)
  return summary


def _ensemble_summary(ctx, model, params, members, evals, gold, train, counts, summary) -> dict:
  """Each member's held-out accuracy / loss / gold accuracy and the ensemble's: the
  normalised member scores combined by reward.aggregate, as every RL stage scores."""
  rc = ctx.config.reward
  n = len(members)
  member_r = np.moveaxis(_rewards_of(ctx, model, params, evals, rc.batch_size, n), 1, 0)
  gain, bias, norm_stats = normalization(ctx, model, params, n)
  normed = np.asarray(gain)[:, None, None] * member_r + np.asarray(bias)[:, None, None]
  agg = np.asarray(aggregate_rewards(normed.reshape(n, -1), rc.aggregate, rc.uwo_coef)
                   ).reshape(member_r.shape[1:])
  rank = jax.jit(ranking_loss)
  per = [rank(r, evals["ranks"], evals["valid"]) for r in member_r]
  ev_loss, ev = rank(agg, evals["ranks"], evals["valid"])
  sets = np.concatenate([member_r, agg[None]])  # the members, then the ensemble
  gold_acc = _gold_accuracy(sets, evals, gold, 0.0)
  gold_clear = _gold_accuracy(sets, evals, gold, 0.25)
  norm_path = os.path.join(ctx.stage_dir("reward"), "checkpoints", "normalization.json")
  if jax.process_index() == 0:
    with open(norm_path, "w") as f:
      json.dump({"gain": gain, "bias": bias, "members": list(members.ids)}, f)
  summary.update(
      accuracy=float(ev["accuracy"]), loss=float(ev_loss), margin=float(ev["margin"]),
      ensemble=int(rc.ensemble), ensemble_members=[int(m) for m in members.ids],
      aggregate=rc.aggregate, ensemble_data=rc.ensemble_data,
      member_accuracy=[float(m["accuracy"]) for _, m in per],
      member_loss=[float(l) for l, _ in per],
      eval_comparisons=int(len(evals["ranks"])), train_comparisons=int(len(train["ranks"])),
      reward_gain=gain, reward_bias=bias, **norm_stats, **counts)
  if gold_acc is not None:
    summary.update(gold_accuracy=gold_acc[-1], gold_accuracy_clear=gold_clear[-1],
                   member_gold_accuracy=gold_acc[:-1], member_gold_accuracy_clear=gold_clear[:-1],
                   gold_scorer=ctx.gold.name)
  return summary
