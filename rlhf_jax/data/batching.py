"""Token lists -> fixed-shape numpy examples -> deterministic per-host batches.

Batch formats (numpy; the trainer turns them into global jax arrays):

  LM / SFT  {'tokens': int32 [B, L], 'mask': bool [B, L] (real tokens),
             'loss_mask': float32 [B, L] (1 where the token is a loss target;
             token t is predicted from position t-1, so position 0 is never one)}
  reward    {'tokens': int32 [B, K, L], 'mask': bool [B, K, L],
             'ranks': int32 [B, K] (0 = best, -1 where not valid),
             'valid': bool [B, K] (False for padding responses when K varies)}
  prompts   {'prompt': int32 [B, P] LEFT-padded, 'prompt_mask': bool [B, P],
             'index': int32 [B] (position of the prompt in the input list)}

Sequences start with BOS (none when the tokenizer has none: bos_id None) and are
right-padded with pad_id, except prompts, which are left-padded so that generation
continues from the last column. Prompt and response have separate token budgets
(`fit_row`); an over-long prompt keeps its end, an over-long response is cut, or
either drops the row (`overlong=`), and every cut or drop is counted.
"""
from typing import Iterator, Sequence

import numpy as np

Tokens = Sequence[int]
_OVERLONG = ('truncate', 'drop')


def _check_overlong(overlong: str):
  if overlong not in _OVERLONG:
    raise ValueError(f"overlong must be one of {_OVERLONG}, got {overlong!r}")


# ------------------------------------------------------------------ LM / SFT

def pack_corpus(token_lists: Sequence[Tokens], seq_len: int, eos_id: int,
                bos_id: int | None) -> np.ndarray:
  """nanoGPT-style packing: BOS doc EOS BOS doc EOS ... cut into [N, seq_len].

  Without a BOS (bos_id None: Qwen, GPT-2) documents are separated by EOS alone.
  The tail that does not fill a row is dropped; nothing is padded, so every
  token of every row is trained on.
  """
  bos = () if bos_id is None else (bos_id,)
  stream = [t for doc in token_lists for t in (*bos, *doc, eos_id)]
  n = len(stream) // seq_len
  if n == 0:
    raise ValueError(f'corpus has {len(stream)} tokens, fewer than one row of {seq_len}')
  return np.asarray(stream[:n * seq_len], np.int32).reshape(n, seq_len)


def lm_examples(rows: np.ndarray) -> dict[str, np.ndarray]:
  """Packed rows -> LM examples: every token real, every token but the first a target."""
  rows = np.asarray(rows, np.int32)
  loss_mask = np.ones(rows.shape, np.float32)
  loss_mask[:, 0] = 0.0  # nothing precedes position 0 to predict it from
  return {'tokens': rows, 'mask': np.ones(rows.shape, bool), 'loss_mask': loss_mask}


def fit_row(prompt: Tokens, response: Tokens, ended: bool, max_len: int, bos_id: int | None,
            eos_id: int, max_prompt_len: int = 0, max_response_len: int = 0):
  """One prompt + response -> (head, tail, prompt_cut, response_cut) within the budgets.

  head = [BOS] + prompt, at most `max_prompt_len` tokens (0: max_len - 1): an over-long
  prompt keeps BOS and its END, the most recent turns, which the response answers.
  tail = response + [EOS if ended], at most `max_response_len` tokens (0: no cap of its
  own) and what the head leaves of max_len. A cut response gets no EOS: it did not end
  where the model sees it (a model taught to stop there would stop mid-sentence).
  """
  bos = [] if bos_id is None else [bos_id]
  budget = min(max_prompt_len or max_len - 1, max_len - 1)
  prompt_cut = len(bos) + len(prompt) > budget
  if prompt_cut:
    keep = max(budget - len(bos), 0)
    prompt = prompt[len(prompt) - keep:] if keep else []
  head = bos + list(prompt)
  room = max_len - len(head)
  if max_response_len:
    room = min(room, max_response_len)
  tail = list(response) + ([eos_id] if ended else [])
  response_cut = len(tail) > room
  if response_cut:
    tail = list(response)[:room]
  return head, tail, prompt_cut, response_cut


