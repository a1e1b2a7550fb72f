"""Stage: critic-free RL from a group baseline: GRPO, RLOO, Dr. GRPO.

Each iteration samples K responses to each of `prompts_per_iteration` prompts from
the current policy, scores them like PPO (`stages.rollout`: proxy RM or a
programmatic `score_fn`, EOS penalty), and replaces PPO's critic and GAE with a
per-group baseline (`rl.group_advantages`): every token of a response gets its
sequence's advantage (outcome supervision, Shao et al. 2024 sec. 4.1.2). The
update is PPO's clipped surrogate over epochs x minibatches. Choices, each a
field of config.grpo:

  advantage  grpo (s - mean) / std        Shao et al. 2024 ("DeepSeekMath")
             rloo s - mean of the others  Ahmadian et al. 2024 ("Back to basics")
             dr_grpo s - mean             Liu et al. 2025 ("Understanding R1-Zero")
  kl_mode    loss: + beta * k3(pi, ref) in the loss (GRPO eq. 3)
             reward: - beta * sum_t k1_t in the sequence reward (InstructGPT's penalty,
             summed over the response because the whole response is one action, as in RLOO)
  loss_agg   token (DAPO) | sequence (GRPO) | constant (Dr. GRPO), `rl.aggregate`

With config.lora (stage "grpo"), the policy trains LoRA adapters on the frozen SFT
weights, and the reference is those weights with the adapters switched off
(`common.lora_views`, as in PPO): one copy of the base.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import rl
from rlhf_jax.losses import entropy_from_logits
from rlhf_jax.model.transformer import flops_per_token, param_count
from rlhf_jax.sampling import generate
from rlhf_jax.stages import common
from rlhf_jax.stages.policy_eval import (PolicyEvaluator, RewardModel, SampleLog, decode_responses,
                                         sample_config)
from rlhf_jax.stages.rollout import (ROW_KEYS, by_row_chunks, eval_points, policy_figures,
                                     response_logprobs, sequence_scores)
from rlhf_jax.train import lora
from rlhf_jax.train import sharding as sh
from rlhf_jax.train import state as st
from rlhf_jax.train.loop import train_loop
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.step import accumulate_grads, apply_update


def make_iteration(model, optimizer, gc, sc, prompt_len: int, score_fn=None, views=common.Views):
  """One GRPO-family iteration `(state, frozen, batch, rng) -> (state, metrics)`, pure.

  gc: config.grpo; sc: SampleConfig; batch: prompt [B, P], prompt_mask, index;
  frozen: ref params, and `RewardModel.frozen`'s (reward params / gain / bias; an ensemble's
  aggregation) unless score_fn is given
  (score_fn(tokens, mask, response, response_mask, ended) -> [B * K]).
  views: how the trainable params and `frozen` make the policy, reference, reward model and
  the sampler's weights (`common.lora_views` for LoRA: the reference is the policy's own
  frozen base with adapters switched off).
  """
  if sc.top_k or sc.top_p < 1.0 or sc.min_new_tokens or sc.greedy:
    raise ValueError("GRPO rollouts sample from the full tempered policy: top_k=0, top_p=1, "
                     "min_new_tokens=0, greedy=False")
  k, temp, n_mb, beta = gc.k, gc.temperature, gc.minibatches, float(gc.kl_coef)
  n_chunks = int(gc.get("score_chunks", 1))

  def rollout(state, batch, rng, frozen):
    # Group members are adjacent rows: [p0 x K, p1 x K, ...], so reshape(-1, K) is the group.
    rep = lambda x: jnp.repeat(x, k, axis=0)
    return generate(model, views.rollout(state["params"], frozen), rep(batch["prompt"]),
                    rep(batch["prompt_mask"]), rng, sc)

  def score(state, frozen, g):
    policy, ref = views.policy(state["params"], frozen), views.ref(frozen)
    reward = frozen if score_fn is not None else {**frozen, "reward": views.reward(frozen)}

    def rows(r):  # over grpo.score_chunks slices of the rows at a time, as ppo_step's
      tokens, mask = r["tokens"], r["mask"]
      _, old_logp = response_logprobs(model, policy, tokens, mask, prompt_len, temp)
      _, ref_logp = response_logprobs(model, ref, tokens, mask, prompt_len, temp)
      score, proxy, raw = sequence_scores(model, reward, r, gc, score_fn)
      return dict(old_logp=old_logp, ref_logp=ref_logp, score=score, proxy=proxy, raw=raw)

    scored = by_row_chunks(rows, n_chunks, {key: g[key] for key in ROW_KEYS})
    return dict(tokens=g["tokens"], mask=g["mask"], rmask=g["response_mask"], ended=g["ended"],
                response=g["response"], **scored)

  def loss_fn(params, mb, rng, frozen):
    out, logp = response_logprobs(model, views.policy(params, frozen), mb["tokens"], mb["mask"],
                                  prompt_len, temp)
    rmask = mb["rmask"]
    adv = mb["adv"][:, None] * jnp.ones_like(logp)
    pg, pm = rl.policy_loss(logp, mb["old_logp"], adv, rmask, gc.clip_eps, gc.loss_agg)
    ent = entropy_from_logits(out["logits"][:, prompt_len - 1:-1] / temp, rmask)
    loss = pg - gc.entropy_coef * ent
    metrics = {"policy_loss": pg, "entropy": ent, **pm}
    if gc.kl_mode == "loss":  # GRPO eq. 3: k3 of the current policy against the reference
      kl = rl.aggregate(rl.kl_per_token(logp, mb["ref_logp"], "k3"), rmask, gc.loss_agg)
      loss = loss + beta * kl
      metrics["kl_loss"] = kl
    return loss, metrics

  def update(state, ro, rng, frozen):
    rmask = ro["rmask"]
    kls = rl.kl_estimators(ro["old_logp"], ro["ref_logp"], rmask)  # per sequence
    reward = ro["score"]
    if gc.kl_mode == "reward":
      reward = reward - beta * kls["k1"]
    groups = reward.reshape(-1, k)
    adv = rl.group_advantages(groups, gc.advantage).reshape(-1)
    data = dict(tokens=ro["tokens"], mask=ro["mask"], rmask=rmask, old_logp=ro["old_logp"],
                ref_logp=ro["ref_logp"], adv=adv)
    n = rmask.shape[0]
    perms = jnp.concatenate([jax.random.permutation(r, n) for r in
                             jax.random.split(rng, gc.epochs)]).reshape(gc.epochs * n_mb, n // n_mb)

    def minibatch_step(carry, idx):
      params, opt_state = carry
      mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)
      loss, grads, m = accumulate_grads(lambda p, b, r: loss_fn(p, b, r, frozen), params, mb, rng, 1)
      params, opt_state, um = apply_update(optimizer, params, opt_state, grads, loss, "skip")
      return (params, opt_state), {**m, "loss": loss, **um}

    (params, opt_state), ms = jax.lax.scan(minibatch_step, (state["params"], state["opt_state"]),
                                           perms)
    upd = jax.tree.map(lambda x: jnp.mean(x), ms)
    upd["finite_loss"] = jnp.all(ms["finite_loss"])
    upd["finite_grads"] = jnp.all(ms["finite_grads"])
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    if "skipped" in state:
      bad = ~(upd["finite_loss"] & upd["finite_grads"])
      new_state["skipped"] = state["skipped"] + bad.astype(jnp.int32)
    std = jnp.std(groups, axis=-1)
    stats = {"kl": jnp.mean(kls["k1"]), "kl_k3": jnp.mean(kls["k3"]), "reward": jnp.mean(reward),
             "group_std": jnp.mean(std),
             # Groups whose samples all scored the same give no gradient (DAPO, Yu et al.
             # 2025, resample them; logged here so the waste is visible).
             "zero_std_frac": jnp.mean((std == 0).astype(jnp.float32)),
             "advantage_abs": jnp.mean(jnp.abs(adv))}
    return new_state, {**upd, **stats}

  def iteration(state, frozen, batch, rng):
    r_roll, r_perm = jax.random.split(rng)
    ro = score(state, frozen, rollout(state, batch, r_roll, frozen))
    new_state, m = update(state, ro, r_perm, frozen)
    metrics = {
        "proxy_reward": jnp.mean(ro["proxy"]), "proxy_reward_raw": jnp.mean(ro["raw"]),
        "score": jnp.mean(ro["score"]), **m,
        "response_length": jnp.mean(jnp.sum(ro["rmask"], -1)),
        "no_eos_frac": 1.0 - jnp.mean(ro["ended"]),
        "_response": ro["response"], "_response_mask": ro["rmask"], "_ended": ro["ended"],
        "_index": jnp.repeat(batch["index"], k, axis=0),
    }
    return new_state, metrics

  iteration.rollout, iteration.score, iteration.update = rollout, score, update
  return iteration


def compute_per_iteration(cfg, model_cfg, prompt_len: int) -> dict:
  """Tokens and FLOPs one iteration spends (upper bound: full response length), with the
  conventions of `ppo.compute_per_iteration`: no critic to run or train."""
  gc = cfg.grpo
  n = gc.prompts_per_iteration * gc.k
  seq = prompt_len + gc.response_len
  fwd = flops_per_token(model_cfg, seq) / 3
  tokens = n * seq
  flops = (tokens * fwd  # rollout
           + (3 + cfg.reward.get("ensemble", 1) - 1) * tokens * fwd  # policy, ref, reward(s)
           + gc.epochs * 3 * tokens * fwd)  # updates (forward + backward)
  return {"tokens_sampled": n * gc.response_len, "tokens_trained": gc.epochs * tokens,
          "flops": flops}


def run(ctx) -> dict:
  cfg, gc = ctx.config, ctx.config.grpo
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  reward = RewardModel(ctx, model)
  sft_params, _ = common.load_params(ctx, "sft", model)
  texts, prompts = ctx.sources.prompt_set("rl")
  prompt_len = prompts["prompt"].shape[1]
  sc = sample_config(ctx, gc.response_len, gc.temperature)
  # LoRA (config.lora): adapters on the frozen SFT weights, which are also the reference
  # (adapters switched off): one copy of the base, as in PPO (common.lora_views).
  ft = common.fine_tune(ctx, "grpo", model)
  optimizer = make_optimizer(common.stage_opt(ctx, gc.opt, ft),
                             gc.iterations * gc.epochs * gc.minibatches)
  iteration = make_iteration(ft.model, optimizer, gc, sc, prompt_len,
                             views=common.policy_views(ctx, ft))
  # The reward model (an ensemble: all members, aggregated), stored as the base is.
  frozen = {"ref": ft.store(sft_params), **reward.frozen(ctx.mesh, store=ft.store)}

  def fresh_state(policy):
    return {"params": policy, "opt_state": optimizer.init(policy),
            "step": jnp.zeros((), jnp.int32), "skipped": jnp.zeros((), jnp.int32)}

  init_state, abstract = st.jit_init(fresh_state, ft.abstract_trainable())
  ckpt = common.checkpointer(ctx, "grpo")
  meta = {**common.model_meta(ctx), **common.run_meta(ctx, gc), **ft.meta("sft")}
  if ckpt.latest_step() is not None:
    common.check_method(ckpt, meta)
    state, _ = common.resume(ckpt, abstract, "grpo", meta)
    print(f"[grpo] resuming from iteration {int(state['step'])}", flush=True)
  else:
    state = init_state(common.start_policy(ctx, "grpo", ft, sft_params))

  batcher = common.host_batcher(ctx, prompts, gc.prompts_per_iteration, "grpo/prompts")
  example = batcher.get(0)
  batch_sh = jax.tree.map(lambda x: sh.batch_sharding(ctx.mesh, np.ndim(x)), example)
  compiled = jax.jit(iteration, in_shardings=(st.shardings_of(abstract),
                                              jax.tree.map(lambda x: x.sharding, frozen), batch_sh,
                                              sh.replicated(ctx.mesh)),
                     out_shardings=(st.shardings_of(abstract), sh.replicated(ctx.mesh)),
                     donate_argnums=(0,))

  def host_fn(step, aux):
    """Gold reward of this iteration's samples (host-side: decode + score)."""
    resp = decode_responses(ctx, sh.to_host(aux["_response"]), sh.to_host(aux["_response_mask"]))
    idx = sh.to_host(aux["_index"])
    gold = ctx.gold.score([texts[i] for i in idx], resp, sh.to_host(aux["_ended"]))
    return {} if gold is None else {"gold_reward": float(np.mean(gold))}

  log = SampleLog.for_stage(ctx, "grpo", int(sh.to_host(state["step"])))
  evaluator = PolicyEvaluator(ctx, model, reward, sft_params, response_len=gc.response_len,
                              temperature=cfg.evaluate.temperature, batch_size=cfg.evaluate.batch_size,
                              log=log)
  tag = lambda s: {"policy": "grpo", "iteration": int(sh.to_host(s["step"]))}
  compute = compute_per_iteration(cfg, ctx.model_cfg, prompt_len)
  state, _ = train_loop(
      name="grpo", stage_dir=ctx.stage_dir("grpo"), state=state,
      step_fn=lambda s, b, r: compiled(s, frozen, b, r), get_batch=batcher.get,
      total_steps=gc.iterations, key=ctx.key("grpo"), mesh=ctx.mesh, ckpt=ckpt,
      meta_fn=lambda s: {**meta, "data_position": s}, log_every=gc.log_every,
      ckpt_every=gc.ckpt_every,
      eval_fn=lambda s: evaluator.evaluate(ft.merged(s["params"], frozen["ref"]), tag(s)),
      eval_every=gc.eval_every, host_fn=host_fn, tokens_per_step=compute["tokens_sampled"],
      nonfinite=gc.nonfinite)
  ckpt.close()
  sft_eval = evaluator.evaluate(sft_params, {"policy": "sft"})
  final = evaluator.evaluate(ft.merged(state["params"], frozen["ref"]), tag(state))
  return {
      **policy_figures(sft_eval, final),
      "advantage": gc.advantage, "k": gc.k, "kl_mode": gc.kl_mode, "loss_agg": gc.loss_agg,
      "iterations": gc.iterations, "skipped_updates": int(sh.to_host(state["skipped"])),
      "tokens_sampled_per_iteration": compute["tokens_sampled"],
      "tokens_trained_per_iteration": compute["tokens_trained"],
      "flops_per_iteration": compute["flops"], "params": param_count(ctx.model_cfg),
      "trainable_params": lora.count(abstract["params"]),
      "eval_points": eval_points(ctx.stage_dir("grpo"), sft_eval, compute),
  }
