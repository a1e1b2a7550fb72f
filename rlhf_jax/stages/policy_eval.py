"""What PPO, best-of-K and evaluate share: the frozen reward model, sampling, and
the held-out evaluation that puts every arm on one gold/proxy-vs-KL frontier.

Every arm is measured the same way (Gao et al. 2022): sample one response per
held-out prompt from the policy at the evaluation temperature with a fixed
key; gold = `ctx.gold` (the synthetic world's scorer or a gold reward model,
config.label.annotator: the stand-in for human labels);
proxy = the normalised reward model; KL(policy || SFT) = mean over prompts of
the summed per-token log-ratio of the sampled response (k1, an unbiased
estimate); win rate = fraction of prompts where the policy's response beats
the SFT policy's response by gold (ties count half).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax import rl
from rlhf_jax.losses import token_logprobs
from rlhf_jax.sampling import SampleConfig, make_generate
from rlhf_jax.stages import common
from rlhf_jax.train import sharding as sh
from rlhf_jax.train import state as st


def last_index(mask):
  """Index of the last real token of each row (reward read there: EOS)."""
  t = jnp.arange(mask.shape[-1])
  return jnp.max(jnp.where(mask, t, 0), axis=-1)


def reward_scores(model, params, tokens, mask, gain, bias):
  """Normalised reward-model score at the last real token: gain * raw + bias."""
  out = model.apply({"params": params}, tokens, mask, logits=False, scalar=True)
  raw = jnp.take_along_axis(out["scalar"], last_index(mask)[:, None], axis=-1)[:, 0]
  return gain * raw + bias, raw


def seq_logprobs(model, params, tokens, mask, prompt_len: int, temperature: float):
  """Per-token log-probs [B, N] of the response part (positions prompt_len..) under `params`."""
  out = model.apply({"params": params}, tokens, mask)
  return token_logprobs(out["logits"], tokens, temperature)[:, prompt_len - 1:]


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class Aggregation:
  """How an ensemble's member scores combine (reward.aggregate, reward.uwo_coef): a static
  node of the frozen reward pytree, so jitted steps specialise on it."""
  how: str = "mean"
  uwo_coef: float = 1.0


def frozen_scores(model, frozen, tokens, mask):
  """(score, raw) [B] of the frozen reward pytree (`RewardModel.frozen`).

  One reward model (scalar gain): gain * raw + bias. An ensemble (params stacked on a
  leading member axis, gain / bias [N], an `aggregate` Aggregation): each member's forward
  (vmapped over members) normalised by its own gain / bias, combined by
  `rl.aggregate_rewards` (Coste et al. 2024); raw is the members' mean raw score."""
  if jnp.ndim(frozen["gain"]) == 0:
    return reward_scores(model, frozen["reward"], tokens, mask, frozen["gain"], frozen["bias"])
  agg = frozen["aggregate"]
  score, raw = jax.vmap(lambda p, g, b: reward_scores(model, p, tokens, mask, g, b))(
      frozen["reward"], frozen["gain"], frozen["bias"])
  return rl.aggregate_rewards(score, agg.how, agg.uwo_coef), jnp.mean(raw, axis=0)


