"""Stage: iterated online RLHF (InstructGPT iterates steps 2-3; Bai et al. 2022 sec. 4.5).

The one-shot recipe labels SFT samples once, trains the reward model once and
optimises against it; the policy then drifts to where the reward model never saw
data. Iterating collects comparisons where the current policy samples.

Round 0 is the shared `label` + `reward` stages: comparisons of SFT samples and the
reward model trained on them, as in Bai et al. (2022), whose first RL policies were
trained on the preference model of the initial (non-RL) data before any online round.
Each of the `online.rounds` rounds r = 1..R (sub-stages DIR/online/round_<r>/...):

  r >= 2 (a, b) label/   label.k samples of the round r-1 policy per reward prompt
                         (`online.prompts_per_round` of the label stage's prompts, a
                         rotating slice; 0 = all), ranked by the same simulated annotators
                         as the label stage (config.label; `label.rank_samples`), on the
                         round's own sampling key and annotator noise stream.
         (c) reward/     the reward model trained on every comparison so far (the label
                         stage's and those of rounds 2..r), each file's last
                         reward.eval_frac held out; from a fresh head on SFT
                         (`online.rm_init=sft`) or from the previous round's model
                         (`continue`), for `online.reward_steps` steps (0 = reward.steps),
                         the other settings from config.reward. Normalised (gain, bias) on
                         the CURRENT policy's samples (`reward.normalization`), so each
                         round's rewards start at mean 0, std 1 (Ziegler et al. 2019).
  r >= 1 (d) ppo/        `online.ppo_iterations` PPO iterations (config.ppo) from the
                         current policy against that reward model (round 1: the reward
                         stage's, from SFT), KL penalty and evaluation still to SFT.

PPO across rounds: the policy continues; the critic restarts from the new reward
model each round (InstructGPT initialises the value function from the RM: its values
start in the units of the rewards it must predict, which the renormalisation moved),
and so do the optimiser states and the KL coefficient (a round is one PPO run).
The held-out proxy of a round is its own reward model, the one being optimised (as
in the ppo stage); gold and KL to SFT are comparable across rounds and arms.
Every sub-stage writes summary.json when done: a finished one is skipped on
re-run and an interrupted one resumes exactly (training from its checkpoints;
label sampling and normalisation are deterministic and simply redone).
The online stage trains every weight (config.lora does not apply to it).

Compute (`refresh_compute`, PPO's conventions in `ppo.compute_per_iteration`):
labelling one forward per prompt+response token of each sample; RM training 3
forwards per trained token (K responses x the padded row width per comparison,
padding included: `batching.padded_width` of prompt_len + response_len); normalisation sample + score. Round 0 is shared, not counted (as for ppo).
"""
from __future__ import annotations

import os

import jax
import numpy as np

from rlhf_jax import pipeline
from rlhf_jax.data.batching import padded_width
from rlhf_jax.data.formats import DataError
from rlhf_jax.model.transformer import flops_per_token
from rlhf_jax.stages import common, label, ppo, reward
from rlhf_jax.train import state as st


def refresh_compute(cfg, model_cfg, prompts: int) -> dict:
  """Compute of one reward-model refresh (label, train, normalise) on `prompts` prompts."""
  seq = cfg.data.prompt_len + cfg.ppo.response_len
  fwd = flops_per_token(model_cfg, seq) / 3
  samples = prompts * cfg.label.k
  norm = cfg.reward.normalize_samples
  # Sampled rows are BOS + prompt + response [+ EOS] within prompt_len + response_len tokens,
  # padded as `batching.padded_width` pads them (data.max_len only bounds it).
  width = padded_width([cfg.data.prompt_len + cfg.ppo.response_len], cfg.data.max_len)
  trained = reward_config(cfg).steps * cfg.reward.batch_size * cfg.label.k * width
  label_flops = samples * seq * fwd
  reward_flops = trained * flops_per_token(model_cfg, width) + 2 * norm * seq * fwd
  return {"label_flops": label_flops, "reward_flops": reward_flops,
          "flops": label_flops + reward_flops,
          "tokens_sampled": (samples + norm) * cfg.ppo.response_len, "tokens_trained": trained}


