"""Compile-only devices for XLA's memory analysis: this host's, or a GPU/TPU that is not here.

`devices("h100", n)` returns n compile-only CUDA devices built from a text
`GpuTargetConfigProto` (jax.experimental.topologies.get_topology_desc). A mesh of them
makes `jit(...).lower(abstract args).compile()` run the whole XLA:GPU pipeline (fusion,
SPMD partitioning, scheduling, buffer assignment) on a CPU-only machine: the CUDA plugin
logs "Found GPU target config and no PjRtClient. Performing a deviceless compilation."
Nothing can run on these devices; `compiled.memory_analysis()` gives the GPU's figures,
without autotuning (GEMM tilings and workspaces are XLA's defaults, not the tuned ones).

Needs the CUDA PJRT plugin of the installed jax version (no GPU, driver or CUDA toolkit):
  pip install jax-cuda13-plugin==<jax version> jax-cuda13-pjrt==<jax version>
and JAX_PLATFORMS=cpu, without which the plugin's initialize() checks for cuDNN/cuBLAS,
fails on a machine without them and never registers its topology factory.

`devices("v5e-8" | "v4-8", n)` does the same for a TPU slice with libtpu's compile-only
topology (the libtpu that `jax[tpu]==<jax version>` pins; no TPU needed): XLA:TPU itself
refuses a program that does not fit the chip's HBM (RESOURCE_EXHAUSTED at compile time).
"""
from __future__ import annotations

import importlib.util
import os

# H100 SXM5 80GB: XLA's own spec, openxla/xla xla/tools/hlo_opt/gpu_specs/h100_sxm.txtpb
# ("Copyright 2024 The OpenXLA Authors"; read from the copy in fractalyze/zkx at c3db433;
# the specs come from Compiler::TargetConfig::ToString(), see that folder's README.md).
# runtime_version / dnn_version_info are ours: the versions of the jax-cuda13 wheels
# (CUDA 13.0, cuDNN 9.12), which the CUDA plugin's deviceless compile was checked with.
_H100 = dict(name="NVIDIA H100 80GB HBM3", memory=84978434048, bandwidth=3352320000000)
# H200: DERIVED, not read from a device: the same GH100 die (132 SMs, 50 MiB L2, sm_90) with
# 141 GB of HBM3e at 4.8 TB/s (NVIDIA's H200 product brief); 143771 MiB, the size nvidia-smi
# is commonly reported to show for it (not checked on a device).
_H200 = dict(name="NVIDIA H200", memory=143771 * 2**20, bandwidth=4800000000000)
GPUS = {"h100": _H100, "h200": _H200}
# TPU slices as libtpu's topology factory names them (the names and arguments MaxText's
# accelerator_to_spec_map passes to get_topology_desc). v5e-8: one host with 8 single-core
# chips (16 GB HBM each); v4-8: 4 chips (32 GB each), each chip's two TensorCores one
# "megacore" device as JAX uses them on a v4 (without megacore: 8 devices of 16 GB).
TPUS = {  # target -> (devices, get_topology_desc arguments)
    "v5e-8": (8, dict(topology_name="v5e:2x4", chip_config_name="default", chips_per_host_bounds=(2, 4, 1))),
    "v4-8": (4, dict(topology_name="v4:2x2x1", chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1))),
}
TARGETS = ("host",) + tuple(GPUS) + tuple(TPUS)

