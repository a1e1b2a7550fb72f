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
