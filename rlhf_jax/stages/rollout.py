"""What PPO and the critic-free stages (GRPO, RLOO, Dr. GRPO) share: one scoring path
for sampled responses, and the held-out evaluation points every policy stage records.

The sampler itself is `rlhf_jax.sampling.generate`; these functions take its output
and do the forward passes an RL update needs (policy and reference log-probs, the
reward model's score with the EOS penalty and clipping of Huang et al. 2024), so
every RL stage scores a rollout the same way.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from rlhf_jax.losses import token_logprobs
from rlhf_jax.stages.policy_eval import frozen_scores


def response_logprobs(model, params, tokens, mask, prompt_len: int, temperature: float,
                      scalar: bool = False):
  """(model output, log-probs [B, N] of the response tokens at `temperature`).

  The temperature divides the logits as in sampling (Huang et al. 2024), so ratios and
  KL estimates are taken under the distribution the rollout came from."""
  out = model.apply({"params": params}, tokens, mask, scalar=scalar)
  return out, token_logprobs(out["logits"], tokens, temperature)[:, prompt_len - 1:]


# The sampler's outputs a scoring pass reads (`sequence_scores` and score_fn take all five).
ROW_KEYS = ("tokens", "mask", "response", "response_mask", "ended")


def by_row_chunks(fn, n_chunks: int, rows):
  """fn(rows) -> pytree of per-row arrays, computed over `n_chunks` slices of the rows one
  at a time (`jax.lax.map`), so one scoring forward's activations and [rows, T, vocab]
  logits exist for rows / n_chunks rows instead of the whole rollout (at 7B, 64 x 512
  tokens: 2.1 GB of bf16 logits and 4.2 GB of float32 log-probs per pass).

  Every output is a function of its own row only (the four scoring passes are), so the
  result equals one pass over all rows (float-for-float on CPU; tests/test_ppo_toy.py).
  Chunk c holds rows c, c + n, c + 2n, ...: with rows sharded in contiguous blocks over
  the data axes, every chunk is spread evenly over the devices and the chunk axis itself
  is unsharded, so the loop needs no communication."""
  if n_chunks == 1:
    return fn(rows)

  def split(x):
    if x.shape[0] % n_chunks:
      raise ValueError(f"{x.shape[0]} rows do not split into {n_chunks} scoring chunks")
    return jnp.swapaxes(x.reshape(x.shape[0] // n_chunks, n_chunks, *x.shape[1:]), 0, 1)

  out = jax.lax.map(fn, jax.tree.map(split, rows))
  return jax.tree.map(lambda y: jnp.swapaxes(y, 0, 1).reshape(-1, *y.shape[2:]), out)


def sequence_scores(model, frozen, g, rc, score_fn=None):
  """(score, proxy, raw) [B] of a rollout `g` (the sampler's output).

  proxy = the normalised reward model (the `RewardModel.frozen` keys of `frozen`: an
  ensemble's members aggregated by reward.aggregate; `policy_eval.frozen_scores`), or
  `score_fn(tokens, mask, response, response_mask, ended)` for a programmatic reward;
  score = proxy with `rc.missing_eos_penalty` for responses without EOS when
  `rc.use_eos_penalty` (Huang et al. 2024), clipped to +-rc.reward_clip if > 0.
  rc: the stage's config section (config.ppo, config.grpo).
  """
  tokens, mask = g["tokens"], g["mask"]
  if score_fn is None:
    # The reward model has the policy's architecture (it is initialised from SFT).
    score, raw = frozen_scores(model, frozen, tokens, mask)
  else:
    score = raw = score_fn(tokens, mask, g["response"], g["response_mask"], g["ended"])
  proxy = score
  if rc.use_eos_penalty:  # Huang et al. 2024: no EOS -> fixed low score
    score = jnp.where(g["ended"], score, rc.missing_eos_penalty)
  if rc.reward_clip > 0:
    score = jnp.clip(score, -rc.reward_clip, rc.reward_clip)
  return score, proxy, raw


def present(**figures) -> dict:
  """The figures that exist: gold ones are None without a gold scorer (data.source=files),
  and are then left out rather than reported as 0."""
  return {k: v for k, v in figures.items() if v is not None}


def policy_figures(sft_eval: dict, final: dict) -> dict:
  """The summary figures every policy stage reports (PolicyEvaluator.evaluate outputs of
  the SFT policy and the final one)."""
  return {**present(sft_gold_reward=sft_eval.get("gold_reward"),
                    gold_reward=final.get("gold_reward"),
                    win_rate_vs_sft=final.get("win_rate_vs_sft")),
          "sft_proxy_reward": sft_eval["proxy_reward"], "proxy_reward": final["proxy_reward"],
          "kl": final["kl"], "response_length": final["response_length"],
          "no_eos_frac": final["no_eos_frac"]}


def eval_points(stage_dir: str, sft_eval: dict, compute: dict, x_key: str = "iteration"):
  """The held-out evaluations in `stage_dir`/metrics.jsonl (all of them, also those from
  before a resume) as frontier points, the SFT policy first at step 0 / KL 0.

  compute: per-step figures {"flops", "tokens_sampled", optionally "tokens_trained"};
  a point's cumulative figures are step x those, plus compute.get("offline_flops", 0)
  spent once before the first step (DPO's reference log-probs)."""
  offline = compute.get("offline_flops", 0.0)
  keys = [k for k in ("flops", "tokens_sampled", "tokens_trained") if k in compute]
  pts = [{x_key: 0, **present(gold_reward=sft_eval.get("gold_reward")),
          "proxy_reward": sft_eval["proxy_reward"], "kl": 0.0, **{k: 0 for k in keys}}]
  with open(os.path.join(stage_dir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      if "eval_proxy_reward" in row:
        p = {x_key: row["step"],
             **present(gold_reward=row.get("eval_gold_reward"),
                       win_rate_vs_sft=row.get("eval_win_rate_vs_sft")),
             "proxy_reward": row["eval_proxy_reward"], "kl": row["eval_kl"],
             **{k: row["step"] * compute[k] for k in keys}}
        if "flops" in p:
          p["flops"] += offline
        pts.append(p)
  return pts
