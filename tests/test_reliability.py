"""Reliability through the real CLI (configs/tiny.py:test, one subprocess per launch).

- SIGKILL at random moments (fixed seed) and in the middle of checkpoint writes
  (the moment an `*.orbax-checkpoint-tmp*` directory appears), then re-run: every
  resume must succeed, start from the last *finished* checkpoint, and the stage must
  end bit-identical to one uninterrupted reference run: every array of the final
  checkpoint (params, optimizer state, counters, KL coefficient), every
  metrics.jsonl row and summary.json.
- SIGTERM inside a training loop: exit 75 within seconds, one line on stderr,
  checkpoint written at the step it names, re-running continues. In a stage
  without one (label): the stage finishes and is saved, exit 75 before the next.
- Determinism, and non-finite loss (exit 3 naming the step and the quantity, last
  good checkpoint kept) or `nonfinite=skip` (counted in `skipped_updates`).

One reference run of every stage is shared by all tests here and in
test_multihost.py. A summary of the kills is printed at the end of the module
(set RLHF_JAX_KILL_SEED to draw other kill moments).
"""
from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import signal
import time

import numpy as np
import pytest

import helpers as h

# The every-stage reference run is built once per session and shared by the pytest-xdist
# workers (helpers.build_once). The kill-and-resume chains stay on one worker, so the
# summary test below sees every chain's kills.
KILL_CHAINS = pytest.mark.xdist_group("kill_chains")

HAS_BEST_OF_K = os.path.exists(os.path.join(h.REPO, "rlhf_jax", "stages", "best_of_k.py"))
STAGES = (["pretrain", "sft", "label", "reward", "ppo"] + (["best_of_k"] if HAS_BEST_OF_K else [])
          + ["dpo", "grpo"])
# Small ckpt_every so kills land between, and during, many saves; adaptive KL so the
# controller's state has to be restored for PPO to resume exactly.
# Every step logged: more metrics rows to compare, and SIGTERM can follow any step.
OVERRIDES = ("--config.pretrain.ckpt_every=5", "--config.pretrain.log_every=1",
             "--config.sft.log_every=1", "--config.reward.log_every=1",
             "--config.ppo.ckpt_every=1", "--config.ppo.kl_mode=adaptive",
             "--config.best_of_k.train.ckpt_every=2", "--config.best_of_k.train.log_every=1",
             "--config.dpo.ckpt_every=1", "--config.grpo.ckpt_every=1")
SEED = int(os.environ.get("RLHF_JAX_KILL_SEED", "20240601"))
TMP_MARK = "orbax-checkpoint-tmp"
LAUNCH_TIMEOUT = int(os.environ.get("RLHF_JAX_LAUNCH_TIMEOUT", "600"))  # raise on a loaded machine

# What happens to each stage, in order, before a last run to completion:
#   time: SIGKILL at a random moment after "[stage] starting" (a fraction, drawn
#         from SEED, of the reference stage's wall time; if the stage finishes
#         first, the first kill of a chain is retried from scratch, window halved)
#   save: SIGKILL as soon as a new checkpoint directory is being written
#   term: SIGTERM once a training step has been logged (expects exit 75)
# Every stage that checkpoints is killed while a checkpoint is being written; pretrain, label,
# ppo and best_of_k also at a random moment; pretrain and best_of_k (rounds: sampling, then
# training) also get a SIGTERM. (11 kills; each launch costs a process start and restore.)
PLANS = {
    "pretrain": ["time", "term", "save"],
    "sft": ["save"],
    "label": ["time"],
    "reward": ["save"],
    "ppo": ["save", "time"],
    "best_of_k": ["time", "term", "save"],
    "dpo": ["save"],  # reference log-probs are recomputed on resume: must match exactly
    "grpo": ["save"],
}

RECORD = {"kills": [], "terms": [], "chains": {}, "nonfinite": []}


# ------------------------------------------------------------------ reference run

_REF: dict = {}


