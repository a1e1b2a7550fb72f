"""`rlhf_jax.hostenv` through `rlhf_jax.main`: one CPU device unless RLHF_JAX_CPU_DEVICES asks for
more; the allocator settings of a CPU run."""
import subprocess
import sys

import helpers
from rlhf_jax.hostenv import cpu_only
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


def test_cpu_only_reads_jax_platforms_first():
  assert cpu_only({"JAX_PLATFORMS": "cpu"}) and not cpu_only({"JAX_PLATFORMS": "cuda"})
  assert not cpu_only({"JAX_PLATFORMS": "tpu,cpu"})


_FAULTS = """
import resource, numpy as np
import rlhf_jax.main  # applies the CPU defaults on import, as `python -m rlhf_jax.main` does
def faults():
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  a = np.ones(16 << 20, np.float32)  # 64 MiB, written: every page touched
  del a
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""


def test_freed_memory_stays_mapped_so_the_next_step_does_not_fault_it_back():
  """XLA frees each call's buffers; with glibc's defaults the next call page-faults all
  of them in again (a fifth of a CPU train step). With the CLI's allocator settings a
  repeated 64 MiB allocation reuses mapped pages; RLHF_JAX_MALLOC=0 restores the default."""
  counts = {}
  for setting in ("1", "0"):
    env = dict(helpers.env(), RLHF_JAX_MALLOC=setting)
    out = subprocess.run([sys.executable, "-c", _FAULTS], cwd=helpers.REPO, env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    counts[setting] = int(out.stdout.strip().splitlines()[-1])
  # Faults per 64 MiB: >= 32 even with 2 MiB transparent huge pages, 0 when pages are reused.
  assert counts["0"] >= 32 and counts["1"] <= counts["0"] // 10, counts