def _counts() -> dict[str, int]:
  # truncated = rows with any cut (prompt or response); kept for older readers.
  return {'truncated': 0, 'prompt_truncated': 0, 'response_truncated': 0, 'dropped': 0}


def sft_examples(prompt_ids: Sequence[Tokens], response_ids: Sequence[Tokens],
                 max_len: int, bos_id: int | None, eos_id: int, pad_id: int,
                 overlong: str = 'truncate', *, max_prompt_len: int = 0,
                 max_response_len: int = 0) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Rows BOS prompt response EOS pad... ([N, width], width: `padded_width`); loss only on
  the response and its EOS.

  Budgets as in `fit_row`: overlong='truncate' keeps a long prompt's end and cuts a
  long response (and its EOS); 'drop' drops any row that needs a cut. Returns
  (examples, {'truncated', 'prompt_truncated', 'response_truncated', 'dropped'}).
  """
  _check_overlong(overlong)
  if len(prompt_ids) != len(response_ids):
    raise ValueError(f'{len(prompt_ids)} prompts but {len(response_ids)} responses')
  rows, targets, counts = [], [], _counts()
  for prompt, response in zip(prompt_ids, response_ids):
    head, tail, p_cut, r_cut = fit_row(prompt, response, True, max_len, bos_id, eos_id,
                                       max_prompt_len, max_response_len)
    if (p_cut or r_cut) and overlong == 'drop':
      counts['dropped'] += 1
      continue
    _count(counts, p_cut, r_cut)
    rows.append(head + tail)
    targets.append(len(head))
  if not rows:
    raise ValueError(f'no SFT example fits in max_len={max_len} '
                     f'({counts["dropped"]} of {len(prompt_ids)} dropped)')
  tokens, mask = _right_pad(rows, padded_width([len(r) for r in rows], max_len), pad_id)
  loss_mask = mask.astype(np.float32)
  loss_mask[np.arange(tokens.shape[1])[None, :] < np.asarray(targets)[:, None]] = 0.0
  loss_mask[:, 0] = 0.0  # nothing precedes position 0 (an empty prompt without BOS)
  return {'tokens': tokens, 'mask': mask, 'loss_mask': loss_mask}, counts


def _count(counts: dict, p_cut: bool, r_cut: bool):
  counts['prompt_truncated'] += bool(p_cut)
  counts['response_truncated'] += bool(r_cut)
  counts['truncated'] += bool(p_cut or r_cut)


# Rows are padded to the longest row of the data set (rounded up to a multiple of this),
# not to data.max_len: the budget is an upper bound, and padding that no row needs is
# compute every forward pays (the default pipeline's SFT and reward rows are at most 48
# tokens of an 80-token budget). Causal attention and right padding make the extra
# positions invisible to the real tokens, so only the cost changes.
PAD_MULTIPLE = 8


def padded_width(lengths, max_len: int, multiple: int = PAD_MULTIPLE) -> int:
  """The row width for rows of these lengths: the longest, rounded up, at most max_len."""
  longest = max(lengths, default=1)
  return min(max_len, -(-max(longest, 1) // multiple) * multiple)


def _right_pad(rows: list[list[int]], length: int, pad_id: int):
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = True
  return tokens, mask


# -------------------------------------------------------------------- reward

def reward_examples(prompt_ids: Sequence[Tokens], responses_ids: Sequence[Sequence[Tokens]],
                    ranks: Sequence[Sequence[int]], max_len: int, bos_id: int | None,
                    eos_id: int, pad_id: int, max_k: int | None = None,
                    overlong: str = 'truncate', *, ended: Sequence[Sequence[bool]] | None = None,
                    max_prompt_len: int = 0, max_response_len: int = 0
                    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Comparisons -> rows BOS prompt response [EOS], [N, max_k, width] (width: `padded_width`).

  EOS follows a response only where it ended: `ended[i][j]` for sampled responses (the
  label stage's token-level truth), every written response otherwise, and never after
  a cut (`fit_row`). The reward is read at the last real token, as PPO reads it
  (policy_eval.last_index), so a response the policy never finished looks unfinished
  to the reward model too. Comparisons with fewer than max_k responses (default: the
  largest K seen) are padded with valid=False rows; overlong='drop' drops a comparison
  that needs any cut. `index` holds each kept comparison's position in the input.
  """
  _check_overlong(overlong)
  if not len(prompt_ids) == len(responses_ids) == len(ranks):
    raise ValueError(f'{len(prompt_ids)} prompts, {len(responses_ids)} response lists, '
                     f'{len(ranks)} rank lists: these must match')
  k_seen = max((len(r) for r in responses_ids), default=0)
  max_k = k_seen if max_k is None else max_k
  if k_seen > max_k:
    raise ValueError(f'a comparison has {k_seen} responses, more than max_k={max_k}')
  kept, index, counts = [], [], _counts()
  for i, (prompt, responses, rank) in enumerate(zip(prompt_ids, responses_ids, ranks)):
    if len(rank) != len(responses):
      raise ValueError(f'{len(responses)} responses but {len(rank)} ranks')
    done = [True] * len(responses) if ended is None else list(ended[i])
    fits = [fit_row(prompt, r, e, max_len, bos_id, eos_id, max_prompt_len, max_response_len)
            for r, e in zip(responses, done)]
    p_cut, r_cut = any(f[2] for f in fits), any(f[3] for f in fits)
    if (p_cut or r_cut) and overlong == 'drop':
      counts['dropped'] += 1
      continue
    _count(counts, p_cut, r_cut)
    kept.append(([head + tail for head, tail, _, _ in fits], rank))
    index.append(i)
  if not kept:
    raise ValueError(f'no comparison fits in max_len={max_len} '
                     f'({counts["dropped"]} of {len(prompt_ids)} dropped)')
  n = len(kept)
  width = padded_width([len(row) for rows, _ in kept for row in rows], max_len)
  tokens = np.full((n, max_k, width), pad_id, np.int32)
  mask = np.zeros((n, max_k, width), bool)
  out_ranks = np.full((n, max_k), -1, np.int32)
  valid = np.zeros((n, max_k), bool)
  for i, (rows, rank) in enumerate(kept):
    k = len(rows)
    tokens[i, :k], mask[i, :k] = _right_pad(rows, width, pad_id)
    out_ranks[i, :k] = rank
    valid[i, :k] = True
  return {'tokens': tokens, 'mask': mask, 'ranks': out_ranks, 'valid': valid,
          'index': np.asarray(index, np.int32)}, counts


