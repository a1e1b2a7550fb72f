"""A bad config fails early with one line naming the offending key."""
import os

import pytest

import helpers
from configs import tiny
from rlhf_jax import config_lib


def _cfg():
  return tiny.get_config("test")


def _error(config, n_devices=1):
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(config, n_devices)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_test_and_default_configs_validate():
  config_lib.validate(_cfg(), 1)
  config_lib.validate(tiny.get_config(), 1)


def test_n_heads_must_divide_d_model():
  c = _cfg()
  c.model.n_heads = 3
  assert _error(c).startswith("config.model.n_heads:")


def test_n_kv_heads_must_divide_n_heads():
  c = _cfg()
  c.model.update(n_heads=4, n_kv_heads=3)
  assert _error(c).startswith("config.model.n_kv_heads:")


def test_mesh_must_match_device_count():
  c = _cfg()
  c.mesh.data = 2
  msg = _error(c, n_devices=1)
  assert msg.startswith("config.mesh:") and "found 1" in msg
  c.mesh.update(data=-1, fsdp=3)
  assert _error(c, n_devices=8).startswith("config.mesh:")


def test_batch_must_divide_over_data_parallel_devices():
  c = _cfg()
  c.mesh.update(data=2, fsdp=2, tensor=2)
  c.model.update(n_heads=2, n_kv_heads=2)
  config_lib.validate(c, 8)  # the layout test_sharding uses is accepted
  c.pretrain.batch_size = 6  # 4 data-parallel devices
  msg = _error(c, n_devices=8)
  assert msg.startswith("config.pretrain.batch_size:") and "4" in msg


def test_ppo_ptx_batch_checked_only_when_ptx_is_on():
  c = _cfg()
  c.mesh.update(data=2, fsdp=2, tensor=2)
  c.model.update(n_heads=2, n_kv_heads=2)
  c.ppo.ptx_batch = 6  # 4 data-parallel devices; ignored while ppo.ptx_coef = 0
  config_lib.validate(c, 8)
  c.ppo.ptx_coef = 0.5
  assert _error(c, n_devices=8).startswith("config.ppo.ptx_batch:")
  c.ppo.update(ptx_batch=8, ptx_coef=-1.0)
  assert _error(c, n_devices=8).startswith("config.ppo.ptx_coef:")


def test_score_chunks_must_split_the_rollout():
  c = _cfg()
  with c.unlocked():  # optional keys: configs that predate them score in one pass
    c.ppo.score_chunks = 3
    c.grpo.score_chunks = 2
  assert _error(c).startswith(f"config.ppo.score_chunks: 3 chunks of the rollout's {c.ppo.rollout_batch}")
  c.ppo.score_chunks = c.ppo.rollout_batch
  config_lib.validate(c, 1)  # one row per chunk is allowed
  c.grpo.score_chunks = 0
  assert _error(c).startswith("config.grpo.score_chunks: must be a positive integer")


def test_batch_must_divide_into_grad_accum():
  c = _cfg()
  c.sft.grad_accum = 3  # batch 8
  assert _error(c).startswith("config.sft.batch_size:")


def test_unknown_stage():
  c = _cfg()
  c.stages = "pretrain,sfft"
  msg = _error(c)
  assert msg.startswith("config.stages:") and "sfft" in msg


def test_seq_len_over_model_max_len():
  c = _cfg()
  c.data.seq_len = c.model.max_len + 1
  assert _error(c).startswith("config.data.seq_len:")


def test_length_budgets_must_fit_the_rows():
  c = _cfg()  # data.max_len=48, prompt_len=24, ppo.response_len=16, model.max_len=64
  c.data.max_prompt_len = 48
  assert _error(c).startswith("config.data.max_prompt_len:")
  c = _cfg()
  c.data.update(max_prompt_len=30, max_response_len=20)
  assert _error(c).startswith("config.data.max_response_len:")
  c = _cfg()
  c.data.max_response_len = -1
  assert _error(c).startswith("config.data.max_response_len:")
  c = _cfg()
  c.data.update(max_len=64, max_prompt_len=50)  # 50 + 16 > model.max_len 64
  assert _error(c).startswith("config.data.max_prompt_len:")
  c = _cfg()
  c.data.update(max_prompt_len=30, max_response_len=18)
  config_lib.validate(c, 1)


def test_unknown_key_is_rejected_by_the_locked_config():
  c = _cfg()
  with pytest.raises(AttributeError):
    c.model.nonexistent = 1
  with pytest.raises(TypeError):
    c.model.d_model = "abc"


# ------------------------------------------------------------------ the CLI

def _cli_error(tmp_path, *overrides):
  workdir = tmp_path / "run"
  p = helpers.run_cli(workdir, *overrides, timeout=120)
  lines = helpers.stderr_lines(p.stderr)
  assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
  assert len(lines) == 1, f"expected one line on stderr, got:\n{p.stderr[-2000:]}"
  assert lines[0].startswith("rlhf_jax: error:"), lines[0]
  # Failed before any stage started: nothing compiled, nothing checkpointed.
  if workdir.exists():
    assert not [d for d in os.listdir(workdir) if os.path.isdir(workdir / d)], os.listdir(workdir)
  assert "starting" not in p.stdout
  return lines[0]


def test_cli_bad_value_fails_before_compiling(tmp_path):
  line = _cli_error(tmp_path, "--config.model.n_heads=3")
  assert "config.model.n_heads" in line


def test_cli_mesh_mismatch(tmp_path):
  line = _cli_error(tmp_path, "--config.mesh.data=2")
  assert "config.mesh" in line


def test_cli_unknown_key(tmp_path):
  line = _cli_error(tmp_path, "--config.model.nonexistent=1")
  assert "model.nonexistent" in line


def test_cli_wrong_type(tmp_path):
  line = _cli_error(tmp_path, "--config.model.d_model=abc")
  assert "model.d_model" in line
