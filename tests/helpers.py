"""Subprocess helpers shared by the CLI / multi-device tests.

Every child runs on CPU with the repo's persistent compilation cache
(`.jax_cache/`, gitignored), so repeated compiles across tests are cheap.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE_DIR = os.path.join(REPO, ".jax_cache")
TEST_CONFIG = "configs/tiny.py:test"
# absl log lines ("I1123 01:37:57.963 ...") that libraries such as orbax write to stderr.
_ABSL_LOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d")


def env(devices: int | None = None) -> dict:
  e = dict(os.environ)
  e.pop("RLHF_JAX_TRACEBACK", None)
  e.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
           JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", PYTHONUNBUFFERED="1")
  flags = [f for f in e.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
  # Always explicit: without it `rlhf_jax.main.cpu_defaults` would split the CPU in two.
  flags.append(f"--xla_force_host_platform_device_count={devices or 1}")
  e["XLA_FLAGS"] = " ".join(flags)
  return e


def cli_args(workdir, *overrides, config: str = TEST_CONFIG) -> list[str]:
  return [sys.executable, "-m", "rlhf_jax.main", "--config", config, "--workdir", str(workdir),
          f"--config.compile_cache={CACHE_DIR}", *overrides]


def run_cli(workdir, *overrides, devices: int | None = None, timeout: float = 300,
            config: str = TEST_CONFIG) -> subprocess.CompletedProcess:
  return subprocess.run(cli_args(workdir, *overrides, config=config), cwd=REPO, env=env(devices),
                        capture_output=True, text=True, timeout=timeout)


def start_cli(workdir, *overrides, devices: int | None = None, config: str = TEST_CONFIG,
              log_path=None) -> subprocess.Popen:
  """Start the CLI in the background; stdout/stderr go to files (no pipe can fill up)."""
  log_path = log_path or os.path.join(str(workdir) + ".log")
  out = open(log_path + ".out", "w")
  err = open(log_path + ".err", "w")
  proc = subprocess.Popen(cli_args(workdir, *overrides, config=config), cwd=REPO,
                          env=env(devices), stdout=out, stderr=err, text=True)
  proc.log_paths = (log_path + ".out", log_path + ".err")
  return proc


def read_logs(proc) -> tuple[str, str]:
  out, err = proc.log_paths
  with open(out) as f, open(err) as g:
    return f.read(), g.read()


def run_script(code: str, devices: int | None = None, timeout: float = 300) -> dict:
  """Run python code in a fresh process; it must print one JSON object as its last stdout line."""
  p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env(devices), capture_output=True,
                     text=True, timeout=timeout)
  assert p.returncode == 0, f"script failed ({p.returncode}):\n{p.stderr[-4000:]}"
  return json.loads(p.stdout.strip().splitlines()[-1])


def stderr_lines(stderr: str) -> list[str]:
  return [l for l in stderr.splitlines() if l.strip()]


def message_lines(stderr: str) -> list[str]:
  """stderr lines that are not absl library log lines."""
  return [l for l in stderr_lines(stderr) if not _ABSL_LOG.match(l)]


def finished_steps(ckpt_dir) -> list[int]:
  """Finalized orbax checkpoint steps (tmp dirs carry a suffix and are not digits)."""
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())


def wait_until(pred, proc, timeout: float = 240, poll: float = 0.02):
  """Poll pred() until true; fails if the process exits first or time runs out."""
  t0 = time.time()
  while time.time() - t0 < timeout:
    if pred():
      return
    if proc.poll() is not None:
      raise AssertionError(f"process exited ({proc.returncode}) before the condition held:\n"
                           + read_logs(proc)[1][-3000:])
    time.sleep(poll)
  proc.kill()
  raise AssertionError("timed out waiting")


def read_jsonl(path) -> list[dict]:
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def read_json(path) -> dict:
  with open(path) as f:
    return json.load(f)


def restore_all(stage_dir: str, step: int | None = None) -> dict:
  """Every array item of a stage's (latest) checkpoint as numpy, keyed 'item/path'."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  directory = os.path.join(stage_dir, "checkpoints")
  mngr = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step() if step is None else step
  out = {}
  for item in ("params", "opt_state", "scalars"):
    path = os.path.join(directory, str(step), item)
    if not os.path.isdir(path):
      continue
    ckptr = ocp.PyTreeCheckpointer()
    meta = ckptr.metadata(path).item_metadata
    meta = getattr(meta, "tree", meta)
    # numpy targets: a checkpoint written on 8 devices restores in a 1-device process.
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta,
                        is_leaf=lambda x: hasattr(x, "shape"))
    tree = ckptr.restore(path, restore_args=args)
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      out[f"{item}{jax.tree_util.keystr(keypath)}"] = np.asarray(leaf)
  mngr.close()
  return {"step": step, "arrays": out}


def build_once(tmp_path_factory, name: str, build) -> str:
  """A directory that `build(path)` fills once per test session, shared by the pytest-xdist
  workers: the first worker to ask builds it under a file lock, the others wait and reuse it.
  Tests must copy it, never write into it."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):  # gw0, gw1, ...: their base temps share a parent
    root = root.parent
  path, done = root / f"{name}_shared", root / f"{name}_shared.done"
  with open(root / f"{name}_shared.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      import shutil  # pylint: disable=import-outside-toplevel
      shutil.rmtree(path, ignore_errors=True)  # a failed earlier attempt
      build(path)
      done.touch()
  return str(path)
