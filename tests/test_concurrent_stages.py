"""ppo, best_of_k, dpo and grpo listed next to each other run at once on a one-device CPU run
(pipeline.INDEPENDENT, config.concurrent_stages). That each gives the same results as when it
runs alone is checked by test_reliability: every kill-and-resume chain runs its stage alone and
compares it bit for bit with the reference run, which runs these four at once."""
import os
import sys
import threading
import time
import types

import pytest

import helpers
from rlhf_jax import pipeline
from rlhf_jax.train import loop

DEFAULT = "pretrain,sft,label,reward,ppo,best_of_k,evaluate".split(",")


def test_consecutive_independent_stages_form_one_group():
  assert pipeline.stage_groups(DEFAULT, True) == [
      ["pretrain"], ["sft"], ["label"], ["reward"], ["ppo", "best_of_k"], ["evaluate"]]
  assert pipeline.stage_groups(DEFAULT, False) == [[s] for s in DEFAULT]
  # Not across a stage that reads them (evaluate), and never the stages they read.
  assert pipeline.stage_groups(["reward", "ppo", "evaluate", "best_of_k", "dpo", "grpo"], True) == [
      ["reward"], ["ppo"], ["evaluate"], ["best_of_k", "dpo", "grpo"]]


def test_independent_stages_need_none_of_each_other():
  for name in pipeline.INDEPENDENT:
    assert not set(pipeline.REQUIRES[name]) & set(pipeline.INDEPENDENT), name


def test_only_one_process_on_one_cpu_device():
  on = types.SimpleNamespace(get=lambda key, default=None: True)
  off = types.SimpleNamespace(get=lambda key, default=None: False)
  assert pipeline.runs_concurrently(on)  # this test process: one CPU device
  assert not pipeline.runs_concurrently(off)


def _fake_stage(name, run):
  mod = types.ModuleType(f"rlhf_jax.stages.{name}")
  mod.run = run
  return mod


def test_a_failing_stage_lets_the_other_finish_then_raises(tmp_path, monkeypatch):
  """One stage raises while the other is still running: the other writes its summary, then
  the error comes out; the two ran in overlapping time."""
  spans = {}

  def slow(ctx):
    spans["slow"] = [time.time()]
    time.sleep(1.0)
    spans["slow"].append(time.time())
    return {"value": 1.0}

  def failing(ctx):
    spans["failing"] = [time.time()]
    time.sleep(0.2)
    raise ValueError("bad rollout")

  monkeypatch.setitem(sys.modules, "rlhf_jax.stages.ppo", _fake_stage("ppo", failing))
  monkeypatch.setitem(sys.modules, "rlhf_jax.stages.best_of_k", _fake_stage("best_of_k", slow))
  from configs import tiny
  ctx = pipeline.Context(tiny.get_config("test"), str(tmp_path), None,
                         _sources=types.SimpleNamespace(tokenizer=object()),
                         _gold=types.SimpleNamespace(name="world"))
  with loop.PreemptionGuard() as guard, pytest.raises(ValueError, match="bad rollout"):
    pipeline._run_at_once(ctx, ["ppo", "best_of_k"], guard)
  assert ctx.is_done("best_of_k") and not ctx.is_done("ppo")
  assert spans["failing"][0] < spans["slow"][1] and spans["slow"][0] < spans["failing"][0] + 0.2
  assert helpers.read_json(os.path.join(tmp_path, "best_of_k", "summary.json"))["value"] == 1.0
  assert not any(t.name.startswith("stage ") for t in threading.enumerate())  # all joined


@pytest.mark.reference_run
def test_the_reference_run_ran_its_policy_stages_at_once(tmp_path_factory):
  import test_reliability as rel
  ref = rel.reference_run(tmp_path_factory)
  out = open(os.path.join(ref, "cli_stdout.txt")).read()
  group = [s for s in rel.STAGES if s in pipeline.INDEPENDENT]
  assert f"[{', '.join(group)}] running at once" in out
  first_done = min(out.index(f"[{s}] done in") for s in group)
  assert all(out.index(f"[{s}] starting") < first_done for s in group)


