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

Sequences start with BOS and are right-padded with pad_id, except prompts,
which are left-padded so that generation continues from the last column.
Overlong inputs are truncated or dropped (`overlong=`) and always counted.
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
                bos_id: int) -> np.ndarray:
  """nanoGPT-style packing: BOS doc EOS BOS doc EOS ... cut into [N, seq_len].

  The tail that does not fill a row is dropped; nothing is padded, so every
  token of every row is trained on.
  """
  stream = [t for doc in token_lists for t in (bos_id, *doc, eos_id)]
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


def sft_examples(prompt_ids: Sequence[Tokens], response_ids: Sequence[Tokens],
                 max_len: int, bos_id: int, eos_id: int, pad_id: int,
                 overlong: str = 'truncate') -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Rows BOS prompt response EOS pad...; loss only on the response and its EOS.

  overlong='truncate' cuts the response (and its EOS: a cut response did not
  end, so the model must not learn to stop there); a prompt that leaves no
  room for a single response token is dropped either way. Returns
  (examples, {'truncated': n, 'dropped': n}).
  """
  _check_overlong(overlong)
  if len(prompt_ids) != len(response_ids):
    raise ValueError(f'{len(prompt_ids)} prompts but {len(response_ids)} responses')
  rows, targets, counts = [], [], {'truncated': 0, 'dropped': 0}
  for prompt, response in zip(prompt_ids, response_ids):
    head, tail = [bos_id, *prompt], [*response, eos_id]
    if len(head) + len(tail) > max_len:
      if overlong == 'drop' or len(head) >= max_len:
        counts['dropped'] += 1
        continue
      tail = tail[:max_len - len(head)]
      counts['truncated'] += 1
    rows.append(head + tail)
    targets.append(len(head))
  if not rows:
    raise ValueError(f'no SFT example fits in max_len={max_len} '
                     f'({counts["dropped"]} of {len(prompt_ids)} dropped)')
  tokens, mask = _right_pad(rows, max_len, pad_id)
  loss_mask = mask.astype(np.float32)
  loss_mask[np.arange(max_len)[None, :] < np.asarray(targets)[:, None]] = 0.0
  return {'tokens': tokens, 'mask': mask, 'loss_mask': loss_mask}, counts


def _right_pad(rows: list[list[int]], length: int, pad_id: int):
  tokens = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = True
  return tokens, mask


# -------------------------------------------------------------------- reward

def reward_examples(prompt_ids: Sequence[Tokens], responses_ids: Sequence[Sequence[Tokens]],
                    ranks: Sequence[Sequence[int]], max_len: int, bos_id: int,
                    eos_id: int, pad_id: int, max_k: int | None = None,
                    overlong: str = 'truncate') -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Comparisons -> rows BOS prompt response EOS, [N, max_k, max_len].

  Comparisons with fewer than max_k responses (default: the largest K seen)
  are padded with valid=False rows. Truncation cuts the response but keeps
  the EOS, so the reward is always read at an EOS token; a comparison whose
  prompt leaves no room for one response token plus EOS is dropped, as is
  any overlong one under overlong='drop'.
  """
  _check_overlong(overlong)
  if not len(prompt_ids) == len(responses_ids) == len(ranks):
    raise ValueError(f'{len(prompt_ids)} prompts, {len(responses_ids)} response lists, '
                     f'{len(ranks)} rank lists: these must match')
  k_seen = max((len(r) for r in responses_ids), default=0)
  max_k = k_seen if max_k is None else max_k
  if k_seen > max_k:
    raise ValueError(f'a comparison has {k_seen} responses, more than max_k={max_k}')
  kept, counts = [], {'truncated': 0, 'dropped': 0}
  for prompt, responses, rank in zip(prompt_ids, responses_ids, ranks):
    if len(rank) != len(responses):
      raise ValueError(f'{len(responses)} responses but {len(rank)} ranks')
    head = [bos_id, *prompt]
    room = max_len - len(head) - 1  # for response tokens, before EOS
    too_long = any(len(r) > room for r in responses)
    if room < 1 or (too_long and overlong == 'drop'):
      counts['dropped'] += 1
      continue
    counts['truncated'] += too_long
    kept.append(([head + [*r[:room], eos_id] for r in responses], rank))
  if not kept:
    raise ValueError(f'no comparison fits in max_len={max_len} '
                     f'({counts["dropped"]} of {len(prompt_ids)} dropped)')
  n = len(kept)
  tokens = np.full((n, max_k, max_len), pad_id, np.int32)
  mask = np.zeros((n, max_k, max_len), bool)
  out_ranks = np.full((n, max_k), -1, np.int32)
  valid = np.zeros((n, max_k), bool)
  for i, (rows, rank) in enumerate(kept):
    k = len(rows)
    tokens[i, :k], mask[i, :k] = _right_pad(rows, max_len, pad_id)
    out_ranks[i, :k] = rank
    valid[i, :k] = True
  return {'tokens': tokens, 'mask': mask, 'ranks': out_ranks, 'valid': valid}, counts


# ------------------------------------------------------------------- prompts

def prompt_examples(prompt_ids: Sequence[Tokens], max_len: int, bos_id: int,
                    pad_id: int, overlong: str = 'truncate'
                    ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
  """Prompts -> LEFT-padded BOS prompt rows for generation, [N, max_len].

  Left padding puts every prompt's last token in the last column, so one
  sampling loop continues all of them. Overlong prompts keep BOS and their
  END (the part nearest to what is generated) under 'truncate'.
  """
  _check_overlong(overlong)
  rows, index, counts = [], [], {'truncated': 0, 'dropped': 0}
  for i, prompt in enumerate(prompt_ids):
    row = [bos_id, *prompt]
    if len(row) > max_len:
      if overlong == 'drop' or max_len < 2:
        counts['dropped'] += 1
        continue
      row = [bos_id, *prompt[len(prompt) - (max_len - 1):]]
      counts['truncated'] += 1
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
