"""Test-wide setup: CPU only, persistent compilation cache under the repo's .jax_cache/."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's programs are tiny: XLA's backend optimisations cost more compile time than
# they save at run time (a cold test pipeline 88 -> 71 s). Child processes inherit it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

from rlhf_jax import hostenv  # noqa: E402

hostenv.tune_malloc()  # as the CLI does, before JAX's thread pools start

import jax  # noqa: E402

import helpers  # noqa: E402  (tests/ is on sys.path: no __init__.py)

if helpers.REPO not in sys.path:  # `from configs import tiny`
  sys.path.insert(0, helpers.REPO)

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_compilation_cache_dir", helpers.CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
