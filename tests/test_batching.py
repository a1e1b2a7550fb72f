"""Batching: packing, SFT/reward/prompt layouts, and resumable per-host batches."""
import numpy as np
import pytest

from rlhf_jax.data import batching

PAD, BOS, EOS = 0, 2, 3


class FakeTokenizer:
  """Stands in for rlhf_jax.data.tokenizer.Tokenizer: UTF-8 bytes offset by 4."""
  pad_id, bos_id, eos_id, vocab_size = PAD, BOS, EOS, 260

  def encode(self, text):
    return [b + 4 for b in text.encode('utf-8')]

  def encode_batch(self, texts):
    return [self.encode(t) for t in texts]

  def decode(self, ids):
    return bytes(i - 4 for i in ids if i >= 4).decode('utf-8')


tok = FakeTokenizer()
NO_CUTS = {'truncated': 0, 'prompt_truncated': 0, 'response_truncated': 0, 'dropped': 0}


def test_pack_corpus_round_trip():
  docs = ['the cat', 'sat', 'on the mat today', 'x']
  rows = batching.pack_corpus(tok.encode_batch(docs), seq_len=8, eos_id=EOS, bos_id=BOS)
  assert rows.dtype == np.int32 and rows.shape[1] == 8
  stream = rows.reshape(-1).tolist()
  assert stream[0] == BOS
  # Split the kept stream at BOS ... EOS: whole documents come back in order,
  # and only the tail that did not fill a row is missing.
  text = bytes(t for t in stream).replace(bytes([EOS, BOS]), b'|').strip(bytes([BOS, EOS]))
  recovered = [tok.decode(list(part)) for part in text.split(b'|')]
  assert recovered[:-1] == docs[:len(recovered) - 1]
  assert docs[len(recovered) - 1].startswith(recovered[-1])
  total = sum(len(d) + 2 for d in docs)
  assert rows.size == total // 8 * 8
  with pytest.raises(ValueError, match='fewer than one row'):
    batching.pack_corpus([[5]], seq_len=8, eos_id=EOS, bos_id=BOS)


def test_lm_examples_train_on_every_token_but_the_first():
  ex = batching.lm_examples(np.arange(12).reshape(2, 6))
  assert ex['mask'].all() and ex['loss_mask'].dtype == np.float32
  assert (ex['loss_mask'][:, 0] == 0).all() and (ex['loss_mask'][:, 1:] == 1).all()


def test_sft_loss_only_on_response_and_eos():
  prompts, responses = tok.encode_batch(['Hi?', 'Q']), tok.encode_batch(['Yo', 'Answer'])
  ex, counts = batching.sft_examples(prompts, responses, 12, BOS, EOS, PAD)
  assert counts == NO_CUTS
  assert ex['tokens'][0].tolist() == [BOS, *prompts[0], *responses[0], EOS] + [PAD] * 5
  assert ex['loss_mask'][0].tolist() == [0, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0]
  assert ex['mask'][0].tolist() == [True] * 7 + [False] * 5
  assert ex['loss_mask'][1].tolist() == [0, 0] + [1] * 7 + [0] * 3
  # Every target is a real token and every prompt token (and BOS) is not a target.
  assert not (ex['loss_mask'] * ~ex['mask']).any()


def test_sft_overlong_keeps_the_prompt_end_and_cuts_the_response():
  prompts = [[10, 11], [30, 31, 32, 33, 34, 35], [12]]
  responses = [[20, 21, 22, 23, 24], [20], [20]]
  ex, counts = batching.sft_examples(prompts, responses, 6, BOS, EOS, PAD, max_prompt_len=4)
  assert counts == {'truncated': 2, 'prompt_truncated': 1, 'response_truncated': 1, 'dropped': 0}
  assert ex['tokens'][0].tolist() == [BOS, 10, 11, 20, 21, 22]  # cut: no EOS
  assert ex['loss_mask'][0].tolist() == [0, 0, 0, 1, 1, 1]
  # The long prompt keeps BOS and its last 3 tokens (the most recent turn), then answers.
  assert ex['tokens'][1].tolist() == [BOS, 33, 34, 35, 20, EOS]
  assert ex['loss_mask'][1].tolist() == [0, 0, 0, 0, 1, 1]
  assert ex['tokens'][2].tolist() == [BOS, 12, 20, EOS, PAD, PAD]
  ex, counts = batching.sft_examples(prompts, responses, 6, BOS, EOS, PAD, overlong='drop',
                                     max_prompt_len=4)
  assert counts == {**NO_CUTS, 'dropped': 2} and len(ex['tokens']) == 1


