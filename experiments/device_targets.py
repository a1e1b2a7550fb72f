"""Issue 18's accelerator targets, measured in one device session, written as JSON.

  python -m experiments.device_targets --out $OUT [--steps sampler_124m,...] [--smoke]

Run on the lent machine from the repository root (the device tool's `run`; its $OUT comes
back). Each step is one `python -m rlhf_jax.bench` or `python -m rlhf_jax.main` child
with its own time limit, so a step that runs out of memory or time costs only itself:

  sampler_124m  gpt2_124m sampler, batch 64 and 512, prompt 64 + 128 new tokens
                (targets: >= 100,000 and >= 300,000 generated tokens/s)
  sampler_355m  gpt2_355m sampler, batch 64 (target: >= 50,000 tokens/s)
  ppo_1b        llama_1b PPO iteration: 1B policy + 1B critic + reference + reward model,
                rollout 64 x (256 + 256), remat=full, bf16 frozen models (target: peak
                device memory fits 80 GB)
  gpu_pipeline  configs/tiny.py:gpu end to end: wall time per stage

OUT/targets.json is rewritten after every step: per step its exit status, seconds and
figures, each target with its measured value and whether it was met, and the device named
as JAX reports it. OUT/<step>/ holds the bench.json or the pipeline's summaries, and
OUT/<step>.log the child's output. `--smoke` runs the same steps at CPU sizes (bench `tiny`,
configs/tiny.py:test) to check this script before a device session; its figures mean
nothing against the targets.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

STEPS = ("sampler_124m", "sampler_355m", "ppo_1b", "gpu_pipeline")
GB = 1e9


def _bench(preset: str, section: str, *overrides: str) -> list[str]:
  return ["-m", "rlhf_jax.bench", "--config", f"configs/bench.py:{preset}",
          f"--config.sections={section}", *overrides]


def commands(smoke: bool) -> dict:
  """step -> (python arguments without --workdir, time limit in seconds)."""
  if smoke:
    tiny = ("--config.compiler_options=xla_backend_optimization_level=0", "--config.hf=False")
    return {
        "sampler_124m": (_bench("tiny", "sampler", "--config.sampler.batch_sizes=64,512", *tiny), 300),
        "sampler_355m": (_bench("tiny", "sampler", "--config.sampler.batch_sizes=64", *tiny), 300),
        "ppo_1b": (_bench("tiny", "ppo", *tiny), 300),
        "gpu_pipeline": (["-m", "rlhf_jax.main", "--config", "configs/tiny.py:test",
                          "--config.compile_cache="], 600),
    }
  return {
      "sampler_124m": (_bench("gpt2_124m", "sampler", "--config.sampler.batch_sizes=64,512",
                              "--config.sampler.prompt_len=64", "--config.sampler.new_tokens=128"), 180),
      "sampler_355m": (_bench("gpt2_355m", "sampler", "--config.sampler.batch_sizes=64",
                              "--config.sampler.prompt_len=64", "--config.sampler.new_tokens=128"), 180),
      "ppo_1b": (_bench("llama_1b", "ppo", "--config.model.remat=full",
                        "--config.ppo.frozen_dtype=bfloat16"), 300),
      "gpu_pipeline": (["-m", "rlhf_jax.main", "--config", "configs/tiny.py:gpu"], 540),
  }


def _read(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _bench_json(out_dir: str) -> dict:
  """The bench's figures; with isolate each section also writes DIR/<section>/bench.json."""
  top = _read(os.path.join(out_dir, "bench.json")) or {}
  for section in ("sampler", "ppo"):
    sub = _read(os.path.join(out_dir, section, "bench.json")) or {}
    if section in sub:  # the section's own figures (the top file may hold only its error)
      top[section] = sub[section]
    top.setdefault("device", sub.get("device"))
  return top


def figures(step: str, out_dir: str, smoke: bool) -> dict:
  """What a finished step measured, and the targets it is held to."""
  if step == "gpu_pipeline":
    stages = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "*", "summary.json"))):
      s = _read(path) or {}
      stages[os.path.basename(os.path.dirname(path))] = {
          k: s[k] for k in ("wall_seconds", "gold_reward", "gold_accuracy", "kl", "eval_loss")
          if k in s}
    return {"stages": stages}
  b = _bench_json(out_dir)
  got: dict = {"device": b.get("device"), "targets": []}
  if step.startswith("sampler"):
    runs = (b.get("sampler") or {}).get("runs", [])
    got["tokens_per_s"] = {str(r["batch_size"]): r.get("tokens_per_s") for r in runs}
    want = {"sampler_124m": {"64": 100_000, "512": 300_000}, "sampler_355m": {"64": 50_000}}[step]
    for batch, target in want.items():
      value = got["tokens_per_s"].get(batch)
      got["targets"].append({"what": f"{step} batch {batch} tokens/s >= {target:,}",
                             "value": value, "met": None if smoke or value is None else value >= target})
  else:  # ppo_1b
    ppo = b.get("ppo") or {}
    peak = ppo.get("iteration_peak_bytes") or ppo.get("peak_bytes")
    compiled = ((ppo.get("compiled_bytes") or {}).get("iteration") or {}).get("total")
    got.update(iteration_s=ppo.get("iteration_s"), rollout_fraction=ppo.get("rollout_fraction"),
               iteration_peak_gb=None if peak is None else peak / GB,
               compiled_gb=None if compiled is None else compiled / GB)
    got["targets"].append({"what": "ppo_1b peak device memory <= 80 GB", "value": got["iteration_peak_gb"],
                           "met": None if smoke or peak is None else peak <= 80 * GB})
  return got


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default=os.environ.get("OUT", "runs/device_targets"))
  p.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ",".join(STEPS))
  p.add_argument("--smoke", action="store_true", help="CPU sizes, to check the script")
  args = p.parse_args(argv)
  steps = [s.strip() for s in args.steps.split(",") if s.strip()]
  for s in steps:
    if s not in STEPS:
      p.error(f"--steps: unknown step {s!r}; known: {','.join(STEPS)}")
  os.makedirs(args.out, exist_ok=True)
  report_path = os.path.join(args.out, "targets.json")
  report = _read(report_path) or {"steps": {}}  # a second call adds its steps
  report["smoke"] = args.smoke
  cmds = commands(args.smoke)
  for step in steps:
    cmd, limit = cmds[step]
    out_dir = os.path.join(args.out, step)
    t0 = time.time()
    with open(os.path.join(args.out, f"{step}.log"), "w") as log:
      try:
        rc = subprocess.run([sys.executable, *cmd, "--workdir", out_dir], stdout=log,
                            stderr=subprocess.STDOUT, timeout=limit).returncode
      except subprocess.TimeoutExpired:
        rc = "timeout"
    entry = {"rc": rc, "seconds": round(time.time() - t0, 1), "limit_s": limit,
             "command": " ".join(["python", *cmd, "--workdir", out_dir])}
    entry.update(figures(step, out_dir, args.smoke))
    report["steps"][step] = entry
    tmp = report_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(report, f, indent=2)
    os.replace(tmp, report_path)
    print(f"{step}: rc={rc} in {entry['seconds']}s "
          + "; ".join(f"{t['what']}: {t['value']} (met: {t['met']})" for t in entry.get("targets", [])),
          flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
