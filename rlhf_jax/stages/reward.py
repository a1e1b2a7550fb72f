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
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses import ranking_loss
from rlhf_jax.sampling import make_generate
from rlhf_jax.stages import common
from rlhf_jax.stages.policy_eval import last_index, sample_config, sample_rows
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


def _rewards_of(ctx, model, params, arrays: dict, batch_size: int) -> np.ndarray:
  fn = jax.jit(functools.partial(response_rewards, model))
  inputs = {k: arrays[k] for k in ("tokens", "mask")}
  out = []
  for _, keep, host in sh.global_batches(inputs, batch_size, ctx.mesh):
    b = sh.put_batch(host, ctx.mesh)
    out.append(sh.to_host(fn(params, b["tokens"], b["mask"]))[:keep])
  return np.concatenate(out)


def _gold_accuracy(ctx, rewards, arrays, raw, min_gap: float, gold=None):
  """Pairwise agreement of the RM with the gold order (`ctx.gold`) on held-out comparisons.
  gold: the comparisons' gold scores (`_gold_of`), computed once for both gaps."""
  if gold is None:
    return None
  agree = total = 0
  for r, valid, g in zip(rewards, arrays["valid"], gold):
    k = int(valid.sum())
    for i in range(k):
      for j in range(i + 1, k):
        if abs(g[i] - g[j]) > min_gap:
          agree += (r[i] > r[j]) == (g[i] > g[j])
          total += 1
  return float(agree / max(total, 1))


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


def normalization(ctx, model, params, policy_params=None, key=None) -> tuple[float, float, dict]:
  """Gain/bias so samples of the policy `policy_params` (default: SFT) on RL prompts score
  mean 0, std 1 (Ziegler et al. 2019). key: the sampling key (default the reward stage's);
  the online stage normalises each round's model on that round's current policy."""
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
                    cfg.label.batch_size)[:, 0]
  std = float(raw.std()) or 1.0
  gain = 1.0 / std
  bias = -float(raw.mean()) * gain
  return gain, bias, {"sft_raw_reward_mean": float(raw.mean()), "sft_raw_reward_std": std}


def run(ctx) -> dict:
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  return train_reward_model(
      ctx, "reward", ctx.config.reward, model, [os.path.join(ctx.stage_dir("label"), "data")],
      init_params=lambda: _fresh_head(model, common.load_params(ctx, "sft", model)[0],
                                      jax.random.fold_in(ctx.key("reward"), 7)),
      base="sft")


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
                       policy_params=None, norm_key=None) -> dict:
  """Train the reward model `name` (a stage dir) on the rankings in `data_dirs`, measure it
  on their held-out comparisons, and normalise it on `policy_params`' samples (default SFT).
  rc: the training settings (config.reward or a copy with other steps); init_params()
  and base: where training starts (see common.train_supervised). Returns the summary,
  with reward_gain / reward_bias, which `policy_eval.RewardModel` reads."""
  (train, evals), raw_eval, counts = load_rankings(ctx, data_dirs, rc.eval_frac)
  loss, eval_loss = make_losses(model)
  summary, state = common.train_supervised(
      ctx, name, rc, model=model, loss_fn=loss, eval_loss=eval_loss,
      train_arrays=train, eval_arrays=evals, init_params=init_params,
      tokens_per_example=int(np.prod(train["tokens"].shape[1:])),  # K x length per comparison
      base=base, heads=("scalar_head",))  # LoRA: the fresh head trains in full
  params = state["params"]
  rewards = _rewards_of(ctx, model, params, evals, rc.batch_size)
  ev_loss, ev = jax.jit(ranking_loss)(rewards, evals["ranks"], evals["valid"])
  gold = _gold_of(ctx, raw_eval)
  gold_acc = _gold_accuracy(ctx, rewards, evals, raw_eval, 0.0, gold)
  gold_acc_clear = _gold_accuracy(ctx, rewards, evals, raw_eval, 0.25, gold)
  gain, bias, norm_stats = normalization(ctx, model, params, policy_params, norm_key)
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
