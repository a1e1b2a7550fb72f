"""Supervised losses: language modelling (pretrain / SFT) and reward-model ranking.

Pure functions of arrays; every reduction is done in float32 so bf16 logits are safe.
The RL losses (PPO policy / value) live in `rlhf_jax/rl.py`; `dpo_loss` (DPO / cDPO / IPO)
is here because it is a supervised loss on preference pairs.
"""
import jax
import jax.numpy as jnp


def token_logprobs(logits, tokens, temperature=1.0):
  """Log-probs of tokens[:, 1:] under softmax(logits[:, :-1] / temperature).

  logits: [B, L, V], where logits[:, t] predicts tokens[:, t + 1]; tokens: [B, L].
  Returns [B, L - 1] float32.

  The temperature divides the logits here too, not only when sampling: the PPO
  ratio, the KL penalty and the reference log-probs must all be taken under the
  distribution the responses were actually sampled from (Huang et al. 2024,
  "The N+ implementation details of RLHF with PPO", detail on temperature).
  """
  x = logits[:, :-1].astype(jnp.float32) / temperature
  # log_softmax's own arithmetic ((x - max) - log sum exp(x - max), jax.nn.log_softmax),
  # taken for the chosen token only: the max and the sum are reductions XLA fuses with the
  # cast, so no [B, L, vocab] log-softmax is materialised.
  x_max = jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True))
  lse = jnp.log(jnp.sum(jnp.exp(x - x_max), axis=-1))
  # mode="clip": a PAD id equal to the vocab size (tokenizers without a PAD token) would
  # otherwise gather NaN at masked positions, and NaN * 0 is still NaN in masked sums.
  picked = jnp.take_along_axis(x, tokens[:, 1:, None], axis=-1, mode="clip")[..., 0]
  return (picked - x_max[..., 0]) - lse


