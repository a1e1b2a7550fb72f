"""Stage 2 (InstructGPT step 1): supervised fine-tuning on demonstrations.

Loss on response tokens (and the closing EOS) only: the prompt is context,
not a target (InstructGPT, Ouyang et al. 2022; `loss_mask` from
`rlhf_jax.data.batching.sft_examples`). Initialised from `pretrain`, or from the
Hugging Face model `config.model.hf` when no pretrain stage ran.
"""
from __future__ import annotations

from rlhf_jax.stages import common
from rlhf_jax.train import state as st


def run(ctx) -> dict:
  cfg = ctx.config
  (train, evals), stats = ctx.sources.sft()
  model = st.make_model(ctx.model_cfg, ctx.mesh)
  loss, eval_loss = common.lm_losses(model)
  summary, _ = common.train_supervised(
      ctx, "sft", cfg.sft, model=model, loss_fn=loss, eval_loss=eval_loss,
      train_arrays=train, eval_arrays=evals,
      init_params=lambda: common.base_params(ctx, model),
      tokens_per_example=train["tokens"].shape[1], base=common.base_source(ctx))
  summary.update(stats)
  return summary
