"""Test-wide setup: CPU only, persistent compilation cache under the repo's .jax_cache/."""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

import helpers  # noqa: E402  (tests/ is on sys.path: no __init__.py)

if helpers.REPO not in sys.path:  # `from configs import tiny`
  sys.path.insert(0, helpers.REPO)

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_compilation_cache_dir", helpers.CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
