"""Test-wide setup: CPU only, persistent compilation cache under the repo's .jax_cache/."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _jaxlib_version() -> tuple:
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  try:
    return tuple(int(x) for x in importlib.metadata.version("jaxlib").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return (0, 0)


# The suite's programs are tiny: XLA's backend optimisations cost more compile time than
# they save at run time (a cold test pipeline 88 -> 71 s). Child processes inherit it.
# The legacy (non-MLIR) fusion emitters compile a test-size train step in half the CPU time
# (1.8 against 3.2-4.0 s, jaxlib 0.10.2). XLA aborts on a flag it does not know, so it is
# set only for the jaxlib minor version it was checked on.
_FAST_COMPILE = ["--xla_backend_optimization_level=0"]
if _jaxlib_version() == (0, 10):
  _FAST_COMPILE.append("--xla_cpu_use_fusion_emitters=false")
_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join([_flags] + [f for f in _FAST_COMPILE if f.split("=")[0] not in _flags]).strip()

from rlhf_jax import hostenv  # noqa: E402

hostenv.tune_malloc()  # as the CLI does, before JAX's thread pools start

import jax  # noqa: E402

import helpers  # noqa: E402  (tests/ is on sys.path: no __init__.py)

if helpers.REPO not in sys.path:  # `from configs import tiny`
  sys.path.insert(0, helpers.REPO)

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_compilation_cache_dir", helpers.CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


# ------------------------------------------------------------------ test order
# Many tests read the every-stage reference run (test_reliability.reference_run), which one
# pytest-xdist worker builds under a file lock while the other would wait. Collected first,
# test_reference_run_is_complete starts that build at once; the tests that read the run are
# collected last, so the other worker runs the independent tests meanwhile, and of those the
# kill-and-resume chains (one group, the longest unit of work) come first.

def pytest_configure(config):
  config.addinivalue_line("markers", "reference_run: the test reads the shared reference run")


def pytest_collection_modifyitems(config, items):
  def rank(item):
    if item.name == "test_reference_run_is_complete":
      return 0
    group = item.get_closest_marker("xdist_group")
    if group is not None and group.args == ("kill_chains",):
      return 2
    if "reference" in item.fixturenames or item.get_closest_marker("reference_run"):
      return 3
    return 1
  items.sort(key=rank)  # stable: file order within each rank
