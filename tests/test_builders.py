"""TFDS builders: prepare to array_record and read back, with no TensorFlow."""
import importlib.util
import json
import re
import sys

import pytest

from rlhf_jax.data import builders
from rlhf_jax.data.formats import DataError

HH = {'chosen': '\n\nHuman: Hi\n\nAssistant: Hello!', 'rejected': '\n\nHuman: Hi\n\nAssistant: Go away.'}
TLDR = {'info': {'post': 'p', 'title': 't', 'subreddit': 's'},
        'summaries': [{'text': ' a'}, {'text': ' b'}], 'choice': 1}


def write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(''.join((r if isinstance(r, str) else json.dumps(r)) + '\n' for r in rows))


@pytest.fixture(autouse=True)
def no_tensorflow():
  assert importlib.util.find_spec('tensorflow') is None, 'tests must run without TensorFlow'
  yield
  assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize('config,row,expected', [
    ('hh_rlhf', HH, {'prompt': '\n\nHuman: Hi\n\nAssistant:', 'responses': [' Hello!', ' Go away.'],
                     'ranks': [0, 1]}),
    ('tldr', TLDR, {'prompt': 'SUBREDDIT: r/s\nTITLE: t\nPOST: p\nTL;DR:', 'responses': [' a', ' b'],
                    'ranks': [1, 0]}),
    ('kway', {'prompt': 'q', 'responses': ['x', 'y', 'zé'], 'ranking': [2, 0, 1]},
     {'prompt': 'q', 'responses': ['x', 'y', 'zé'], 'ranks': [2, 0, 1]}),
])
def test_ranking_builder_round_trip(tmp_path, config, row, expected):
  manual = tmp_path / 'manual'
  write_jsonl(manual / 'train.jsonl', [row] * 3)
  write_jsonl(manual / 'test.jsonl', [row])
  train, stats = builders.load_records('ranking', tmp_path / 'data', manual, builder_config=config)
  assert len(train) == 3 and train[0] == expected and train[-1] == expected
  assert isinstance(train[0]['prompt'], str) and isinstance(train[0]['ranks'][0], int)
  assert stats.read == 3 and stats.num_skipped == 0
  test, _ = builders.load_records('ranking', tmp_path / 'data', manual, 'test', builder_config=config)
  assert list(test) == [expected]
  assert (tmp_path / 'data' / 'rlhf_ranking' / config / '1.0.0').is_dir()


def test_records_keep_file_order(tmp_path):
  rows = [{'prompt': f'p{i}', 'response': f'r{i}'} for i in range(50)]
  write_jsonl(tmp_path / 'm' / 'train.jsonl', rows)
  recs, _ = builders.load_records('sft', tmp_path / 'd', tmp_path / 'm')
  assert list(recs) == rows
  assert recs[10:12] == rows[10:12]


def test_text_builder_txt_and_jsonl(tmp_path):
  (tmp_path / 'm').mkdir()
  (tmp_path / 'm' / 'train.txt').write_text('doc one\nmore\n\ndoc two\n')
  write_jsonl(tmp_path / 'm' / 'test.jsonl', [{'text': 'held out'}])
  train, _ = builders.load_records('text', tmp_path / 'd', tmp_path / 'm')
  test, _ = builders.load_records('text', tmp_path / 'd', tmp_path / 'm', split='test')
  assert list(train) == [{'text': 'doc one\nmore'}, {'text': 'doc two'}]
  assert list(test) == [{'text': 'held out'}]


def test_synthetic_builder_from_callable(tmp_path):
  calls = []

  def world(split):
    calls.append(split)
    n = 4 if split == 'train' else 2
    return ({'prompt': f'{split} {i}', 'response': 'ok'} for i in range(n))

  cfg = builders.SyntheticConfig(name='sft', fn=world)
  train, stats = builders.load_records('synthetic', tmp_path, builder_config=cfg)
  assert [r['prompt'] for r in train] == [f'train {i}' for i in range(4)] and stats.read == 4
  test, _ = builders.load_records('synthetic', tmp_path, split='test', builder_config=cfg)
  assert len(test) == 2 and sorted(calls) == ['test', 'train']
  # Prepared data is reused: no fn needed to read it again.
  again, _ = builders.load_records('synthetic', tmp_path, builder_config=builders.SyntheticConfig(name='sft'))
  assert list(again) == list(train) and len(calls) == 2