# ------------------------------------------------------------------- prompts

def prompt_examples(prompt_ids: Sequence[Tokens], max_len: int, bos_id: int | None,
                    pad_id: int, overlong: str = 'truncate'
                    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Prompts -> LEFT-padded BOS prompt rows for generation, [N, max_len].

  Left padding puts every prompt's last token in the last column, so one
  sampling loop continues all of them. Overlong prompts keep BOS and their
  END (the part nearest to what is generated) under 'truncate'. A prompt with
  no token at all (empty, and no BOS) has nothing to continue and is dropped.
  """
  _check_overlong(overlong)
  bos = [] if bos_id is None else [bos_id]
  rows, index = [], []
  counts = {'truncated': 0, 'prompt_truncated': 0, 'dropped': 0}
  for i, prompt in enumerate(prompt_ids):
    row = bos + list(prompt)
    if len(row) > max_len:
      if overlong == 'drop' or max_len <= len(bos):
        counts['dropped'] += 1
        continue
      row = bos + list(prompt[len(prompt) - (max_len - len(bos)):])
      counts['truncated'] += 1
      counts['prompt_truncated'] += 1
    if not row:
      counts['dropped'] += 1
      continue
    rows.append(row)
    index.append(i)
  if not rows:
    raise ValueError(f'no prompt fits in max_len={max_len} '
                     f'({counts["dropped"]} of {len(prompt_ids)} dropped)')
  tokens = np.full((len(rows), max_len), pad_id, np.int32)
  mask = np.zeros((len(rows), max_len), bool)
  for j, row in enumerate(rows):
    tokens[j, max_len - len(row):] = row
    mask[j, max_len - len(row):] = True
  return {'prompt': tokens, 'prompt_mask': mask, 'index': np.asarray(index, np.int32)}, counts


# ------------------------------------------------------------------- batcher

class Batcher:
  """Deterministic, resumable, per-host batches over a dict of equal-length arrays.

  `get(step)` is a pure function of (seed, step): epoch e = step //
  steps_per_epoch uses the permutation `default_rng([seed, e])` and drops its
  remainder, so every batch is full and every example appears at most once
  per epoch. Resuming at step s therefore yields exactly the batches an
  uninterrupted run would have seen from s on. Each host gets its contiguous
  slice [process_index * local_batch, +local_batch) of the global batch.
  """

  def __init__(self, examples: dict[str, np.ndarray], global_batch: int, *,
               seed: int = 0, process_index: int = 0, process_count: int = 1,
               start_step: int = 0, shuffle: bool = True, name: str = 'dataset'):
    self.name = name
    if not examples:
      raise ValueError(f"dataset '{name}' has no arrays")
    lengths = {k: len(v) for k, v in examples.items()}
    if len(set(lengths.values())) != 1:
      raise ValueError(f"dataset '{name}': arrays differ in length: {lengths}")
    self.num_examples = next(iter(lengths.values()))
    if global_batch < 1:
      raise ValueError(f'global_batch must be positive, got {global_batch}')
    if self.num_examples == 0:
      raise ValueError(f"dataset '{name}' is empty")
    if self.num_examples < global_batch:
      raise ValueError(f"dataset '{name}' has {self.num_examples} examples, fewer than "
                       f'one global batch of {global_batch}')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} not in [0, {process_count})')
    if global_batch % process_count:
      raise ValueError(f'global_batch {global_batch} does not divide evenly over '
                       f'{process_count} processes')
    self.examples = {k: np.asarray(v) for k, v in examples.items()}
    self.global_batch, self.seed, self.shuffle = global_batch, seed, shuffle
    self.local_batch = global_batch // process_count
    self.process_index, self.process_count = process_index, process_count
    self.steps_per_epoch = self.num_examples // global_batch
    self.step = start_step  # the next step __next__ returns
    self._perm_epoch, self._perm = None, None

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch != self._perm_epoch:  # memo only: the result depends on epoch alone
      self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
                    if self.shuffle else np.arange(self.num_examples))
      self._perm_epoch = epoch
    return self._perm

  def indices(self, step: int) -> np.ndarray:
    """Example indices of this host's part of global batch `step`."""
    if step < 0:
      raise ValueError(f'step must be >= 0, got {step}')
    epoch, i = divmod(step, self.steps_per_epoch)
    start = i * self.global_batch + self.process_index * self.local_batch
    return self._permutation(epoch)[start:start + self.local_batch]

  def get(self, step: int) -> dict[str, np.ndarray]:
    idx = self.indices(step)
    return {k: v[idx] for k, v in self.examples.items()}

  def epoch(self, step: int) -> int:
    return step // self.steps_per_epoch

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = self.get(self.step)
    self.step += 1
    return batch

  def iterate(self, start_step: int = 0, num_steps: int | None = None):
    """Yields (step, batch) from start_step, without touching self.step."""
    step = start_step
    while num_steps is None or step < start_step + num_steps:
      yield step, self.get(step)
      step += 1

  def state(self) -> dict[str, int]:
    return {'step': self.step, 'seed': self.seed}

  def restore(self, state: dict[str, int]):
    if state.get('seed', self.seed) != self.seed:
      raise ValueError(f"dataset '{self.name}': checkpoint was written with seed "
                       f"{state['seed']}, this batcher has seed {self.seed}")
    self.step = int(state['step'])
