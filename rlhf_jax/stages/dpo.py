"""Stage: direct preference optimisation (DPO, conservative DPO, IPO) from SFT.

Trains the policy on the same comparisons the reward model learns from: the label
stage's K-way rankings (or real rankings, data.files.ranking). Each ranking gives
every untied pair (InstructGPT's C(K, 2) comparisons) or best-versus-rest
(`dpo.pairs`). The reference is the frozen SFT policy; its summed response
log-probs are computed once per pair before training and stored with the pair,
not recomputed per step (Rafailov et al. 2023, sec. 4: pi_ref is fixed). The loss
is `losses.dpo_loss` (DPO / cDPO / IPO by config). Evaluation: held-out pairs
(loss, implicit-reward accuracy and margins) plus the shared PolicyEvaluator on
the held-out prompts (gold, proxy, KL from SFT, win rate), so DPO's points land
on the same frontier as PPO's. `dpo.online=True` samples and ranks fresh pairs each
step instead (`stages/online_dpo.py`). With config.lora (stage "dpo", offline or online)
the policy trains LoRA adapters on the frozen SFT weights and the reference is that base
with the adapters switched off (`FineTune.base_view`).
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.batching import fit_row
from rlhf_jax.data.formats import DataError
from rlhf_jax.losses import dpo_loss, token_logprobs
from rlhf_jax.model.transformer import flops_per_token, param_count
from rlhf_jax.stages import common
from rlhf_jax.stages.policy_eval import PolicyEvaluator, RewardModel, SampleLog
from rlhf_jax.stages.rollout import eval_points, policy_figures
from rlhf_jax.train import sharding as sh
from rlhf_jax.train import state as st

SIDES = ("chosen", "rejected")


def preference_pairs(ranks, mode: str) -> list[tuple[int, int]]:
  """(better, worse) response indices of one ranking (0 = best, equal = tie, no pair).

  all: every untied pair; best_vs_rest: the top-ranked response(s) against each
  response ranked strictly below them."""
  k = len(ranks)
  if mode == "all":
    return [(i, j) for i in range(k) for j in range(k) if ranks[i] < ranks[j]]
  if mode == "best_vs_rest":
    top = min(ranks)
    return [(i, j) for i in range(k) for j in range(k) if ranks[i] == top and ranks[j] > top]
  raise ValueError(f"pairs must be 'all' or 'best_vs_rest', got {mode!r}")


def pair_examples(prompt_ids, responses_ids, ranks, max_len: int, bos_id: int | None,
                  eos_id: int, pad_id: int, mode: str, ended=None, *, max_prompt_len: int = 0,
                  max_response_len: int = 0) -> tuple[dict, dict]:
  """Rankings -> pair rows [BOS] prompt response [EOS], right-padded to max_len.

  For each side: tokens [N, L], mask (real tokens), loss_mask (the response tokens and
  EOS: what the policy chose). Rows are cut as the reward model's are
  (`batching.fit_row`: a long prompt keeps its end, a cut response has no EOS), and EOS
  follows only a response that ended (`ended`, from the label stage; None = all did).
  Returns (arrays, counts)."""
  rows = {s: [] for s in SIDES}
  counts = {"rankings": len(prompt_ids), "dropped": 0, "truncated": 0, "ties_or_no_pair": 0}
  for n, (prompt, responses, rank) in enumerate(zip(prompt_ids, responses_ids, ranks)):
    fits = [fit_row(prompt, r, True if ended is None else bool(ended[n][i]), max_len, bos_id,
                    eos_id, max_prompt_len, max_response_len) for i, r in enumerate(responses)]
    head = fits[0][0]
    if len(head) >= max_len:
      counts["dropped"] += 1
      continue
    counts["truncated"] += any(p_cut or r_cut for _, _, p_cut, r_cut in fits)
    seqs = [h + t for h, t, _, _ in fits]
    pairs = preference_pairs(list(rank), mode)
    counts["ties_or_no_pair"] += not pairs
    for i, j in pairs:
      rows["chosen"].append((seqs[i], len(head)))
      rows["rejected"].append((seqs[j], len(head)))
  n = len(rows["chosen"])
  if n == 0:
    raise DataError(f"dpo: no preference pair fits in data.max_len={max_len} "
                    f"({counts['dropped']} of {len(prompt_ids)} rankings dropped, the rest tied)")
  out = {}
  for side in SIDES:
    tokens = np.full((n, max_len), pad_id, np.int32)
    mask = np.zeros((n, max_len), bool)
    loss_mask = np.zeros((n, max_len), np.float32)
    for r, (seq, start) in enumerate(rows[side]):
      tokens[r, :len(seq)] = seq
      mask[r, :len(seq)] = True
      loss_mask[r, start:len(seq)] = 1.0
    out.update({f"{side}_tokens": tokens, f"{side}_mask": mask, f"{side}_loss_mask": loss_mask})
  return out, {**counts, "pairs": n}


def sequence_logps(model, params, tokens, mask, loss_mask, rng=None):
  """Summed log-probs [B] of the loss-masked (response) tokens, at temperature 1."""
  out = model.apply({"params": params}, tokens, mask, **common.dropout_args(rng))
  return jnp.sum(token_logprobs(out["logits"], tokens) * loss_mask[:, 1:], axis=-1)


def make_loss(model, dc):
  """loss(params, batch, rng) -> (loss, metrics): chosen and rejected in one forward."""
  def loss(params, batch, rng=None):
    cat = lambda k: jnp.concatenate([batch[f"chosen_{k}"], batch[f"rejected_{k}"]], axis=0)
    lp = sequence_logps(model, params, cat("tokens"), cat("mask"), cat("loss_mask"), rng)
    n = batch["chosen_tokens"].shape[0]
    return dpo_loss(lp[:n], lp[n:], batch["ref_chosen"], batch["ref_rejected"], dc.beta,
                    loss_type=dc.loss_type, label_smoothing=dc.label_smoothing)
  return loss


def reference_logps(ctx, model, params, arrays: dict, batch_size: int) -> dict:
  """Once per pair, before training: the frozen reference's summed log-probs."""
  fn = jax.jit(functools.partial(sequence_logps, model))
  out = {}
  for side in SIDES:
    inputs = {k: arrays[f"{side}_{k}"] for k in ("tokens", "mask", "loss_mask")}
    vals = []
    for _, keep, host in sh.global_batches(inputs, batch_size, ctx.mesh):
      b = sh.put_batch(host, ctx.mesh)
      vals.append(sh.to_host(fn(params, b["tokens"], b["mask"], b["loss_mask"]))[:keep])
    out[f"ref_{side}"] = np.concatenate(vals).astype(np.float32)
  return out


