"""Killing a run loses no finished work: re-running the same command ends bit-identical."""
import os
import re
import signal

import numpy as np
import pytest

import helpers

# One worker runs the module, so its module-scoped fixture runs once (pytest-xdist loadgroup).
pytestmark = pytest.mark.xdist_group("resume")

STEPS = 30
ARGS = ["--config.stages=pretrain", f"--config.pretrain.steps={STEPS}", "--config.pretrain.ckpt_every=5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("resume") / "a"
  p = helpers.run_cli(workdir, *ARGS)
  assert p.returncode == 0, p.stderr[-3000:]
  return workdir


def _interrupt(workdir, sig):
  """Start a run, wait until it has checkpointed step >= 5, send `sig`, wait for the exit."""
  proc = helpers.start_cli(workdir, *ARGS)
  ckpts = workdir / "pretrain" / "checkpoints"
  try:
    helpers.wait_until(lambda: any(s >= 5 for s in helpers.finished_steps(ckpts)), proc)
    proc.send_signal(sig)
    proc.wait(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  out, err = helpers.read_logs(proc)
  assert not (workdir / "pretrain" / "summary.json").exists(), "the stage finished before the signal"
  return proc.returncode, out, err


def _assert_same_run(a, b):
  ra = helpers.restore_all(str(a / "pretrain"))
  rb = helpers.restore_all(str(b / "pretrain"))
  assert ra["step"] == rb["step"] == STEPS
  assert ra["arrays"].keys() == rb["arrays"].keys()
  assert any(k.startswith("params") for k in ra["arrays"])
  assert any(k.startswith("opt_state") for k in ra["arrays"])
  for k, v in ra["arrays"].items():
    assert np.array_equal(v, rb["arrays"][k]), f"{k} differs after resume"
  ma = helpers.read_jsonl(a / "pretrain" / "metrics.jsonl")
  mb = helpers.read_jsonl(b / "pretrain" / "metrics.jsonl")
  assert [r["step"] for r in ma] == [r["step"] for r in mb]  # no duplicated or missing steps
  assert ma == mb
  sa = helpers.read_json(a / "pretrain" / "summary.json")
  sb = helpers.read_json(b / "pretrain" / "summary.json")
  for k in ("init_eval_loss", "eval_loss", "eval_accuracy", "steps"):
    assert sa[k] == sb[k], k


def test_sigkill_then_rerun_resumes_bit_identical(uninterrupted, tmp_path):
  workdir = tmp_path / "b"
  rc, _, _ = _interrupt(workdir, signal.SIGKILL)
  assert rc == -signal.SIGKILL
  resume_at = max(helpers.finished_steps(workdir / "pretrain" / "checkpoints"))
  assert 5 <= resume_at < STEPS
  p = helpers.run_cli(workdir, *ARGS)
  assert p.returncode == 0, p.stderr[-3000:]
  assert f"resuming from step {resume_at}" in p.stdout
  _assert_same_run(uninterrupted, workdir)


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("preempt") / "c"
  rc, out, err = _interrupt(workdir, signal.SIGTERM)
  return workdir, rc, out, err


def test_sigterm_saves_and_exits_75(preempted):
  workdir, rc, _, err = preempted
  assert rc == 75, err[-3000:]
  lines = helpers.message_lines(err)
  assert len(lines) == 1, lines
  assert lines[0].startswith("rlhf_jax: error:") and "preempted" in lines[0], lines[0]
  step = int(re.search(r"at step (\d+)", lines[0]).group(1))
  assert 5 <= step < STEPS
  assert step in helpers.finished_steps(workdir / "pretrain" / "checkpoints")


def test_sigterm_stderr_is_exactly_one_line(preempted):
  _, _, _, err = preempted
  assert len(helpers.stderr_lines(err)) == 1, f"{len(helpers.stderr_lines(err))} lines"


def test_sigterm_then_rerun_finishes_identically(uninterrupted, preempted):
  workdir = preempted[0]
  p = helpers.run_cli(workdir, *ARGS)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resuming from step" in p.stdout
  _assert_same_run(uninterrupted, workdir)


def test_rerun_of_finished_stage_skips_it(uninterrupted):
  summary = uninterrupted / "pretrain" / "summary.json"
  before = (summary.read_bytes(), os.path.getmtime(summary),
            helpers.finished_steps(uninterrupted / "pretrain" / "checkpoints"))
  p = helpers.run_cli(uninterrupted, *ARGS)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "skipping" in p.stdout
  assert "starting" not in p.stdout
  after = (summary.read_bytes(), os.path.getmtime(summary),
           helpers.finished_steps(uninterrupted / "pretrain" / "checkpoints"))
  assert before == after


def test_workdir_from_a_different_model_shape_is_refused(uninterrupted):
  p = helpers.run_cli(uninterrupted, *ARGS, "--config.model.d_model=48")
  assert p.returncode == 2, p.stderr[-3000:]
  lines = helpers.stderr_lines(p.stderr)
  assert len(lines) == 1, p.stderr[-3000:]
  assert lines[0].startswith("rlhf_jax: error:") and "d_model" in lines[0], lines[0]
  assert "fresh --workdir" in lines[0]


def test_resume_refuses_a_different_data_order_and_announces_other_changes(tmp_path):
  """An interrupted stage resumes only with the seed and batch size it started with (others
  would silently change the remaining data and every step's key); other changes, such as a
  lower learning rate after a divergence or more steps, resume and are announced."""
  base = tmp_path / "a"
  p = helpers.run_cli(base, "--config.stages=pretrain", "--config.pretrain.steps=10",
                      "--config.pretrain.ckpt_every=5")
  assert p.returncode == 0, p.stderr[-3000:]
  (base / "pretrain" / "summary.json").unlink()  # as if killed after the last checkpoint
  common = ["--config.stages=pretrain", "--config.pretrain.ckpt_every=5"]
  for changed, key in ((["--config.seed=1"], "seed"), (["--config.pretrain.batch_size=16"], "batch_size")):
    p = helpers.run_cli(base, *common, "--config.pretrain.steps=10", *changed)
    assert p.returncode == 2, (changed, p.stderr[-3000:])
    lines = helpers.stderr_lines(p.stderr)
    assert len(lines) == 1 and key in lines[0] and "fresh --workdir" in lines[0], lines
  p = helpers.run_cli(base, *common, "--config.pretrain.steps=12", "--config.pretrain.opt.lr=0.001",
                      "--config.pretrain.log_every=1")
  assert p.returncode == 0, p.stderr[-3000:]
  assert "resuming from step 10" in p.stdout
  changed = [l for l in p.stdout.splitlines() if "resuming with changed config" in l]
  assert len(changed) == 1 and "steps 10 -> 12" in changed[0] and "opt.lr 0.003 -> 0.001" in changed[0], p.stdout
  assert "log_every" not in changed[0]
  assert helpers.read_json(base / "pretrain" / "summary.json")["steps"] == 12
