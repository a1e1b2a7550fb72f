"""The benchmark runs end to end on the tiny preset and writes finite, positive figures."""
import importlib.util
import json
import math
import os

import pytest

from rlhf_jax import bench
from rlhf_jax.config_lib import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, "configs", "bench.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny")
  c.unlock()
  # Smaller than the preset: one layer keeps compilation (most of the time) short.
  c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, vocab_size=128, max_len=64)
  c.update(warmup=0, steps=1, hf=False)
  c.compiler_options = "xla_backend_optimization_level=0"  # compile time is the test's cost
  c.train.update(batch_size=2, seq_len=32)
  c.reward.update(batch_size=2, k=2, seq_len=24)
  c.sampler.update(batch_sizes="4", prompt_len=8, new_tokens=8, steps=1)
  c.ppo.update(rollout_batch=4, prompt_len=8, response_len=8, minibatches=2, epochs=1, steps=1)
  for k, v in overrides.items():
    c[k] = v
  return c


def _positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tiny_preset_writes_finite_figures(tmp_path):
  report = bench.run(_config(), str(tmp_path))
  with open(tmp_path / "bench.json") as f:
    saved = json.load(f)
  assert saved["sections"] == ["train", "reward", "sampler", "ppo"]
  assert _positive(saved["peak"]["peak_flops"]) and "measured" in saved["peak"]["peak_source"]
  for name in ("train", "reward"):
    assert _positive(saved[name]["tokens_per_s"]), name
    assert _positive(saved[name]["mfu"]), name
    # CPU time per step: the load-independent figure (all threads, so it can exceed wall time).
    assert _positive(saved[name]["cpu_s"]), name
    assert math.isclose(saved[name]["tokens_per_cpu_s"] * saved[name]["cpu_s"],
                        saved[name]["tokens_per_step"]), name
    assert saved[name]["peak_bytes"] is None  # CPU reports no memory stats
  run = saved["sampler"]["runs"][0]
  assert run["tokens_generated"] == 4 * 8  # min_new_tokens = new_tokens: nothing stops early
  assert _positive(run["tokens_per_s"]) and _positive(run["mfu"])
  ppo = saved["ppo"]
  for part in ("rollout", "scoring", "update"):
    assert _positive(ppo["parts"][part]["s"]), part
    assert _positive(ppo["parts"][part]["mfu"]), part
  assert _positive(ppo["iteration_s"]) and _positive(ppo["mfu"])
  assert 0 < ppo["rollout_fraction"] < 1
  assert math.isclose(ppo["parts_total_s"], sum(p["s"] for p in ppo["parts"].values()))
  assert saved["hf"]["status"].startswith("off")
  assert report["train"]["tokens_per_step"] == 2 * 32
  assert "sampler b=4" in bench.format_table(saved)
  assert "ms CPU/step" in bench.format_table(saved) and saved["load_avg_end"] >= 0


def test_bad_section_fails_before_compiling(tmp_path):
  with pytest.raises(ConfigError, match="config.sections"):
    bench.run(_config(sections="train,nope"), str(tmp_path))
  with pytest.raises(ConfigError, match="config.sampler"):
    bench.run(_config(sections="sampler", sampler=dict(batch_sizes="4,x", prompt_len=8,
                                                       new_tokens=8, temperature=1.0, steps=1)),
              str(tmp_path))


def test_peak_override_and_hf_skip_message(tmp_path, monkeypatch):
  assert bench.detect_peak(123e12)["peak_flops"] == 123e12
  monkeypatch.setattr(bench.importlib.util, "find_spec", lambda name: None)
  assert bench.run_hf(_config(), ["train"], str(tmp_path))["status"] == (
      "skipped: torch/transformers not installed")


def test_bench_memory_gpu_target_without_plugin_is_one_line_and_host_rows_keep_their_label(
    tmp_path, monkeypatch, capsys):
  import jax
  from rlhf_jax import bench_memory
  argv = ["--sizes", "test", "--methods", "full", "--exact", "--out", str(tmp_path / "m.json")]
  # --target host (the default) builds the row as before; the compile itself is stubbed (~40 s on CPU).
  monkeypatch.setattr(bench, "_compile", lambda jitted, *a, options=None: (None, {
      "compile_s": 0.0, "compiled_bytes": {"total": 1}}))
  row, = bench_memory.main(argv)
  assert row["devices"] == "1 x cpu (compile-only)" and row["target"] == "host"
  assert row["size"] == "test" and row["per_device_bytes"] == {"total": 1}
  # A deviceless H100 compile needs jax-cuda13-plugin (CI has none): one line saying what to do.
  if importlib.util.find_spec("jax_plugins") and importlib.util.find_spec("jax_plugins.xla_cuda13"):
    pytest.skip("the CUDA plugin is installed here; the message is for when it is not")
  (tmp_path / "m.json").unlink()
  with pytest.raises(SystemExit) as e:
    bench_memory.main(argv + ["--target", "h100"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1, err
  assert f"pip install jax-cuda13-plugin=={jax.__version__} jax-cuda13-pjrt=={jax.__version__}" in err
  assert "JAX_PLATFORMS=cpu" in err and not (tmp_path / "m.json").exists()


def test_bench_memory_tpu_target_without_libtpu_or_with_bad_fsdp_is_one_line(capsys):
  import jax
  from rlhf_jax import bench_memory
  argv = ["--sizes", "test", "--methods", "full", "--exact"]
  # v4-8 is 4 devices: --fsdp 8 cannot be a mesh on it, said before libtpu is even looked for.
  with pytest.raises(SystemExit) as e:
    bench_memory.main(argv + ["--target", "v4-8", "--fsdp", "8"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1, err
  assert "--fsdp must divide 4 (got 8)" in err
  if importlib.util.find_spec("libtpu") or os.environ.get("TPU_LIBRARY_PATH"):
    pytest.skip("libtpu is installed here; the message is for when it is not")
  with pytest.raises(SystemExit) as e:
    bench_memory.main(argv + ["--target", "v5e-8", "--fsdp", "8"])
  err = capsys.readouterr().err.strip()
  assert e.value.code == 2 and len(err.splitlines()) == 1, err
  assert f'pip install "jax[tpu]=={jax.__version__}"' in err and "JAX_PLATFORMS=cpu" in err