def load_pairs(ctx, dc):
  """(train, eval) pair arrays with reference log-probs to come, split by ranking."""
  recs, prompt_ids, responses_ids, ended, stats = ctx.sources.ranking_tokens(
      os.path.join(ctx.stage_dir("label"), "data"))
  tok = ctx.sources.tokenizer
  n_eval = max(1, int(len(recs) * dc.eval_frac))
  if len(recs) - n_eval < 1:
    raise DataError(f"dpo: only {len(recs)} rankings; not enough to hold out dpo.eval_frac")
  split = {"train": slice(0, len(recs) - n_eval), "eval": slice(len(recs) - n_eval, len(recs))}
  out, counts = {}, {"skipped_rows": stats.num_skipped}
  for name, sl in split.items():
    r = recs[sl]
    out[name], c = pair_examples(
        prompt_ids[sl], responses_ids[sl], [x["ranks"] for x in r], ctx.config.data.max_len,
        tok.bos_id, tok.eos_id, tok.pad_id, dc.pairs, None if ended is None else ended[sl],
        max_prompt_len=ctx.sources.max_prompt_len, max_response_len=ctx.sources.max_response_len)
    counts.update({f"{name}_{k}": v for k, v in c.items()})
  return out["train"], out["eval"], counts


def compute(cfg, model_cfg, n_pairs: int) -> dict:
  """FLOPs with `ppo.compute_per_iteration`'s conventions. Per step: chosen and rejected
  rows forward + backward; once (offline_flops): the reference forward over every
  training pair; shown apart (label_flops): the label stage's sampling of K responses
  per prompt, which DPO shares with the reward model."""
  seq = cfg.data.max_len
  fwd = flops_per_token(model_cfg, seq) / 3
  trained = 2 * cfg.dpo.batch_size * seq
  lab_seq = cfg.data.prompt_len + cfg.ppo.response_len
  label = cfg.data.reward_prompts * cfg.label.k * lab_seq * flops_per_token(model_cfg, lab_seq) / 3
  return {"flops": 3 * trained * fwd, "tokens_sampled": 0, "tokens_trained": trained,
          "offline_flops": 2 * n_pairs * seq * fwd, "label_flops": label,
          "label_tokens_sampled": cfg.data.reward_prompts * cfg.label.k * cfg.ppo.response_len}


