"""Stage: PPO against the reward model (InstructGPT step 3).

Policy and reference from SFT; critic from the reward model (InstructGPT;
Stiennon et al. 2020; from a reward ensemble, its member 0 with that member's
normalisation: one model's backbone, whose values start in normalised units), trained by its own AdamW with step size `ppo.critic_lr`
(`ppo.vf_coef` has no effect on it). `ppo.critic=shared`: a value head on the
policy's backbone, zero-initialised so every initial value is 0 (lm-human-
preferences initialises its value head to zeros), its loss weighted by vf_coef. Each loop step is one PPO
iteration (`ppo_step.make_iteration`); every `eval_every` iterations the
policy is evaluated on the held-out prompts (gold, proxy, KL from SFT, win
rate), the points that feed the PPO-vs-best-of-K frontier.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.model.transformer import flops_per_token, param_count
from rlhf_jax.stages import common
from rlhf_jax.stages.policy_eval import (PolicyEvaluator, RewardModel, SampleLog, decode_responses,
                                         sample_config)
from rlhf_jax.stages.common import lora_views  # noqa: F401  (ppo.lora_views: bench, tests)
from rlhf_jax.stages.ppo_step import make_iteration
from rlhf_jax.stages.rollout import eval_points, policy_figures
from rlhf_jax.train import lora
from rlhf_jax.train import sharding as sh
from rlhf_jax.train import state as st
from rlhf_jax.train.loop import train_loop
from rlhf_jax.train.optim import make_optimizer


def compute_per_iteration(cfg, model_cfg, prompt_len: int) -> dict:
  """Tokens and FLOPs one iteration spends (upper bound: full response length)."""
  pc = cfg.ppo
  seq = prompt_len + pc.response_len
  fwd = flops_per_token(model_cfg, seq) / 3  # forward FLOPs per token
  tokens = pc.rollout_batch * seq
  n_models_trained = 1 if pc.critic == "shared" else 2
  rm_extra = cfg.reward.get("ensemble", 1) - 1  # an ensemble scores with every member
  sampled = pc.rollout_batch * pc.response_len
  flops = (tokens * fwd  # rollout (KV-cache decode ~ one forward per token)
           + (n_models_trained + 2 + rm_extra) * tokens * fwd  # policy, (critic,) ref, reward(s)
           + pc.epochs * n_models_trained * 3 * tokens * fwd)  # updates
  if pc.ptx_coef > 0:
    flops += pc.epochs * pc.minibatches * 3 * pc.ptx_batch * cfg.data.seq_len * fwd
  return {"tokens_sampled": sampled, "flops": flops}


def run(ctx) -> dict:
  return train_policy(ctx, "ppo")


def train_policy(ctx, name: str, *, reward_stage: str = "reward", init_policy: str | None = None,
                 iterations: int | None = None) -> dict:
  """PPO (config.ppo) as the stage `name` (its dir, checkpoints, RNG streams and sample
  log): `iterations` iterations (default ppo.iterations) against the reward model of
  `reward_stage`, the policy starting from the stage `init_policy`'s params (default SFT)
  and the critic from that reward model; the KL penalty and evaluation are to SFT.
  `run` is the `ppo` stage; the online stage calls this once per round."""
  cfg, pc = ctx.config, ctx.config.ppo
  if iterations is not None and iterations != pc.iterations:
    pc = pc.copy_and_resolve_references()
    pc.iterations = iterations
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  reward = RewardModel(ctx, model, stage=reward_stage)
  sft_params, _ = common.load_params(ctx, "sft", model)
  start_params = sft_params if init_policy is None else common.load_params(ctx, init_policy, model)[0]
  texts, prompts = ctx.sources.prompt_set("rl")
  prompt_len = prompts["prompt"].shape[1]
  sc = sample_config(ctx, pc.response_len, pc.temperature)
  # LoRA (config.lora): the policy trains adapters on the SFT weights, which are also the
  # reference; a separate critic trains adapters (and its head) on the reward model's.
  policy_ft = common.fine_tune(ctx, name, model, ("scalar_head",) if pc.critic == "shared" else ())
  critic_ft = common.fine_tune(ctx, name, model, ("scalar_head",))
  policy_opt, critic_opt = optimizers(pc, ctx.config.lora.lr_scale if policy_ft.lora else 1.0)
  views = common.policy_views(ctx, policy_ft)
  iteration = make_iteration(policy_ft.model, critic_ft.model, policy_opt, critic_opt, pc, sc,
                             prompt_len, views=views)
  # The reward model (an ensemble: every member, aggregated) as RewardModel.frozen gives it.
  frozen = {"ref": policy_ft.store(sft_params), **reward.frozen(ctx.mesh, store=policy_ft.store)}

  def fresh_state(policy, critic):
    s = {"params": policy, "opt_state": policy_opt.init(policy), "step": jnp.zeros((), jnp.int32),
         "kl_coef": jnp.float32(pc.kl_coef), "skipped": jnp.zeros((), jnp.int32)}
    if pc.critic != "shared":
      s.update(critic_params=critic, critic_opt_state=critic_opt.init(critic))
    return s

  init_state, abstract = st.jit_init(fresh_state, policy_ft.abstract_trainable(),
                                     critic_ft.abstract_trainable())
  ckpt = common.checkpointer(ctx, name)
  meta = {**common.model_meta(ctx), **common.run_meta(ctx, pc), **policy_ft.meta("sft")}
  if pc.critic != "shared" and pc.vf_coef != 1.0:
    print(f"[{name}] ppo.vf_coef={pc.vf_coef} has no effect with ppo.critic=separate: the critic "
          f"has its own optimizer, step size ppo.critic_lr={pc.critic_lr}", flush=True)
  if ckpt.latest_step() is not None:
    common.check_method(ckpt, meta)
    state, _ = common.resume(ckpt, abstract, name, meta)
    print(f"[{name}] resuming from iteration {int(state['step'])}", flush=True)
  else:
    # The critic starts from the reward model (InstructGPT), in normalised score units;
    # from an ensemble, member 0 (RewardModel.normalized_params).
    if policy_ft.lora:
      key = ctx.key(name)
      policy = policy_ft.init_trainable(initial_policy(sft_params, pc.critic),
                                        jax.random.fold_in(key, 2**31 - 1))
      critic = policy  # unused with a shared critic
      if pc.critic != "shared":  # adapters + the normalised head on the frozen RM weights
        rm = {**reward.params, "scalar_head": reward.normalized_head()}
        critic = critic_ft.init_trainable(rm, jax.random.fold_in(key, 2**31 - 2))
      state = init_state(policy, critic)
    else:
      critic_init = reward.normalized_params() if pc.critic != "shared" else sft_params
      # A fresh copy (the state is donated each iteration, the frozen reference is not).
      policy0 = jax.jit(lambda p: initial_policy(p, pc.critic),
                        out_shardings=st.shardings_of(sft_params))(start_params)
      state = init_state(policy0, critic_init)

  prompt_batcher = common.host_batcher(ctx, prompts, pc.rollout_batch, f"{name}/prompts")
  ptx_batcher = None
  if pc.ptx_coef > 0:
    ptx_rows, _ = ctx.sources.corpus_rows()
    # ptx_batch fresh rows for each of the iteration's epochs x minibatches updates.
    ptx_batcher = common.host_batcher(ctx, ptx_rows, pc.ptx_batch * pc.epochs * pc.minibatches,
                                      f"{name}/ptx")

  def get_batch(s):
    b = dict(prompt_batcher.get(s))
    if ptx_batcher is not None:
      p = ptx_batcher.get(s)
      b.update(ptx_tokens=p["tokens"], ptx_mask=p["mask"], ptx_loss_mask=p["loss_mask"])
    return b

  shardings = st.shardings_of(abstract)
  frozen_sh = jax.tree.map(lambda x: x.sharding, frozen)
  example = get_batch(0)
  batch_sh = jax.tree.map(lambda x: sh.batch_sharding(ctx.mesh, np.ndim(x)), example)
  compiled = jax.jit(iteration, in_shardings=(shardings, frozen_sh, batch_sh, sh.replicated(ctx.mesh)),
                     out_shardings=(shardings, sh.replicated(ctx.mesh)), donate_argnums=(0,))
  step_fn = lambda state, batch, rng: compiled(state, frozen, batch, rng)

  def host_fn(step, aux):
    """Gold reward of this iteration's rollouts (host-side: decode + score)."""
    resp = decode_responses(ctx, sh.to_host(aux["_response"]), sh.to_host(aux["_response_mask"]))
    idx = sh.to_host(aux["_index"])
    gold = ctx.gold.score([texts[i] for i in idx], resp, sh.to_host(aux["_ended"]))
    return {} if gold is None else {"gold_reward": float(np.mean(gold))}

  start = int(sh.to_host(state["step"]))  # evaluations up to here are final (a resume keeps them)
  log = SampleLog.for_stage(ctx, name, start)
  evaluator = PolicyEvaluator(ctx, model, reward, sft_params, response_len=pc.response_len,
                              temperature=cfg.evaluate.temperature, batch_size=cfg.evaluate.batch_size,
                              log=log)
  tag = lambda s: {"policy": name, "iteration": int(sh.to_host(s["step"]))}
  compute = compute_per_iteration(cfg, ctx.model_cfg, prompt_len)
  state, rows = train_loop(
      name=name, stage_dir=ctx.stage_dir(name), state=state, step_fn=step_fn, get_batch=get_batch,
      total_steps=pc.iterations, key=ctx.key(name), mesh=ctx.mesh, ckpt=ckpt,
      meta_fn=lambda s: {**meta, "data_position": s}, log_every=pc.log_every,
      ckpt_every=pc.ckpt_every,
      eval_fn=lambda s: evaluator.evaluate(policy_ft.merged(s["params"], frozen["ref"]), tag(s)),
      eval_every=pc.eval_every, host_fn=host_fn, tokens_per_step=compute["tokens_sampled"],
      nonfinite=pc.nonfinite)
  ckpt.close()
  sft_eval = evaluator.evaluate(sft_params, {"policy": "sft"})
  final = evaluator.evaluate(policy_ft.merged(state["params"], frozen["ref"]), tag(state))
  return {
      **policy_figures(sft_eval, final),
      "kl_coef_final": float(sh.to_host(state["kl_coef"])), "iterations": pc.iterations,
      "skipped_updates": int(sh.to_host(state["skipped"])),
      "tokens_sampled_per_iteration": compute["tokens_sampled"],
      "flops_per_iteration": compute["flops"], "params": param_count(ctx.model_cfg),
      "trainable_params": lora.count(abstract["params"]),
      "critic_trainable_params": lora.count(abstract.get("critic_params", {})),
      "eval_points": eval_points(ctx.stage_dir(name), sft_eval, compute),
  }


def initial_policy(params, critic: str):
  """The policy PPO starts from: the SFT params, and for critic=shared a zero value head
  (lm-human-preferences), not the SFT checkpoint's untrained one (values ~N(0, 1))."""
  if critic != "shared":
    return params
  head = jax.tree.map(jnp.zeros_like, params["scalar_head"])
  return {**params, "scalar_head": head}


def optimizers(pc, lr_scale: float = 1.0):
  """Policy and critic AdamW. Their schedules count optimizer updates, epochs x
  minibatches per iteration, so a decay (Huang et al. 2024 anneal linearly) spans the run.
  lr_scale: config.lora.lr_scale when the models train LoRA adapters."""
  updates = pc.iterations * pc.epochs * pc.minibatches
  policy = pc.opt if lr_scale == 1.0 else _with_lr(pc.opt, pc.opt.lr * lr_scale)
  return (make_optimizer(policy, updates),
          make_optimizer(_with_lr(pc.opt, pc.critic_lr * lr_scale), updates))


def _with_lr(opt_cfg, lr):
  o = opt_cfg.copy_and_resolve_references()
  o.lr = lr
  return o
