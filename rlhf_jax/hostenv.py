"""Process-level settings for running on the host CPU, applied before JAX creates its backends.

`cpu_defaults()` is called by every entry point (`rlhf_jax.main`, `rlhf_jax.bench`, the
experiment runners); the tests' conftest calls `tune_malloc()` alone (each test sets its own
device count). It imports nothing heavy.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import sys

# glibc mallopt(3) parameter numbers (<malloc.h>).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8
_MiB = 1 << 20


def cpu_defaults(environ=os.environ) -> None:
  """Device count and allocator for a CPU run (see `cpu_devices` and `tune_malloc`)."""
  cpu_devices(environ)
  if cpu_only(environ):
    tune_malloc(environ)


def cpu_devices(environ=os.environ) -> None:
  """`RLHF_JAX_CPU_DEVICES=N` splits the host CPU into N XLA devices (the default mesh,
  data=-1, then runs data-parallel over them).

  One device is the default. Two devices ran the default pipeline 5% faster on an idle
  2-core machine (648 against 682 s from a fresh clone, docs/performance.md), but a
  two-device PPO run aborted inside XLA's in-process collectives when other jobs loaded
  the cores (an all-gather and an all-reduce waited for each other past XLA's 40 s
  rendezvous timeout, `rendezvous.cc`), which a single device cannot hit. Nothing
  changes where XLA_FLAGS already sets a host device count (the tests do). The flag
  only shapes the CPU platform: on a GPU/TPU host the accelerator stays the default.
  """
  flags = environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" in flags:
    return
  want = environ.get("RLHF_JAX_CPU_DEVICES", "").strip()
  n = int(want) if want else 1
  if n > 1:
    environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def cpu_only(environ=os.environ) -> bool:
  """True when JAX will compute on the host CPU: JAX_PLATFORMS=cpu, or no accelerator
  plugin (CUDA / ROCm / TPU) is installed. Decided without importing jax."""
  platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0] == "cpu"
  if importlib.util.find_spec("libtpu") is not None:
    return False
  try:  # jax's PJRT plugins register as namespace modules or entry points (jax_plugins)
    import jax_plugins  # noqa: F401  pylint: disable=import-outside-toplevel
    import pkgutil  # pylint: disable=import-outside-toplevel
    if next(pkgutil.iter_modules(jax_plugins.__path__), None) is not None:
      return False
  except ImportError:
    pass
  return not list(importlib.metadata.entry_points(group="jax_plugins"))


def tune_malloc(environ=os.environ) -> bool:
  """Keep freed memory in the process instead of handing it back to the kernel (glibc only).

  XLA's CPU runtime allocates each call's temporaries and outputs with malloc and frees
  them when the call ends. With glibc's defaults those blocks live in mmap'd chunks and
  per-thread arenas whose heaps are unmapped or trimmed on free, so every train step
  page-faults its whole working set back in: on the project's 2-core machine a fifth of
  the pretraining step's time was the kernel zeroing and mapping pages (perf:
  `clear_page_erms`, `exc_page_fault`, `unmap_page_range`). One arena, no mmap'd chunks
  and a high trim threshold keep the pages mapped across steps: the pretrain step went
  from 430 to 290 ms (docs/performance.md, "The allocator"). The cost is that up to
  `trim threshold` of freed memory stays in the process's resident set.

  `RLHF_JAX_MALLOC=0` turns it off. Returns whether the settings were applied; must run
  before JAX starts its thread pools (arenas are per thread)."""
  if environ.get("RLHF_JAX_MALLOC", "1").strip() == "0" or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl or another libc: nothing to tune
    return False
  settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 1024 * _MiB),
              (_M_TOP_PAD, 256 * _MiB))
  return all(mallopt(param, value) == 1 for param, value in settings)
