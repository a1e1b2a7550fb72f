"""The PPO math for RLHF, top to bottom, each trick with its source.

Shapes: [B, T] arrays over response tokens; `mask` marks valid tokens (1 up to
and including the last response token, 0 after), so each row's valid entries are
a prefix. Everything is a pure, jit-compatible function of arrays (except the
host-side KL controller classes), computed in float32.

Sources: Ziegler et al. 2019 ("Fine-tuning LMs from human preferences", the
lm-human-preferences code), Stiennon et al. 2020, InstructGPT (Ouyang et al.
2022), Schulman et al. 2017 (PPO), Schulman et al. 2015 (GAE), Huang et al. 2024
("The N+ implementation details of RLHF with PPO"); for the critic-free group
baselines GRPO (Shao et al. 2024), RLOO (Ahmadian et al. 2024), Dr. GRPO (Liu et
al. 2025) and DAPO's token-level aggregation (Yu et al. 2025).
"""
import jax
import jax.numpy as jnp


def _f32(x):
  return jnp.asarray(x, jnp.float32)


# ----------------------------------------------------------------- masked stats

def masked_mean(x, mask, axis=None):
  """Mean of x over entries where mask is set; 0 (not NaN) if none are."""
  m = _f32(mask)
  return jnp.sum(_f32(x) * m, axis=axis) / jnp.maximum(jnp.sum(m, axis=axis), 1.0)


def masked_var(x, mask, unbiased=False):
  """Variance over valid entries; biased (divide by n) like lm-human-preferences'
  `whiten`. `unbiased=True` applies Bessel's correction (TRL does; Huang et al.
  2024 note the difference is negligible at RLHF batch sizes)."""
  m = _f32(mask)
  mean = masked_mean(x, m)
  var = masked_mean(jnp.square(_f32(x) - mean), m)
  if unbiased:
    n = jnp.sum(m)
    var = var * n / jnp.maximum(n - 1.0, 1.0)
  return var


def whiten(x, mask, shift_mean=True):
  """(x - mean) / sqrt(var + 1e-8) with statistics over valid entries only.

  shift_mean=False adds the mean back: lm-human-preferences whitens the rewards
  this way (only rescaled, so their sign / level is kept), while advantages are
  fully whitened (Ziegler et al. 2019; Huang et al. 2024, "advantage
  whitening"). Masked-out entries are 0 in the output, so padding never carries
  a value into a later masked sum.
  """
  m = _f32(mask)
  x = _f32(x)
  mean = masked_mean(x, m)
  out = (x - mean) * jax.lax.rsqrt(masked_var(x, m) + 1e-8)
  if not shift_mean:
    out = out + mean
  return out * m


def explained_variance(values, returns, mask):
  """1 - Var[R - V] / Var[R] over valid tokens (a value-head health check, as
  logged by OpenAI baselines / CleanRL). 0 when Var[R] is 0 (baselines gives NaN;
  0 keeps metric logs finite)."""
  var_r = masked_var(returns, mask)
  var_d = masked_var(_f32(returns) - _f32(values), mask)
  return jnp.where(var_r > 0, 1.0 - var_d / jnp.where(var_r > 0, var_r, 1.0), 0.0)


# ------------------------------------------------------------------ KL penalty

