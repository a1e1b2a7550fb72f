"""Readers: each format parses, each kind of bad row names its file:line."""
import json
import re

import pytest

from rlhf_jax.data import formats
from rlhf_jax.data.formats import DataError


def write_lines(path, lines):
  """lines: dicts (dumped as JSON), str (written as is) or bytes (raw)."""
  with open(path, 'wb') as f:
    for line in lines:
      if isinstance(line, dict):
        line = json.dumps(line)
      f.write((line.encode() if isinstance(line, str) else line) + b'\n')
  return path


HH = {'chosen': '\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: Knock knock.',
      'rejected': '\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant: No.'}
TLDR = {'info': {'post': 'My cat ignores me.', 'title': 'Cat help', 'subreddit': 'cats'},
        'summaries': [{'text': ' cat is aloof'}, {'text': ' cat sad'}], 'choice': 1}
KWAY = {'prompt': 'Name a colour.', 'responses': ['red', 'blue', 'hmm'], 'ranking': [1, 0, 2]}
SFT = {'prompt': 'Say hi.', 'response': 'Hi!'}


def test_hh_rlhf_splits_shared_prompt_from_final_turns(tmp_path):
  path = write_lines(tmp_path / 'hh.jsonl', [HH])
  [rec] = formats.read_hh_rlhf(path)
  assert rec['prompt'] == '\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Tell a joke\n\nAssistant:'
  assert rec['responses'] == [' Knock knock.', ' No.']
  assert rec['ranks'] == [0, 1]
  assert rec['prompt'] + rec['responses'][0] == HH['chosen']


def test_hh_rlhf_rejects_pairs_with_different_prompts(tmp_path):
  other = dict(HH, rejected=HH['rejected'].replace('Tell a joke', 'Tell a story'))
  path = write_lines(tmp_path / 'hh.jsonl', [HH, other])
  with pytest.raises(DataError, match='^' + re.escape(f'{tmp_path}/hh.jsonl:2: ') + '.*do not share'):
    list(formats.read_hh_rlhf(path))


def test_tldr_prompt_and_ranks_from_choice(tmp_path):
  path = write_lines(tmp_path / 'c.jsonl', [TLDR, dict(TLDR, choice=0)])
  a, b = formats.read_tldr(path)
  assert a['prompt'] == 'SUBREDDIT: r/cats\nTITLE: Cat help\nPOST: My cat ignores me.\nTL;DR:'
  assert a['responses'] == [' cat is aloof', ' cat sad']
  assert a['ranks'] == [1, 0] and b['ranks'] == [0, 1]


def test_kway_permutation_and_ties(tmp_path):
  tie = dict(KWAY, ranking=[0, 0, 1])
  path = write_lines(tmp_path / 'k.jsonl', [KWAY, tie])
  with pytest.raises(DataError, match=r'k.jsonl:2: .*not a permutation'):
    list(formats.read_kway(path))
  recs = list(formats.read_kway(path, allow_ties=True))
  assert [r['ranks'] for r in recs] == [[1, 0, 2], [0, 0, 1]]
  assert recs[0]['responses'] == ['red', 'blue', 'hmm']


def test_sft_and_text_readers(tmp_path):
  assert list(formats.read_sft(write_lines(tmp_path / 's.jsonl', [SFT]))) == [SFT]
  txt = tmp_path / 'c.txt'
  txt.write_text('first doc\nline two\n\n\nsecond doc\n')
  assert list(formats.read_text(txt)) == [{'text': 'first doc\nline two'}, {'text': 'second doc'}]
  jl = write_lines(tmp_path / 'c.jsonl', [{'text': 'héllo'}])
  assert list(formats.read_text(jl)) == [{'text': 'héllo'}]