class RewardModel:
  """A reward stage's model and its normalisation (gain, bias), frozen.

  stage: the stage directory it comes from ("reward"; e.g. an online round's). An ensemble
  (reward.ensemble > 1; its checkpoint names its members) holds stacked params, per-member
  gain / bias ([N]) and scores with reward.aggregate. RL stages pass `frozen(mesh)` into
  their jitted steps and score it with `frozen_scores` (rollout.sequence_scores does)."""
  members = None  # an ensemble's member ids; None: one reward model
  aggregation = Aggregation()

  def __init__(self, ctx, model, stage: str = "reward"):
    self.model = model
    self.params, meta = common.load_params(ctx, stage, model)
    self.members = (meta.get("ensemble") or {}).get("members")  # None: one reward model
    summary = ctx.summary(stage)
    rc = ctx.config.reward
    self.aggregation = Aggregation(rc.get("aggregate", "mean"), float(rc.get("uwo_coef", 1.0)))
    if self.members is None:
      self.gain, self.bias = float(summary["reward_gain"]), float(summary["reward_bias"])
      fn = functools.partial(reward_scores, model, gain=self.gain, bias=self.bias)
      self._score = jax.jit(fn)
    else:
      self.gain = np.asarray(summary["reward_gain"], np.float32)
      self.bias = np.asarray(summary["reward_bias"], np.float32)
      if self.gain.shape != (len(self.members),):
        raise ValueError(f"{ctx.stage_dir(stage)}: summary.json has {self.gain.shape} gains for "
                         f"{len(self.members)} ensemble members; re-run the reward stage")
      fn = lambda p, t, m: frozen_scores(model, {"reward": p, "gain": self.gain,
                                                 "bias": self.bias, "aggregate": self.aggregation}, t, m)
      self._score = jax.jit(fn)

  @property
  def ensemble(self) -> int:
    """Members (1: one reward model)."""
    return 1 if self.members is None else len(self.members)

  def score(self, tokens, mask):
    return self._score(self.params, tokens, mask)[0]

  def frozen(self, mesh, store=None) -> dict:
    """The pytree RL stages pass into their jitted steps: {"reward": params (through
    `store`, e.g. a LoRA FineTune's), "gain", "bias"} as replicated global arrays (a
    host-local scalar would live on one device only with several processes), plus the
    static "aggregate" for an ensemble. Score it with `frozen_scores`."""
    rep = lambda v: jax.make_array_from_callback(np.shape(v), sh.replicated(mesh),
                                                 lambda idx: np.asarray(v, np.float32)[idx])
    out = {"reward": self.params if store is None else store(self.params),
           "gain": rep(self.gain), "bias": rep(self.bias)}
    if self.members is not None:
      out["aggregate"] = self.aggregation
    return out

  def _member0(self):
    """(params, gain, bias) of one model: the reward model, or an ensemble's member 0."""
    if self.members is None:
      return self.params, self.gain, self.bias
    return (jax.jit(lambda p: jax.tree.map(lambda x: x[0], p),
                    out_shardings=st.param_shardings(self.model))(self.params),
            float(self.gain[0]), float(self.bias[0]))

  def normalized_head(self):
    """The scalar head folded so it outputs gain * raw + bias (see normalized_params)."""
    params, gain, bias = self._member0()
    head = params["scalar_head"]
    return jax.jit(lambda h: {"kernel": h["kernel"] * gain,
                              "bias": h["bias"] * gain + bias})(head)

  def normalized_params(self):
    """A copy of the params whose scalar head outputs gain * raw + bias: the normalised
    score. PPO's critic starts here, so its values begin in the units of the rewards it
    learns to predict (InstructGPT initialises the value function from the RM). An
    ensemble gives member 0's (one model's backbone and head, normalised as it is in
    the ensemble): the critic predicts returns, it need not reproduce the aggregate."""
    params, gain, bias = self._member0()

    def fold(params):
      head = params["scalar_head"]
      return {**jax.tree.map(jnp.copy, params),
              "scalar_head": {"kernel": head["kernel"] * gain,
                              "bias": head["bias"] * gain + bias}}
    return jax.jit(fold)(params)


def sample_config(ctx, response_len: int, temperature: float) -> SampleConfig:
  tok = ctx.sources.tokenizer
  return SampleConfig(max_new_tokens=response_len, eos_id=tok.eos_id, pad_id=tok.pad_id,
                      temperature=temperature)


def decode_responses(ctx, response, response_mask) -> list[str]:
  tok = ctx.sources.tokenizer
  r = np.where(np.asarray(response_mask), np.asarray(response), tok.pad_id)
  return tok.decode_batch(r.tolist())


class SampleLog:
  """DIR/<stage>/samples.jsonl: every evaluation's samples, one row per held-out prompt
  (prompt, response, proxy, gold where there is a scorer, ended, policy and
  iteration/round). Researchers read samples before they trust a curve (issue 14).

  A resumed stage keeps the rows `keep(row)` says were final (evaluations it will
  not redo) and skips an evaluation whose rows are already there, so a resumed
  run leaves the rows an uninterrupted one would. Only process 0 writes.
  """

  def __init__(self, path: str, keep=lambda row: False):
    self.path = path
    self.active = jax.process_index() == 0
    rows = []
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            row = json.loads(line)
          except ValueError:
            break  # a torn last line from a hard kill
          if keep(row):
            rows.append(row)
    self.seen = {self._key(r) for r in rows}
    if self.active:
      tmp = f"{path}.tmp{os.getpid()}"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
      os.replace(tmp, path)

  @classmethod
  def for_stage(cls, ctx, name: str, start: int) -> "SampleLog":
    """A policy stage's log, resumed at iteration `start`: its evaluations up to there are
    final and kept; later ones (and the closing SFT/final ones) are written again."""
    return cls(os.path.join(ctx.stage_dir(name), "samples.jsonl"),
               keep=lambda r: r.get("policy") == name and r.get("iteration", 0) <= start)

  @staticmethod
  def _key(row: dict) -> tuple:
    return tuple((k, row.get(k)) for k in ("policy", "iteration", "round"))

  def write(self, tag: dict, samples: dict, prompts: list[str]) -> None:
    if self._key(tag) in self.seen:
      return
    self.seen.add(self._key(tag))
    if not self.active:
      return
    with open(self.path, "a") as f:
      for j, i in enumerate(samples["index"]):
        row = {**tag, "prompt_index": int(i), "prompt": prompts[int(i)],
               "response": samples["texts"][j], "proxy": float(samples["proxy"][j]),
               "ended": bool(samples["ended"][j])}
        if np.isfinite(samples["gold"][j]):
          row["gold"] = float(samples["gold"][j])
        f.write(json.dumps(row) + "\n")