def reference_run(tmp_path_factory) -> str:
  """Workdir of one uninterrupted run of every stage (one per session, shared across modules
  and workers; read-only: tests copy it)."""
  if "dir" not in _REF:
    def build(wd):
      t0 = time.time()
      p = h.run_cli(wd, *OVERRIDES, f"--config.stages={','.join(STAGES)}", timeout=LAUNCH_TIMEOUT)
      assert p.returncode == 0, f"reference run failed ({p.returncode}):\n{p.stderr[-4000:]}"
      with open(os.path.join(wd, "cli_stdout.txt"), "w") as f:  # test_concurrent_stages reads it
        f.write(p.stdout)
      _REF["seconds"] = time.time() - t0  # on the worker that built it
    _REF["dir"] = h.build_once(tmp_path_factory, "reference", build)
  return _REF["dir"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  return reference_run(tmp_path_factory)


def copy_before(ref: str, stage: str, dest) -> str:
  """The reference workdir as it was when `stage` was about to start."""
  later = set(STAGES[STAGES.index(stage):])

  def ignore(d, names):
    if os.path.abspath(d) != os.path.abspath(ref):
      return []
    return [n for n in names if n in later or n == "report.md" or n.endswith(".png")]

  dest = str(dest)
  shutil.copytree(ref, dest, ignore=ignore)
  if stage == "reward":  # the reward stage prepares the TFDS copy of the label data itself
    shutil.rmtree(os.path.join(dest, "label", "data", "tfds"), ignore_errors=True)
  return dest


# ------------------------------------------------------------------ comparing runs

def _canon(obj):
  """JSON text with sorted keys, wall-clock fields dropped (NaN compares equal to NaN)."""
  def strip(o):
    if isinstance(o, dict):
      return {k: strip(v) for k, v in o.items() if k != "wall_seconds"}
    if isinstance(o, list):
      return [strip(v) for v in o]
    return o
  return json.dumps(strip(obj), sort_keys=True)


def sub_stages(workdir: str, stage: str) -> list[str]:
  """The stage and the sub-stages with their own checkpoints (best_of_k/round_R)."""
  subs = sorted(os.path.relpath(os.path.dirname(d), workdir)
                for d in glob.glob(os.path.join(workdir, stage, "round_*", "checkpoints")))
  return [stage] + subs


def assert_same_stage(ref: str, got: str, stage: str) -> None:
  """Bit-identical outputs of `stage` in two workdirs."""
  subs = sub_stages(ref, stage)
  assert subs == sub_stages(got, stage)
  for sub in subs:
    a, b = os.path.join(ref, sub), os.path.join(got, sub)
    assert _canon(h.read_json(f"{a}/summary.json")) == _canon(h.read_json(f"{b}/summary.json")), \
        f"{sub}: summary.json differs"
    if os.path.exists(f"{a}/metrics.jsonl"):
      ra, rb = h.read_jsonl(f"{a}/metrics.jsonl"), h.read_jsonl(f"{b}/metrics.jsonl")
      for x, y in zip(ra, rb):
        assert _canon(x) == _canon(y), f"{sub}: metrics row differs:\n{x}\n{y}"
      assert len(ra) == len(rb), f"{sub}: {len(ra)} vs {len(rb)} metrics rows"
    if os.path.isdir(f"{a}/checkpoints") and h.finished_steps(f"{a}/checkpoints"):
      ca, cb = h.restore_all(a), h.restore_all(b)
      assert ca["step"] == cb["step"], sub
      assert sorted(ca["arrays"]) == sorted(cb["arrays"]), sub
      for k, x in ca["arrays"].items():
        y = cb["arrays"][k]
        assert x.dtype == y.dtype and x.shape == y.shape, f"{sub}: {k}"
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), \
            f"{sub}: {k} differs (max abs diff {np.max(np.abs(x.astype(np.float64) - y)):.3g})"
  extra = {"label": ["label/data/train.jsonl"], "reward": ["reward/checkpoints/normalization.json"],
           "best_of_k": ["best_of_k/bon_curve.json"]}.get(stage, [])
  for rel in extra:
    with open(os.path.join(ref, rel), "rb") as f, open(os.path.join(got, rel), "rb") as g:
      assert f.read() == g.read(), f"{rel} differs"


# ------------------------------------------------------------------ launching and killing

def ckpt_dirs(workdir: str, stage: str) -> list[str]:
  return (glob.glob(os.path.join(workdir, stage, "checkpoints"))
          + glob.glob(os.path.join(workdir, stage, "round_*", "checkpoints")))


