"""Stage 1: causal language modelling on a packed corpus (nanoGPT-style packing).

Rows are documents concatenated (each starting with BOS, ending with EOS) and cut to
data.seq_len; attention is plain causal over the whole row and positions run 0..L-1,
so a document may attend to the one before it, as in GPT-2 / nanoGPT pretraining.
SFT, reward and sampling rows hold one example from position 0.
"""
from __future__ import annotations

from rlhf_jax.stages import common
from rlhf_jax.train import state as st


def run(ctx) -> dict:
  cfg = ctx.config
  train, evals = ctx.sources.corpus_rows()
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  loss, eval_loss = common.lm_losses(model, packed=True)
  summary, _ = common.train_supervised(
      ctx, "pretrain", cfg.pretrain, model=model, loss_fn=loss, eval_loss=eval_loss,
      train_arrays=train, eval_arrays=evals,
      # From random weights, or continued pretraining of config.model.hf.
      init_params=(lambda: common.hf_params(ctx, model)) if cfg.model.hf else None,
      tokens_per_example=cfg.data.seq_len)
  summary["corpus_tokens"] = int(train["mask"].sum() + evals["mask"].sum())
  summary["vocab_size"] = ctx.model_cfg.vocab_size
  return summary