def kl_per_token(logp, ref_logp, estimator='k1'):
  """Per-token estimate of KL(pi || pi_ref) from samples of pi.

  k1 = log pi - log pi_ref (unbiased, can be negative; the form Ziegler et al.
  2019 and InstructGPT put in the reward); k2 = 0.5 * (log ratio)^2;
  k3 = (r - 1) - log r with r = pi_ref / pi (unbiased and >= 0). From Schulman,
  "Approximating KL divergence" (2020 blog post).
  """
  logr = _f32(ref_logp) - _f32(logp)
  if estimator == 'k1':
    return -logr
  if estimator == 'k2':
    return 0.5 * jnp.square(logr)
  if estimator == 'k3':
    return jnp.expm1(logr) - logr
  raise ValueError(f"kl_estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def kl_estimators(logp, ref_logp, mask):
  """Per-sequence sums over valid tokens of the k1 / k2 / k3 estimators: {name: [B]}."""
  m = _f32(mask)
  return {k: jnp.sum(kl_per_token(logp, ref_logp, k) * m, axis=-1)
          for k in ('k1', 'k2', 'k3')}


def token_rewards(score, logp, ref_logp, mask, beta, kl_estimator='k1'):
  """Per-token PPO rewards: -beta * KL on every valid token, plus the reward
  model's score [B] on the last valid token.

  The KL penalty against the SFT policy is per token and the score arrives only
  at the end of the episode (Ziegler et al. 2019; InstructGPT eq. 2;
  Huang et al. 2024). Rows with no valid token get no score.
  Returns (rewards [B, T], kl [B, T]), both 0 outside the mask.
  """
  m = _f32(mask)
  kl = kl_per_token(logp, ref_logp, kl_estimator) * m
  t = jnp.arange(m.shape[-1])
  last = jnp.max(jnp.where(m > 0, t, -1), axis=-1)       # -1 if the row is empty
  at_last = (t[None, :] == last[:, None]).astype(jnp.float32)
  rewards = -_f32(beta) * kl + _f32(score)[:, None] * at_last
  return rewards, kl


class AdaptiveKLController:
  """Adaptive KL coefficient (Ziegler et al. 2019, sec. 2.2), host-side.

  Steers the measured KL toward `target`: the proportional error is clipped to
  [-0.2, 0.2] and the coefficient moves by a factor (1 + e * n_steps / horizon).
  """

  def __init__(self, init_kl_coef, target, horizon):
    self.value = float(init_kl_coef)
    self.target = float(target)
    self.horizon = float(horizon)

  def update(self, kl, n_steps):
    e = min(max(float(kl) / self.target - 1.0, -0.2), 0.2)
    self.value *= 1.0 + e * n_steps / self.horizon
    return self.value


class FixedKLController:
  """Constant KL coefficient, same interface as AdaptiveKLController."""

  def __init__(self, kl_coef):
    self.value = float(kl_coef)

  def update(self, kl, n_steps):
    del kl, n_steps
    return self.value


def adaptive_kl_update(value, kl, n_steps, target, horizon):
  """Functional form of AdaptiveKLController.update, for beta kept in jitted state.

  Works with Python floats (host) and traced arrays (inside jit) alike.
  """
  e = jnp.clip(_f32(kl) / target - 1.0, -0.2, 0.2)
  return _f32(value) * (1.0 + e * n_steps / horizon)


# ------------------------------------------------------------------------- GAE

def gae(rewards, values, mask, gamma, lam):
  """Generalised advantage estimation (Schulman et al. 2015) over response tokens.

  delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1},
  where V and A after the last valid token are 0 (the episode ends at EOS /
  truncation; Huang et al. 2024). Returns (advantages, returns) with
  returns = advantages + values (the value-head targets); advantages are 0
  outside the mask (returns there equal the values and must be masked later).
  """
  m = _f32(mask)
  r = _f32(rewards) * m
  v = _f32(values) * m
  # "Next" quantities are zero past the end of each valid prefix.
  next_m = jnp.concatenate([m[:, 1:], jnp.zeros_like(m[:, :1])], axis=1)
  next_v = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
  delta = r + gamma * next_v - v

  def step(carry, xs):
    d, nm = xs
    adv = d + gamma * lam * nm * carry
    return adv, adv

  _, adv = jax.lax.scan(step, jnp.zeros_like(m[:, 0]), (delta.T, next_m.T),
                        reverse=True)
  advantages = adv.T * m
  return advantages, advantages + _f32(values)


# ------------------------------------------------------------ group baselines

def group_advantages(scores, method, eps=1e-6):
  """Critic-free advantages from K samples of each prompt: scores [B, K] -> [B, K].

  "grpo":    (s - mean) / (std + eps) over the group, std with ddof = 1 like the
             GRPO reference code's torch.std (Shao et al. 2024, sec. 4.1.2);
  "rloo":    s_i minus the mean of the other K - 1 samples (REINFORCE leave-one-out,
             Kool et al. 2019; Ahmadian et al. 2024), = K / (K - 1) * (s - mean);
  "dr_grpo": s - mean, no division by the std (Dr. GRPO, Liu et al. 2025: the std
             up-weights prompts that are too easy or too hard).
  Needs K >= 2 (a group of one has no baseline).
  """
  s = _f32(scores)
  k = s.shape[-1]
  if k < 2:
    raise ValueError(f"group_advantages needs K >= 2 samples per prompt, got {k}")
  mean = jnp.mean(s, axis=-1, keepdims=True)
  if method == "grpo":
    std = jnp.std(s, axis=-1, keepdims=True, ddof=1)
    return (s - mean) / (std + eps)
  if method == "rloo":
    return s - (jnp.sum(s, axis=-1, keepdims=True) - s) / (k - 1)
  if method == "dr_grpo":
    return s - mean
  raise ValueError(f"group advantage method must be 'grpo', 'rloo' or 'dr_grpo', got {method!r}")


# ---------------------------------------------------------------------- losses

def aggregate(per_token, mask, mode="token"):
  """Reduce a per-token loss [B, T] to a scalar over the valid tokens.

  "token":    sum over all valid tokens / their number (PPO as in lm-human-preferences;
              DAPO, Yu et al. 2025, sec. 3.3: long responses are not down-weighted);
  "sequence": mean over each response's tokens, then over responses (GRPO, Shao et
              al. 2024, eq. 3: the 1/|o_i| factor);
  "constant": sum over each response's tokens / T (the fixed response budget), then
              mean over responses (Dr. GRPO, Liu et al. 2025: no length normalisation,
              so the gradient does not favour long wrong answers and short right ones).
  """
  m = _f32(mask)
  x = _f32(per_token) * m
  if mode == "token":
    return masked_mean(per_token, mask)
  if mode == "sequence":
    return jnp.mean(jnp.sum(x, -1) / jnp.maximum(jnp.sum(m, -1), 1.0))
  if mode == "constant":
    return jnp.mean(jnp.sum(x, -1) / m.shape[-1])
  raise ValueError(f"loss aggregation must be 'token', 'sequence' or 'constant', got {mode!r}")


def policy_loss(logp, old_logp, advantages, mask, clip_eps, agg="token"):
  """PPO clipped surrogate (Schulman et al. 2017, eq. 7), reduced by `aggregate`
  (PPO: the masked token mean; GRPO-family stages choose).

  Returns (loss, {'clipfrac', 'approxkl', 'ratio'}); approxkl is
  0.5 * mean((logp - old_logp)^2) as logged by lm-human-preferences.
  """
  log_ratio = _f32(logp) - _f32(old_logp)
  ratio = jnp.exp(log_ratio)
  adv = _f32(advantages)
  pg1 = -adv * ratio
  pg2 = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
  loss = aggregate(jnp.maximum(pg1, pg2), mask, agg)
  return loss, {
      'clipfrac': masked_mean((pg2 > pg1).astype(jnp.float32), mask),
      'approxkl': 0.5 * masked_mean(jnp.square(log_ratio), mask),
      'ratio': masked_mean(ratio, mask),
  }


def value_loss(values, old_values, returns, mask, clip_eps):
  """Clipped value loss: 0.5 * mean(max((V - R)^2, (clip(V, V_old +- eps) - R)^2)).

  Value clipping as in OpenAI baselines' PPO2 and lm-human-preferences (Huang et
  al. 2024 keep it). Returns (loss, {'vf_clipfrac'}).
  """
  v, v_old, ret = _f32(values), _f32(old_values), _f32(returns)
  v_clip = v_old + jnp.clip(v - v_old, -clip_eps, clip_eps)
  l1 = jnp.square(v - ret)
  l2 = jnp.square(v_clip - ret)
  loss = 0.5 * masked_mean(jnp.maximum(l1, l2), mask)
  return loss, {'vf_clipfrac': masked_mean((l2 > l1).astype(jnp.float32), mask)}


# ------------------------------------------------------- reward-model ensembles

AGGREGATES = ("mean", "wco", "uwo")


def aggregate_rewards(member_scores, how: str, uwo_coef: float = 1.0):
  """Combine an ensemble's scores [N, B] into one reward per sample [B].

  mean: the ensemble mean (Coste et al. 2024 "Reward Model Ensembles Help Mitigate
        Overoptimization", sec. 3; Eisenstein et al. 2023 "Helping or Herding?").
  wco:  worst-case optimisation, the minimum over members (Coste et al. 2024, eq. 3).
  uwo:  uncertainty-weighted optimisation, mean - uwo_coef * the variance over members
        (population variance, ddof=0; Coste et al. 2024, eq. 4, their lambda = uwo_coef).
  A single member ([1, B]) gives its own scores back for every `how` (variance 0).
  """
  s = _f32(member_scores)
  if how == "mean":
    return jnp.mean(s, axis=0)
  if how == "wco":
    return jnp.min(s, axis=0)
  if how == "uwo":
    return jnp.mean(s, axis=0) - uwo_coef * jnp.var(s, axis=0)
  raise ValueError(f"unknown ensemble aggregation {how!r}; use one of {AGGREGATES}")
