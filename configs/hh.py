"""RLHF from a pretrained model on real preferences: a Hugging Face checkpoint on HH-RLHF.

  python -m rlhf_jax.main --config configs/hh.py:/models/Qwen2.5-0.5B --workdir runs/hh \
      --config.data.files.ranking=/data/hh-rlhf

MODEL_DIR (after the colon) is a local Hugging Face folder: config.json, model.safetensors
(or sharded *.safetensors with their index) and tokenizer files. data.files.ranking is a
folder holding Anthropic's HH-RLHF JSONL as it ships ({"chosen": ..., "rejected": ...} a
line) named train.jsonl (and optionally test.jsonl). Stages: sft on the chosen responses
-> reward on the pairs -> ppo -> best_of_k -> evaluate; the recipe and every PPO detail are
configs/tiny.py's, at real lengths and learning rates. Real data has no gold scorer, so the
report shows proxy reward and KL from SFT (the gold columns are left out).

Memory (full fine-tuning, float32 parameters and Adam moments, bf16 compute) for a model of
P parameters: SFT and reward about 16 P bytes plus activations; PPO holds policy and critic
with their moments (2 x 16 P) plus reference and reward model (2 x 4 P), about 40 P bytes:
20 GB at 0.5B (one 40-80 GB GPU; a TPU v5e-8 with mesh.fsdp=8) and 50 GB at 1.2B (one 80 GB
GPU with model.remat=full; a v4-8 or v5e-8 with mesh.fsdp). See README "Your own model".

`configs/hh.py:test` is the seconds-scale variant the tests run (give the model with
--config.model.hf=DIR).
"""
import importlib.util
import os

from rlhf_jax import config_lib as cl


def _default_recipe(arg=None):
  """configs/tiny.py's recipe: the same stages and PPO details, changed below where real
  models and data differ."""
  spec = importlib.util.spec_from_file_location(
      "rlhf_jax_configs_tiny", os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
  tiny = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tiny)
  return tiny.get_config(arg)


def get_config(arg=None):
  test = arg == "test"
  c = _default_recipe("test" if test else None)
  with c.unlocked():
    c.stages = "sft,reward,ppo,best_of_k,evaluate"
    # The architecture comes from MODEL_DIR/config.json (rlhf_jax.pipeline.apply_hf_model).
    c.model = cl.model(hf="" if test or not arg else arg, max_len=128 if test else 640,
                       dtype="float32" if test else "bfloat16", remat="none" if test else "full")
    c.data.update(
        source="files", tokenizer="",  # "" = the model folder's tokenizer
        # HH-RLHF: the prompt is the dialogue up to the last "Assistant:"; SFT learns the
        # chosen reply, the reward model the chosen-vs-rejected pair (Bai et al. 2022).
        files=dict(pretrain="", sft="", ranking="", ranking_format="hh_rlhf"),
        skip_bad=True,  # HH-RLHF has rows with an empty reply or differing prompts
        max_len=128 if test else 640, prompt_len=96 if test else 512)
  if not test:
    c.sft.update(steps=2_000, batch_size=32, eval_every=250, log_every=25, ckpt_every=250)
    c.sft.opt.update(lr=1e-5, warmup_steps=100)
    c.reward.update(steps=1_000, batch_size=32, eval_every=250, log_every=25, ckpt_every=250)
    c.reward.opt.update(lr=5e-6, warmup_steps=50)
    c.ppo.update(iterations=200, rollout_batch=64, response_len=128, minibatches=4, epochs=2,
                 eval_every=20, ckpt_every=20, log_every=1)
    c.ppo.opt.lr = 1e-6
    c.ppo.critic_lr = 5e-6
    c.best_of_k.update(rounds=3, k=4, prompts_per_round=512, sample_batch=64)
    c.best_of_k.train.opt.lr = 1e-6
    c.evaluate.batch_size = 64
    c.data.eval_prompts = 256
  return c
