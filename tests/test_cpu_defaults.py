"""`rlhf_jax.main.cpu_defaults`: one CPU device unless RLHF_JAX_CPU_DEVICES asks for more."""
import subprocess
import sys

import helpers
from rlhf_jax.main import cpu_defaults


def test_one_device_by_default_and_every_override_wins():
  default = {}
  cpu_defaults(default)  # one device: XLA_FLAGS untouched
  assert "XLA_FLAGS" not in default
  env = {"RLHF_JAX_CPU_DEVICES": "2", "XLA_FLAGS": "--xla_cpu_enable_fast_math=false"}
  cpu_defaults(env)
  assert env["XLA_FLAGS"] == "--xla_cpu_enable_fast_math=false --xla_force_host_platform_device_count=2"
  mine = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  cpu_defaults(mine)  # a count the user (or a test) set is kept
  assert mine["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
  one = {"RLHF_JAX_CPU_DEVICES": "1"}
  cpu_defaults(one)  # asking for one device changes nothing
  assert "XLA_FLAGS" not in one


def test_cli_process_sees_two_cpu_devices():
  env = helpers.env()
  env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=1", "")
  env["RLHF_JAX_CPU_DEVICES"] = "2"
  code = "import rlhf_jax.main, jax; print(jax.device_count())"
  out = subprocess.run([sys.executable, "-c", code], cwd=helpers.REPO, env=env, capture_output=True,
                       text=True, timeout=120, check=True)
  assert out.stdout.strip().splitlines()[-1] == "2"