def prompts_per_round(cfg, n_prompts: int) -> int:
  return min(cfg.online.prompts_per_round or n_prompts, n_prompts)


def reward_config(cfg):
  """config.reward with online.reward_steps steps (0 = reward.steps)."""
  rc = cfg.reward.copy_and_resolve_references()
  rc.steps = cfg.online.reward_steps or cfg.reward.steps
  rc.eval_every = min(rc.eval_every, rc.steps)
  return rc


def _dirs(r: int) -> dict:
  rd = f"online/round_{r}"
  return {"round": rd, "label": f"{rd}/label", "reward": f"{rd}/reward", "ppo": f"{rd}/ppo"}


def _reward_stage(r: int) -> str:
  return "reward" if r == 1 else _dirs(r)["reward"]


def _label(ctx, model, r: int, policy: str) -> dict:
  """(a, b): the annotators rank label.k samples of `policy` per prompt of this round."""
  d = _dirs(r)
  texts, _ = ctx.sources.prompt_set("reward")
  n = prompts_per_round(ctx.config, len(texts))
  rows = (np.arange(n) + (r - 2) * n) % len(texts)  # a rotating slice, as best_of_k's rounds
  params, _ = common.load_params(ctx, policy, model)
  out = label.rank_samples(ctx, model, params, os.path.join(ctx.stage_dir(d["label"]), "data"),
                           key=ctx.key(d["label"]), annotators=f"annotators/{d['label']}",
                           rows=rows)
  pipeline.barrier(f"{d['label']} written")  # every process reads the rankings next
  return out


def _reward(ctx, model, r: int, policy: str) -> dict:
  """(c): the reward model on every comparison so far, normalised on `policy`'s samples."""
  d = _dirs(r)
  dirs = [os.path.join(ctx.stage_dir("label"), "data")] + [
      os.path.join(ctx.stage_dir(_dirs(j)["label"]), "data") for j in range(2, r + 1)]
  if ctx.config.online.rm_init == "continue":
    prev = _reward_stage(r - 1)
    init = lambda: common.load_params(ctx, prev, model)[0]
  else:
    prev = "sft"
    init = lambda: reward._fresh_head(model, common.load_params(ctx, "sft", model)[0],
                                      jax.random.fold_in(ctx.key(d["reward"]), 7))
  params, _ = common.load_params(ctx, policy, model)
  return reward.train_reward_model(ctx, d["reward"], reward_config(ctx.config), model, dirs,
                                   init_params=init, base=prev, policy_params=params,
                                   norm_key=ctx.key(f"{d['reward']}/norm"))


def _sub_stage(ctx, name: str, fn) -> dict:
  """Run a round's sub-stage unless finished; its summary.json marks it finished."""
  if ctx.is_done(name):
    print(f"[online] {name} finished earlier; skipping", flush=True)
    return ctx.summary(name)
  os.makedirs(ctx.stage_dir(name), exist_ok=True)
  print(f"[online] {name} starting", flush=True)
  out = fn()
  pipeline.write_json(os.path.join(ctx.stage_dir(name), "summary.json"), out)
  pipeline.barrier(f"{name} finished")
  return out


def _round_points(s: dict, r: int, iterations: int, per_it: dict, before: dict) -> list[dict]:
  """Round r's held-out points (its PPO summary `s`), iterations and compute cumulative over
  the rounds: `before` = what was spent before its PPO (earlier rounds, its RM refresh)."""
  at = lambda it: {"round": r, "iteration": (r - 1) * iterations + it,
                   "flops": before["flops"] + it * per_it["flops"],
                   "tokens_sampled": before["tokens_sampled"] + it * per_it["tokens_sampled"]}
  pts = s["eval_points"] if r == 1 else s["eval_points"][1:]  # round r > 1 starts where r-1 ended
  out = [{**p, **at(p["iteration"])} for p in pts]
  if not pts or pts[-1]["iteration"] != iterations:  # the round's end is always a point
    out.append({**{k: s[k] for k in ("gold_reward", "win_rate_vs_sft") if k in s},
                "proxy_reward": s["proxy_reward"], "kl": s["kl"], **at(iterations)})
  return out