def tmp_entries(workdir: str, stage: str) -> set[tuple]:
  """Orbax temporary (unfinished) checkpoint dirs as (path, inode, mtime).

  This orbax names them `<step>.orbax-checkpoint-tmp` without a timestamp, so a
  directory re-created under a leftover's name is told apart by inode and mtime.
  """
  out = set()
  for d in ckpt_dirs(workdir, stage):
    try:
      for e in os.scandir(d):
        if TMP_MARK in e.name:
          st = e.stat(follow_symlinks=False)
          out.add((e.path, st.st_ino, st.st_mtime_ns))
    except FileNotFoundError:
      pass
  return out


def _rel(entries, workdir) -> list[str]:
  return sorted({os.path.relpath(e[0], workdir) for e in entries})


def finished(workdir: str, stage: str) -> dict[str, list[int]]:
  """Finalized checkpoint steps of each (sub-)stage that has not finished yet."""
  out = {}
  for d in ckpt_dirs(workdir, stage):
    sub = os.path.relpath(os.path.dirname(d), workdir)
    if not os.path.exists(os.path.join(workdir, sub, "summary.json")):
      out[sub] = h.finished_steps(d)
  return out


def _stdout(proc) -> str:
  with open(proc.log_paths[0]) as f:
    return f.read()


def _wait(pred, proc, timeout: float, poll: float) -> bool:
  """True once pred() holds while proc runs; False if proc exits first."""
  t0 = time.time()
  while time.time() - t0 < timeout:
    if pred():
      return proc.poll() is None
    if proc.poll() is not None:
      return False
    time.sleep(poll)
  proc.kill()
  raise AssertionError(f"timed out after {timeout}s waiting:\n{h.read_logs(proc)[1][-3000:]}")


def _finish(proc, timeout: float = LAUNCH_TIMEOUT) -> int:
  try:
    return proc.wait(timeout=timeout)
  except Exception:
    proc.kill()
    raise


def _stage_started(stage):
  return lambda proc: f"[{stage}] starting" in _stdout(proc)


