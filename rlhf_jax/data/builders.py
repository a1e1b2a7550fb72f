"""TFDS builders that write array_record and need no TensorFlow.

tfds 4.9.x can prepare a `GeneratorBasedBuilder` with file_format='array_record'
and read it back with `as_data_source()` / `tfds.data_source` using only numpy,
as long as the features are simple (`Text`, `Sequence`, scalar ints). Two
things to avoid: `dataset_info_from_configs` (it wants a dataset package
directory, so we build `DatasetInfo` directly) and tf.data (`as_dataset`).

Builders:
  RankingBuilder   configs hh_rlhf | tldr | kway   manual_dir/{train,validation,test}.jsonl
  SFTBuilder       manual_dir/{split}.jsonl with prompt/response
  TextBuilder      manual_dir/{split}.txt or {split}.jsonl (pretraining corpus)
  SyntheticBuilder examples from `config.fn(split)`, e.g. the synthetic world

Prepared data is cached under data_dir/<name>/<config>/<version>/ and reused:
change the version of a SyntheticConfig (or pass force_prepare=True) when the
generating code changes. Rows skipped with skip_bad are counted in the
dataset's metadata.json, so the counts survive the cache.
"""
import collections.abc
import dataclasses
import logging
import os
from typing import Any, Callable, Iterable

import numpy as np
import tensorflow_datasets as tfds

from rlhf_jax.data import formats

SPLITS = ('train', 'validation', 'test')


class _QuietPrepare(logging.Filter):
  """tfds warns "Variant folder ... has no dataset_info.json" while it looks for data it has
  not prepared yet: expected on every first preparation, not a problem."""

  def filter(self, record):
    return not str(record.msg).startswith('Variant folder')


logging.getLogger('absl').addFilter(_QuietPrepare())
_Text, _Seq = tfds.features.Text, tfds.features.Sequence

