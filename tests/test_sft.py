"""SFT trains on the demonstration only: prompt tokens are context, never targets.

Goes through the real batch path (`sft_examples`) and the real loss
(`stages.common.lm_losses`). Note: prompt tokens' *input* embeddings do get
gradient (response predictions attend to them); what must be zero is the
gradient reaching the logits that predict prompt (and pad) tokens.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data.batching import sft_examples
from rlhf_jax.model.transformer import ModelConfig, Transformer
from rlhf_jax.stages.common import lm_losses
from rlhf_jax.train import state as st

# One worker runs the module, so its module-scoped fixture runs once (pytest-xdist loadgroup).
pytestmark = pytest.mark.xdist_group("sft")

PAD, BOS, EOS = 0, 1, 2
PROMPT_TOKENS = range(3, 11)  # appear only in prompts
RESPONSE_TOKENS = range(11, 20)  # appear only in responses
CFG = ModelConfig(vocab_size=24, d_model=16, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=32, max_len=16,
                  tie_embeddings=False)  # untied: `embed` rows are input-only


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  prompts = [list(rng.choice(PROMPT_TOKENS, n)) for n in (3, 5, 2, 6)]
  responses = [list(rng.choice(RESPONSE_TOKENS, n)) for n in (4, 2, 6, 3)]
  batch, counts = sft_examples(prompts, responses, max_len=14, bos_id=BOS, eos_id=EOS, pad_id=PAD)
  assert counts["truncated"] == 0 and counts["dropped"] == 0
  model = st.make_model(CFG)
  params = st.init_params(model, jax.random.key(0))
  return model, params, batch, prompts, responses


def _with_logits(fn):
  """run(edit, *args): fn(*args) with the Transformer's output logits replaced by edit(logits)."""
  def run(edit, *args):
    def interceptor(next_fun, a, kw, ctx):
      out = next_fun(*a, **kw)
      if isinstance(ctx.module, Transformer) and ctx.method_name == "__call__":
        out = dict(out, logits=edit(out["logits"]))
      return out
    with nn.intercept_methods(interceptor):
      return fn(*args)
  return run


def test_only_response_and_eos_positions_get_gradient(setup):
  model, params, batch, prompts, responses = setup
  loss_fn, _ = lm_losses(model)
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  logits = model.apply({"params": params}, b["tokens"], b["mask"])["logits"]
  grad = jax.jit(jax.grad(lambda delta: _with_logits(loss_fn)(lambda l: l + delta, params, b)[0]))(
      jnp.zeros_like(logits))
  per_pos = np.abs(np.asarray(grad)).sum(-1)  # [B, L]: logits[:, t] predict tokens[:, t+1]
  for i, (p, r) in enumerate(zip(prompts, responses)):
    n_head = 1 + len(p)  # BOS + prompt
    targets = range(n_head - 1, n_head + len(r))  # positions predicting response tokens and EOS
    for t in range(per_pos.shape[1]):
      if t in targets:
        assert per_pos[i, t] > 0, (i, t)
      else:  # predicts a prompt token or padding
        assert per_pos[i, t] == 0, (i, t, per_pos[i, t])


def test_prompt_targets_do_not_change_the_loss(setup):
  model, params, batch, prompts, _ = setup
  loss_fn, _ = lm_losses(model)
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  frozen = model.apply({"params": params}, b["tokens"], b["mask"])["logits"]
  loss = lambda tokens: float(_with_logits(loss_fn)(lambda _: frozen, params, dict(b, tokens=tokens))[0])
  base = loss(b["tokens"])
  tokens = np.asarray(batch["tokens"]).copy()
  for i, p in enumerate(prompts):
    tokens[i, 1:1 + len(p)] = (tokens[i, 1:1 + len(p)] + 1 - 3) % 8 + 3  # other prompt tokens
  assert loss(jnp.asarray(tokens)) == base
  tokens[0, 1 + len(prompts[0])] = 23  # one response token: a target
  assert loss(jnp.asarray(tokens)) != base


def test_loss_is_mean_cross_entropy_over_response_tokens(setup):
  model, params, batch, prompts, responses = setup
  loss_fn, _ = lm_losses(model)
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  loss, metrics = loss_fn(params, b)
  assert metrics["tokens"] == sum(len(r) + 1 for r in responses)  # responses + their EOS
  logp = np.asarray(jax.nn.log_softmax(model.apply({"params": params}, b["tokens"], b["mask"])["logits"]))
  ce = [-logp[i, t - 1, batch["tokens"][i, t]]
        for i, (p, r) in enumerate(zip(prompts, responses)) for t in range(1 + len(p), 2 + len(p) + len(r))]
  np.testing.assert_allclose(float(loss), np.mean(ce), rtol=1e-5)


def test_embedding_gradient_reaches_responses_not_padding(setup):
  model, params, batch, _, _ = setup
  loss_fn, _ = lm_losses(model)
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  g = np.asarray(jax.jit(jax.grad(lambda p: loss_fn(p, b)[0]))(params)["embed"])
  row = np.abs(g).sum(-1)
  assert all(row[t] > 0 for t in np.unique(batch["tokens"]) if t in RESPONSE_TOKENS)
  assert row[PAD] == 0  # padding after EOS is neither a target nor seen by a real token
  assert all(row[t] == 0 for t in range(CFG.vocab_size) if t not in np.unique(batch["tokens"]))