def test_response_budget_caps_the_response_even_with_room_left():
  ex, counts = batching.sft_examples([[10]], [[20, 21, 22, 23]], 10, BOS, EOS, PAD,
                                     max_prompt_len=4, max_response_len=3)
  assert ex['tokens'][0].tolist() == [BOS, 10, 20, 21, 22] + [PAD] * 3  # width 8, not 10
  assert counts['response_truncated'] == 1 and counts['prompt_truncated'] == 0


def test_rows_are_padded_to_the_longest_row_not_the_budget():
  """A budget of 80 with rows of at most 11 tokens gives 16-wide rows (a multiple of 8):
  the forward passes pay for the data, not for the budget."""
  ex, _ = batching.sft_examples([[10] * 5, [11]], [[20] * 4, [21]], 80, BOS, EOS, PAD)
  assert ex['tokens'].shape == (2, 16) and ex['mask'].sum(1).tolist() == [11, 4]
  assert ex['loss_mask'][0].tolist() == [0] * 6 + [1] * 5 + [0] * 5
  rw, _ = batching.reward_examples([[10] * 5], [[[20] * 9, [21]]], [[0, 1]], 80, BOS, EOS, PAD)
  assert rw['tokens'].shape == (1, 2, 16) and rw['mask'][0].sum(1).tolist() == [16, 8]
  assert batching.padded_width([81], 80) == 80  # never wider than the budget


def test_no_bos_tokenizer_prepends_nothing():
  """Qwen-style tokenizers have no BOS (bos_id None): rows start with the prompt."""
  ex, _ = batching.sft_examples([[10, 11]], [[20]], 6, None, EOS, PAD)
  assert ex['tokens'][0].tolist() == [10, 11, 20, EOS, PAD, PAD]
  assert ex['loss_mask'][0].tolist() == [0, 0, 1, 1, 0, 0]
  ex, _ = batching.sft_examples([[]], [[20, 21]], 4, None, EOS, PAD)
  assert ex['loss_mask'][0].tolist() == [0, 1, 1, 0]  # position 0 has no predecessor
  ex, counts = batching.prompt_examples([[10, 11], [12, 13, 14, 15], []], 3, None, PAD)
  assert ex['prompt'].tolist() == [[PAD, 10, 11], [13, 14, 15]] and ex['index'].tolist() == [0, 1]
  # The empty prompt has nothing to continue: dropped.
  assert counts == {'truncated': 1, 'prompt_truncated': 1, 'dropped': 1}
  rw, _ = batching.reward_examples([[10]], [[[20], [21, 22]]], [[0, 1]], 5, None, EOS, PAD)
  assert rw['tokens'][0].tolist() == [[10, 20, EOS, PAD, PAD], [10, 21, 22, EOS, PAD]]
  rows = batching.pack_corpus([[5, 6], [7]], 5, EOS, None)
  assert rows.tolist() == [[5, 6, EOS, 7, EOS]]


def test_reward_examples_mixed_k():
  prompts = [[10], [11, 12]]
  responses = [[[20], [21, 22], [23]], [[24, 25, 26, 27], [28]]]
  ex, counts = batching.reward_examples(prompts, responses, [[1, 0, 2], [0, 1]], 6, BOS, EOS, PAD)
  assert ex['tokens'].shape == (2, 3, 6) and ex['ranks'].dtype == np.int32
  assert ex['valid'].tolist() == [[True] * 3, [True, True, False]]
  assert ex['ranks'].tolist() == [[1, 0, 2], [0, 1, -1]]
  assert ex['tokens'][0, 1].tolist() == [BOS, 10, 21, 22, EOS, PAD]
  # A cut response has no EOS: it did not end where the model sees it.
  assert ex['tokens'][1, 0].tolist() == [BOS, 11, 12, 24, 25, 26]
  assert counts['response_truncated'] == 1 and ex['index'].tolist() == [0, 1]
  assert not ex['mask'][1, 2].any() and ex['mask'][0, 0].sum() == 4
  ex, counts = batching.reward_examples(prompts, responses, [[1, 0, 2], [0, 1]], 6, BOS, EOS, PAD,
                                        max_k=4, overlong='drop')
  assert ex['tokens'].shape == (1, 4, 6) and counts == {**NO_CUTS, 'dropped': 1}
  assert ex['index'].tolist() == [0]