FEATURES = {  # record kind -> feature spec (all TF-free)
    'ranking': lambda: {'prompt': _Text(), 'responses': _Seq(_Text()),
                        'ranks': _Seq(np.int32)},
    'sft': lambda: {'prompt': _Text(), 'response': _Text()},
    'text': lambda: {'text': _Text()},
    'prompt': lambda: {'prompt': _Text()},
}


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared: TF-free info, file order kept, skip stats saved in metadata."""
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  # tfds looks for a checksums file next to the builder's code, and for a
  # module inside a package that lookup imports `importlib_resources`, which
  # tfds 4.9.10 does not declare. We download nothing, so there are no URLs.
  url_infos = None

  def __init__(self, *, skip_bad: bool = False, allow_ties: bool = False,
               file_format: str = 'array_record', **kwargs):
    self._skip_bad, self._allow_ties = skip_bad, allow_ties
    super().__init__(file_format=file_format, **kwargs)

  def _kind(self) -> str:
    raise NotImplementedError

  # tfds prints "Downloading and preparing dataset Unknown size (download: Unknown size ..."
  # and "... downloaded and prepared to ..." around every preparation. Nothing is
  # downloaded: load_records prints one line of ours instead.
  def _log_download_bytes(self):
    pass

  def _log_download_done(self):
    pass

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict(FEATURES[self._kind()]()),
        metadata=tfds.core.MetadataDict(),
        # Index i is then the i-th valid row of the file: easy to debug.
        disable_shuffling=True)

  def _record_stats(self, split: str, stats: formats.ReadStats):
    self.info.metadata.setdefault('stats', {})[split] = stats.as_dict()


class _ManualBuilder(_Builder, skip_registration=True):
  """Reads manual_dir/<split><suffix> through a formats.py reader."""
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Put train.jsonl (and optionally validation.jsonl, test.jsonl) in manual_dir.'
  SUFFIXES = ('.jsonl',)

  def _read(self, path, stats):
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    found = split_files(dl_manager.manual_dir, self.SUFFIXES)
    self.info.metadata['stats'] = {}  # forget counts from an earlier build
    return {split: self._generate_examples(split, path) for split, path in found.items()}

  def _generate_examples(self, split, path):
    stats = formats.ReadStats()
    for i, record in enumerate(self._read(path, stats)):
      yield i, record
    self._record_stats(split, stats)


def split_files(manual_dir, suffixes) -> dict[str, str]:
  """{split: path} for manual_dir/<split><suffix>; errors if there are none."""
  d = os.fspath(manual_dir)
  found = {}
  for split in SPLITS:
    paths = [os.path.join(d, split + s) for s in suffixes if os.path.isfile(os.path.join(d, split + s))]
    if len(paths) > 1:
      raise formats.DataError(f'{d}: both {paths[0]} and {paths[1]} exist; keep one')
    if paths:
      found[split] = paths[0]
  if not found:
    names = ', '.join(s + x for s in SPLITS for x in suffixes)
    raise formats.DataError(f'{d}: no split files (expected one of {names})')
  return found


class RankingBuilder(_ManualBuilder):
  """Preference comparisons: {'prompt', 'responses', 'ranks'} (rank 0 = best)."""
  name = 'rlhf_ranking'
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='hh_rlhf', description='Anthropic HH-RLHF chosen/rejected JSONL'),
      tfds.core.BuilderConfig(name='tldr', description='OpenAI summarize-from-feedback comparisons'),
      tfds.core.BuilderConfig(name='kway', description='prompt, K responses, InstructGPT ranking'),
  ]

  def _kind(self):
    return 'ranking'

  def _read(self, path, stats):
    extra = {'allow_ties': self._allow_ties} if self.builder_config.name == 'kway' else {}
    return formats.read(self.builder_config.name, path, skip_bad=self._skip_bad, stats=stats, **extra)


class SFTBuilder(_ManualBuilder):
  """Demonstrations: {'prompt', 'response'}."""
  name = 'rlhf_sft'

  def _kind(self):
    return 'sft'

  def _read(self, path, stats):
    return formats.read_sft(path, skip_bad=self._skip_bad, stats=stats)


class TextBuilder(_ManualBuilder):
  """Pretraining corpus: {'text'} from <split>.txt (blank-line blocks) or .jsonl."""
  name = 'rlhf_text'
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Put train.txt or train.jsonl (and optionally test.*) in manual_dir.'
  SUFFIXES = ('.txt', '.jsonl')

  def _kind(self):
    return 'text'

  def _read(self, path, stats):
    return formats.read_text(path, skip_bad=self._skip_bad, stats=stats)


# ------------------------------------------------------------------- synthetic

_SYNTHETIC_KINDS = {'corpus': 'text', 'sft': 'sft', 'prompts': 'prompt', 'ranking': 'ranking'}


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  """Examples come from `fn(split) -> iterable of records` of type `kind`.

  kind: 'text' | 'sft' | 'prompt' | 'ranking'; defaults from the name for
  corpus / sft / prompts / ranking. `fn` may be None to read data prepared
  earlier. Bump `version` when fn's output changes, or the cache is reused.
  """
  fn: Callable[[str], Iterable[dict]] | None = None
  kind: str = ''
  splits: tuple[str, ...] = ('train', 'test')

  def __post_init__(self):
    self.kind = self.kind or _SYNTHETIC_KINDS.get(self.name, '')
    if self.kind not in FEATURES:
      raise ValueError(f'SyntheticConfig {self.name!r}: kind must be one of '
                       f'{sorted(FEATURES)}, got {self.kind!r}')


class SyntheticBuilder(_Builder):
  """Generated locally from a Python callable (the synthetic world plugs in here)."""
  name = 'rlhf_synthetic'

  def _kind(self):
    if not isinstance(self.builder_config, SyntheticConfig):
      raise ValueError('SyntheticBuilder needs config=SyntheticConfig(name=..., fn=...)')
    return self.builder_config.kind

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    if cfg.fn is None:
      raise ValueError(f'SyntheticConfig {cfg.name!r} has no fn and no prepared data')
    self.info.metadata['stats'] = {}
    return {split: self._generate_examples(split) for split in cfg.splits}

  def _generate_examples(self, split):
    cfg = self.builder_config
    n = 0
    for n, record in enumerate(cfg.fn(split), 1):
      yield n - 1, formats.check_record(cfg.kind, record, f'{cfg.name}/{split} example {n - 1}')
    if not n:
      raise formats.DataError(f'{cfg.name}/{split}: fn produced no examples')
    self._record_stats(split, formats.ReadStats(read=n))


BUILDERS = {'ranking': RankingBuilder, 'sft': SFTBuilder, 'text': TextBuilder,
            'synthetic': SyntheticBuilder}


# -------------------------------------------------------------------- loading

def _decode(value: Any) -> Any:
  """array_record gives bytes and numpy ints; callers want str and int."""
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray):
    return [_decode(v) for v in value.tolist()] if value.ndim else _decode(value.item())
  if isinstance(value, (list, tuple)):
    return [_decode(v) for v in value]
  if isinstance(value, np.generic):
    return value.item()
  return value


class Records(collections.abc.Sequence):
  """Random-access view of one prepared split, returning decoded records."""

  def __init__(self, source, name: str):
    self._source, self.name = source, name

  def __len__(self):
    return len(self._source)

  def __getitem__(self, i):
    if isinstance(i, slice):
      return self.get_many(range(*i.indices(len(self))))
    if not -len(self) <= i < len(self):
      raise IndexError(f'{self.name}: index {i} out of range for {len(self)} records')
    return {k: _decode(v) for k, v in self._source[i % len(self)].items()}

  def get_many(self, indices) -> list[dict]:
    return [self[int(i)] for i in indices]

  def __repr__(self):
    return f'Records({self.name}, {len(self)} records)'


def make_builder(kind: str, data_dir, builder_config=None, *, skip_bad: bool = False,
                 allow_ties: bool = False) -> _Builder:
  """The builder for `kind` ('ranking' | 'sft' | 'text' | 'synthetic')."""
  if kind not in BUILDERS:
    raise ValueError(f'unknown dataset kind {kind!r}; expected one of {sorted(BUILDERS)}')
  if kind in ('ranking', 'synthetic') and builder_config is None:
    raise ValueError(f"{kind} data needs builder_config ("
                     + ("'hh_rlhf', 'tldr' or 'kway')" if kind == 'ranking' else 'a SyntheticConfig)'))
  return BUILDERS[kind](data_dir=os.fspath(data_dir), config=builder_config,
                        skip_bad=skip_bad, allow_ties=allow_ties)


def prepared_line(builder, manual_dir) -> str:
  """`preparing DIR from FILES: N rows, M skipped` for a builder just prepared."""
  stats = builder.info.metadata.get('stats', {})
  rows = sum(s['read'] for s in stats.values())
  skipped = sum(sum(s['skipped'].values()) for s in stats.values())
  if manual_dir is not None and hasattr(builder, 'SUFFIXES'):
    files = ', '.join(split_files(manual_dir, builder.SUFFIXES).values())
  else:
    files = f'{builder.builder_config.name} (generated)'
  return f'preparing {builder.data_dir} from {files}: {rows} rows, {skipped} skipped'


def load_records(kind: str, data_dir, manual_dir=None, split: str = 'train',
                 builder_config=None, skip_bad: bool = False, *,
                 allow_ties: bool = False, force_prepare: bool = False, verbose: bool = True
                 ) -> tuple[Records, formats.ReadStats]:
  """Prepares the dataset if needed and opens one split for random access.

  A preparation prints one line (verbose=True): `preparing DIR from FILES: N rows, M skipped`.

  Returns (records, stats): records[i] is a dict of str / list[str] / list[int];
  stats counts the rows read and skipped (by reason) when the split was built.
  """
  builder = make_builder(kind, data_dir, builder_config, skip_bad=skip_bad, allow_ties=allow_ties)
  saved = builder.info.metadata.get('stats', {}) if builder.is_prepared() else {}
  # Data prepared with skip_bad=True holds fewer rows than the file; asking
  # without skip_bad must then fail as it would on a fresh build.
  stale = not skip_bad and any(sum(s['skipped'].values()) for s in saved.values())
  if force_prepare or stale or not builder.is_prepared():
    if kind != 'synthetic':
      if manual_dir is None:
        why = 'is not prepared' if not builder.is_prepared() else 'must be prepared again'
        raise ValueError(f'{kind} data in {data_dir} {why}; pass manual_dir')
      split_files(manual_dir, builder.SUFFIXES)  # our error beats tfds' assertion
    mode = tfds.download.GenerateMode
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=None if manual_dir is None else os.fspath(manual_dir),
        download_mode=mode.FORCE_REDOWNLOAD if (force_prepare or stale) else mode.REUSE_DATASET_IF_EXISTS))
    if verbose:
      print(prepared_line(builder, manual_dir), flush=True)
  name = '/'.join([builder.name] + ([builder.builder_config.name] if builder.builder_config else []))
  if split not in builder.info.splits:
    raise formats.DataError(f'{name} in {data_dir}: no split {split!r}; '
                            f'available: {sorted(builder.info.splits)}')
  s = builder.info.metadata.get('stats', {}).get(split, {'read': 0, 'skipped': {}})
  stats = formats.ReadStats(read=s['read'])
  stats.skipped.update(s['skipped'])
  return Records(builder.as_data_source(split=split), f'{name}/{split}'), stats