def lm_loss(logits, tokens, loss_mask):
  """Next-token cross-entropy over the masked TARGET tokens.

  loss_mask[:, t] says whether token t is a target (it is predicted from position
  t - 1, so loss_mask[:, 0] is ignored). For SFT the prompt is masked out, so
  prompt tokens get exactly zero gradient weight (InstructGPT trains SFT on the
  demonstration only). Returns (loss, {'loss', 'accuracy', 'tokens'}).
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  targets = tokens[:, 1:]
  m = loss_mask[:, 1:].astype(jnp.float32)
  ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1, mode="clip")[..., 0]  # see token_logprobs
  n = jnp.sum(m)
  denom = jnp.maximum(n, 1.0)
  loss = jnp.sum(ce * m) / denom
  correct = (jnp.argmax(logp, axis=-1) == targets).astype(jnp.float32)
  accuracy = jnp.sum(correct * m) / denom
  return loss, {'loss': loss, 'accuracy': accuracy, 'tokens': n}


def ranking_loss(rewards, ranks, valid):
  """InstructGPT reward-model loss over all C(K, 2) comparisons of a prompt.

  rewards: [B, K] scalar rewards, one per response (each computed once);
  ranks: [B, K] integers, 0 = best, equal ranks = tie (ties give no pair);
  valid: [B, K] bool, which responses exist (prompts may have fewer than K).

  Loss per pair: -log sigmoid(r_better - r_worse) (Ziegler et al. 2019;
  Stiennon et al. 2020). InstructGPT (Ouyang et al. 2022, sec. 3.5) puts all
  C(K, 2) comparisons of one prompt in a single batch element to avoid
  overfitting, and weights each prompt equally: we take the mean over a prompt's
  pairs, then the mean over prompts that have at least one pair.

  Returns (loss, {'loss', 'accuracy', 'margin', 'pairs'}): accuracy counts a
  pair as right when the better response scores strictly higher; margin is the
  mean of r_better - r_worse over all counted pairs; pairs is their number.
  """
  r = rewards.astype(jnp.float32)
  valid = valid.astype(bool)
  both = valid[:, :, None] & valid[:, None, :]
  # better[b, i, j]: response i is ranked strictly above j. Each untied pair
  # appears exactly once in this ordered form, ties not at all.
  better = both & (ranks[:, :, None] < ranks[:, None, :])
  m = better.astype(jnp.float32)
  # Zero out uncounted differences so garbage rewards in padding cannot leak NaN.
  diff = jnp.where(better, r[:, :, None] - r[:, None, :], 0.0)

  n_pairs = jnp.sum(m, axis=(1, 2))                       # [B]
  per_pair = lambda x: jnp.sum(x * m, axis=(1, 2)) / jnp.maximum(n_pairs, 1.0)
  prompt_loss = per_pair(-jax.nn.log_sigmoid(diff))
  prompt_acc = per_pair((diff > 0).astype(jnp.float32))

  has = (n_pairs > 0).astype(jnp.float32)
  n_prompts = jnp.maximum(jnp.sum(has), 1.0)
  loss = jnp.sum(prompt_loss * has) / n_prompts
  accuracy = jnp.sum(prompt_acc * has) / n_prompts
  total = jnp.sum(n_pairs)
  margin = jnp.sum(diff * m) / jnp.maximum(total, 1.0)
  return loss, {'loss': loss, 'accuracy': accuracy, 'margin': margin,
                'pairs': total}


def entropy_from_logits(logits, mask=None):
  """Entropy of softmax(logits) along the last axis, in float32.

  Without mask: per-position entropies, shape logits.shape[:-1]. With a mask of
  that shape: the scalar masked mean (0 if nothing is valid).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  ent = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
  if mask is None:
    return ent
  m = mask.astype(jnp.float32)
  return jnp.sum(ent * m) / jnp.maximum(jnp.sum(m), 1.0)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
             beta, *, loss_type="sigmoid", label_smoothing=0.0):
  """Direct preference optimisation losses over N pairs of summed response log-probs.

  h = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected), the difference of
  the implicit rewards r = beta * log(pi / pi_ref) divided by beta.
    "sigmoid": -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)
               (DPO, Rafailov et al. 2023 eq. 7; ls > 0 is conservative DPO,
               Mitchell 2023, "A note on DPO with noisy preferences": the label
               is assumed flipped with probability ls).
    "ipo":     (h - 1 / (2 beta))^2 (IPO, Azar et al. 2023 eq. 17: regresses the
               log-ratio gap to a finite target instead of pushing it to infinity).
  Each a mean over pairs. Returns (loss, metrics) with accuracy (share of pairs
  with h > 0), the implicit rewards beta * (pi - ref) of chosen / rejected and their
  margin, and the policy's chosen / rejected log-probs.
  """
  pc, pr = _f32(policy_chosen_logps), _f32(policy_rejected_logps)
  rc, rr = _f32(ref_chosen_logps), _f32(ref_rejected_logps)
  beta = jnp.float32(beta)
  h = (pc - rc) - (pr - rr)
  if loss_type == "sigmoid":
    ls = jnp.float32(label_smoothing)
    per = -(1.0 - ls) * jax.nn.log_sigmoid(beta * h) - ls * jax.nn.log_sigmoid(-beta * h)
  elif loss_type == "ipo":
    per = jnp.square(h - 1.0 / (2.0 * beta))
  else:
    raise ValueError(f"dpo_loss: loss_type must be 'sigmoid' or 'ipo', got {loss_type!r}")
  loss = jnp.mean(per)
  chosen_r, rejected_r = beta * (pc - rc), beta * (pr - rr)
  return loss, {"loss": loss, "accuracy": jnp.mean((h > 0).astype(jnp.float32)),
                "chosen_reward": jnp.mean(chosen_r), "rejected_reward": jnp.mean(rejected_r),
                "margin": jnp.mean(chosen_r - rejected_r),
                "chosen_logp": jnp.mean(pc), "rejected_logp": jnp.mean(pr)}


def _f32(x):
  return jnp.asarray(x, jnp.float32)
