"""Write tests/fixtures/hf/<family>/: a tiny random transformers model and what it computes.

Needs torch + transformers (`pip install -e ".[hf]"`); tests/test_hf.py then checks
rlhf_jax against these files without them. Run from the repository root:

    python tests/make_hf_fixtures.py

Each folder holds the model as transformers saves it (config.json, model.safetensors
in bfloat16 to keep the fixtures small; the expected outputs are computed in float32
from exactly those rounded weights) and expected.safetensors: a right-padded batch
(tokens, mask), its float32 logits, two prompts left-padded (prompt, prompt_mask)
and the 16 greedy tokens transformers' generate() produces for each prompt alone.
Sizes are odd on purpose (vocab 97, d 48, 3 query heads, 1 kv head, d_ff 40, a
head_dim of 20 independent of d where the family allows it).
"""
import os
import shutil

import numpy as np
import torch
import transformers
from safetensors.numpy import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf")
V, D, FF, N_NEW = 97, 48, 40, 16
GQA = dict(hidden_size=D, num_hidden_layers=2, num_attention_heads=3, num_key_value_heads=1,
           intermediate_size=FF, max_position_embeddings=64, vocab_size=V, rms_norm_eps=1e-6)
FAMILIES = {
    # Llama 3.1-style rope scaling with a small original context so it changes the result.
    "llama": dict(GQA, tie_word_embeddings=False, rope_theta=500000.0,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mistral": dict(GQA, tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(GQA, tie_word_embeddings=False),
    "qwen3": dict(GQA, tie_word_embeddings=False, head_dim=20),
    "gemma": dict(GQA, head_dim=20),  # tied, as Gemma ships
    "gemma2": dict(GQA, head_dim=20, query_pre_attn_scalar=24, sliding_window=64,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "gpt2": dict(vocab_size=V, n_embd=D, n_layer=2, n_head=3, n_inner=FF, n_positions=64),
}


def _randomize(model, seed):
  """Weights large enough that logits are peaked (HF's std 0.02 makes them nearly uniform,
  and greedy decoding on near-ties would test rounding, not the architecture)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1 and ("norm" in name or "ln_" in name) and "bias" not in name:
        p.copy_((0.0 if "gemma" in type(model).__name__.lower() else 1.0) + 0.2 * noise)
      else:
        p.copy_(noise * (0.3 if p.ndim > 1 else 0.1))


def _batch(rng):
  tokens = rng.randint(1, V, (3, 12)).astype(np.int32)
  mask = np.ones_like(tokens, bool)
  mask[1, 8:] = False
  mask[2, 5:] = False
  tokens[~mask] = 0  # pad id 0 never occurs in the real tokens
  return tokens, mask


def _round_to_bf16(model):
  # Parameters only: model.to(bfloat16) would also round buffers such as rope's inv_freq,
  # which are not saved and which a reader recomputes in float32.
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p.to(torch.bfloat16).to(torch.float32))


def _write(model, folder, extra):
  if os.path.isdir(folder):
    shutil.rmtree(folder)
  model.to(torch.bfloat16).save_pretrained(folder)
  save_file(extra, os.path.join(folder, "expected.safetensors"))


def make_causal(family: str, seed: int) -> float:
  cfg = transformers.AutoConfig.for_model(family, **FAMILIES[family], pad_token_id=0,
                                          bos_token_id=1, eos_token_id=2)
  model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
  _randomize(model, seed)
  _round_to_bf16(model)  # so expected outputs come from exactly the saved weights
  rng = np.random.RandomState(seed)
  tokens, mask = _batch(rng)
  prompts = [rng.randint(3, V, n).tolist() for n in (5, 9)]
  model.generation_config.eos_token_id = None  # always 16 tokens
  model.generation_config.pad_token_id = 0
  greedy, min_gap = [], np.inf
  with torch.no_grad():
    logits = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    for p in prompts:
      out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                           max_new_tokens=N_NEW, do_sample=False, output_scores=True,
                           return_dict_in_generate=True)
      greedy.append(out.sequences[0, len(p):].numpy())
      for s in out.scores:  # the margin greedy decoding has at each step
        top = torch.topk(s[0].float(), 2).values
        min_gap = min(min_gap, float(top[0] - top[1]))
  width = max(len(p) for p in prompts)
  prompt = np.zeros((2, width), np.int32)
  pmask = np.zeros((2, width), np.int32)
  for i, p in enumerate(prompts):  # left-padded, as rlhf_jax's sampler takes prompts
    prompt[i, width - len(p):] = p
    pmask[i, width - len(p):] = 1
  _write(model, os.path.join(OUT, family), {
      "tokens": tokens, "mask": mask.astype(np.int32), "logits": logits.astype(np.float32),
      "prompt": prompt, "prompt_mask": pmask, "greedy": np.stack(greedy).astype(np.int32)})
  return min_gap


def make_reward(seed: int = 100) -> None:
  cfg = transformers.LlamaConfig(**dict(GQA, tie_word_embeddings=False), num_labels=1,
                                 pad_token_id=0)
  model = transformers.LlamaForSequenceClassification(cfg).eval()
  _randomize(model, seed)
  _round_to_bf16(model)
  tokens, mask = _batch(np.random.RandomState(seed))
  with torch.no_grad():
    scores = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).logits[:, 0].numpy()
  _write(model, os.path.join(OUT, "llama_reward"), {
      "tokens": tokens, "mask": mask.astype(np.int32), "scores": scores.astype(np.float32)})


if __name__ == "__main__":
  for i, fam in enumerate(FAMILIES):
    gap = make_causal(fam, seed=i)
    print(f"{fam}: smallest top-2 logit margin over greedy steps {gap:.3g}")
  make_reward()
  print(f"wrote {OUT}")
