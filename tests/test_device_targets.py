"""experiments/device_targets.py reads the bench's figures and holds them to issue 18's targets."""
import json
import os

import pytest

from experiments import device_targets as dt


def _write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f)


def test_sampler_and_ppo_figures_are_held_to_the_targets(tmp_path):
  device = {"kind": "NVIDIA H200", "platform": "gpu", "count": 1}
  # isolate=True: the section's figures are in DIR/sampler/bench.json, the top file has its error
  _write(tmp_path / "s" / "bench.json", {"device": device, "sampler": {"error": "see sampler/"}})
  _write(tmp_path / "s" / "sampler" / "bench.json", {"device": device, "sampler": {"runs": [
      {"batch_size": 64, "tokens_per_s": 120_000.0}, {"batch_size": 512, "tokens_per_s": 250_000.0}]}})
  got = dt.figures("sampler_124m", str(tmp_path / "s"), smoke=False)
  assert got["device"]["kind"] == "NVIDIA H200"
  assert [(t["value"], t["met"]) for t in got["targets"]] == [(120_000.0, True), (250_000.0, False)]

  _write(tmp_path / "p" / "ppo" / "bench.json", {"device": device, "ppo": {
      "iteration_s": 2.5, "iteration_peak_bytes": 71.5e9, "compiled_bytes": {"iteration": {"total": 60e9}}}})
  got = dt.figures("ppo_1b", str(tmp_path / "p"), smoke=False)
  assert got["iteration_peak_gb"] == pytest.approx(71.5) and got["compiled_gb"] == pytest.approx(60)
  assert got["targets"][0]["met"] is True
  # A step that died before writing anything: no value, not met, no crash.
  got = dt.figures("sampler_355m", str(tmp_path / "missing"), smoke=False)
  assert got["targets"][0]["value"] is None and got["targets"][0]["met"] is None


def test_unknown_step_is_refused(capsys):
  with pytest.raises(SystemExit) as e:
    dt.main(["--out", "/nonexistent/never", "--steps", "sampler_124m,typo"])
  assert e.value.code == 2 and "typo" in capsys.readouterr().err