def run(ctx) -> dict:
  cfg, oc = ctx.config, ctx.config.online
  if not ctx.gold.available:
    raise DataError("online: no gold scorer to play the annotators (data.source=files)")
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  texts, _ = ctx.sources.prompt_set("reward")
  refresh = refresh_compute(cfg, ctx.model_cfg, prompts_per_round(cfg, len(texts)))
  per_it = ppo.compute_per_iteration(cfg, ctx.model_cfg, ctx.sources.prompt_set("rl")[1]["prompt"].shape[1])
  spent = {"flops": 0.0, "tokens_sampled": 0, "label_flops": 0.0, "reward_flops": 0.0}
  rounds, points, policy = [], [], None  # policy: the stage holding the current policy (None = SFT)
  for r in range(1, oc.rounds + 1):
    d = _dirs(r)
    row = {"round": r}
    if r >= 2:
      lab = _sub_stage(ctx, d["label"], lambda: _label(ctx, model, r, policy))
      rm = _sub_stage(ctx, d["reward"], lambda: _reward(ctx, model, r, policy))
      for k in ("label_flops", "reward_flops", "flops", "tokens_sampled"):
        spent[k] += refresh[k]
      row.update(label_gold_agreement=lab["label_gold_agreement"],
                 label_sample_gold=lab["sample_gold_mean"], rm_accuracy=rm["accuracy"],
                 rm_gold_accuracy=rm.get("gold_accuracy"), rm_train_comparisons=rm["train_comparisons"],
                 rm_eval_comparisons=rm["eval_comparisons"])
    s = _sub_stage(ctx, d["ppo"], lambda: ppo.train_policy(
        ctx, d["ppo"], reward_stage=_reward_stage(r), init_policy=policy,
        iterations=oc.ppo_iterations))
    points += _round_points(s, r, oc.ppo_iterations, per_it, spent)
    spent["flops"] += oc.ppo_iterations * per_it["flops"]
    spent["tokens_sampled"] += oc.ppo_iterations * per_it["tokens_sampled"]
    fresh = r >= 2  # this round's own spending, then the cumulative figures
    row.update({k: s[k] for k in ("gold_reward", "proxy_reward", "kl", "win_rate_vs_sft") if k in s},
               round_label_flops=refresh["label_flops"] if fresh else 0.0,
               round_reward_flops=refresh["reward_flops"] if fresh else 0.0,
               round_flops=(refresh["flops"] if fresh else 0.0) + oc.ppo_iterations * per_it["flops"],
               round_tokens_sampled=(refresh["tokens_sampled"] if fresh else 0)
               + oc.ppo_iterations * per_it["tokens_sampled"],
               flops=spent["flops"], tokens_sampled=spent["tokens_sampled"],
               label_flops=spent["label_flops"], reward_flops=spent["reward_flops"])
    rounds.append({k: v for k, v in row.items() if v is not None})
    print(f"[online] round {r}: " + ", ".join(f"{k}={v:.4g}" for k, v in rounds[-1].items()
                                               if k != "round"), flush=True)
    policy = d["ppo"]
  last = ctx.summary(policy)
  keep = ("sft_gold_reward", "gold_reward", "win_rate_vs_sft", "sft_proxy_reward", "proxy_reward",
          "kl", "response_length", "no_eos_frac")
  return {
      **{k: last[k] for k in keep if k in last}, "rounds": rounds, "eval_points": points,
      "iterations": oc.rounds * oc.ppo_iterations, "ppo_iterations_per_round": oc.ppo_iterations,
      "flops_per_iteration": per_it["flops"], "tokens_sampled_per_iteration": per_it["tokens_sampled"],
      "refresh_flops": refresh["flops"], "label_flops": spent["label_flops"],
      "reward_flops": spent["reward_flops"], "total_flops": spent["flops"],
      "total_tokens_sampled": spent["tokens_sampled"], "final_checkpoint": policy,
  }
