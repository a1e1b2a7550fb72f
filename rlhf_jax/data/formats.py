"""Readers for local preference / SFT / text files, with errors that name the line.

Every reader yields plain dicts of one of three record types:

  ranking: {'prompt': str, 'responses': [str, ...] (2..9), 'ranks': [int, ...]}
           ranks[i] is the rank of responses[i]; 0 = best, equal ranks = tie.
  sft:     {'prompt': str, 'response': str}
  text:    {'text': str}

A bad row raises `DataError("path:LINE: what is wrong")` (1-based lines) unless
`skip_bad=True`, in which case it is skipped and counted in `stats` by reason.
Files are read in binary and decoded line by line, so one non-UTF-8 line is a
bad row rather than a crash of the whole file. A file with no valid rows is an
error: silently training on nothing is worse than stopping.
"""
import collections
import dataclasses
import json
import os
from typing import Any, Callable, Iterator

MAX_K = 9  # InstructGPT showed labelers 4..9 responses; more is probably a bug.
HUMAN = '\n\nHuman:'
ASSISTANT = '\n\nAssistant:'


class DataError(ValueError):
  """A data file (or record) is malformed; the message says where and why."""


@dataclasses.dataclass
class ReadStats:
  """What a reader accepted and skipped. Share one across files to sum them."""
  read: int = 0
  skipped: collections.Counter = dataclasses.field(
      default_factory=collections.Counter)  # reason -> count

  @property
  def num_skipped(self) -> int:
    return sum(self.skipped.values())

  def as_dict(self) -> dict:
    return {'read': self.read, 'skipped': dict(self.skipped)}


class _Bad(Exception):
  """A row is bad for `reason`; the reader adds path:line and decides to skip."""

  def __init__(self, reason: str, msg: str):
    super().__init__(msg)
    self.reason, self.msg = reason, msg


_JSON_TYPE = {dict: 'object', list: 'array', str: 'string', int: 'integer',
              float: 'number', bool: 'boolean', type(None): 'null'}


def _type_name(v: Any) -> str:
  return _JSON_TYPE.get(type(v), type(v).__name__)


def _get(row: dict, key: str, typ: type, where: str = '') -> Any:
  if not isinstance(row, dict):
    raise _Bad('wrong_type', f"'{where}' must be an object, got {_type_name(row)}")
  name = f'{where}.{key}' if where else key
  if key not in row:
    raise _Bad('missing_field', f"missing field '{name}'")
  v = row[key]
  # bool is an int subclass in Python but never a valid rank or choice.
  if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
    raise _Bad('wrong_type', f"field '{name}' must be {_JSON_TYPE[typ]}, "
               f'got {_type_name(v)}')
  return v


def _nonempty(text: str, name: str) -> str:
  if not text.strip():
    raise _Bad('empty', f"'{name}' is empty")
  return text


# ---------------------------------------------------------------- row parsers
# Each takes one decoded JSON object and returns a record or raises _Bad.

def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str]:
  """HH-RLHF pair -> (prompt, chosen_response, rejected_response).

  The prompt is everything up to and including the last '\\n\\nAssistant:'
  marker, which must be the same in both strings; only the final assistant
  turn differs between chosen and rejected in the released data.
  """
  cut = chosen.rfind(ASSISTANT)
  if cut < 0:
    raise _Bad('bad_dialogue', "'chosen' has no '\\n\\nAssistant:' turn")
  if HUMAN not in chosen[:cut]:
    raise _Bad('bad_dialogue', "'chosen' has no '\\n\\nHuman:' turn before the "
               'last assistant turn')
  cut += len(ASSISTANT)
  prompt = chosen[:cut]
  if rejected.rfind(ASSISTANT) + len(ASSISTANT) != cut or not rejected.startswith(prompt):
    raise _Bad('bad_dialogue', "'chosen' and 'rejected' do not share the dialogue "
               "up to the last '\\n\\nAssistant:' marker")
  a, b = chosen[cut:], rejected[cut:]
  if HUMAN in a or HUMAN in b:
    raise _Bad('bad_dialogue', 'the final turn is not an assistant turn')
  return prompt, _nonempty(a, 'chosen response'), _nonempty(b, 'rejected response')