class Chain:
  """Interrupts one stage several times in one workdir, then runs it to the end."""

  def __init__(self, stage: str, workdir: str, ref_wall: float, rng: random.Random, logs: str,
               reset):
    self.stage, self.workdir, self.ref_wall, self.rng, self.logs = stage, workdir, ref_wall, rng, logs
    self.reset = reset  # () -> None: back to the workdir the chain started from
    self.window = 1.0
    self.launches = 0
    self.kills: list[dict] = []
    self.terms: list[dict] = []
    self.events: list[str] = []

  def launch(self):
    self.before = finished(self.workdir, self.stage)
    self.tmp_before = tmp_entries(self.workdir, self.stage)
    self.launches += 1
    proc = h.start_cli(self.workdir, *OVERRIDES, f"--config.stages={self.stage}",
                       log_path=os.path.join(self.logs, f"{self.stage}_{self.launches}"))
    proc.t0 = time.time()
    return proc

  def check_resume(self, proc, complete: bool = True) -> None:
    """The run resumed from the newest finished checkpoint, never a half-written one.

    complete=False: the run was killed, maybe before it got to say where it resumed.
    """
    got = {m.group(1): int(m.group(2)) for m in
           re.finditer(r"^\[(\S+)\] resuming from (?:step|iteration) (\d+)", _stdout(proc), re.M)}
    want = {sub: steps[-1] for sub, steps in self.before.items() if steps}
    # A later round starts (and resumes) only after the earlier ones finished in this run.
    got = {k: v for k, v in got.items() if k in self.before}
    if not complete:
      want = {k: v for k, v in want.items() if k in got}
    assert got == want, f"{self.stage}: resumed from {got}, finished checkpoints were {self.before}"

  def sigkill(self, proc, mode: str, delay: float | None = None) -> None:
    t = time.time() - proc.t0
    tmp_now = tmp_entries(self.workdir, self.stage) - self.tmp_before
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    left = _rel(tmp_entries(self.workdir, self.stage) - self.tmp_before, self.workdir)
    self.kills.append({"stage": self.stage, "mode": mode, "launch": self.launches,
                       "at_s": round(t, 2), "delay_s": None if delay is None else round(delay, 2),
                       "tmp_seen": _rel(tmp_now, self.workdir),
                       "half_written_left": left, "finished_after": finished(self.workdir, self.stage)})

  def run_plan(self, plan) -> None:
    i = 0
    while i < len(plan):
      mode = plan[i]
      proc = self.launch()
      try:
        getattr(self, f"_{mode}")(proc, first=(i == 0))
      finally:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
      if proc.returncode == 0:
        self.events.append(f"{mode}: missed (launch {self.launches} finished first)")
        if mode == "time" and self.window > 0.05:
          # The machine is faster than when the reference ran: shrink the window and
          # start the plan again from a clean copy.
          self.window /= 2
          self.reset()
          i = 0
          continue
        return  # the stage is done; nothing left to interrupt
      i += 1
    proc = self.launch()
    rc = _finish(proc)
    out, err = h.read_logs(proc)
    assert rc == 0, f"{self.stage}: final resume failed ({rc}):\n{err[-4000:]}"
    self.check_resume(proc)

  def _time(self, proc, first: bool) -> None:
    if not _wait(lambda: _stage_started(self.stage)(proc), proc, LAUNCH_TIMEOUT, 0.02):
      self._after_exit(proc, "time")
      return
    frac = self.rng.uniform(0.05, 0.9 if first else 0.5)
    delay = frac * self.ref_wall * self.window
    t_start = time.time()
    if _wait(lambda: time.time() - t_start >= delay, proc, delay + LAUNCH_TIMEOUT, 0.01):
      self.sigkill(proc, "time", delay)
      self._check_partial_resume(proc)
    else:
      self._after_exit(proc, "time")

  def _save(self, proc, first: bool) -> None:
    if _wait(lambda: bool(tmp_entries(self.workdir, self.stage) - self.tmp_before), proc,
             LAUNCH_TIMEOUT, 0.002):
      self.sigkill(proc, "save")
      self._check_partial_resume(proc)
    else:
      self._after_exit(proc, "save")

  def _term(self, proc, first: bool) -> None:
    # SIGTERM right after a logged step that leaves at least one more step to run.
    pat = re.compile(rf"^\[{re.escape(self.stage)}[^\]]*\] step (\d+)/(\d+)", re.M)

    def ready():
      return any(int(s) < int(n) - 1 for s, n in pat.findall(_stdout(proc)))

    if not _wait(ready, proc, LAUNCH_TIMEOUT, 0.01):
      self._after_exit(proc, "term")
      return
    t0 = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    rc = _finish(proc, 300)
    elapsed = time.time() - t0
    out, err = h.read_logs(proc)
    lines = h.message_lines(err)
    rec = {"stage": self.stage, "launch": self.launches, "rc": rc, "exit_s": round(elapsed, 2),
           "message": lines[-1] if lines else "", "stderr_lines": len(lines)}
    self.terms.append(rec)
    assert rc == 75, f"{self.stage}: SIGTERM gave exit {rc}, want 75:\n{err[-3000:]}"
    assert elapsed < 60, f"{self.stage}: {elapsed:.1f}s from SIGTERM to exit"
    assert len(lines) == 1 and "preempted" in lines[0] and "re-run" in lines[0], lines
    m = re.search(r"(\S+): preempted \(SIGTERM\) at step (\d+)", lines[0])
    assert m, lines[0]
    sub, step = m.group(1), int(m.group(2))
    after = finished(self.workdir, self.stage)
    assert step in after.get(sub, []), f"no finished checkpoint at step {step}: {after}"
    self._check_partial_resume(proc)

  def _check_partial_resume(self, proc) -> None:
    if self.launches > 1:
      self.check_resume(proc, complete=False)

  def _after_exit(self, proc, mode: str) -> None:
    rc = proc.wait()
    out, err = h.read_logs(proc)
    assert rc == 0, f"{self.stage} ({mode} launch {self.launches}) failed ({rc}):\n{err[-3000:]}"
    self.check_resume(proc)


