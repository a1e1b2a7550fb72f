"""Pieces every stage uses: build/restore a train state, run a supervised loop.

`train_supervised` is the whole of pretraining and SFT (and the fine-tuning
inside best-of-K and the reward model): a loss function over a batch, a
Batcher, an eval set. It restores an interrupted run exactly and starts a new
one from `init_params` (another stage's checkpoint) or from random weights.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.data.batching import Batcher
from rlhf_jax.data.sources import stream_seed
from rlhf_jax.model import stacking
from rlhf_jax.model.transformer import DTYPES, NOT_ARCHITECTURE, architecture
from rlhf_jax.train import ensemble as ens
from rlhf_jax.train import lora
from rlhf_jax.train import sharding as sh
from rlhf_jax.train import state as st
from rlhf_jax.train.checkpoint import Checkpointer, CheckpointMismatch, latest_meta, restore_item
from rlhf_jax.train.loop import train_loop
from rlhf_jax.train.optim import make_optimizer
from rlhf_jax.train.step import compile_step, make_train_step


# Model architecture revision, checked with the shapes: 2 = embedding std d^-0.5 and
# untied-scale tied logits (checkpoints of revision 1 would load with logits sqrt(d) off).
ARCH = 2

# Config fields that do not change a run's trajectory, so a resume may change them.
_NOT_TRAJECTORY = ("log_every", "eval_every", "ckpt_every", "eval_batches", "nonfinite")


def model_meta(ctx) -> dict:
  return {"model": {**dataclasses.asdict(ctx.model_cfg), "arch": ARCH}}


def architecture_meta(cfg) -> dict:
  """What an earlier stage's checkpoint must agree on with the model of `cfg` reading it:
  the architecture fields (transformer.architecture: model.remat, dtype, attention,
  dropout and scan_layers may differ) and the revision."""
  return {"model": {**architecture(dataclasses.asdict(cfg)), "arch": ARCH}}


def run_meta(ctx, section) -> dict:
  """The seed and every field of the stage's config section that shapes its trajectory,
  saved with each checkpoint and compared on resume by `check_resume`."""
  def flat(d, prefix=""):  # dotted keys: a change reads "opt.lr 0.003 -> 0.001"
    out = {}
    for k, v in d.items():
      if k not in _NOT_TRAJECTORY:
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out
  return {"run": {"seed": ctx.config.seed, **flat(section.to_dict())}}


# Resuming under a different value of these would silently change which data the
# remaining steps see (the batchers are functions of seed, batch size and step) and
# every step's RNG key, so it is refused.
_DATA_ORDER = ("seed", "batch_size", "rollout_batch", "ptx_batch")


def resume(ckpt: Checkpointer, abstract, name: str, meta: dict):
  """Restore the latest checkpoint: everything in `meta` but "run" must match, the model in
  its architecture and layer layout (the state is restored in the layout it was saved in);
  how the model runs (model.remat, dtype, ...) may change, as the pipeline allows for an
  interrupted stage, and is announced by `check_resume`. Returns (state, saved meta)."""
  expect = {k: v for k, v in meta.items() if k not in ("run", "model")}
  if "model" in meta:
    m = meta["model"]
    expect["model"] = {**architecture(m), "scan_layers": m.get("scan_layers", False)}
  state, saved = ckpt.restore(abstract, expect_meta=expect)
  check_resume(name, saved, meta, ckpt.directory)
  return state, saved


def check_resume(name: str, saved: dict, meta: dict, where: str) -> None:
  """Refuse a resume that would change the data order; announce any other change
  (a lower learning rate after a divergence, more steps) in one line."""
  was, now = saved.get("model") or {}, meta.get("model") or {}
  diff = {f"model.{k}": (was[k], now[k]) for k in NOT_ARCHITECTURE
          if k in was and k in now and was[k] != now[k]}
  old, new = saved.get("run"), meta["run"]
  if old is not None:  # None: written before run metadata existed
    diff.update({k: (old.get(k), v) for k, v in new.items() if old.get(k) != v})
  order = {k: v for k, v in diff.items() if k in _DATA_ORDER}
  if order:
    raise CheckpointMismatch(
        f"{where}: checkpoint was written with a different data order (checkpoint, config): "
        f"{json.dumps(order)}; use a fresh --workdir or the original values")
  if diff:
    print(f"[{name}] resuming with changed config (checkpoint -> now): "
          + ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items()), flush=True)


def checkpointer(ctx, name: str) -> Checkpointer:
  c = ctx.config.checkpoint
  return Checkpointer(os.path.join(ctx.stage_dir(name), "checkpoints"), keep=c.keep,
                      async_save=c.async_save)


def load_params(ctx, stage: str, model, item: str = "params"):
  """Params of an earlier stage's latest checkpoint, placed on this model's shardings.

  A LoRA stage's checkpoint holds its trainable part and names its base (`meta.lora`):
  the base is loaded (recursively: it may be LoRA too), stored as the stage stored it
  (quantised for QLoRA) and the adapters merged in, so every caller gets full weights.
  An ensemble's checkpoint (`meta.ensemble`: the reward stage with reward.ensemble > 1)
  holds its members' params stacked on a leading axis; they are returned stacked.
  The checkpoint's model must have `model`'s architecture (`architecture_meta`: a stage
  may run with another model.remat, dtype, attention or dropout than the one it reads);
  one written with the other `model.scan_layers` layout is read in its own layout and
  converted (rlhf_jax/model/stacking.py)."""
  latest = latest_meta(ctx.stage_dir(stage))[1]
  saved = latest if item == "params" else {}
  stored = bool((latest.get("model") or {}).get("scan_layers", False))
  if stored != model.cfg.scan_layers:
    other = st.make_model(dataclasses.replace(model.cfg, scan_layers=stored), model.mesh, model.rules)
    params, meta = load_params(ctx, stage, other, item)
    target = st.abstract_params(model)
    if saved.get("ensemble"):
      target = ens.stack_abstract(target, len(saved["ensemble"]["members"]))
    convert = lambda p: stacking.to_layout(p, model.cfg.scan_layers, axis=1 if saved.get("ensemble") else 0)
    return jax.jit(convert, out_shardings=st.shardings_of(target))(params), meta
  expect = architecture_meta(model.cfg)
  lm = saved.get("lora")
  if lm is None:
    abstract = st.abstract_params(model)
    if saved.get("ensemble"):
      abstract = ens.stack_abstract(abstract, len(saved["ensemble"]["members"]))
    return restore_item(ctx.stage_dir(stage), item, abstract, expect_meta=expect)
  ft = lora.FineTune(model, lora.spec_from_meta(lm))
  base = hf_params(ctx, model) if lm["base"] == "hf" else load_params(ctx, lm["base"], model)[0]
  trainable, meta = restore_item(ctx.stage_dir(stage), item, ft.abstract_trainable(), expect_meta=expect)
  return ft.merged(trainable, ft.store(base)), meta


def base_source(ctx) -> str:
  """Which weights the first trained stage after pretraining starts from (see base_params)."""
  return "hf" if ctx.config.model.hf and not ctx.is_done("pretrain") else "pretrain"


def base_params(ctx, model):
  """Where the first trained stage after pretraining starts: the pretrain checkpoint, or,
  with `config.model.hf` and no pretrain stage run, the Hugging Face weights."""
  if base_source(ctx) == "hf":
    return hf_params(ctx, model)
  return load_params(ctx, "pretrain", model)[0]


def fine_tune(ctx, stage: str, model, heads=()) -> lora.FineTune:
  """How `stage` trains `model`: every weight, or LoRA adapters (`config.lora`, for the
  stages in lora.stages) plus `heads` (top-level params trained in full, e.g. a fresh
  scalar head) on a frozen, possibly quantised base. Stages only use the FineTune's
  trainable/frozen split and do not know which method made it."""
  return lora.FineTune(model, lora.spec_from_config(ctx.config.get("lora"), stage, heads))


class Views:
  """Which params each model of an RL step is applied with (ppo_step, grpo, online DPO).
  Full fine-tuning passes them as they are; LoRA (`lora_views`) joins the trainable
  adapters to a frozen base in `frozen` (the reference IS the policy's base; PPO's critic
  may sit on the reward model's). policy/critic(trainable, frozen); ref/reward(frozen);
  rollout(trainable, frozen): the weights the sampler decodes with."""
  policy = staticmethod(lambda t, f: t)
  critic = staticmethod(lambda t, f: t)
  rollout = staticmethod(lambda t, f: t)
  ref = staticmethod(lambda f: f["ref"])
  reward = staticmethod(lambda f: f["reward"])


def lora_views(policy_ft: lora.FineTune, sampling: str):
  """Views for LoRA: one frozen SFT base (`frozen["ref"]`, stored as `policy_ft.store`
  stores it: quantised for QLoRA) serves the policy (with adapters) and the reference
  (adapters switched off); PPO's critic adapters sit on the frozen reward model. Rollouts
  decode with the adapters merged once per iteration (`merge`) or applied in every decode
  step (`on_the_fly`), config.lora.sampling; docs/performance.md has the bench of both."""
  spec, off = policy_ft.spec, policy_ft.base_view
  dt = DTYPES[policy_ft.model.cfg.dtype]
  # The merged copy in the compute dtype, as the sampler would cast it: half the bytes.
  cast = lambda x: x.astype(dt) if x.ndim >= 2 and x.dtype == jnp.float32 else x

  class LoraViews(Views):
    policy = staticmethod(lambda t, f: lora.apply_params(t, f["ref"]))
    critic = staticmethod(lambda t, f: lora.apply_params(t, f["reward"]))
    ref = staticmethod(lambda f: off(f["ref"]))
    reward = staticmethod(lambda f: off(f["reward"]))
    rollout = staticmethod(
        (lambda t, f: jax.tree.map(cast, lora.merged_params(t, f["ref"], spec)))
        if sampling == "merge"
        else (lambda t, f: lora.apply_params(t, f["ref"])))
  return LoraViews


def policy_views(ctx, ft: lora.FineTune):
  """The Views an RL stage's step takes for its fine-tuning method."""
  return lora_views(ft, ctx.config.lora.sampling) if ft.lora else Views


def start_policy(ctx, name: str, ft: lora.FineTune, params):
  """The trainable part an RL stage starts from: fresh adapters (B = 0, so the policy
  starts exactly at `params`) whose frozen base is `params`, or, full fine-tuning, a fresh
  copy of `params` (the state is donated every step; the frozen reference is not)."""
  if ft.lora:
    return ft.init_trainable(params, jax.random.fold_in(ctx.key(name), 2**31 - 1))
  return jax.jit(lambda p: jax.tree.map(jnp.copy, p))(params)


def stage_opt(ctx, opt_cfg, ft: lora.FineTune):
  """The stage's optimizer config; a LoRA stage's learning rate times lora.lr_scale."""
  if not ft.lora:
    return opt_cfg
  o = opt_cfg.copy_and_resolve_references()
  o.lr = opt_cfg.lr * ctx.config.lora.lr_scale
  return o


def hf_params(ctx, model):
  """`config.model.hf`'s weights, read tensor by tensor onto this model's shardings."""
  from rlhf_jax import hf
  return hf.load_params(os.path.expanduser(ctx.config.model.hf), model)


class HostBatcher:
  """This process's rows of a Batcher's global batches (`get(step)`, a pure function of
  the seed and the step). The rows are those its devices hold (`sharding.process_rows`),
  so a mesh whose device order differs from the process order still gets every row once."""

  def __init__(self, arrays: dict, global_batch: int, seed: int, mesh, name: str = "dataset"):
    self.batcher = Batcher(arrays, global_batch, seed=seed, name=name)  # the global batch
    self.seed, self.global_batch = seed, global_batch
    self._rows = sh.process_rows(mesh, global_batch)

  def indices(self, step: int) -> np.ndarray:
    return self.batcher.indices(step)[self._rows]

  def get(self, step: int) -> dict:
    idx = self.indices(step)
    return {k: v[idx] for k, v in self.batcher.examples.items()}


def host_batcher(ctx, arrays: dict, global_batch: int, stream: str) -> HostBatcher:
  """Batches of one named random stream (e.g. "sft", "ppo/prompts"): its seed folds the
  name into config.seed (`sources.stream_seed`), so no two streams of any two seeds
  coincide (seed + offset made seed 1's pretraining order seed 0's SFT order)."""
  seed = stream_seed(ctx.config.seed, "batches", str(stream))
  return HostBatcher(arrays, global_batch, seed, ctx.mesh, name=str(stream))


def eval_batches(arrays: dict, batch_size: int, n_batches: int, mesh) -> list[dict]:
  """Fixed evaluation batches from the first rows (host-local slices).

  A held-out set smaller than one training batch is evaluated in one smaller
  batch (a multiple of the data-parallel size).
  """
  rows = len(next(iter(arrays.values())))
  if rows < batch_size:
    dp = sh.data_parallel_size(mesh)
    batch_size = rows // dp * dp
    if batch_size == 0:
      raise ValueError(f"evaluation set of {rows} rows is smaller than the {dp} data-parallel "
                       f"devices; use more data")
  n = min(n_batches, rows // batch_size)
  return [sh.host_slice(arrays, np.arange(i * batch_size, (i + 1) * batch_size), mesh)
          for i in range(n)]


def make_evaluator(ctx, eval_loss: Callable, batches: list[dict]):
  """Mean of eval_loss's metrics over fixed batches, one compiled function."""
  fn = jax.jit(eval_loss)

  def evaluate(params) -> dict:
    totals = None
    for b in batches:
      _, m = fn(params, sh.put_batch(b, ctx.mesh))
      m = {k: float(sh.to_host(v)) for k, v in m.items()}
      totals = m if totals is None else {k: totals[k] + m[k] for k in m}
    return {k: v / len(batches) for k, v in totals.items()}
  return evaluate


def train_supervised(ctx, name: str, tcfg, *, model, loss_fn: Callable, eval_loss: Callable,
                     train_arrays: dict, eval_arrays: dict, init_params: Callable | None,
                     extra_meta: dict | None = None, tokens_per_example: int = 0,
                     stream: str | None = None, extra_eval: Callable | None = None,
                     base: str | None = None, heads: tuple = (),
                     members: ens.Members | None = None) -> tuple[dict, dict]:
  """Train `model` on `train_arrays` with `loss_fn`; returns (summary figures, final state).

  init_params(): params to start from (another stage's checkpoint), or None
  for random initialisation. Only called when there is no checkpoint of this
  stage yet; an interrupted run resumes from its own checkpoint instead.
  stream: the batch order's random stream (default: `name`, distinct per stage/round).
  extra_eval(params, step) -> dict, if given, is merged into every evaluation (DPO adds the
  held-out policy figures that put it on the frontier).
  base: the stage init_params() loads (named in a LoRA checkpoint, whose adapters sit on
  it); heads: params a LoRA stage trains in full. The returned state's `params` are full
  weights (adapters merged) whichever way the stage trained.
  members: train an ensemble in one program (`train.ensemble`): init_params() then returns
  the members' params stacked on a leading axis, each member gets its own batch stream
  ("<stream>/member<id>", its own rows if `members.rows`) and step keys, evaluations are
  means over members, and the checkpoint's meta names the members (`load_params`).
  """
  stage_dir = ctx.stage_dir(name)
  ft = fine_tune(ctx, name, model, heads)
  optimizer = make_optimizer(stage_opt(ctx, tcfg.opt, ft), tcfg.steps)
  key = ctx.key(name)
  ckpt = checkpointer(ctx, name)
  if ft.lora and init_params is None:
    raise ValueError(f"{name}: LoRA needs a base to adapt; remove the stage from lora.stages")
  if ft.lora and members is not None:
    raise ValueError(f"{name}: an ensemble trains full weights; remove the stage from lora.stages")
  ev_loss = ft.loss(lambda p, b, r: eval_loss(p, b))
  one_eval = lambda tf, b: ev_loss(tf[0], b, None, tf[1])
  if members is not None:  # the mean over members (no LoRA: nothing frozen)
    one_eval = lambda tf, b: ens.mean_over_members(lambda p, bb: ev_loss(p, bb, None, {}))(tf[0], b)
  base_eval = make_evaluator(ctx, one_eval,
                             eval_batches(eval_arrays, tcfg.batch_size, tcfg.eval_batches, ctx.mesh))
  meta = {**model_meta(ctx), **run_meta(ctx, tcfg), **ft.meta(base), **(extra_meta or {})}
  if members is not None:
    meta["ensemble"] = {"members": [int(m) for m in members.ids]}

  def evaluator(trainable, frozen, step: int) -> dict:
    figures = base_eval((trainable, frozen))
    if extra_eval is not None:
      figures.update(extra_eval(ft.merged(trainable, frozen), step))
    return figures

  def fresh_state(params):
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32),
            "skipped": jnp.zeros((), jnp.int32)}

  if members is None:
    init_state, abstract = st.jit_init(fresh_state, ft.abstract_trainable())
  else:
    init_state, abstract = st.jit_init(lambda p: ens.fresh_state(optimizer, p),
                                       ens.stack_abstract(ft.abstract_trainable(), len(members)))
  frozen = {}
  if ckpt.latest_step() is not None:
    check_method(ckpt, meta)
    state, saved = resume(ckpt, abstract, name, meta)
    init_eval = saved["init_eval"]
    if ft.lora:  # the base is a function of earlier stages' checkpoints: rebuilt exactly
      frozen = ft.store(init_params())
    print(f"[{name}] resuming from step {int(state['step'])}", flush=True)
  else:
    params = init_params() if init_params is not None else st.init_params(model, jax.random.fold_in(key, 2**31 - 1))
    trainable, frozen = ft.split(params, jax.random.fold_in(key, 2**31 - 2))
    state = init_state(trainable)
    init_eval = evaluator(state["params"], frozen, 0)
  t_loss = ft.loss(loss_fn)
  if members is None:
    batcher = host_batcher(ctx, train_arrays, tcfg.batch_size, stream or name)
    make_step = make_train_step
  else:
    rows = members.rows or (None,) * len(members)
    batcher = ens.MemberBatcher([
        host_batcher(ctx, train_arrays if r is None else {k: v[r] for k, v in train_arrays.items()},
                     tcfg.batch_size, f"{stream or name}/member{m}")
        for m, r in zip(members.ids, rows)])
    make_step = lambda loss, opt, **kw: ens.make_step(loss, opt, members.ids, **kw)

  def step(state, batch, rng, frozen):
    inner = make_step(lambda t, b, r: t_loss(t, b, r, frozen), optimizer,
                      grad_accum=tcfg.grad_accum, nonfinite=tcfg.nonfinite)
    return inner(state, batch, rng)

  compiled = compile_step(step, ctx.mesh, st.shardings_of(abstract), batcher.get(0),
                          extra_shardings=jax.tree.map(lambda x: x.sharding, frozen))
  step_fn = lambda s, b, r: compiled(s, b, r, frozen)
  state, rows = train_loop(
      name=name, stage_dir=stage_dir, state=state, step_fn=step_fn, get_batch=batcher.get,
      total_steps=tcfg.steps, key=key, mesh=ctx.mesh, ckpt=ckpt,
      meta_fn=lambda s: {**meta, "init_eval": init_eval, "data_position": s},
      log_every=tcfg.log_every, ckpt_every=tcfg.ckpt_every,
      eval_fn=lambda s: evaluator(s["params"], frozen, int(sh.to_host(s["step"]))),
      eval_every=tcfg.eval_every,
      tokens_per_step=tokens_per_example * tcfg.batch_size * (len(members) if members else 1),
      nonfinite=tcfg.nonfinite)
  ckpt.close()
  final_eval = evaluator(state["params"], frozen, tcfg.steps)
  summary = {f"init_eval_{k}": v for k, v in init_eval.items()}
  summary.update({f"eval_{k}": v for k, v in final_eval.items()})
  summary.update(steps=tcfg.steps, skipped_updates=int(sh.to_host(state["skipped"])),
                 examples=len(next(iter(train_arrays.values()))),
                 **param_figures(abstract["params"], model))
  state = dict(state, trainable=state["params"], params=ft.merged(state["params"], frozen))
  return summary, state


