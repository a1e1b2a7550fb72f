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


def normalization(ctx, model, params) -> tuple[float, float, dict]:
  """Gain/bias so SFT samples on RL prompts score mean 0, std 1 (Ziegler et al. 2019)."""
  cfg = ctx.config
  sft_params, _ = common.load_params(ctx, "sft", model)
  _, prompts = ctx.sources.prompt_set("rl")
  n = min(cfg.reward.normalize_samples, len(prompts["prompt"]))
  prompts = {k: v[:n] for k, v in prompts.items()}
  gen = make_generate(model, sample_config(ctx, cfg.ppo.response_len, cfg.ppo.temperature),
                      ctx.mesh, st.param_shardings(model))
  s = sample_rows(ctx, gen, sft_params, prompts, cfg.label.batch_size, ctx.key("reward_norm"))
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
  rc = ctx.config.reward
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  (train, evals), raw_eval, counts = ctx.sources.rankings(
      os.path.join(ctx.stage_dir("label"), "data"), max_k=None, eval_frac=rc.eval_frac)
  loss, eval_loss = make_losses(model)
  summary, state = common.train_supervised(
      ctx, "reward", rc, model=model, loss_fn=loss, eval_loss=eval_loss,
      train_arrays=train, eval_arrays=evals,
      init_params=lambda: _fresh_head(model, common.load_params(ctx, "sft", model)[0],
                                      jax.random.fold_in(ctx.key("reward"), 7)),
      tokens_per_example=int(np.prod(train["tokens"].shape[1:])),  # K x length per comparison
      base="sft", heads=("scalar_head",))  # LoRA: the fresh head trains in full
  params = state["params"]
  rewards = _rewards_of(ctx, model, params, evals, rc.batch_size)
  ev_loss, ev = jax.jit(ranking_loss)(rewards, evals["ranks"], evals["valid"])
  gold = _gold_of(ctx, raw_eval)
  gold_acc = _gold_accuracy(ctx, rewards, evals, raw_eval, 0.0, gold)
  gold_acc_clear = _gold_accuracy(ctx, rewards, evals, raw_eval, 0.25, gold)
  gain, bias, norm_stats = normalization(ctx, model, params)
  norm_path = os.path.join(ctx.stage_dir("reward"), "checkpoints", "normalization.json")
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
