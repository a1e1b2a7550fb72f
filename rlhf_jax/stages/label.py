"""Stage: the simulated annotators rank K samples of the SFT policy per prompt.

InstructGPT's labelers ranked K = 4..9 model outputs per prompt. Here the gold
scorer (`ctx.gold`: the synthetic world's, or a reward model named by
config.label.annotator as in Gao et al. 2022, stages/gold.py) plus Plackett-Luce
noise (`world.annotate`, temperature and flip rate from config.label) plays them.
With data.source=files and an RM annotator the prompts are the first
data.reward_prompts of the demonstrations' (real prompts, e.g. HH-RLHF's). The output is the
generic K-way ranking JSONL (`DIR/label/data/train.jsonl`: prompt, responses,
ranking) that real ranking data also uses, plus the token-level truth the reward
model must be trained on (issue 19 item 7): `prompt_ids` (the prompt the samples
were conditioned on, BOS stripped), `response_ids` (each sample's ids as sampled,
its EOS stripped: no decode/re-encode, which can change ids) and `ended` (whether
it emitted EOS). The reward stage puts EOS back only where a sample ended, so a
truncated sample, which gold penalises, also looks unfinished to the RM; an empty
response stays empty (its row is prompt + EOS).
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np

from rlhf_jax.data import world
from rlhf_jax.data.formats import DataError
from rlhf_jax.sampling import make_generate
from rlhf_jax.stages import common
from rlhf_jax.stages.policy_eval import sample_config, sample_rows
from rlhf_jax.train import state as st


def pair_agreement(ranks: np.ndarray, gold: np.ndarray, min_gap: float = 0.0) -> float:
  """Fraction of pairs (gold gap > min_gap) that the ranking orders like gold."""
  agree = total = 0
  k = ranks.shape[1]
  for i in range(k):
    for j in range(i + 1, k):
      gap = gold[:, i] - gold[:, j]
      sel = np.abs(gap) > min_gap
      agree += np.sum(((ranks[:, i] < ranks[:, j]) == (gap > 0))[sel])
      total += np.sum(sel)
  return float(agree / max(total, 1))


def sampled_prompt_ids(prompt, prompt_mask, bos_id) -> list[list[int]]:
  """Left-padded prompt rows -> their real ids, without the leading BOS."""
  out = []
  for row, m in zip(np.asarray(prompt), np.asarray(prompt_mask, bool)):
    ids = row[m].tolist()
    out.append(ids[1:] if bos_id is not None and ids[:1] == [bos_id] else ids)
  return out


def sampled_response_ids(response, response_mask, ended, eos_id) -> list[list[int]]:
  """Sampled responses -> their ids as sampled, without the EOS of those that ended."""
  out = []
  for row, m, e in zip(np.asarray(response), np.asarray(response_mask, bool), ended):
    ids = row[m].tolist()
    out.append(ids[:-1] if e and ids[-1:] == [eos_id] else ids)
  return out


def run(ctx) -> dict:
  if not ctx.gold.available:
    raise DataError("label: data.source=files has no gold scorer to play the annotators; "
                    "give ranked data in data.files.ranking and skip the label stage, or set "
                    "config.label.annotator to a reward model (a workdir or an HF folder)")
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  sft_params, _ = common.load_params(ctx, "sft", model)
  return rank_samples(ctx, model, sft_params, os.path.join(ctx.stage_dir("label"), "data"),
                      key=ctx.key("label"), annotators="annotators")


def rank_samples(ctx, model, params, out_dir: str, *, key, annotators: str,
                 rows: np.ndarray | None = None) -> dict:
  """Sample label.k responses per reward prompt from the policy `params`, have the simulated
  annotators rank them, write `out_dir`/train.jsonl; returns the figures.

  key: the sampling key; annotators: the name of the annotators' noise stream
  (`sources.seed_for`); rows: which reward prompts (default all). The label stage
  ranks SFT samples; the online stage ranks each round's policy's with the same
  annotators (config.label) on its own streams.
  """
  cfg, lc = ctx.config, ctx.config.label
  texts, prompts = ctx.sources.prompt_set("reward")
  if not ctx.sources.synthetic:  # every demonstration prompt: keep the first reward_prompts
    prompts = {name: v[:cfg.data.reward_prompts] for name, v in prompts.items()}
  if rows is not None:
    prompts = {name: v[rows] for name, v in prompts.items()}
  k = lc.k
  repeated = {name: np.repeat(v, k, axis=0) for name, v in prompts.items()}
  gen = make_generate(model, sample_config(ctx, cfg.ppo.response_len, lc.sample_temperature),
                      ctx.mesh, st.param_shardings(model))
  s = sample_rows(ctx, gen, params, repeated, lc.batch_size, key)
  prompt_of = [texts[i] for i in repeated["index"]]
  gold = ctx.gold.score(prompt_of, s["texts"], s["ended"]).reshape(-1, k)
  rng = np.random.default_rng(ctx.sources.seed_for(annotators))
  ranks = world.annotate(gold, rng, lc.annotator_temperature, lc.flip_rate)
  os.makedirs(out_dir, exist_ok=True)
  responses = np.array(s["texts"], dtype=object).reshape(-1, k)
  prompt_ids = sampled_prompt_ids(prompts["prompt"], prompts["prompt_mask"],
                                  ctx.sources.tokenizer.bos_id)
  response_ids = sampled_response_ids(s["response"], s["response_mask"], s["ended"],
                                      ctx.sources.tokenizer.eos_id)
  ended = s["ended"].reshape(-1, k)
  if jax.process_index() == 0:
    tmp = os.path.join(out_dir, "train.jsonl.tmp")
    with open(tmp, "w") as f:
      for i, (p, rs, rk) in enumerate(zip((texts[j] for j in prompts["index"]), responses, ranks)):
        f.write(json.dumps({"prompt": p, "responses": list(rs), "ranking": rk.tolist(),
                            "prompt_ids": prompt_ids[i],
                            "response_ids": response_ids[i * k:(i + 1) * k],
                            "ended": ended[i].tolist()}) + "\n")
    os.replace(tmp, os.path.join(out_dir, "train.jsonl"))
  return {
      "prompts": len(ranks), "k": k, "gold_scorer": ctx.gold.name, "comparisons_per_prompt": k * (k - 1) // 2,
      "label_gold_agreement": pair_agreement(ranks, gold),
      "label_gold_agreement_clear": pair_agreement(ranks, gold, min_gap=0.25),
      "sample_gold_mean": float(gold.mean()), "sample_gold_std": float(gold.std()),
      "no_eos_frac": float(1 - s["ended"].mean()),
      "mean_response_tokens": float(s["response_mask"].sum(-1).mean()),
      "prompt_truncated": ctx.sources.prompt_counts["reward"]["prompt_truncated"],
      "prompt_dropped": ctx.sources.prompt_counts["reward"]["dropped"],
  }