@pytest.fixture(scope="module", autouse=True)
def kill_report(request, tmp_path_factory):
  yield
  kills = RECORD["kills"]
  exact = sum(1 for k in kills if k.get("exact"))
  lines = [f"reliability: {len(kills)} SIGKILLs ({sum(k['mode'] == 'save' for k in kills)} during a "
           f"checkpoint write, {sum(bool(k['half_written_left']) for k in kills)} left a half-written "
           f"checkpoint on disk), {exact} resumed bit-identically; seed {SEED}"]
  for stage, c in RECORD["chains"].items():
    lines.append(f"  {stage}: {c['launches']} launches, {c['kills']} kills, {c['terms']} SIGTERMs, "
                 f"{c['seconds']:.1f}s, exact={c['exact']} {'; '.join(c['events'])}")
  for k in kills:
    lines.append(f"    kill {k['stage']}/{k['mode']} launch {k['launch']} at {k['at_s']}s "
                 f"tmp_seen={k['tmp_seen']} left={k['half_written_left']} "
                 f"finished_after={k['finished_after']}")
  for t in RECORD["terms"]:
    lines.append(f"    SIGTERM {t['stage']}: exit {t['rc']} after {t['exit_s']}s: {t['message']!r}")
  for n in RECORD["nonfinite"]:
    lines.append(f"    non-finite: {n}")
  if "seconds" in _REF:
    lines.append(f"  reference run (all stages): {_REF['seconds']:.1f}s")
  tr = request.config.pluginmanager.getplugin("terminalreporter")
  cap = request.config.pluginmanager.getplugin("capturemanager")
  with cap.global_and_fixture_disabled():
    for l in [""] + lines:
      (tr.write_line(l) if tr is not None else print(l))
  with open(os.path.join(str(tmp_path_factory.getbasetemp()),
                         "reliability_report.json"), "w") as f:
    json.dump(RECORD, f, indent=1, default=str)


# ------------------------------------------------------------------ tests

def test_reference_run_is_complete(reference):
  for stage in STAGES:
    assert os.path.exists(os.path.join(reference, stage, "summary.json")), stage
  if HAS_BEST_OF_K:
    assert set(sub_stages(reference, "best_of_k")) > {"best_of_k"}


def test_same_config_and_seed_give_identical_results(reference, tmp_path):
  """A second, fresh pretraining run: identical metrics, summary and checkpoint arrays."""
  p = h.run_cli(tmp_path / "wd", *OVERRIDES, "--config.stages=pretrain", timeout=LAUNCH_TIMEOUT)
  assert p.returncode == 0, p.stderr[-3000:]
  assert_same_stage(reference, str(tmp_path / "wd"), "pretrain")


@KILL_CHAINS
@pytest.mark.parametrize("stage", ["pretrain", "sft", "label", "reward", "ppo",
                                   pytest.param("best_of_k", marks=pytest.mark.skipif(
                                       not HAS_BEST_OF_K, reason="rlhf_jax/stages/best_of_k.py missing")),
                                   "dpo", "grpo"])
def test_killed_and_resumed_matches_uninterrupted(stage, reference, tmp_path):
  rng = random.Random(f"{SEED}-{stage}")
  wd = str(tmp_path / "wd")

  def reset():
    shutil.rmtree(wd, ignore_errors=True)
    if stage != STAGES[0]:  # pretrain starts from an empty workdir (kills may hit the tokenizer)
      copy_before(reference, stage, wd)

  reset()
  ref_wall = h.read_json(os.path.join(reference, stage, "summary.json"))["wall_seconds"]
  chain = Chain(stage, wd, ref_wall, rng, str(tmp_path), reset)
  t0 = time.time()
  entry = {"launches": 0, "kills": 0, "terms": 0, "seconds": 0.0, "exact": False, "events": []}
  RECORD["chains"][stage] = entry
  try:
    chain.run_plan(PLANS[stage])
    assert_same_stage(reference, wd, stage)
    for k in chain.kills:
      k["exact"] = True
    entry["exact"] = True
  finally:
    RECORD["kills"].extend(chain.kills)
    RECORD["terms"].extend(chain.terms)
    entry.update(launches=chain.launches, kills=len(chain.kills), terms=len(chain.terms),
                 seconds=time.time() - t0, events=chain.events)
  assert chain.kills, f"{stage}: no kill landed ({chain.events})"