def test_two_stages_saving_checkpoints_at_once(tmp_path):
  """Orbax keys its save signals by a process-wide operation id: two managers saving at once
  in one process broke each other's saves (FileExistsError / "Directory not empty") until
  train/checkpoint.py made them take turns."""
  import jax.numpy as jnp
  import numpy as np
  from rlhf_jax.train import checkpoint as ck
  errors = []

  def saver(name):
    try:
      c = ck.Checkpointer(str(tmp_path / name / "checkpoints"), keep=2)
      for step in range(1, 9):
        state = {"params": {"w": jnp.full((64, 64), float(step))}, "opt_state": {"m": jnp.ones(256) * step},
                 "step": jnp.int32(step)}
        c.save(step, state, {"stage": name})
      c.close()
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  with ck.exclusive_saves():
    threads = [threading.Thread(target=saver, args=(n,), daemon=True) for n in ("ppo", "best_of_k", "dpo")]
    for t in threads:
      t.start()
    for t in threads:
      t.join(timeout=120)  # without the turns, a save can also wait forever on another's signal
  assert not any(t.is_alive() for t in threads), "a save hung"
  assert not errors, errors
  for name in ("ppo", "best_of_k", "dpo"):
    w, meta = ck.restore_item(str(tmp_path / name), "params", {"w": jnp.zeros((64, 64))})
    assert meta == {"stage": name} and np.all(np.asarray(w["w"]) == 8.0)


# Longer stages than the reference run's (3 PPO iterations, 4 steps a round), so that a
# SIGTERM lands with steps to go in both; compared with an uninterrupted run of the same.
# Two best-of-K rounds, as in configs/tiny.py:test (_will_stop_on_sigterm names the last).
LONGER = ("--config.ppo.iterations=6", "--config.best_of_k.train.steps=6",
          "--config.best_of_k.rounds=2")


def _latest_steps(out: str, stage: str) -> tuple[str, int, int] | None:
  """The stage's newest progress line as (loop name, step, of), e.g. ('best_of_k/round_1', 2, 6)."""
  import re
  found = re.findall(rf"^\[({stage}[^\]]*)\] step (\d+)/(\d+)", out, re.M)
  return (found[-1][0], int(found[-1][1]), int(found[-1][2])) if found else None


def _will_stop_on_sigterm(out: str) -> bool:
  """Both stages will still check for a SIGTERM before they finish.

  A loop checks after each step it dispatches, then logs it; the check of the step after
  a logged one may already be behind it, so a loop needs two more steps after the logged one.
  best_of_k also checks while it samples, so before its first step it will stop too."""
  ppo, bok = _latest_steps(out, "ppo"), _latest_steps(out, "best_of_k")
  if ppo is None or ppo[1] > ppo[2] - 3 or "[best_of_k] done" in out:
    return False
  return bok is None or bok[0] != "best_of_k/round_2" or bok[1] <= bok[2] - 3


@pytest.mark.reference_run
def test_sigterm_stops_stages_running_at_once_and_the_rerun_matches(tmp_path_factory, tmp_path):
  """SIGTERM while ppo and best_of_k run at once: both save and stop, exit 75 with one line
  naming each stage's step; the same command then finishes both, bit-identical to a run
  that was never stopped."""
  import re
  import signal
  import test_reliability as rel
  ref = rel.reference_run(tmp_path_factory)
  args = (*rel.OVERRIDES, *LONGER, "--config.stages=ppo,best_of_k")
  wd = rel.copy_before(ref, "ppo", tmp_path / "wd")
  proc = helpers.start_cli(wd, *args, log_path=str(tmp_path / "first"))
  deadline = time.time() + rel.LAUNCH_TIMEOUT
  while proc.poll() is None and time.time() < deadline:
    if _will_stop_on_sigterm(helpers.read_logs(proc)[0]):
      # Frozen, the process cannot move past what its log shows while the signal is sent.
      os.kill(proc.pid, signal.SIGSTOP)
      if _will_stop_on_sigterm(helpers.read_logs(proc)[0]):
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        break
      os.kill(proc.pid, signal.SIGCONT)
    time.sleep(0.01)
  rc = proc.wait(timeout=rel.LAUNCH_TIMEOUT)
  out, err = helpers.read_logs(proc)
  assert "[ppo, best_of_k] running at once" in out
  lines = helpers.message_lines(err)
  assert rc == 75 and len(lines) == 1, (rc, out[-3000:], err[-3000:])
  assert re.search(r"ppo: preempted \(SIGTERM\) at step \d+", lines[0]), lines[0]
  assert re.search(r"best_of_k[^:]*: preempted \(SIGTERM\)", lines[0]), lines[0]
  assert not os.path.exists(os.path.join(wd, "ppo", "summary.json"))
  p = helpers.run_cli(wd, *args, timeout=rel.LAUNCH_TIMEOUT)
  assert p.returncode == 0, p.stderr[-3000:]
  assert re.search(r"^\[ppo\] resuming from iteration \d+", p.stdout, re.M), p.stdout[-2000:]
  whole = rel.copy_before(ref, "ppo", tmp_path / "whole")
  p = helpers.run_cli(whole, *args, timeout=rel.LAUNCH_TIMEOUT)
  assert p.returncode == 0, p.stderr[-3000:]
  for stage in ("ppo", "best_of_k"):
    rel.assert_same_stage(whole, wd, stage)
