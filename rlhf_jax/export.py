"""Export a stage's model from a workdir as a Hugging Face folder.

    python -m rlhf_jax.export --workdir DIR --stage sft --out OUT
    python -m rlhf_jax.export --workdir DIR --stage reward --out RM   # *ForSequenceClassification
    python -m rlhf_jax.export --workdir DIR --stage dpo --out OUT     # LoRA: merged weights

Reads the stage's latest orbax checkpoint (best_of_k: its last round; ppo: the
policy, or `--item critic_params` for the critic), rebuilds the ModelConfig from
the checkpoint's own "meta" item (what the stage trained, nothing merged from a
config), loads its params as the next stage would (stages.common.load_params: a
LoRA / QLoRA stage's adapters merged onto the base its checkpoint names, another
layer layout converted), and writes config.json, model.safetensors,
generation_config.json and the tokenizer (rlhf_jax.hf.save). Models rlhf_jax pretrained export as Llama;
imported ones as the family they came from (config.model.hf in DIR/config.json).
The reward model's normalisation (DIR/reward/checkpoints/normalization.json) is
recorded in config.json. A bad workdir or stage: one line on stderr, exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import sys
import types

STAGES = ("pretrain", "sft", "reward", "ppo", "best_of_k", "dpo", "grpo")
# Tokenizer files of a Hugging Face folder, copied when no tokenizer object can write them.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def _stage_dir(workdir: str, stage: str) -> str:
  if stage == "best_of_k":  # the stage's result is its last round
    rounds = [d for d in glob.glob(os.path.join(workdir, "best_of_k", "round_*"))
              if re.fullmatch(r"round_\d+", os.path.basename(d))
              and os.path.isdir(os.path.join(d, "checkpoints"))]
    if not rounds:
      raise FileNotFoundError(f"{workdir}/best_of_k: no round_N/checkpoints; run best_of_k first")
    return max(rounds, key=lambda d: int(d.rsplit("_", 1)[1]))
  return os.path.join(workdir, stage)


def model_config_of(meta: dict, where: str):
  """The ModelConfig a checkpoint was trained with, from its meta item."""
  from rlhf_jax.config_lib import ConfigError
  from rlhf_jax.model.transformer import ModelConfig
  from rlhf_jax.stages.common import ARCH
  m = dict(meta.get("model") or {})
  if not m:
    raise ConfigError(f"{where}: checkpoint meta has no model description")
  if m.get("arch", ARCH) != ARCH:
    raise ConfigError(f"{where}: checkpoint has model revision {m.get('arch')}, this rlhf_jax "
                      f"reads revision {ARCH}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  return ModelConfig(**{k: v for k, v in m.items() if k in fields})


def _workdir_config(workdir: str) -> dict:
  path = os.path.join(workdir, "config.json")
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return {}


def _tokenizer(workdir: str, run_cfg: dict):
  """(tokenizer object or None, folder/file to copy tokenizer files from or None)."""
  data, model = run_cfg.get("data", {}), run_cfg.get("model", {})
  path = data.get("tokenizer") or model.get("hf") or ""
  path = os.path.expanduser(path) if path else os.path.join(workdir, "tokenizer.model")
  if not os.path.exists(path):
    return None, None
  try:  # the tokenizer helper's loader (sentencepiece, tokenizer.json or a folder)
    from rlhf_jax.data.tokenizer import load_tokenizer
  except ImportError:
    load_tokenizer = None
  if load_tokenizer is not None:
    return load_tokenizer(path), None
  if path.endswith(".model") and os.path.isfile(path):
    from rlhf_jax.data.tokenizer import Tokenizer
    return Tokenizer.load(path), path
  return None, path


def _params(workdir: str, stage_dir: str, run_cfg: dict, model, meta: dict, item: str):
  """The stage's full weights as a later stage loads them (stages.common.load_params):
  adapters merged onto their base (itself loaded the same way: another stage, or the
  Hugging Face weights of config.model.hf), QLoRA bases dequantised as trained."""
  from rlhf_jax import hf
  from rlhf_jax.stages import common
  if meta.get("lora") and item != "params":
    # The PPO critic's adapters sit on the reward model, not on the base meta.lora names.
    raise hf.HFError(f"{stage_dir}: --item {item} of a LoRA stage holds adapters whose base is "
                     f"not recorded in the checkpoint; export --item params, or train the stage "
                     f"without config.lora")
  src = (run_cfg.get("model") or {}).get("hf") or ""
  ctx = types.SimpleNamespace(config=types.SimpleNamespace(model=types.SimpleNamespace(hf=src)),
                              stage_dir=lambda name: os.path.join(workdir, name))
  if not src and _uses_hf_base(ctx, os.path.relpath(stage_dir, workdir)):
    raise hf.HFError(f"{stage_dir}: adapters on the Hugging Face weights of config.model.hf, which "
                     f"{workdir}/config.json does not name")
  return common.load_params(ctx, os.path.relpath(stage_dir, workdir), model, item)[0]


def _uses_hf_base(ctx, stage: str) -> bool:
  """Whether the chain of LoRA bases from `stage` ends at the Hugging Face weights."""
  from rlhf_jax.train.checkpoint import latest_meta
  lm = latest_meta(ctx.stage_dir(stage))[1].get("lora")
  return lm is not None and (lm["base"] == "hf" or _uses_hf_base(ctx, lm["base"]))


def export(workdir: str, stage: str, out: str, kind: str | None = None,
           item: str = "params") -> str:
  from rlhf_jax import hf
  from rlhf_jax.train import state as st
  if stage not in STAGES and not re.fullmatch(r"best_of_k/round_\d+", stage):
    raise hf.HFError(f"--stage {stage!r}: one of {', '.join(STAGES)} (or best_of_k/round_N)")
  kind = kind or ("reward" if stage == "reward" else "causal_lm")
  stage_dir = _stage_dir(workdir, stage)
  from rlhf_jax.train.checkpoint import latest_meta
  step, meta = latest_meta(stage_dir)
  if meta.get("ensemble"):
    raise hf.HFError(f"{stage_dir}: a reward ensemble ({len(meta['ensemble']['members'])} members "
                     "stacked, config.reward.ensemble) has no one-model Hugging Face form; "
                     "export a single reward model (reward.ensemble=1)")
  cfg = model_config_of(meta, f"{stage_dir}/checkpoints/{step}")
  model = st.make_model(cfg)
  run_cfg = _workdir_config(workdir)
  params = _params(workdir, stage_dir, run_cfg, model, meta, item)
  model_type = None
  src = run_cfg.get("model", {}).get("hf")
  if src and os.path.isfile(os.path.join(os.path.expanduser(src), "config.json")):
    model_type = hf.read_config(os.path.expanduser(src), cfg.max_len)[1]["model_type"]
  gain = bias = None
  if kind == "reward":
    norm = os.path.join(workdir, "reward", "checkpoints", "normalization.json")
    if stage == "reward" and os.path.isfile(norm):
      with open(norm) as f:
        n = json.load(f)
      gain, bias = n["gain"], n["bias"]
  tok, copy_from = _tokenizer(workdir, run_cfg)
  try:
    hf.save(out, model, params, tokenizer=tok, kind=kind, model_type=model_type,
            reward_gain=gain, reward_bias=bias)
  except hf.HFError as e:
    raise hf.HFError(f"{stage} stage ({stage_dir}): {e}") from None
  if copy_from and not hasattr(tok, "save"):
    files = ([copy_from] if os.path.isfile(copy_from) else
             [os.path.join(copy_from, f) for f in _TOKENIZER_FILES])
    for f in files:
      if os.path.isfile(f):
        shutil.copy(f, os.path.join(out, "tokenizer.model" if f.endswith(".model")
                                    else os.path.basename(f)))
    if os.path.isfile(copy_from) and hasattr(tok, "_sp"):  # our sentencepiece model
      _sentencepiece_tokenizer_config(tok, out)
  return out


def _sentencepiece_tokenizer_config(tok, out: str) -> None:
  """Special tokens by piece name, so transformers' AutoTokenizer (Llama, from
  tokenizer.model) uses our ids: checked by hand with transformers 5.24, where
  encode(text, add_special_tokens=False) gives our ids and bos/eos/pad match."""
  sp = tok._sp
  cfg = {"bos_token": sp.id_to_piece(tok.bos_id), "eos_token": sp.id_to_piece(tok.eos_id),
         "unk_token": sp.id_to_piece(sp.unk_id()), "pad_token": sp.id_to_piece(tok.pad_id),
         "model_max_length": 1 << 30}
  import jax
  if jax.process_index() == 0:
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
      json.dump(cfg, f, indent=2)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m rlhf_jax.export", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--stage", required=True, help=f"{', '.join(STAGES)} or best_of_k/round_N")
  p.add_argument("--out", required=True)
  p.add_argument("--kind", choices=("causal_lm", "reward"), default=None,
                 help="default: reward for the reward stage, causal_lm otherwise")
  p.add_argument("--item", default="params", help="checkpoint item (ppo: critic_params)")
  args = p.parse_args(argv)
  from rlhf_jax.config_lib import ConfigError
  from rlhf_jax.train.checkpoint import CheckpointMismatch
  try:
    out = export(args.workdir, args.stage, args.out, args.kind, args.item)
  except (ConfigError, CheckpointMismatch, FileNotFoundError, KeyError, ValueError) as e:
    print(f"rlhf_jax.export: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
          file=sys.stderr, flush=True)
    return 2
  print(f"wrote {out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