def test_dpo_and_grpo_land_on_the_frontier(reference, tmp_path):
  """The reference run's dpo / grpo summaries carry the figures every policy stage reports,
  its report lists them, and `evaluate` puts them beside SFT (and PPO) on one frontier."""
  for stage in ("dpo", "grpo"):
    s = h.read_json(os.path.join(reference, stage, "summary.json"))
    for key in ("sft_gold_reward", "gold_reward", "proxy_reward", "kl"):
      assert np.isfinite(s[key]), (stage, key, s[key])
    pts = s["eval_points"]
    assert pts[0]["iteration"] == 0 and pts[0]["kl"] == 0.0 and len(pts) >= 2, pts
    assert pts[-1]["flops"] > 0 and pts[-1]["gold_reward"] == s["gold_reward"], (stage, pts[-1])
  assert h.read_json(os.path.join(reference, "grpo", "summary.json"))["eval_points"][-1]["tokens_sampled"] > 0
  assert h.read_json(os.path.join(reference, "dpo", "summary.json"))["offline_flops"] > 0
  report = open(os.path.join(reference, "report.md")).read()
  assert "**dpo**" in report and "**grpo**" in report
  wd = str(tmp_path / "wd")
  shutil.copytree(reference, wd)
  p = h.run_cli(wd, *OVERRIDES, "--config.stages=evaluate", timeout=LAUNCH_TIMEOUT)
  assert p.returncode == 0, p.stderr[-3000:]
  ev = h.read_json(os.path.join(wd, "evaluate", "summary.json"))
  assert {"sft", "ppo", "dpo", "grpo"} <= set(ev["arms"]), ev["arms"]
  assert {"dpo", "grpo"} <= set(ev["frontier"]), list(ev["frontier"])


def test_dpo_and_grpo_with_lora_store_adapters_that_merge_onto_sft(reference, tmp_path):
  """config.lora in dpo and grpo (in process, from the reference run's SFT): the summaries
  count only adapters as trainable, the checkpoints hold adapters naming SFT as their base,
  and load_params returns merged weights in which every weight without an adapter is SFT's,
  bit for bit, and every adapted kernel moved."""
  import jax
  from configs import tiny
  from rlhf_jax import pipeline
  from rlhf_jax.stages import common
  from rlhf_jax.train import sharding as sh
  from rlhf_jax.train import state as st
  wd = copy_before(reference, "dpo", tmp_path / "wd")
  cfg = tiny.get_config("test").copy_and_resolve_references()
  cfg.stages, cfg.compile_cache = "dpo,grpo", ""
  cfg.lora.update(rank=4, stages="dpo,grpo")
  cfg.dpo.update(steps=1, eval_every=1, ckpt_every=1)  # one step moves every adapter
  # No EOS penalty: the tiny SFT policy rarely ends, and equal penalised scores in every
  # group would leave no advantage (and no gradient) in one iteration.
  cfg.grpo.update(iterations=1, eval_every=1, ckpt_every=1, use_eos_penalty=False)
  for c in (cfg.dpo, cfg.grpo):  # warmup would make the first step's learning rate 0
    c.opt.warmup_steps = 0
  pipeline.run(cfg, wd)
  ctx = pipeline.Context(cfg, wd, sh.make_mesh(cfg.mesh))
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  sft, _ = common.load_params(ctx, "sft", model)
  for stage in ("dpo", "grpo"):
    s = h.read_json(os.path.join(wd, stage, "summary.json"))
    assert 0 < s["trainable_params"] < 0.2 * s["params"], (stage, s["trainable_params"], s["params"])
    saved = h.restore_all(os.path.join(wd, stage))["arrays"]
    assert all(k.startswith(("params['adapters']", "opt_state", "scalars")) for k in saved), stage
    merged, meta = common.load_params(ctx, stage, model)
    assert meta["lora"]["base"] == "sft" and meta["lora"]["rank"] == 4
    for (path, m), f in zip(jax.tree_util.tree_flatten_with_path(merged)[0], jax.tree.leaves(sft)):
      names = [getattr(k, "key", "") for k in path]
      if names[-1] == "kernel" and names[-2] in ("qkv", "o", "wi", "down"):
        assert np.abs(np.asarray(m) - np.asarray(f)).max() > 0, (stage, names)
      else:
        np.testing.assert_array_equal(np.asarray(m), np.asarray(f), err_msg=f"{stage} {names}")