def test_synthetic_bad_record_is_reported(tmp_path):
  cfg = builders.SyntheticConfig(name='corpus', fn=lambda split: [{'text': 'a'}, {'txt': 'b'}])
  with pytest.raises(DataError, match=r"corpus/train example 1: missing field 'text'"):
    builders.load_records('synthetic', tmp_path, builder_config=cfg)


def test_bad_row_fails_prepare_with_file_line_and_skip_bad_counts_survive_cache(tmp_path):
  manual = tmp_path / 'm'
  write_jsonl(manual / 'train.jsonl', [HH, '{not json', HH, {'chosen': HH['chosen']}])
  with pytest.raises(DataError, match=re.escape(f'{manual}/train.jsonl:2: invalid JSON')):
    builders.load_records('ranking', tmp_path / 'd', manual, builder_config='hh_rlhf')
  recs, stats = builders.load_records('ranking', tmp_path / 'd', manual, builder_config='hh_rlhf',
                                      skip_bad=True)
  assert len(recs) == 2 and stats.as_dict() == {'read': 2, 'skipped': {'bad_json': 1, 'missing_field': 1}}
  # From the cache, the counts are the same ...
  _, cached = builders.load_records('ranking', tmp_path / 'd', builder_config='hh_rlhf', skip_bad=True)
  assert cached.as_dict() == stats.as_dict()
  # ... and without skip_bad the cached, filtered data is not silently accepted.
  with pytest.raises(DataError, match=r'train.jsonl:2: invalid JSON'):
    builders.load_records('ranking', tmp_path / 'd', manual, builder_config='hh_rlhf')


def test_missing_inputs_are_clear_errors(tmp_path):
  (tmp_path / 'm').mkdir()
  with pytest.raises(DataError, match=r'no split files \(expected one of train.jsonl'):
    builders.load_records('sft', tmp_path / 'd', tmp_path / 'm')
  write_jsonl(tmp_path / 'm' / 'train.jsonl', [{'prompt': '', 'response': 'r'}])
  with pytest.raises(DataError, match=r"no split 'test'; available: \['train'\]"):
    builders.load_records('sft', tmp_path / 'd', tmp_path / 'm', split='test')
  with pytest.raises(ValueError, match='not prepared; pass manual_dir'):
    builders.load_records('text', tmp_path / 'd2')
  with pytest.raises(ValueError, match="builder_config .*'hh_rlhf'"):
    builders.load_records('ranking', tmp_path / 'd', tmp_path / 'm')


def test_prepare_a_few_thousand_rows(tmp_path):
  # (No time bound: speed is measured in benchmarks, not asserted in unit tests.)
  rows = [{'prompt': f'prompt {i}', 'responses': ['a' * (i % 50 + 1), 'b', 'c'],
           'ranking': [i % 3, (i + 1) % 3, (i + 2) % 3]} for i in range(3000)]
  write_jsonl(tmp_path / 'm' / 'train.jsonl', rows)
  recs, _ = builders.load_records('ranking', tmp_path / 'd', tmp_path / 'm', builder_config='kway')
  assert len(recs) == 3000 and recs[2999]['prompt'] == 'prompt 2999'
  assert recs[7]['responses'][0] == 'a' * 8 and list(recs[7]['ranks']) == [1, 2, 0]


def test_force_prepare_picks_up_edited_files(tmp_path):
  write_jsonl(tmp_path / 'm' / 'train.jsonl', [{'text': 'old'}])
  recs, _ = builders.load_records('text', tmp_path / 'd', tmp_path / 'm')
  write_jsonl(tmp_path / 'm' / 'train.jsonl', [{'text': 'new'}, {'text': 'newer'}])
  cached, _ = builders.load_records('text', tmp_path / 'd', tmp_path / 'm')
  assert list(cached) == [{'text': 'old'}]  # the cache is reused on purpose
  fresh, _ = builders.load_records('text', tmp_path / 'd', tmp_path / 'm', force_prepare=True)
  assert [r['text'] for r in fresh] == ['new', 'newer']