def test_reward_rows_put_eos_only_where_a_sample_ended():
  """Issue 19 item 7: sampled responses keep their ids; EOS only if the sample emitted it;
  an empty sample stays empty (its row is BOS prompt EOS)."""
  ex, counts = batching.reward_examples(
      [[10]], [[[20, 21], [22, 23, 24], []]], [[0, 2, 1]], 8, BOS, EOS, PAD,
      ended=[[True, False, True]])
  assert ex['tokens'][0].tolist() == [[BOS, 10, 20, 21, EOS, PAD, PAD, PAD],
                                      [BOS, 10, 22, 23, 24, PAD, PAD, PAD],
                                      [BOS, 10, EOS, PAD, PAD, PAD, PAD, PAD]]
  assert counts == NO_CUTS  # an unfinished sample is not a cut


def test_prompts_are_left_padded_and_truncated_from_the_left():
  prompts = [[10, 11], [12, 13, 14, 15, 16, 17], [18]]
  ex, counts = batching.prompt_examples(prompts, 5, BOS, PAD)
  assert ex['prompt'].tolist() == [[PAD, PAD, BOS, 10, 11], [BOS, 14, 15, 16, 17],
                                   [PAD, PAD, PAD, BOS, 18]]
  assert ex['prompt_mask'].tolist()[0] == [False, False, True, True, True]
  assert ex['index'].tolist() == [0, 1, 2]
  assert counts == {'truncated': 1, 'prompt_truncated': 1, 'dropped': 0}
  ex, counts = batching.prompt_examples(prompts, 5, BOS, PAD, overlong='drop')
  assert ex['index'].tolist() == [0, 2] and counts['dropped'] == 1


def make_batcher(n=23, global_batch=4, **kw):
  examples = {'x': np.arange(n, dtype=np.int32), 'y': np.arange(n * 2).reshape(n, 2)}
  return batching.Batcher(examples, global_batch, seed=7, name='toy', **kw)


def test_resumed_batcher_yields_exactly_the_remaining_batches():
  b = make_batcher()
  assert b.steps_per_epoch == 5
  full = [next(b)['x'].tolist() for _ in range(17)]  # spans 4 epochs
  resumed = make_batcher(start_step=9)
  assert [next(resumed)['x'].tolist() for _ in range(8)] == full[9:]
  other = make_batcher()
  other.restore(b.state())
  assert other.step == 17 and next(other)['x'].tolist() == b.get(17)['x'].tolist()
  # Within an epoch no example repeats; epochs are shuffled differently.
  epoch0 = sum(full[:5], [])
  assert len(set(epoch0)) == 20 and sum(full[5:10], []) != epoch0


def test_host_slices_concatenate_to_the_global_batch():
  one = make_batcher(global_batch=6)
  hosts = [make_batcher(global_batch=6, process_index=i, process_count=3) for i in range(3)]
  for step in (0, 2, 3, 11):
    parts = [h.get(step) for h in hosts]
    assert all(p['x'].shape == (2,) for p in parts)
    for key in ('x', 'y'):
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), one.get(step)[key])


def test_batcher_errors_name_the_dataset():
  with pytest.raises(ValueError, match="dataset 'toy' is empty"):
    make_batcher(n=0)
  with pytest.raises(ValueError, match="dataset 'toy' has 3 examples, fewer than one global batch of 4"):
    make_batcher(n=3)
  with pytest.raises(ValueError, match='global_batch 4 does not divide evenly over 3 processes'):
    make_batcher(process_count=3)
  with pytest.raises(ValueError, match='differ in length'):
    batching.Batcher({'a': np.zeros(4), 'b': np.zeros(5)}, 2)
  with pytest.raises(ValueError, match='seed'):
    make_batcher().restore({'step': 3, 'seed': 8})


def test_best_of_k_examples_without_bos():
  """Sampled rows of a BOS-less tokenizer: an unfinished sample loses only its EOS target."""
  from rlhf_jax.stages.best_of_k import build_examples
  prompt = np.array([[PAD, PAD, 5, 6], [7, 8, 9, 10]])
  response = np.array([[4, 4, EOS, PAD], [3, 3, 3, 3]])
  rmask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], bool)
  ex, stats = build_examples(prompt, prompt != PAD, response, rmask, np.array([True, False]),
                             bos_id=None, eos_id=EOS, pad_id=PAD)
  assert stats == {'no_eos': 1}
  assert ex['tokens'].tolist() == [[5, 6, 4, 4, EOS, PAD, PAD, PAD], [7, 8, 9, 10, 3, 3, 3, 3]]
  assert ex['loss_mask'].tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]]
