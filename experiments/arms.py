"""The ablation's arm registry: arm name pattern -> stage + config overrides + compute.

One entry per method family (DESIGN.md sec. 5: a registry, not an if-chain). An arm
name such as `grpo_k8` matches one pattern; the entry turns the match into the
stage to run, the config overrides that make the arm, the config key that sets how
long it runs (`steps_key`), and the stage's own per-step compute estimate, so the
runner can match every arm to one FLOP (or sampled-token) budget.

  ppo_kl<beta>     PPO, fixed KL coefficient (0 = no penalty)     Ziegler et al. 2019
  ppo_adaptive     PPO, adaptive KL controller                    Ziegler et al. 2019
  bok_k<K>         best-of-K rejection-sampling fine-tuning       Dong et al. 2023
  dpo_b<beta>      DPO on the label stage's rankings              Rafailov et al. 2023
  ipo_b<beta>      IPO                                            Azar et al. 2023
  online_dpo_b<beta> DPO on fresh pairs ranked by the RM each step Guo et al. 2024
  grpo_k<K>        GRPO: (s - mean) / std, k3 KL loss, 1/|o| mean Shao et al. 2024
  rloo_k<K>        RLOO: leave-one-out baseline, KL in reward     Ahmadian et al. 2024
  drgrpo_k<K>      Dr. GRPO: s - mean, constant normaliser        Liu et al. 2025
  ppo_online_r<R>  R rounds of label -> RM -> PPO (iterated online) Bai et al. 2022
  ppo_ens<N>_<agg> PPO on an N-member reward ensemble, aggregated Coste et al. 2024
                   by agg = mean | wco (worst case) | uwo (mean - lambda var)
  bok_ens<N>_<agg> best-of-K (config.best_of_k.k) on the same     Coste et al. 2024

An ensemble arm's reward model is trained once per N and shared by every arm that
uses it (ppo_vs_bok: DIR/shared_ens<N>/reward); `ensemble_of(overrides)` says which.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

_NUM = r"([0-9.]+(?:e-?\d+)?)"


def ppo_compute(cfg, model_cfg) -> dict:
  """Per PPO iteration (the stage's own estimate)."""
  from rlhf_jax.stages.ppo import compute_per_iteration
  return compute_per_iteration(cfg, model_cfg, cfg.data.prompt_len)


def bok_compute(cfg, model_cfg) -> dict:
  """Per best-of-K round, with the conventions of `stages.best_of_k._round_compute`.

  tokens_sampled = prompts_per_round * K * response_len. FLOPs: sampling and
  reward-model scoring one forward per prompt+response token each, plus the
  fine-tuning's train.steps * batch_size * (prompt_len + response_len) tokens at
  3 forwards per token (which does not depend on K).
  """
  from rlhf_jax.model.transformer import flops_per_token
  b, resp = cfg.best_of_k, cfg.ppo.response_len
  seq = cfg.data.prompt_len + resp
  samples = b.prompts_per_round * b.k
  trained = b.train.steps * b.train.batch_size * seq
  return {"tokens_sampled": samples * resp, "tokens_trained": trained,
          "flops": (1 + cfg.reward.get("ensemble", 1)) * samples * seq * flops_per_token(model_cfg, seq) / 3
                   + trained * flops_per_token(model_cfg, seq)}


def dpo_compute(cfg, model_cfg) -> dict:
  """Per DPO step, plus `offline_flops` (reference log-probs, once) for an upper bound on
  the pair count: every pair of the K-way rankings of the training prompts (ties drop some)."""
  from rlhf_jax.stages.dpo import compute
  k = cfg.label.k
  per_prompt = k * (k - 1) // 2 if cfg.dpo.pairs == "all" else k - 1
  prompts = int(cfg.data.reward_prompts * (1 - cfg.dpo.eval_frac))
  return compute(cfg, model_cfg, prompts * per_prompt)


def online_dpo_compute(cfg, model_cfg) -> dict:
  from rlhf_jax.stages.online_dpo import compute_per_step
  return compute_per_step(cfg, model_cfg, cfg.data.prompt_len)


def grpo_compute(cfg, model_cfg) -> dict:
  from rlhf_jax.stages.grpo import compute_per_iteration
  return compute_per_iteration(cfg, model_cfg, cfg.data.prompt_len)


def online_compute(cfg, model_cfg) -> dict:
  """Per PPO iteration of every round (rounds x PPO), plus `offline_flops` /
  `offline_tokens_sampled`: the rounds - 1 reward-model refreshes (labelling the policy's
  samples, RM training, renormalisation), whatever the iteration count; `label_flops`
  is their labelling part (`stages.online.refresh_compute`)."""
  from rlhf_jax.stages import online
  from rlhf_jax.stages.ppo import compute_per_iteration
  r = cfg.online.rounds
  per = compute_per_iteration(cfg, model_cfg, cfg.data.prompt_len)
  refresh = online.refresh_compute(cfg, model_cfg, online.prompts_per_round(cfg, cfg.data.reward_prompts))
  return {"flops": r * per["flops"], "tokens_sampled": r * per["tokens_sampled"],
          "offline_flops": (r - 1) * refresh["flops"],
          "offline_tokens_sampled": (r - 1) * refresh["tokens_sampled"],
          "label_flops": (r - 1) * refresh["label_flops"]}


@dataclasses.dataclass(frozen=True)
class ArmKind:
  pattern: str  # full-match regex over the arm name
  stage: str
  overrides: Callable  # re.Match -> {dotted config key: value}
  steps_key: str  # what the budget sets (iterations / rounds / steps)
  compute: Callable  # (cfg, model_cfg) -> per-step {"flops", "tokens_sampled", ...}
  min_steps: int = 1  # best-of-K needs >= 2 rounds for a frontier
  unit: str = "iterations"


def _grpo(advantage, kl_mode, agg):
  return lambda m: {"grpo.k": int(m.group(1)), "grpo.advantage": advantage,
                    "grpo.kl_mode": kl_mode, "grpo.loss_agg": agg}


def _ens(m):
  return {"reward.ensemble": int(m.group(1)), "reward.aggregate": m.group(2)}


def ensemble_of(overrides: dict) -> int:
  """The reward ensemble's size an arm scores with (1: the shared single reward model)."""
  return int(overrides.get("reward.ensemble", 1))


REGISTRY = (
    ArmKind("ppo_adaptive", "ppo", lambda m: {"ppo.kl_mode": "adaptive"}, "ppo.iterations",
            ppo_compute),
    ArmKind(rf"ppo_kl{_NUM}", "ppo",
            lambda m: {"ppo.kl_mode": "fixed", "ppo.kl_coef": float(m.group(1))},
            "ppo.iterations", ppo_compute),
    ArmKind(r"bok_k([1-9]\d*)", "best_of_k", lambda m: {"best_of_k.k": int(m.group(1))},
            "best_of_k.rounds", bok_compute, min_steps=2, unit="rounds"),
    ArmKind(rf"dpo_b{_NUM}", "dpo",
            lambda m: {"dpo.loss_type": "sigmoid", "dpo.beta": float(m.group(1))},
            "dpo.steps", dpo_compute, unit="steps"),
    ArmKind(rf"ipo_b{_NUM}", "dpo",
            lambda m: {"dpo.loss_type": "ipo", "dpo.beta": float(m.group(1)),
                       "dpo.label_smoothing": 0.0}, "dpo.steps", dpo_compute, unit="steps"),
    ArmKind(rf"online_dpo_b{_NUM}", "dpo",
            lambda m: {"dpo.online": True, "dpo.loss_type": "sigmoid", "dpo.beta": float(m.group(1))},
            "dpo.steps", online_dpo_compute, unit="steps"),
    ArmKind(r"grpo_k(\d+)", "grpo", _grpo("grpo", "loss", "sequence"), "grpo.iterations",
            grpo_compute),
    ArmKind(r"rloo_k(\d+)", "grpo", _grpo("rloo", "reward", "token"), "grpo.iterations",
            grpo_compute),
    ArmKind(r"drgrpo_k(\d+)", "grpo", _grpo("dr_grpo", "loss", "constant"), "grpo.iterations",
            grpo_compute),
    # steps_key counts PPO iterations per round; one "step" = one iteration of every round.
    ArmKind(r"ppo_online_r([1-9]\d*)", "online", lambda m: {"online.rounds": int(m.group(1))},
            "online.ppo_iterations", online_compute, unit="iterations per round"),
    ArmKind(r"ppo_ens([1-9]\d*)_(mean|wco|uwo)", "ppo", _ens, "ppo.iterations", ppo_compute),
    ArmKind(r"bok_ens([1-9]\d*)_(mean|wco|uwo)", "best_of_k", _ens, "best_of_k.rounds",
            bok_compute, min_steps=2, unit="rounds"),
)

NAMES = ("ppo_kl<beta>, ppo_adaptive, bok_k<K>, dpo_b<beta>, ipo_b<beta>, online_dpo_b<beta>, "
         "grpo_k<K>, rloo_k<K>, drgrpo_k<K>, ppo_online_r<R>, ppo_ens<N>_<mean|wco|uwo>, "
         "bok_ens<N>_<mean|wco|uwo>")


def lookup(name: str) -> tuple[ArmKind, dict]:
  """Arm name -> (its registry entry, config overrides); ValueError naming the patterns."""
  for kind in REGISTRY:
    m = re.fullmatch(kind.pattern, name)
    if m:
      try:
        overrides = kind.overrides(m)
      except ValueError:
        break
      if "grpo.k" in overrides and overrides["grpo.k"] < 2:
        raise ValueError(f"arm {name!r}: a group needs K >= 2 samples per prompt")
      if overrides.get("dpo.beta") == 0:
        raise ValueError(f"arm {name!r}: beta must be > 0")
      return kind, overrides
  raise ValueError(f"unknown arm {name!r}: use {NAMES}")
