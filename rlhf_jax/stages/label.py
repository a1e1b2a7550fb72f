"""Stage: the simulated annotators rank K samples of the SFT policy per prompt.

InstructGPT's labelers ranked K = 4..9 model outputs per prompt. Here the
synthetic world's gold scorer plus Plackett-Luce noise (`world.annotate`,
temperature and flip rate from config.label) plays them. The output is the
generic K-way ranking JSONL (`DIR/label/data/train.jsonl`) that real ranking
data also uses, so the reward stage reads either through the same builder.
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


def run(ctx) -> dict:
  cfg, lc = ctx.config, ctx.config.label
  if not ctx.sources.has_gold:
    raise DataError("label: data.source=files has no gold scorer to play the annotators; "
                    "give ranked data in data.files.ranking and skip the label stage")
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  sft_params, _ = common.load_params(ctx, "sft", model)
  texts, prompts = ctx.sources.prompt_set("reward")
  k = lc.k
  repeated = {key: np.repeat(v, k, axis=0) for key, v in prompts.items()}
  gen = make_generate(model, sample_config(ctx, cfg.ppo.response_len, lc.sample_temperature),
                      ctx.mesh, st.param_shardings(model))
  s = sample_rows(ctx, gen, sft_params, repeated, lc.batch_size, ctx.key("label"))
  prompt_of = [texts[i] for i in repeated["index"]]
  gold = world.gold_score(prompt_of, s["texts"], s["ended"]).reshape(-1, k)
  rng = np.random.default_rng(ctx.sources.seed_for("annotators"))
  ranks = world.annotate(gold, rng, lc.annotator_temperature, lc.flip_rate)
  out_dir = os.path.join(ctx.stage_dir("label"), "data")
  os.makedirs(out_dir, exist_ok=True)
  responses = np.array(s["texts"], dtype=object).reshape(-1, k)
  if jax.process_index() == 0:
    tmp = os.path.join(out_dir, "train.jsonl.tmp")
    with open(tmp, "w") as f:
      for p, rs, rk in zip(texts, responses, ranks):
        # Empty samples cannot be ranked data (the reader rejects them); keep K aligned.
        rs = [r if r.strip() else "." for r in rs]
        f.write(json.dumps({"prompt": p, "responses": list(rs), "ranking": rk.tolist()}) + "\n")
    os.replace(tmp, os.path.join(out_dir, "train.jsonl"))
  return {
      "prompts": len(texts), "k": k, "comparisons_per_prompt": k * (k - 1) // 2,
      "label_gold_agreement": pair_agreement(ranks, gold),
      "label_gold_agreement_clear": pair_agreement(ranks, gold, min_gap=0.25),
      "sample_gold_mean": float(gold.mean()), "sample_gold_std": float(gold.std()),
      "no_eos_frac": float(1 - s["ended"].mean()),
      "mean_response_tokens": float(s["response_mask"].sum(-1).mean()),
  }