def _parse_hh(row: dict) -> dict:
  prompt, a, b = split_hh_dialogue(_get(row, 'chosen', str), _get(row, 'rejected', str))
  return {'prompt': prompt, 'responses': [a, b], 'ranks': [0, 1]}


def tldr_prompt(subreddit: str, title: str, post: str) -> str:
  """The TL;DR prompt format of Stiennon et al. (2020)."""
  subreddit = subreddit[2:] if subreddit.startswith('r/') else subreddit
  return f'SUBREDDIT: r/{subreddit}\nTITLE: {title}\nPOST: {post}\nTL;DR:'


def _parse_tldr(row: dict) -> dict:
  info = _get(row, 'info', dict)
  prompt = tldr_prompt(*(_get(info, k, str, 'info') for k in ('subreddit', 'title', 'post')))
  summaries = _get(row, 'summaries', list)
  if len(summaries) != 2:
    raise _Bad('bad_k', f"'summaries' must hold 2 entries, got {len(summaries)}")
  texts = [_nonempty(_get(s, 'text', str, f'summaries[{i}]'), f'summaries[{i}].text')
           for i, s in enumerate(summaries)]
  choice = _get(row, 'choice', int)
  if choice not in (0, 1):
    raise _Bad('bad_ranking', f"'choice' must be 0 or 1, got {choice}")
  return {'prompt': prompt, 'responses': texts, 'ranks': [0, 1] if choice == 0 else [1, 0]}


def check_ranks(ranks: list, k: int, allow_ties: bool = False,
                name: str = 'ranking') -> list[int]:
  """Validates InstructGPT-style ranks (ranks[i] = rank of response i, 0 = best).

  Without ties they must be a permutation of 0..K-1. With ties, equal values
  mean a tie and the distinct values must be 0..m (dense), so that one
  ordering has exactly one spelling.
  """
  if len(ranks) != k:
    raise _Bad('bad_ranking', f"'{name}' has {len(ranks)} entries for {k} responses")
  if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
    raise _Bad('wrong_type', f"'{name}' must hold integers")
  if allow_ties:
    if sorted(set(ranks)) != list(range(len(set(ranks)))):
      raise _Bad('bad_ranking', f"'{name}' {ranks} must use the ranks 0..m with no gaps")
    if len(set(ranks)) < 2:
      raise _Bad('bad_ranking', f"'{name}' {ranks} ties every response: no preference")
  elif sorted(ranks) != list(range(k)):
    raise _Bad('bad_ranking', f"'{name}' {ranks} is not a permutation of 0..{k - 1} "
               '(ties need allow_ties=True)')
  return list(ranks)


def _responses(row: dict, allow_empty: bool) -> list:
  """'responses': 2..MAX_K strings (non-empty unless allow_empty: a label-stage sample may be)."""
  responses = _get(row, 'responses', list)
  if not 2 <= len(responses) <= MAX_K:
    raise _Bad('bad_k', f"'responses' must hold 2..{MAX_K} entries, got {len(responses)}")
  for i, r in enumerate(responses):
    if not isinstance(r, str):
      raise _Bad('wrong_type', f"'responses[{i}]' must be string, got {_type_name(r)}")
    if not allow_empty:
      _nonempty(r, f'responses[{i}]')
  return responses


def _parse_kway(row: dict, allow_ties: bool = False, key: str = 'ranking') -> dict:
  prompt, responses = _get(row, 'prompt', str), _responses(row, allow_empty=False)
  ranks = check_ranks(_get(row, key, list), len(responses), allow_ties, key)
  return {'prompt': prompt, 'responses': list(responses), 'ranks': ranks}


