"""Optimizer from config: AdamW, warmup + decay schedule, global-norm clipping."""
from __future__ import annotations

import jax
import optax


def schedule(opt_cfg, total_steps: int):
  warmup = int(opt_cfg.warmup_steps)
  decay_steps = max(total_steps - warmup, 1)
  end = opt_cfg.lr * opt_cfg.end_lr_frac
  kind = opt_cfg.schedule
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(opt_cfg.lr, decay_steps, alpha=opt_cfg.end_lr_frac)
  elif kind == "linear":
    decay = optax.linear_schedule(opt_cfg.lr, end, decay_steps)
  elif kind == "constant":
    decay = optax.constant_schedule(opt_cfg.lr)
  else:
    raise ValueError(f"optimizer.schedule: unknown schedule {kind!r}")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, opt_cfg.lr, warmup), decay], [warmup])


def _decayed(params):
  """Weight decay on matrices only (kernels, embedding), not on norm scales or biases,
  which decay would pull toward 0 (GPT-2 / nanoGPT practice)."""
  return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(opt_cfg, total_steps: int) -> optax.GradientTransformation:
  """AdamW with eps exposed (Huang et al. 2024: PyTorch's 1e-8 vs TF's 1e-5 matters in PPO)."""
  return optax.chain(
      optax.clip_by_global_norm(opt_cfg.clip_norm) if opt_cfg.clip_norm > 0 else optax.identity(),
      optax.adamw(schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                  weight_decay=opt_cfg.weight_decay, mask=_decayed),
  )
