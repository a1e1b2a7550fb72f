"""One PPO iteration as a pure function: rollout -> score -> GAE -> updates.

`iteration(state, frozen, batch, rng) -> (state, metrics)` is jitted once and
sharded over the mesh. The recipe is InstructGPT's / Ziegler et al. 2019's,
with the details catalogued by Huang et al. 2024 ("The N+ implementation
details of RLHF with PPO"); each is a field of `config.ppo`:

  reward_t = -beta * KL_t (every response token) + score (last token)
  score    = normalised RM score (an ensemble's members aggregated by
             reward.aggregate, `policy_eval.frozen_scores`); replaced by `missing_eos_penalty` when no
             EOS was produced; optionally clipped to +-reward_clip
  A, R     = GAE(gamma, lambda) over the response, whitened advantages
  loss     = clipped surrogate - entropy_coef * H + ptx_coef * LM(pretrain)
  critic   = clipped value loss: a separate model initialised from the RM with
             its own AdamW (step size `critic_lr`; vf_coef does not apply: Adam
             is invariant to a loss scale), or a zero-initialised value head on
             the policy's backbone, its loss weighted by vf_coef in the policy's
             loss (lm-human-preferences)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax import rl
from rlhf_jax.losses import entropy_from_logits, lm_loss, token_logprobs
from rlhf_jax.sampling import generate
from rlhf_jax.stages.common import Views
from rlhf_jax.stages.rollout import ROW_KEYS, by_row_chunks, response_logprobs, sequence_scores
from rlhf_jax.train.step import accumulate_grads, apply_update


def _response_logits(model, params, tokens, mask, prompt_len, scalar=False):
  out = model.apply({"params": params}, tokens, mask, scalar=scalar)
  return out, out["logits"][:, prompt_len - 1:-1]


def make_iteration(model, critic_model, policy_opt, critic_opt, pc, sc, prompt_len: int,
                   score_fn=None, views=Views):
  """pc: config.ppo; sc: SampleConfig for rollouts.

  score_fn(tokens, mask, response, response_mask, ended) -> [B], if given, replaces the
  reward model (a programmatic reward; frozen['reward'] is then unused). The parts are
  exposed for benchmarks: `iteration.rollout(state, batch, rng)`,
  `iteration.score(state, frozen, rollout)` and
  `iteration.update(state, scored, batch, rng) -> (state, metrics, aux)`.
  """
  if sc.top_k or sc.top_p < 1.0 or sc.min_new_tokens or sc.greedy:
    # The ratio and the KL use log-probs of the full tempered policy; tokens drawn from a
    # filtered or EOS-banned distribution would make both wrong (off-policy).
    raise ValueError("PPO rollouts sample from the full tempered policy: top_k=0, top_p=1, "
                     "min_new_tokens=0, greedy=False")
  shared = pc.critic == "shared"
  temp = pc.temperature
  n_mb = pc.minibatches
  n_chunks = int(pc.get("score_chunks", 1))

  def rollout(state, batch, rng, frozen=None):
    return generate(model, views.rollout(state["params"], frozen), batch["prompt"],
                    batch["prompt_mask"], rng, sc)

  def score(state, frozen, g):
    """The four forward passes over a rollout: policy, reference, critic, reward, over
    `ppo.score_chunks` slices of its rows at a time (rollout.by_row_chunks: the same
    figures, a fraction of the activations and logits)."""
    def rows(r):
      tokens, mask = r["tokens"], r["mask"]
      # Recompute the old log-probs with the training forward pass (the sampler's agree
      # to float tolerance; the update's ratio must start at exactly 1).
      out, old_logp = response_logprobs(model, views.policy(state["params"], frozen), tokens, mask,
                                        prompt_len, temp, scalar=shared)
      _, ref_logp = response_logprobs(model, views.ref(frozen), tokens, mask, prompt_len, temp)
      if shared:
        values = out["scalar"][:, prompt_len - 1:-1]
      else:
        values = critic_model.apply({"params": views.critic(state["critic_params"], frozen)},
                                    tokens, mask, logits=False,
                                    scalar=True)["scalar"][:, prompt_len - 1:-1]
      score, proxy, raw = sequence_scores(model, {**frozen, "reward": views.reward(frozen)}, r, pc,
                                          score_fn)
      return dict(old_logp=old_logp, ref_logp=ref_logp, values=values, score=score, proxy=proxy,
                  raw=raw)

    scored = by_row_chunks(rows, n_chunks, {k: g[k] for k in ROW_KEYS})
    return dict(tokens=g["tokens"], mask=g["mask"], rmask=g["response_mask"], ended=g["ended"],
                response=g["response"], **scored)

  def policy_loss_fn(params, mb, rng, frozen=None):
    params = views.policy(params, frozen)
    out, logits = _response_logits(model, params, mb["tokens"], mb["mask"], prompt_len, shared)
    logp = token_logprobs(out["logits"], mb["tokens"], temp)[:, prompt_len - 1:]
    pg, pm = rl.policy_loss(logp, mb["old_logp"], mb["adv"], mb["rmask"], pc.clip_eps)
    ent = entropy_from_logits(logits / temp, mb["rmask"])
    loss = pg - pc.entropy_coef * ent
    metrics = {"policy_loss": pg, "entropy": ent, **pm}
    if shared:
      v = out["scalar"][:, prompt_len - 1:-1]
      vl, vm = rl.value_loss(v, mb["values"], mb["returns"], mb["rmask"], pc.value_clip_eps)
      loss = loss + pc.vf_coef * vl
      metrics.update(value_loss=vl, **vm)
    if pc.ptx_coef > 0:  # PPO-ptx (InstructGPT eq. 2)
      ptx = model.apply({"params": params}, mb["ptx_tokens"], mb["ptx_mask"])
      lm, _ = lm_loss(ptx["logits"], mb["ptx_tokens"], mb["ptx_loss_mask"])
      loss = loss + pc.ptx_coef * lm
      metrics["ptx_loss"] = lm
    return loss, metrics

  def critic_loss_fn(params, mb, rng, frozen=None):
    v = critic_model.apply({"params": views.critic(params, frozen)}, mb["tokens"], mb["mask"], logits=False,
                           scalar=True)["scalar"][:, prompt_len - 1:-1]
    vl, vm = rl.value_loss(v, mb["values"], mb["returns"], mb["rmask"], pc.value_clip_eps)
    # No vf_coef: the critic has its own optimizer, where a loss scale would only move
    # the gradient-clipping threshold (and Adam's eps). Its step size is ppo.critic_lr.
    return vl, {"value_loss": vl, **vm}

  def update(state, ro, batch, rng, frozen=None):
    """Rewards, GAE and epochs x minibatches of updates on one scored rollout."""
    r_perm = rng
    rmask = ro["rmask"]
    beta = state["kl_coef"]
    rewards, kl_tok = rl.token_rewards(ro["score"], ro["old_logp"], ro["ref_logp"], rmask, beta,
                                       pc.kl_estimator)
    if pc.whiten_rewards:  # lm-human-preferences: whiten without shifting the mean
      rewards = rl.whiten(rewards, rmask, shift_mean=False)
    adv, returns = rl.gae(rewards, ro["values"], rmask, pc.gae_gamma, pc.gae_lambda)
    if pc.whiten_advantages:
      adv = rl.whiten(adv, rmask)
    data = dict(tokens=ro["tokens"], mask=ro["mask"], rmask=rmask, old_logp=ro["old_logp"],
                values=ro["values"], adv=adv, returns=returns)
    b = rmask.shape[0]
    perms = jnp.concatenate([jax.random.permutation(k, b) for k in
                             jax.random.split(r_perm, pc.epochs)]).reshape(pc.epochs * n_mb, b // n_mb)

    # PPO-ptx: every minibatch update gets its own ptx_batch rows of pretraining data
    # (the batch holds epochs x minibatches of them), as InstructGPT mixes fresh
    # pretraining gradients into each PPO update.
    ptx = {}
    if pc.ptx_coef > 0:
      ptx = {k: batch[k].reshape(pc.epochs * n_mb, -1, *batch[k].shape[1:])
             for k in ("ptx_tokens", "ptx_mask", "ptx_loss_mask")}

    def minibatch_step(carry, xs):
      params, opt_state, cparams, copt = carry
      idx, ptx_mb = xs
      mb = jax.tree.map(lambda x: jnp.take(x, idx, axis=0), data)
      mb.update(ptx_mb)
      loss, grads, m = accumulate_grads(lambda p, b, r: policy_loss_fn(p, b, r, frozen), params,
                                        mb, rng, 1)
      params, opt_state, um = apply_update(policy_opt, params, opt_state, grads, loss, "skip")
      m = {**m, "policy_grad_norm": um["grad_norm"], "finite_loss": um["finite_loss"],
           "finite_grads": um["finite_grads"]}
      if not shared:
        closs, cgrads, cm = accumulate_grads(lambda p, b, r: critic_loss_fn(p, b, r, frozen),
                                             cparams, mb, rng, 1)
        cparams, copt, cum = apply_update(critic_opt, cparams, copt, cgrads, closs, "skip")
        m.update(cm, critic_grad_norm=cum["grad_norm"],
                 finite_loss=m["finite_loss"] & cum["finite_loss"],
                 finite_grads=m["finite_grads"] & cum["finite_grads"])
      return (params, opt_state, cparams, copt), m

    carry = (state["params"], state["opt_state"], state.get("critic_params", {}),
             state.get("critic_opt_state", {}))
    (params, opt_state, cparams, copt), ms = jax.lax.scan(minibatch_step, carry, (perms, ptx))
    upd = jax.tree.map(lambda x: x[-1] if x.dtype == jnp.bool_ else jnp.mean(x), ms)
    upd["finite_loss"] = jnp.all(ms["finite_loss"])
    upd["finite_grads"] = jnp.all(ms["finite_grads"])
    kls = rl.kl_estimators(ro["old_logp"], ro["ref_logp"], rmask)
    kl_mean = jnp.mean(kls["k1"])
    if pc.kl_mode == "adaptive":  # Ziegler et al. 2019
      new_beta = rl.adaptive_kl_update(beta, kl_mean, b, pc.kl_target, pc.kl_horizon)
    else:
      new_beta = beta
    # Minibatch updates with a non-finite loss/gradient were skipped above; count the
    # iterations that had any (the loop stops on them unless ppo.nonfinite=skip).
    new_state = dict(state, params=params, opt_state=opt_state, step=state["step"] + 1,
                     kl_coef=new_beta)
    if "skipped" in state:
      bad = ~(upd["finite_loss"] & upd["finite_grads"])
      new_state["skipped"] = state["skipped"] + bad.astype(jnp.int32)
    if not shared:
      new_state.update(critic_params=cparams, critic_opt_state=copt)
    aux = dict(adv=adv, returns=returns, kls=kls, kl_mean=kl_mean, beta=beta,
               kl_tok=kl_tok)
    return new_state, upd, aux

  def iteration(state, frozen, batch, rng):
    r_roll, r_perm = jax.random.split(rng)
    ro = score(state, frozen, rollout(state, batch, r_roll, frozen))
    new_state, upd, aux = update(state, ro, batch, r_perm, frozen)
    rmask, adv, returns = ro["rmask"], aux["adv"], aux["returns"]
    kls, kl_mean, beta = aux["kls"], aux["kl_mean"], aux["beta"]
    lengths = jnp.sum(rmask, axis=-1)
    metrics = {
        "proxy_reward": jnp.mean(ro["proxy"]), "proxy_reward_raw": jnp.mean(ro["raw"]),
        "score": jnp.mean(ro["score"]), "kl": kl_mean, "kl_k3": jnp.mean(kls["k3"]),
        "kl_coef": beta,
        "non_score_reward": -beta * jnp.mean(jnp.sum(aux["kl_tok"], -1)),  # the KL penalty
        "explained_variance": rl.explained_variance(ro["values"], returns, rmask),
        "advantage_mean": rl.masked_mean(adv, rmask), "return_mean": rl.masked_mean(returns, rmask),
        "value_mean": rl.masked_mean(ro["values"], rmask),
        "response_length": jnp.mean(lengths), "no_eos_frac": 1.0 - jnp.mean(ro["ended"]),
        "loss": upd["policy_loss"], **upd,
        "_response": ro["response"], "_response_mask": rmask, "_ended": ro["ended"],
        "_index": batch["index"],
    }
    return new_state, metrics

  iteration.rollout, iteration.score, iteration.update = rollout, score, update
  return iteration