# (reader, bad row, message fragment, reason counted under skip_bad)
BAD_ROWS = [
    ('kway', '{"prompt": "p", "responses": ["a", "b"]', 'invalid JSON', 'bad_json'),
    ('kway', {'responses': ['a', 'b'], 'ranking': [0, 1]}, "missing field 'prompt'", 'missing_field'),
    ('kway', dict(KWAY, prompt=3), "'prompt' must be string, got integer", 'wrong_type'),
    ('kway', dict(KWAY, responses=['a', '  ', 'c']), "'responses[1]' is empty", 'empty'),
    ('kway', dict(KWAY, responses=['a'], ranking=[0]), 'must hold 2..9 entries, got 1', 'bad_k'),
    ('kway', dict(KWAY, responses=['a'] * 10, ranking=list(range(10))), 'got 10', 'bad_k'),
    ('kway', dict(KWAY, ranking=[0, 1, 1]), 'not a permutation of 0..2', 'bad_ranking'),
    ('kway', dict(KWAY, ranking=[0, True, 2]), 'must hold integers', 'wrong_type'),
    ('kway', b'{"prompt": "caf\xe9", "responses": ["a", "b"], "ranking": [0, 1]}', 'not valid UTF-8', 'not_utf8'),
    ('kway', '[1, 2]', 'must be a JSON object', 'wrong_type'),
    ('sft', {'prompt': 'p', 'response': ''}, "'response' is empty", 'empty'),
    ('sft', {'prompt': 'p'}, "missing field 'response'", 'missing_field'),
    ('hh_rlhf', {'chosen': HH['chosen'], 'rejected': 7}, "'rejected' must be string", 'wrong_type'),
    ('hh_rlhf', dict(HH, chosen=HH['chosen'].replace('Knock knock.', ' ')), 'chosen response', 'empty'),
    ('hh_rlhf', {'chosen': 'no turns', 'rejected': 'x'}, "has no '\\n\\nAssistant:' turn", 'bad_dialogue'),
    ('tldr', dict(TLDR, info={'article': 'cnn text'}), "missing field 'info.subreddit'", 'missing_field'),
    ('tldr', dict(TLDR, choice=2), "'choice' must be 0 or 1", 'bad_ranking'),
    ('tldr', dict(TLDR, summaries=[{'text': 'a'}]), 'must hold 2 entries', 'bad_k'),
    ('text', {'text': 5}, "'text' must be string", 'wrong_type'),
]
GOOD = {'kway': KWAY, 'sft': SFT, 'hh_rlhf': HH, 'tldr': TLDR, 'text': {'text': 'doc'}}


@pytest.mark.parametrize('fmt,bad,fragment,reason', BAD_ROWS)
def test_bad_row_names_file_and_line(tmp_path, fmt, bad, fragment, reason):
  # Line 2 is blank: line numbers count physical lines, blank ones included.
  path = write_lines(tmp_path / 'data.jsonl', [GOOD[fmt], '', GOOD[fmt], bad, GOOD[fmt]])
  with pytest.raises(DataError) as err:
    list(formats.read(fmt, path))
  assert str(err.value).startswith(f'{path}:4: ')
  assert fragment in str(err.value)
  assert isinstance(err.value, ValueError)

  stats = formats.ReadStats()
  assert len(list(formats.read(fmt, path, skip_bad=True, stats=stats))) == 3
  assert stats.read == 3 and dict(stats.skipped) == {reason: 1}


def test_skip_bad_counts_each_reason(tmp_path):
  rows = [KWAY, '{oops', {'prompt': 'p'}, dict(KWAY, ranking=[0, 0, 1]),
          dict(KWAY, ranking=[0, 2, 1, 3]), b'\xff\xfe', KWAY]
  stats = formats.ReadStats()
  recs = list(formats.read_kway(write_lines(tmp_path / 'k.jsonl', rows), skip_bad=True, stats=stats))
  assert len(recs) == 2
  assert stats.as_dict() == {'read': 2, 'skipped': {
      'bad_json': 1, 'missing_field': 1, 'bad_ranking': 2, 'not_utf8': 1}}
  assert stats.num_skipped == 5


def test_empty_dataset_is_an_error_naming_the_file(tmp_path):
  empty = write_lines(tmp_path / 'empty.jsonl', ['', '  '])
  with pytest.raises(DataError, match='^' + re.escape(f'{empty}: no valid records') + '$'):
    list(formats.read_sft(empty))
  all_bad = write_lines(tmp_path / 'bad.jsonl', ['{x', '{y'])
  with pytest.raises(DataError, match=r'bad.jsonl: no valid records \(2 bad rows skipped\)'):
    list(formats.read_sft(all_bad, skip_bad=True))
  with pytest.raises(DataError, match=r'nope.jsonl: no such file'):
    list(formats.read_sft(tmp_path / 'nope.jsonl'))


def test_txt_non_utf8_line_is_reported_or_skips_its_document(tmp_path):
  path = tmp_path / 'c.txt'
  path.write_bytes(b'good one\n\nbad \xff line\nsame doc\n\nlast\n')
  with pytest.raises(DataError, match='^' + re.escape(f'{path}:3: not valid UTF-8')):
    list(formats.read_text(path))
  stats = formats.ReadStats()
  docs = list(formats.read_text(path, skip_bad=True, stats=stats))
  assert docs == [{'text': 'good one'}, {'text': 'last'}]
  assert dict(stats.skipped) == {'not_utf8': 1}


def test_check_record_for_python_made_records():
  rec = {'prompt': 'p', 'responses': ['a', 'b'], 'ranks': [0, 0]}
  with pytest.raises(DataError, match=r"^world/train example 3: 'ranks' .* ties every"):
    formats.check_record('ranking', rec, 'world/train example 3')
  assert formats.check_record('prompt', {'prompt': 'p', 'extra': 1}, 'w') == {'prompt': 'p'}