class PolicyEvaluator:
  """Gold / proxy / KL-from-SFT / win-rate of a policy on the held-out prompts.

  With `log` (a SampleLog), `evaluate(params, tag)` also writes the samples it scored.
  """

  def __init__(self, ctx, model, reward: RewardModel, sft_params, *, response_len: int,
               temperature: float, batch_size: int, log: SampleLog | None = None):
    self.ctx, self.model, self.reward, self.sft_params = ctx, model, reward, sft_params
    self.log = log
    self.texts, self.prompts = ctx.sources.prompt_set("eval")
    self.batch_size = min(batch_size, len(self.texts) // jax.process_count() * jax.process_count())
    self.prompt_len = self.prompts["prompt"].shape[1]
    self.temperature = temperature
    self.gen = make_generate(model, sample_config(ctx, response_len, temperature), ctx.mesh,
                             st.param_shardings(model))
    self._logp = jax.jit(functools.partial(seq_logprobs, model, prompt_len=self.prompt_len,
                                           temperature=temperature))
    self._sft_gold = None

  def _batches(self):
    n = len(self.texts) // self.batch_size * self.batch_size
    for i in range(0, n, self.batch_size):
      yield i, sh.host_slice(self.prompts, np.arange(i, i + self.batch_size), self.ctx.mesh)

  def samples(self, params, key=0):
    """Sample once per held-out prompt; returns host arrays and per-sample figures."""
    out = {"gold": [], "proxy": [], "kl": [], "length": [], "ended": [], "index": [], "texts": []}
    for i, host in self._batches():
      b = sh.put_batch(host, self.ctx.mesh)
      g = self.gen(params, b["prompt"], b["prompt_mask"], jax.random.key(1_000_003 + key + i))
      proxy = self.reward.score(g["tokens"], g["mask"])
      lp = self._logp(params, g["tokens"], g["mask"])
      lp_sft = self._logp(self.sft_params, g["tokens"], g["mask"])
      m = g["response_mask"]
      kl = jnp.sum((lp - lp_sft) * m, axis=-1)
      resp, rmask = sh.to_host(g["response"]), sh.to_host(m)
      idx = sh.to_host(b["index"])
      texts = decode_responses(self.ctx, resp, rmask)
      ended = sh.to_host(g["ended"])
      gold = self.ctx.gold.score([self.texts[j] for j in idx], texts, ended)
      out["gold"].append(gold if gold is not None else np.full(len(texts), np.nan))
      out["proxy"].append(sh.to_host(proxy))
      out["kl"].append(sh.to_host(kl))
      out["length"].append(rmask.sum(-1))
      out["ended"].append(ended)
      out["index"].append(idx)
      out["texts"].extend(texts)
    return {k: (np.concatenate(v) if k != "texts" else v) for k, v in out.items()}

  def sft_gold(self):
    if self._sft_gold is None:
      self._sft_gold = self.samples(self.sft_params)["gold"]
    return self._sft_gold

  def evaluate(self, params, tag: dict | None = None) -> dict:
    """Held-out figures. Without a gold scorer (data.source=files) gold_reward and
    win_rate_vs_sft are absent, not 0: there is nothing to compare. tag (e.g.
    {"policy": "ppo", "iteration": 6}) names the samples written to the log."""
    s = self.samples(params)
    if tag is not None and self.log is not None:
      self.log.write(tag, s, self.texts)
    out = {"proxy_reward": float(np.mean(s["proxy"])), "kl": float(np.mean(s["kl"])),
           "response_length": float(np.mean(s["length"])),
           "no_eos_frac": float(1.0 - np.mean(s["ended"]))}
    if self.ctx.gold.available:
      base = self.sft_gold()
      win = np.mean((s["gold"] > base) + 0.5 * (s["gold"] == base))
      out = {"gold_reward": float(np.mean(s["gold"])), **out, "win_rate_vs_sft": float(win)}
    return out


def _stop_if_preempted():
  """Sampling-only stages (label, normalisation, best-of-K rounds) have no loop to save
  from; they keep no partial state and are deterministic, so they stop and re-run."""
  from rlhf_jax.train import loop
  if loop.ACTIVE is not None and loop.ACTIVE.requested():
    raise loop.Preempted("preempted (SIGTERM) while sampling; finished work is saved, "
                         "re-run the same command to continue")


def sample_rows(ctx, gen, params, prompts: dict, batch_size: int, key, reward: RewardModel | None = None):
  """Sample one response for every row of `prompts` (host arrays), in global batches.

  The last partial batch is padded by repeating rows and the extras dropped,
  so every row gets exactly one sample whatever the batch size. Returns host
  arrays: response, response_mask, ended, index, texts and (with a reward
  model) proxy scores.
  """
  out = {"response": [], "response_mask": [], "ended": [], "proxy": []}
  for start, keep, host in sh.global_batches(prompts, batch_size, ctx.mesh):
    _stop_if_preempted()
    b = sh.put_batch(host, ctx.mesh)
    g = gen(params, b["prompt"], b["prompt_mask"], jax.random.fold_in(key, start))
    for k in ("response", "response_mask", "ended"):
      out[k].append(sh.to_host(g[k])[:keep])
    if reward is not None:
      out["proxy"].append(sh.to_host(reward.score(g["tokens"], g["mask"]))[:keep])
  res = {k: np.concatenate(v) for k, v in out.items() if v}
  res["texts"] = decode_responses(ctx, res["response"], res["response_mask"])
  return res