_SPEC = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: {memory}
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
runtime_version {{ major: 13 minor: 0 patch: 0 }}
dnn_version_info {{ major: 9 minor: 12 }}
platform_name: "CUDA"
device_description_str: "{name}"
"""


class AotError(RuntimeError):
  """A compile-only target that this environment cannot provide (one line: what to do)."""


def target_config(target: str) -> str:
  """The GpuTargetConfigProto text of a GPU target (`h100`, `h200`)."""
  return _SPEC.format(**GPUS[target])


def devices(target: str = "host", n: int = 1) -> list:
  """n devices to build a mesh from: this host's (`host`), compile-only GPUs (`h100`, `h200`)
  or the first n chips of a compile-only TPU slice (`v5e-8`, `v4-8`; n divides its chips)."""
  import jax
  if target == "host":
    devs = jax.devices()
    if len(devs) < n:
      raise AotError(f"--target host: {n} devices asked, {len(devs)} present (on CPU set "
                     f"XLA_FLAGS=--xla_force_host_platform_device_count={n})")
    return devs[:n]
  if target in TPUS:
    return _tpu_devices(target, n)
  if target not in GPUS:
    raise AotError(f"--target {target}: unknown; known: {', '.join(TARGETS)}")
  from jax.experimental import topologies
  try:
    return topologies.get_topology_desc(f"aot_{target}", "cuda", target_config=target_config(target),
                                        topology=f"1x1x{n}").devices
  except Exception as e:  # pylint: disable=broad-except  # the plugin's errors name nothing useful
    raise AotError(_why(target, e)) from e


def _tpu_devices(target: str, n: int) -> list:
  """The first n compile-only chips of a TPU slice; n must divide its chip count (a mesh
  over part of a slice is what a run with fewer devices would use)."""
  import jax
  from jax.experimental import topologies
  count, kw = TPUS[target]
  if n < 1 or count % n:  # before libtpu: a bad --fsdp is one line wherever it runs
    raise AotError(f"--target {target} has {count} devices; --fsdp must divide {count} (got {n})")
  v = jax.__version__
  if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
    raise AotError(f"--target {target} compiles for a TPU that is not here and needs libtpu: "
                   f'pip install "jax[tpu]=={v}", then run with JAX_PLATFORMS=cpu')
  # No GCE metadata server queries (nothing touches the network at run time).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms and "tpu" not in platforms.split(","):
    # libtpu takes /tmp/libtpu_lockfile even for a compile-only topology, so a second
    # process fails (ABORTED ... lockfile); the lock guards TPU chips, which this one never opens.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    devs = topologies.get_topology_desc(platform="tpu", **kw).devices
  except Exception as e:  # pylint: disable=broad-except
    msg = str(e).splitlines()[0] if str(e) else ""
    hint = ("; another process holds libtpu's lock: run with JAX_PLATFORMS=cpu"
            if "lockfile" in msg else "")
    raise AotError(f"--target {target}: libtpu's compile-only topology failed "
                   f"({type(e).__name__}: {msg}){hint}") from e
  assert len(devs) == count, (target, len(devs))
  return devs[:n]


def label(devs: list) -> str:
  """How a row names the devices it was compiled for."""
  d = devs[0]
  if d.platform == "cpu":
    return f"{len(devs)} x cpu (compile-only)"
  if d.platform == "tpu":
    return f"{len(devs)} x {d.device_kind} (deviceless XLA:TPU compile)"
  cc = getattr(d, "compute_capability", "9.0").replace(".", "")
  return f"{len(devs)} x {d.device_kind} (deviceless XLA:GPU compile, sm_{cc})"


def _why(target: str, err: Exception) -> str:
  import jax
  v = jax.__version__
  install = f"pip install jax-cuda13-plugin=={v} jax-cuda13-pjrt=={v}"
  if importlib.util.find_spec("jax_plugins") is None or not any(
      importlib.util.find_spec(f"jax_plugins.xla_cuda{c}") for c in (12, 13)):
    return (f"--target {target} compiles for a GPU that is not here and needs JAX's CUDA plugin: "
            f"{install}, then run with JAX_PLATFORMS=cpu")
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if not platforms or any(p in ("cuda", "gpu") for p in platforms.split(",")):
    return (f"--target {target}: the CUDA plugin is installed but was not initialised "
            f"(JAX_PLATFORMS={platforms or '<unset>'}); run with JAX_PLATFORMS=cpu")
  return f"--target {target}: deviceless CUDA topology failed ({type(err).__name__}: {err}); {install}"
