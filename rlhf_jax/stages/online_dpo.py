"""Online DPO (`dpo.online=True`): each step samples two responses per prompt from the
current policy, ranks them by the proxy reward model and takes one DPO step on those
pairs (Guo et al. 2024, "Direct language model alignment from online AI feedback": the
annotator is the RM here). The reference is the frozen SFT policy; its log-probs are
taken per step because the responses are new every step. Sampling and scoring reuse
PPO's sampler and scoring path (`stages.rollout`), evaluation the shared
PolicyEvaluator, so online DPO lands on the same frontier.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import rl
from rlhf_jax.losses import dpo_loss
from rlhf_jax.model.transformer import flops_per_token, param_count
from rlhf_jax.sampling import generate
from rlhf_jax.stages import common
from rlhf_jax.stages.policy_eval import PolicyEvaluator, RewardModel, SampleLog, sample_config
from rlhf_jax.stages.rollout import eval_points, policy_figures, response_logprobs, sequence_scores
from rlhf_jax.train import lora
from rlhf_jax.train import sharding as sh
from rlhf_jax.train import state as st
from rlhf_jax.train.loop import train_loop
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.step import accumulate_grads, apply_update


def make_step(model, optimizer, dc, rc, sc, prompt_len: int, score_fn=None, views=common.Views):
  """`(state, frozen, batch, rng) -> (state, metrics)`: sample 2 per prompt, rank, DPO step.

  dc: config.dpo; rc: the section whose EOS penalty / clip the scores use (config.ppo);
  views: as in grpo.make_iteration (`common.lora_views`: the reference is the policy's
  frozen base with its adapters switched off)."""
  def step(state, frozen, batch, rng):
    rep = lambda x: jnp.repeat(x, 2, axis=0)  # rows 2i, 2i + 1: the two samples of prompt i
    g = generate(model, views.rollout(state["params"], frozen), rep(batch["prompt"]),
                 rep(batch["prompt_mask"]), rng, sc)
    tokens, mask, rmask = g["tokens"], g["mask"], g["response_mask"]
    scored = frozen if score_fn is not None else {**frozen, "reward": views.reward(frozen)}
    score, proxy, _ = sequence_scores(model, scored, g, rc, score_fn)
    _, ref_lp = response_logprobs(model, views.ref(frozen), tokens, mask, prompt_len, sc.temperature)
    ref_seq = jnp.sum(ref_lp * rmask, -1)
    s = score.reshape(-1, 2)
    swap = (s[:, 1] > s[:, 0]).astype(jnp.int32)
    base = 2 * jnp.arange(s.shape[0])
    chosen, rejected = base + swap, base + 1 - swap

    def loss_fn(params, _, rng):
      _, lp = response_logprobs(model, views.policy(params, frozen), tokens, mask, prompt_len,
                                sc.temperature)
      seq = jnp.sum(lp * rmask, -1)
      return dpo_loss(seq[chosen], seq[rejected], ref_seq[chosen], ref_seq[rejected], dc.beta,
                      loss_type=dc.loss_type, label_smoothing=dc.label_smoothing)

    loss, grads, m = accumulate_grads(loss_fn, state["params"], None, rng, 1)
    params, opt_state, um = apply_update(optimizer, state["params"], state["opt_state"], grads,
                                         loss, dc.nonfinite)
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1)
    new_state["skipped"] = state["skipped"] + (~(um["finite_loss"] & um["finite_grads"])).astype(jnp.int32)
    kl = rl.kl_estimators(*(response_logprobs(model, views.policy(state["params"], frozen), tokens,
                                              mask, prompt_len, sc.temperature)[1], ref_lp),
                          rmask)["k1"]
    return new_state, {**m, **um, "proxy_reward": jnp.mean(proxy), "score_gap": jnp.mean(
        jnp.abs(s[:, 0] - s[:, 1])), "kl": jnp.mean(kl),
        "response_length": jnp.mean(jnp.sum(rmask, -1)), "no_eos_frac": 1.0 - jnp.mean(g["ended"])}

  return step


def compute_per_step(cfg, model_cfg, prompt_len: int) -> dict:
  dc = cfg.dpo
  n, seq = 2 * dc.batch_size, prompt_len + dc.response_len
  fwd = flops_per_token(model_cfg, seq) / 3
  tokens = n * seq
  # rollout, reward(s: an ensemble's every member), reference, policy (KL metric) forwards;
  # one update (forward + backward)
  return {"flops": (4 + cfg.reward.get("ensemble", 1) - 1 + 3) * tokens * fwd, "tokens_sampled": n * dc.response_len,
          "tokens_trained": tokens}


def run(ctx) -> dict:
  cfg, dc = ctx.config, ctx.config.dpo
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  reward = RewardModel(ctx, model)
  sft_params, _ = common.load_params(ctx, "sft", model)
  _, prompts = ctx.sources.prompt_set("rl")
  prompt_len = prompts["prompt"].shape[1]
  sc = sample_config(ctx, dc.response_len, 1.0)  # DPO's policy is the untempered one
  # LoRA (config.lora, stage "dpo"): as in grpo, adapters on the frozen SFT weights, which
  # with adapters switched off are the reference.
  ft = common.fine_tune(ctx, "dpo", model)
  optimizer = make_optimizer(common.stage_opt(ctx, dc.opt, ft), dc.steps)
  step = make_step(ft.model, optimizer, dc, cfg.ppo, sc, prompt_len,
                   views=common.policy_views(ctx, ft))
  # The reward model (an ensemble: all members, aggregated), stored as the base is.
  frozen = {"ref": ft.store(sft_params), **reward.frozen(ctx.mesh, store=ft.store)}
  fresh = lambda p: {"params": p, "opt_state": optimizer.init(p), "step": jnp.zeros((), jnp.int32),
                     "skipped": jnp.zeros((), jnp.int32)}
  init_state, abstract = st.jit_init(fresh, ft.abstract_trainable())
  ckpt = common.checkpointer(ctx, "dpo")
  meta = {**common.model_meta(ctx), **common.run_meta(ctx, dc), **ft.meta("sft")}
  if ckpt.latest_step() is not None:
    common.check_method(ckpt, meta)
    state, _ = common.resume(ckpt, abstract, "dpo", meta)
    print(f"[dpo] resuming from step {int(state['step'])}", flush=True)
  else:
    state = init_state(common.start_policy(ctx, "dpo", ft, sft_params))
  batcher = common.host_batcher(ctx, prompts, dc.batch_size, "dpo/online_prompts")
  batch_sh = jax.tree.map(lambda x: sh.batch_sharding(ctx.mesh, np.ndim(x)), batcher.get(0))
  shardings = st.shardings_of(abstract)
  compiled = jax.jit(step, in_shardings=(shardings, jax.tree.map(lambda x: x.sharding, frozen),
                                         batch_sh, sh.replicated(ctx.mesh)),
                     out_shardings=(shardings, sh.replicated(ctx.mesh)), donate_argnums=(0,))
  evaluator = PolicyEvaluator(ctx, model, reward, sft_params, response_len=dc.response_len,
                              temperature=cfg.evaluate.temperature, batch_size=cfg.evaluate.batch_size,
                              log=SampleLog.for_stage(ctx, "dpo", int(sh.to_host(state["step"]))))
  tag = lambda s: {"policy": "dpo", "iteration": int(sh.to_host(s["step"]))}
  c = compute_per_step(cfg, ctx.model_cfg, prompt_len)
  state, _ = train_loop(
      name="dpo", stage_dir=ctx.stage_dir("dpo"), state=state,
      step_fn=lambda s, b, r: compiled(s, frozen, b, r), get_batch=batcher.get,
      total_steps=dc.steps, key=ctx.key("dpo"), mesh=ctx.mesh, ckpt=ckpt,
      meta_fn=lambda s: {**meta, "data_position": s}, log_every=dc.log_every,
      ckpt_every=dc.ckpt_every,
      eval_fn=lambda s: evaluator.evaluate(ft.merged(s["params"], frozen["ref"]), tag(s)),
      eval_every=dc.eval_every, tokens_per_step=c["tokens_sampled"], nonfinite=dc.nonfinite)
  ckpt.close()
  sft_eval = evaluator.evaluate(sft_params, {"policy": "sft"})
  final = evaluator.evaluate(ft.merged(state["params"], frozen["ref"]), tag(state))
  return {
      "online": True, **policy_figures(sft_eval, final),
      "loss_type": dc.loss_type, "beta": dc.beta, "steps": dc.steps,
      "skipped_updates": int(sh.to_host(state["skipped"])), "flops_per_step": c["flops"],
      "offline_flops": 0.0, "tokens_sampled_per_step": c["tokens_sampled"],
      "params": param_count(ctx.model_cfg), "trainable_params": lora.count(abstract["params"]),
      "eval_points": eval_points(ctx.stage_dir("dpo"), sft_eval, c),
  }
