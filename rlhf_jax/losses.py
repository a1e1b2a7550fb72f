"""Supervised losses: language modelling (pretrain / SFT) and reward-model ranking.

Pure functions of arrays; every reduction is done in float32 so bf16 logits are safe.
The RL losses (PPO policy / value) live in `rlhf_jax/rl.py`.
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
  logits = logits[:, :-1].astype(jnp.float32) / temperature
  logp = jax.nn.log_softmax(logits, axis=-1)
  # mode="clip": a PAD id equal to the vocab size (tokenizers without a PAD token) would
  # otherwise gather NaN at masked positions, and NaN * 0 is still NaN in masked sums.
  return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1, mode="clip")[..., 0]


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