def _token_ids(value, name: str) -> list[int]:
  if not isinstance(value, list) or not all(
      isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
    raise _Bad('wrong_type', f"'{name}' must be an array of non-negative integers")
  return value


def _parse_sampled(row: dict) -> dict:
  """The label stage's K samples per prompt, as sampled (issue 19 item 7).

  Besides the K-way fields ('responses' may hold empty texts here), the token ids:
  'prompt_ids' (what the samples were conditioned on, no BOS), 'response_ids' (each
  sample's ids, without its EOS) and 'ended' (whether the sample emitted EOS).
  """
  prompt, responses = _get(row, 'prompt', str), _responses(row, allow_empty=True)
  k = len(responses)
  ranks = check_ranks(_get(row, 'ranking', list), k, allow_ties=True)
  prompt_ids = _token_ids(_get(row, 'prompt_ids', list), 'prompt_ids')
  response_ids = _get(row, 'response_ids', list)
  ended = _get(row, 'ended', list)
  if len(response_ids) != k or len(ended) != k:
    raise _Bad('bad_k', f"'response_ids' and 'ended' must hold {k} entries like 'responses'")
  response_ids = [_token_ids(r, f'response_ids[{i}]') for i, r in enumerate(response_ids)]
  if not all(isinstance(e, bool) for e in ended):
    raise _Bad('wrong_type', "'ended' must hold booleans")
  for i, (r, e) in enumerate(zip(response_ids, ended)):
    if not r and not e:
      raise _Bad('bad_sample', f"'response_ids[{i}]' is empty but the sample did not end")
  return {'prompt': prompt, 'responses': list(responses), 'ranks': ranks,
          'prompt_ids': prompt_ids, 'response_ids': response_ids, 'ended': list(ended)}


def _parse_sft(row: dict) -> dict:
  return {'prompt': _get(row, 'prompt', str),
          'response': _nonempty(_get(row, 'response', str), 'response')}


def _parse_text(row: dict) -> dict:
  return {'text': _nonempty(_get(row, 'text', str), 'text')}


# ------------------------------------------------------------------ file loops

def _rows(path, parse: Callable[[dict], dict], skip_bad: bool,
          stats: ReadStats | None) -> Iterator[dict]:
  """JSONL loop shared by all readers: decode, parse, report or skip."""
  path = os.fspath(path)
  stats = ReadStats() if stats is None else stats
  if not os.path.isfile(path):
    raise DataError(f'{path}: no such file')
  good = bad = 0
  with open(path, 'rb') as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        continue  # blank lines (e.g. a trailing newline) are not rows
      try:
        try:
          line = raw.decode('utf-8')
        except UnicodeDecodeError as e:
          raise _Bad('not_utf8', f'not valid UTF-8 (byte {e.start})') from None
        try:
          row = json.loads(line)
        except json.JSONDecodeError as e:
          raise _Bad('bad_json', f'invalid JSON: {e.msg} (column {e.colno})') from None
        if not isinstance(row, dict):
          raise _Bad('wrong_type', f'row must be a JSON object, got {_type_name(row)}')
        record = parse(row)
      except _Bad as e:
        if not skip_bad:
          raise DataError(f'{path}:{lineno}: {e.msg}') from None
        stats.skipped[e.reason] += 1
        bad += 1
        continue
      stats.read += 1
      good += 1
      yield record
  if not good:
    raise DataError(f'{path}: no valid records' + (f' ({bad} bad rows skipped)' if bad else ''))


def read_hh_rlhf(path, *, skip_bad: bool = False, stats: ReadStats | None = None):
  """Anthropic HH-RLHF JSONL ({'chosen', 'rejected'}) -> ranking records."""
  return _rows(path, _parse_hh, skip_bad, stats)


def read_tldr(path, *, skip_bad: bool = False, stats: ReadStats | None = None):
  """OpenAI summarize-from-feedback comparisons JSONL -> ranking records."""
  return _rows(path, _parse_tldr, skip_bad, stats)


def read_kway(path, *, allow_ties: bool = False, skip_bad: bool = False,
              stats: ReadStats | None = None):
  """{'prompt', 'responses': K strings, 'ranking': K ints} JSONL -> ranking records."""
  return _rows(path, lambda row: _parse_kway(row, allow_ties), skip_bad, stats)


def read_sampled_ranking(path, *, skip_bad: bool = False, stats: ReadStats | None = None):
  """The label stage's JSONL with token ids -> ranking records plus 'prompt_ids',
  'response_ids', 'ended' (see `_parse_sampled`)."""
  return _rows(path, _parse_sampled, skip_bad, stats)


def read_sft(path, *, skip_bad: bool = False, stats: ReadStats | None = None):
  """{'prompt', 'response'} JSONL -> sft records."""
  return _rows(path, _parse_sft, skip_bad, stats)


def read_text(path, *, skip_bad: bool = False, stats: ReadStats | None = None):
  """Pretraining corpus -> text records.

  `.txt`: one document per blank-line-separated block (newlines inside a block
  are kept). Anything else is read as JSONL with a 'text' field.
  """
  if not os.fspath(path).endswith('.txt'):
    return _rows(path, _parse_text, skip_bad, stats)
  return _txt_blocks(os.fspath(path), skip_bad, ReadStats() if stats is None else stats)


def _txt_blocks(path: str, skip_bad: bool, stats: ReadStats) -> Iterator[dict]:
  if not os.path.isfile(path):
    raise DataError(f'{path}: no such file')
  good = bad = 0
  block, broken = [], False

  def flush():
    nonlocal good, block, broken
    out = None
    if block and not broken:
      out = {'text': ''.join(block).rstrip('\n')}
      stats.read += 1
      good += 1
    block, broken = [], False
    return out

  with open(path, 'rb') as f:
    for lineno, raw in enumerate(f, 1):
      if not raw.strip():
        if (doc := flush()) is not None:
          yield doc
        continue
      try:
        block.append(raw.decode('utf-8'))
      except UnicodeDecodeError as e:
        if not skip_bad:
          raise DataError(f'{path}:{lineno}: not valid UTF-8 (byte {e.start})') from None
        if not broken:  # the whole document goes, counted once
          stats.skipped['not_utf8'] += 1
          bad += 1
        broken = True
    if (doc := flush()) is not None:
      yield doc
  if not good:
    raise DataError(f'{path}: no valid records' + (f' ({bad} bad documents skipped)' if bad else ''))


READERS = {'hh_rlhf': read_hh_rlhf, 'tldr': read_tldr, 'kway': read_kway,
           'sft': read_sft, 'text': read_text}
RECORD_KIND = {'hh_rlhf': 'ranking', 'tldr': 'ranking', 'kway': 'ranking',
               'sft': 'sft', 'text': 'text'}


def read(fmt: str, path, **kwargs) -> Iterator[dict]:
  """read('hh_rlhf' | 'tldr' | 'kway' | 'sft' | 'text', path, skip_bad=..., stats=...)."""
  if fmt not in READERS:
    raise ValueError(f'unknown data format {fmt!r}; expected one of {sorted(READERS)}')
  return READERS[fmt](path, **kwargs)


_CHECKS = {'ranking': lambda r: _parse_kway(r, allow_ties=True, key='ranks'),
           'sft': _parse_sft, 'text': _parse_text,
           'prompt': lambda r: {'prompt': _get(r, 'prompt', str)}}


def check_record(kind: str, record: dict, where: str) -> dict:
  """Validates a record made in Python (e.g. by the synthetic world).

  `kind` is 'ranking' (ties allowed), 'sft', 'text' or 'prompt'; errors read
  `where: what is wrong`. Returns the record restricted to its known fields.
  """
  try:
    return _CHECKS[kind](record)
  except _Bad as e:
    raise DataError(f'{where}: {e.msg}') from None