def run(ctx) -> dict:
  cfg, dc = ctx.config, ctx.config.dpo
  if dc.get("online"):
    from rlhf_jax.stages import online_dpo
    return online_dpo.run(ctx)
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  reward = RewardModel(ctx, model)
  sft_params, _ = common.load_params(ctx, "sft", model)
  train, evals, counts = load_pairs(ctx, dc)
  # LoRA (config.lora): train_supervised trains adapters on the frozen SFT weights; the
  # reference is that base with adapters switched off, as stored (QLoRA: quantised), so
  # the policy starts exactly at the reference (every implicit reward 0 at step 0).
  ft = common.fine_tune(ctx, "dpo", model)
  ref = ft.base_view(ft.store(sft_params))
  # Deterministic (same params, same batches), so a resumed run recomputes the same values.
  train.update(reference_logps(ctx, ft.model, ref, train, dc.batch_size))
  evals.update(reference_logps(ctx, ft.model, ref, evals, dc.batch_size))
  del ref  # a QLoRA stage's quantised copy; train_supervised stores its own
  print(f"[dpo] {len(train['ref_chosen'])} training pairs, {len(evals['ref_chosen'])} held out; "
        f"reference log-probs computed once", flush=True)
  log = SampleLog.for_stage(ctx, "dpo", common.checkpointer(ctx, "dpo").latest_step() or 0)
  evaluator = PolicyEvaluator(ctx, model, reward, sft_params, response_len=dc.response_len,
                              temperature=cfg.evaluate.temperature, batch_size=cfg.evaluate.batch_size,
                              log=log)
  loss = make_loss(model, dc)
  summary, state = common.train_supervised(
      ctx, "dpo", dc, model=model, loss_fn=loss, eval_loss=loss, train_arrays=train,
      eval_arrays=evals, base="sft",
      # A copy to donate; LoRA: the SFT params are the frozen base as they are (no copy).
      init_params=lambda: sft_params if ft.lora else jax.jit(lambda p: jax.tree.map(jnp.copy, p))(
          sft_params),
      tokens_per_example=2 * cfg.data.max_len, extra_eval=lambda p, step: evaluator.evaluate(p, {"policy": "dpo", "iteration": step}))
  sft_eval = evaluator.evaluate(sft_params, {"policy": "sft"})
  c = compute(cfg, ctx.model_cfg, len(train["ref_chosen"]))
  summary.update(
      **policy_figures(sft_eval, {k[5:]: v for k, v in summary.items() if k.startswith("eval_")}),
      accuracy=summary["eval_accuracy"], margin=summary["eval_margin"],
      loss_type=dc.loss_type, beta=dc.beta, label_smoothing=dc.label_smoothing,
      flops_per_step=c["flops"], tokens_trained_per_step=c["tokens_trained"],
      offline_flops=c["offline_flops"], label_flops=c["label_flops"],
      label_tokens_sampled=c["label_tokens_sampled"], params=param_count(ctx.model_cfg),
      eval_points=eval_points(ctx.stage_dir("dpo"), sft_eval, c), **counts)
  return summary