def param_figures(trainable, model) -> dict:
  """`params` (the whole model) and `trainable_params` (what the optimizer updates)."""
  return {"params": lora.count(st.abstract_params(model)), "trainable_params": lora.count(trainable)}


def check_method(ckpt: Checkpointer, meta: dict) -> None:
  """A checkpoint of full weights and one of adapters cannot resume each other."""
  saved = ckpt.read_meta(ckpt.latest_step()).get("lora")
  if (saved is None) != ("lora" not in meta):
    have = "LoRA adapters" if saved is not None else "full weights"
    raise CheckpointMismatch(
        f"{ckpt.directory}: checkpoint holds {have} but config.lora asks for the other; use a "
        f"fresh --workdir or the original config.lora")


def dropout_args(rng) -> dict:
  """model.apply arguments: dropout (model.dropout) in a train step, which passes its
  step key; off in evaluation, which passes none. PPO and sampling never pass one:
  dropout stays off in RL, as in Ziegler et al. (2019) and Huang et al. (2024)."""
  return {} if rng is None else {"deterministic": False, "rngs": {"dropout": rng}}


def lm_losses(model, packed: bool = False):
  """(train loss, eval loss) for next-token prediction with a target mask.

  packed=True: rows are full (no padding), so no mask is passed and the model
  takes the plain causal path (a fused causal kernel with attention=cudnn).
  """
  from rlhf_jax.losses import lm_loss

  def loss(params, batch, rng=None):
    out = model.apply({"params": params}, batch["tokens"], None if packed else batch["mask"],
                      **dropout_args(rng))
    return lm_loss(out["logits"], batch["tokens"], batch["loss_mask"])

  return loss, loss