@KILL_CHAINS
@pytest.mark.reference_run  # after the chains, on their worker
def test_at_least_ten_kills_all_resumed_exactly():
  kills = RECORD["kills"]
  if len(RECORD["chains"]) < 5:
    pytest.skip("needs the kill-and-resume tests of this module")
  assert len(kills) >= 10, [(k["stage"], k["mode"]) for k in kills]
  assert all(k.get("exact") for k in kills)
  assert any(k["mode"] == "save" and k["tmp_seen"] for k in kills), "no kill landed during a save"


def test_half_written_checkpoint_is_never_read(reference, tmp_path):
  """A newer step left as an orbax tmp dir with torn files is ignored (and cleaned up)."""
  wd = copy_before(reference, "sft", tmp_path / "wd")
  ck = os.path.join(wd, "pretrain", "checkpoints")
  os.remove(os.path.join(wd, "pretrain", "summary.json"))
  shutil.rmtree(os.path.join(ck, "20"))
  torn = os.path.join(ck, f"20.{TMP_MARK}-1700000000000000")
  shutil.copytree(os.path.join(ck, "15"), torn)
  for path in glob.glob(os.path.join(torn, "**", "*"), recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  p = h.run_cli(wd, *OVERRIDES, "--config.stages=pretrain", timeout=LAUNCH_TIMEOUT)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "[pretrain] resuming from step 15" in p.stdout
  assert not os.path.exists(torn)
  assert_same_stage(reference, wd, "pretrain")


def _pretrain_at_step_15(reference, dest) -> str:
  """Reference pretraining rolled back to its step-15 checkpoint (unfinished)."""
  wd = copy_before(reference, "sft", dest)
  os.remove(os.path.join(wd, "pretrain", "summary.json"))
  shutil.rmtree(os.path.join(wd, "pretrain", "checkpoints", "20"))
  return wd


# A learning rate of 1e30 makes the first update blow the weights up to ~1e29 (still
# finite); the next forward pass overflows float32, so the loss is inf/NaN.
HUGE_LR = "--config.pretrain.opt.lr=1e30"


def test_nonfinite_loss_stops_with_step_and_keeps_last_good_checkpoint(reference, tmp_path):
  wd = _pretrain_at_step_15(reference, tmp_path / "wd")
  p = h.run_cli(wd, *OVERRIDES, "--config.stages=pretrain", HUGE_LR, timeout=LAUNCH_TIMEOUT)
  lines = h.message_lines(p.stderr)
  RECORD["nonfinite"].append(f"lr=1e30 from step 15: exit {p.returncode}: {lines[-1] if lines else ''!r}")
  assert p.returncode == 3, p.stderr[-3000:]
  assert len(lines) == 1, lines
  m = re.search(r"pretrain: non-finite (loss|gradient norm) at step (\d+)", lines[0])
  assert m and 15 < int(m.group(2)) <= 20, lines[0]
  assert "last good checkpoint (step 15) kept" in lines[0]
  assert h.finished_steps(os.path.join(wd, "pretrain", "checkpoints")) == [15]
  assert not os.path.exists(os.path.join(wd, "pretrain", "summary.json"))
  # Re-running with a sane learning rate continues from the good checkpoint, exactly.
  p = h.run_cli(wd, *OVERRIDES, "--config.stages=pretrain", timeout=LAUNCH_TIMEOUT)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "[pretrain] resuming from step 15" in p.stdout
  assert_same_stage(reference, wd, "pretrain")


def test_nonfinite_skip_counts_skipped_updates(reference, tmp_path):
  wd = _pretrain_at_step_15(reference, tmp_path / "wd")
  p = h.run_cli(wd, *OVERRIDES, "--config.stages=pretrain", HUGE_LR, "--config.pretrain.nonfinite=skip",
                timeout=LAUNCH_TIMEOUT)
  assert p.returncode == 0, p.stderr[-3000:]
  summary = h.read_json(os.path.join(wd, "pretrain", "summary.json"))
  RECORD["nonfinite"].append(f"lr=1e30, nonfinite=skip from step 15: exit 0, skipped_updates="
                             f"{summary['skipped_updates']} of 5, eval_loss={summary['eval_loss']}")
  assert 1 <= summary["skipped_updates"] <= 5, summary
  rows = h.read_jsonl(os.path.join(wd, "pretrain", "metrics.jsonl"))
  assert any(r.get("finite_loss") is False or r.get("finite_grads") is False for r in rows), rows
  params = h.restore_all(os.path.join(wd, "pretrain"))["arrays"]
  assert all(np.isfinite(v).all() for k, v in params.items() if v.dtype.kind == "f"), \
      "a skipped update still reached the checkpoint"


def test_sigterm_in_a_stage_without_train_loop_stops_before_the_next(reference, tmp_path):
  """SIGTERM during `label` (sampling, no train loop): exit 75 with one line before the
  next stage starts, either mid-sampling (nothing partial is kept: the stage is
  deterministic and re-runs) or after its work was saved; re-running ends identical."""
  wd = copy_before(reference, "label", tmp_path / "wd")
  proc = h.start_cli(wd, *OVERRIDES, "--config.stages=label,reward", log_path=str(tmp_path / "label"))
  try:
    assert _wait(lambda: "[label] starting" in _stdout(proc), proc, LAUNCH_TIMEOUT, 0.005)
    t0 = time.time()
    os.kill(proc.pid, signal.SIGTERM)
    rc = _finish(proc, 300)
    elapsed = time.time() - t0
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  out, err = h.read_logs(proc)
  lines = h.message_lines(err)
  RECORD["terms"].append({"stage": "label (no train loop, then reward)", "rc": rc,
                          "exit_s": round(elapsed, 2), "message": lines[-1] if lines else ""})
  if "[reward] starting" in out:
    pytest.skip("the label stage finished before SIGTERM arrived")
  assert rc == 75, f"exit {rc}:\n{err[-3000:]}"
  assert len(lines) == 1 and ("preempted (SIGTERM) while sampling" in lines[0]
                              or "label: finished and saved, then preempted" in lines[0]), lines
  assert not os.path.exists(os.path.join(wd, "reward", "summary.json"))
  if not os.path.exists(os.path.join(wd, "label", "summary.json")):
    p = h.run_cli(wd, *OVERRIDES, "--config.stages=label")
    assert p.returncode == 0, p.stderr[-3000:]
  assert_same_stage(reference, wd, "label")


@pytest.mark.skipif(not HAS_BEST_OF_K, reason="rlhf_jax/stages/best_of_k.py missing")
def test_best_of_k_resume_trains_on_the_samples_it_kept(reference, tmp_path):
  """Issue 19 item 11: a round interrupted during its fine-tuning resumes on the examples it
  kept (round_R/kept.json), not on a resample, which matches only while sampling repeats bit
  for bit. Resuming with another best_of_k.sample_batch (other batches, other samples: what
  other devices or library versions could do) still ends identical to the uninterrupted run."""
  wd = copy_before(reference, "best_of_k", tmp_path / "wd")
  rd = os.path.join(wd, "best_of_k", "round_2")
  proc = h.start_cli(wd, *OVERRIDES, "--config.stages=best_of_k", log_path=str(tmp_path / "bok"))
  try:
    assert _wait(lambda: os.path.exists(os.path.join(rd, "kept.json"))
                 or h.finished_steps(os.path.join(rd, "checkpoints")), proc, LAUNCH_TIMEOUT, 0.01)
    os.kill(proc.pid, signal.SIGTERM)
    rc = _finish(proc, 300)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert rc == 75, h.read_logs(proc)[1][-3000:]
  assert not os.path.exists(os.path.join(rd, "summary.json"))
  p = h.run_cli(wd, *OVERRIDES, "--config.stages=best_of_k", "--config.best_of_k.sample_batch=16",
                timeout=LAUNCH_TIMEOUT)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "[best_of_k] round 2: reusing the" in p.stdout, p.stdout
  assert "best_of_k.sample_batch 8 (now 16)" in p.stdout, p.stdout
  assert_same_stage(reference, wd, "best_of_k")
