"""Tokenizers behind one interface: the sentencepiece model we train, and a model folder's.

Every stage uses only: `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `encode`,
`encode_batch` (no special tokens added: the caller places BOS and EOS), `decode`,
`decode_batch`, `path`, and `save(out_dir)`. `load_tokenizer(path)` opens any of:

  ours         a `.model` file trained by `Tokenizer.train` (PAD=0 UNK=1 BOS=2 EOS=3);
  tokenizer.json  a Hugging Face fast tokenizer, through the `tokenizers` library;
  tokenizer.model a model folder's sentencepiece (Llama 1/2, Gemma) with its own ids;
  a folder     holding either (tokenizer.json preferred, as transformers does).

A folder's special tokens come from tokenizer_config.json, special_tokens_map.json,
generation_config.json and config.json, the first that names one. BOS is the token the
tokenizer itself prepends (the tokenizer.json post-processor, or sentencepiece's
`add_bos_token`); a model without one (Qwen, GPT-2) has `bos_id = None` and nothing is
prepended. PAD is never EOS: a policy's "I am done" must not be confused with batch
padding, or masking and EOS-based reward handling silently break (Huang et al. 2024,
"The N+ implementation details of RLHF with PPO"). A folder with no PAD token, or whose
PAD is its EOS, BOS or UNK (GPT-2, Llama 3, Qwen base), gets `pad_id = vocab_size`: an id
no text encodes to and no model head emits (the model clips it in the embedding gather;
masks exclude it everywhere else). `vocab_size` is what the model head must cover: the
vocabulary with added tokens, or the folder's config.json `vocab_size` if larger.

Our BPE trains in well under a second on the synthetic world's 50k documents and maps
every world word to a single piece. It keeps whitespace as written
(`remove_extra_whitespaces=False`), so real text round-trips, and a text's leading
space is sentencepiece's word-start prefix (as in transformers' Llama tokenizer), so a
response encoded alone gives the tokens it has after its prompt. `Tokenizer.save`
writes an exact tokenizer.json beside tokenizer.model.
"""
from __future__ import annotations

import io
import json
import os
import shutil
from typing import Iterable, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
# Files transformers reads for a tokenizer; `save` copies those a folder has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
_META_FILES = ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
               "config.json")


class BaseTokenizer:
  """The interface; subclasses set the ids and implement `_encode_batch` / `_decode_ids`."""
  path: str = "<memory>"
  vocab_size: int
  pad_id: int
  bos_id: int | None
  eos_id: int
  unk_id: int | None = None

  def encode(self, text: str) -> list:
    """Token ids of `text`; no BOS/EOS added (the caller decides where they go)."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list:
    return self._encode_batch(list(texts))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids` up to (excluding) the first EOS; PAD and BOS are skipped.

    Ids past the tokenizer's vocabulary (a model head padded beyond it) decode as UNK,
    or to nothing if there is no UNK. Callers that have a mask decode only masked ids.
    """
    out, n = [], self._n_tokens
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i == self.pad_id or i == self.bos_id:
        continue
      if 0 <= i < n:
        out.append(i)
      elif self.unk_id is not None:
        out.append(self.unk_id)
    return self._decode_ids(out)

  def decode_batch(self, batch: Iterable[Sequence[int]]) -> list:
    return [self.decode(ids) for ids in batch]

  def special_tokens(self) -> dict:
    """{'bos_token': str, ...} for the special tokens that exist as text (not a virtual PAD)."""
    out = {}
    for name, i in (("bos", self.bos_id), ("eos", self.eos_id), ("unk", self.unk_id),
                    ("pad", self.pad_id)):
      if i is not None and 0 <= i < self._n_tokens:
        out[f"{name}_token"] = self._id_to_token(i)
    return out

  def save(self, out_dir: str) -> None:
    """Writes files `transformers.AutoTokenizer.from_pretrained(out_dir)` loads with the
    same ids and special tokens (a virtual PAD = vocab_size has no token to write)."""
    os.makedirs(out_dir, exist_ok=True)
    copied = _copy_files(self._source_files(), out_dir)
    if "tokenizer_config.json" not in copied:
      _write_json(os.path.join(out_dir, "tokenizer_config.json"), self._tokenizer_config())
      _write_json(os.path.join(out_dir, "special_tokens_map.json"), self.special_tokens())

  def __repr__(self):
    return (f"{type(self).__name__}({self.path}, vocab_size={self.vocab_size}, "
            f"bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})")

  # Subclass hooks.
  _n_tokens: int  # ids [0, _n_tokens) have text

  def _encode_batch(self, texts: list) -> list:
    raise NotImplementedError

  def _decode_ids(self, ids: list) -> str:
    raise NotImplementedError

  def _id_to_token(self, i: int) -> str:
    raise NotImplementedError

  def _source_files(self) -> list:
    return []

  def _tokenizer_config(self) -> dict:
    raise NotImplementedError


# ------------------------------------------------------------------ sentencepiece

class SentencePieceTokenizer(BaseTokenizer):
  """A sentencepiece model with given special ids (a model folder's tokenizer.model)."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str, *, bos_id, eos_id,
               pad_id=None, unk_id=None, vocab_size: int = 0, added: dict | None = None,
               folder: str | None = None):
    self._sp, self.path, self._folder = processor, path, folder
    # Sentencepiece prepends "▁" to every text (add_dummy_prefix), so " I" would become
    # "▁▁I" where the same words inside a dialogue are "▁I": a response encoded on its
    # own would not match the tokens of prompt + response. As transformers' Llama
    # tokenizer does (Metaspace prepend_scheme="first"), a leading space is the prefix.
    self._space_is_prefix = _dummy_prefix(processor)
    self._added = dict(added or {})  # id -> token text beyond the sentencepiece pieces
    self._n_tokens = max([processor.get_piece_size()] + [i + 1 for i in self._added])
    self.vocab_size = max(self._n_tokens, vocab_size)
    self.bos_id, self.eos_id, self.unk_id = bos_id, eos_id, unk_id
    special = lambda i: i in self._added or (0 <= i < self._sp.get_piece_size() and (
        processor.is_control(i) or processor.is_unknown(i)))
    self.pad_id = _real_pad(pad_id, self.eos_id, self.bos_id, self.unk_id, self.vocab_size,
                            special)

  def _encode_batch(self, texts):
    if self._space_is_prefix:
      texts = [t[1:] if t.startswith(" ") else t for t in texts]
    return self._sp.encode(texts)

  def _decode_ids(self, ids):
    n = self._sp.get_piece_size()
    # Added tokens (ids past the pieces) are special: decode them as their text.
    parts, run = [], []
    for i in ids:
      if i < n:
        run.append(i)
      else:
        parts += [self._sp.decode(run), self._added.get(i, "")]
        run = []
    return "".join(parts + [self._sp.decode(run)])

  def _id_to_token(self, i):
    return self._added[i] if i in self._added else self._sp.id_to_piece(i)

  def _source_files(self):
    if self._folder is None:
      return [(self.path, "tokenizer.model")]
    return [(os.path.join(self._folder, f), f) for f in TOKENIZER_FILES
            if f != "tokenizer.json"]

  def _tokenizer_config(self):
    # transformers builds its Llama tokenizer from a sentencepiece BPE model: the same
    # pieces and ids, BOS added when we add one.
    return {"tokenizer_class": "LlamaTokenizer", **self.special_tokens(),
            "add_bos_token": self.bos_id is not None, "add_eos_token": False,
            "add_prefix_space": self._space_is_prefix, "legacy": False,
            "clean_up_tokenization_spaces": False}


class Tokenizer(SentencePieceTokenizer):
  """The sentencepiece BPE we train ourselves: PAD=0, UNK=1, BOS=2, EOS=3."""

  def __init__(self, processor: spm.SentencePieceProcessor, path: str = "<memory>"):
    ids = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
    if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
      raise ValueError(f"tokenizer {path}: special ids (pad, unk, bos, eos) = {ids}, "
                       f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")
    super().__init__(processor, path, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
                     unk_id=UNK_ID)

  @classmethod
  def train(cls, texts: Iterable[str], model_prefix: str, vocab_size: int) -> "Tokenizer":
    """Trains on `texts` and writes `<model_prefix>.model`; same texts -> same bytes."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model,
        vocab_size=vocab_size, model_type="bpe",
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        # Determinism: one thread, all sentences in order, no sampling.
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
        # A small corpus may not support vocab_size pieces; take what it has.
        hard_vocab_limit=False,
        # Text as written: no Unicode normalisation, no collapsing of repeated spaces
        # (HH-RLHF has "  " after sentences; collapsing them loses text on decode and
        # is not what transformers' Llama tokenizer does with a saved copy).
        character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2)  # errors only: training is otherwise very chatty
    os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
    path = model_prefix + ".model"
    with open(path, "wb") as f:
      f.write(model.getvalue())
    return cls.load(path)

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    return cls(_read_sentencepiece(path), path)

  def save(self, out_dir: str) -> None:
    """tokenizer.model plus an exact tokenizer.json: transformers' own conversion of a
    sentencepiece model does not prepend the dummy-prefix space to a text that already
    starts with one (every HH-RLHF response does) and drops unknown characters, so it
    would not give our ids."""
    os.makedirs(out_dir, exist_ok=True)
    _copy_files([(self.path, "tokenizer.model")], out_dir)
    self.to_tokenizers().save(os.path.join(out_dir, "tokenizer.json"))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"),
                {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens(),
                 "clean_up_tokenization_spaces": False})
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), self.special_tokens())

  def to_tokenizers(self):
    """The same tokenizer as a `tokenizers.Tokenizer` (what tokenizer.json serialises).

    Sentencepiece BPE merges the adjacent pair whose merged piece scores highest; a
    `tokenizers` BPE merges by rank, so ranking every (left, right) split of a piece by
    that piece's score gives the same segmentation (transformers' SentencePieceExtractor
    does the same). Spaces become "▁" and a text not starting with one gets the "▁"
    prefix (sentencepiece's add_dummy_prefix, see `_space_is_prefix`); BOS is prepended
    on request.
    """
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import processors
    from tokenizers import Tokenizer as _Tok
    sp, n = self._sp, self._sp.get_piece_size()
    vocab = {sp.id_to_piece(i): i for i in range(n)}
    normal = [i for i in range(n) if not (sp.is_control(i) or sp.is_unknown(i))]
    merges = []
    for i in sorted(normal, key=lambda i: -sp.get_score(i)):
      piece = sp.id_to_piece(i)
      splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
      merges += sorted(((l, r) for l, r in splits if l in vocab and r in vocab),
                       key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
    tok = _Tok(models.BPE(vocab=vocab, merges=merges, unk_token=sp.id_to_piece(self.unk_id),
                          fuse_unk=True, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace("\u2581", prepend_scheme="first", split=False)
    if sp.decode(sp.encode("a  b ")) != "a  b ":  # trained with remove_extra_whitespaces
      tok.normalizer = normalizers.Sequence([normalizers.Strip(),
                                             normalizers.Replace(Regex(" {2,}"), " ")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(sp.id_to_piece(i), special=True)
                            for i in range(n) if sp.is_control(i) or sp.is_unknown(i)])
    bos = sp.id_to_piece(self.bos_id)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, self.bos_id)])
    return tok


def _read_sentencepiece(path: str) -> spm.SentencePieceProcessor:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer model not found: {path}")
  sp = spm.SentencePieceProcessor()
  try:
    with open(path, "rb") as f:
      sp.LoadFromSerializedProto(f.read())
  except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
    raise ValueError(f"cannot read tokenizer model {path}: {e}") from e
  return sp


def _dummy_prefix(sp) -> bool:
  """Whether the model prepends '▁' to a text (sentencepiece's add_dummy_prefix)."""
  return sp.encode("a", out_type=str)[:1] != ["a"]


# ---------------------------------------------------------------- tokenizer.json

class HFTokenizer(BaseTokenizer):
  """A Hugging Face fast tokenizer (tokenizer.json) through the `tokenizers` library."""

  def __init__(self, path: str, meta: dict, folder: str | None):
    from tokenizers import Tokenizer as _Tok
    try:
      self._tok = _Tok.from_file(path)
    except Exception as e:  # tokenizers raises its own Exception subclasses
      raise ValueError(f"cannot read tokenizer {path}: {e}") from e
    self.path, self._folder = path, folder
    vocab = self._tok.get_vocab(with_added_tokens=True)
    self._n_tokens = max(vocab.values()) + 1 if vocab else 0
    self.vocab_size = max(self._n_tokens, _int(meta["config.json"].get("vocab_size")) or 0)
    to_id = self._tok.token_to_id
    self.eos_id = _special(meta, "eos", to_id)
    if self.eos_id is None:
      raise ValueError(f"tokenizer {path}: no EOS token (looked for eos_token in "
                       "tokenizer_config.json / special_tokens_map.json and eos_token_id "
                       "in generation_config.json / config.json)")
    self.unk_id = _special(meta, "unk", to_id)
    add_bos = meta["tokenizer_config.json"].get("add_bos_token")
    bos = self._prepended()
    if bos is None and add_bos:
      bos = _special(meta, "bos", to_id)
    if add_bos is False:  # transformers' Llama/Gemma tokenizers then add none either
      bos = None
    self.bos_id = None if bos == self.eos_id else bos
    added = self._tok.get_added_tokens_decoder()
    self.pad_id = _real_pad(_special(meta, "pad", to_id), self.eos_id, self.bos_id,
                            self.unk_id, self.vocab_size, lambda i: i in added and added[i].special)

  def _prepended(self):
    """The id the tokenizer's post-processor puts before a text (its BOS), if any."""
    plain = self._tok.encode("a", add_special_tokens=False).ids
    full = self._tok.encode("a", add_special_tokens=True).ids
    if len(full) > len(plain) and full[1:1 + len(plain)] == plain:
      return full[0]
    return None

  def _encode_batch(self, texts):
    return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

  def _decode_ids(self, ids):
    return self._tok.decode(ids, skip_special_tokens=False)

  def _id_to_token(self, i):
    return self._tok.id_to_token(i)

  def _source_files(self):
    if self._folder is None:
      return [(self.path, "tokenizer.json")]
    return [(os.path.join(self._folder, f), f) for f in TOKENIZER_FILES]

  def _tokenizer_config(self):
    return {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens(),
            "clean_up_tokenization_spaces": False}


# ----------------------------------------------------------------------- loading

def load_tokenizer(path: str) -> BaseTokenizer:
  """A `.model` file, a `tokenizer.json`, or a folder holding either (see module doc)."""
  path = os.path.expanduser(os.fspath(path))
  if os.path.isdir(path):
    for name in ("tokenizer.json", "tokenizer.model"):
      if os.path.isfile(os.path.join(path, name)):
        return load_tokenizer(os.path.join(path, name))
    raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer.model in this folder")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"tokenizer not found: {path}")
  folder = os.path.dirname(os.path.abspath(path))
  meta = _read_meta(folder)
  if path.endswith(".json"):
    return HFTokenizer(path, meta, folder if os.path.basename(path) == "tokenizer.json" else None)
  sp = _read_sentencepiece(path)
  in_folder = os.path.basename(path) == "tokenizer.model" and any(
      os.path.isfile(os.path.join(folder, f)) for f in _META_FILES[:2])
  if in_folder:
    return _folder_sentencepiece(sp, path, folder, meta)
  if (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
    return Tokenizer(sp, path)  # our own
  empty = {name: {} for name in _META_FILES}  # a bare model file: its own special ids
  return _folder_sentencepiece(sp, path, None, empty)


def _folder_sentencepiece(sp, path, folder, meta) -> SentencePieceTokenizer:
  tc = meta["tokenizer_config.json"]
  added = {}
  for i, tok in (tc.get("added_tokens_decoder") or {}).items():
    content = _token_text(tok)
    if content is not None and str(i).isdigit() and int(i) >= sp.get_piece_size():
      added[int(i)] = content
  by_text = {v: k for k, v in added.items()}

  def to_id(text):
    if text in by_text:
      return by_text[text]
    i = sp.piece_to_id(text)
    return i if sp.id_to_piece(i) == text else None

  def own(i):  # sentencepiece reports -1 for an id the model does not define
    return i if i >= 0 else None

  eos = _special(meta, "eos", to_id)
  eos = own(sp.eos_id()) if eos is None else eos
  if eos is None:
    raise ValueError(f"tokenizer {path}: no EOS token in the model or its folder's configs")
  bos = _special(meta, "bos", to_id)
  bos = own(sp.bos_id()) if bos is None else bos
  if not tc.get("add_bos_token", True):  # Llama and Gemma tokenizers add BOS by default
    bos = None
  unk = _special(meta, "unk", to_id)
  pad = _special(meta, "pad", to_id)
  return SentencePieceTokenizer(
      sp, path, bos_id=None if bos == eos else bos, eos_id=eos,
      pad_id=own(sp.pad_id()) if pad is None else pad,
      unk_id=own(sp.unk_id()) if unk is None else unk,
      vocab_size=_int(meta["config.json"].get("vocab_size")) or 0, added=added, folder=folder)


def _read_meta(folder: str) -> dict:
  meta = {}
  for name in _META_FILES:
    p = os.path.join(folder, name)
    meta[name] = {}
    if os.path.isfile(p):
      try:
        with open(p, encoding="utf-8") as f:
          meta[name] = json.load(f)
      except (ValueError, OSError) as e:
        raise ValueError(f"{p}: cannot read: {e}") from None
      if not isinstance(meta[name], dict):
        raise ValueError(f"{p}: expected a JSON object")
  return meta


def _token_text(value):
  """A special token as tokenizer configs write it: a string or {'content': str, ...}."""
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def _int(value):
  if isinstance(value, list):  # generation_config.json may list several EOS ids
    value = value[0] if value else None
  return value if isinstance(value, int) and not isinstance(value, bool) else None


def _special(meta: dict, name: str, to_id):
  """The id of special token `name` ('bos' | 'eos' | 'pad' | 'unk') from the folder's
  configs, the first that names one that exists; None if none does."""
  for src in ("tokenizer_config.json", "special_tokens_map.json"):
    text = _token_text(meta[src].get(f"{name}_token"))
    if text is not None and to_id(text) is not None:
      return to_id(text)
  for src in ("generation_config.json", "config.json"):
    i = _int(meta[src].get(f"{name}_token_id"))
    if i is not None:
      return i
  return None


def _real_pad(pad, eos, bos, unk, vocab_size: int, is_special) -> int:
  """The folder's PAD if it is a special token of its own, else vocab_size (see module
  doc). A config naming an ordinary token as PAD (GPT-2 fine-tunes with pad_token_id=0,
  "!") would otherwise make decode drop real text; EOS/BOS/UNK as PAD would make padding
  read as an ending, a start, or unknown text."""
  if pad is None or pad >= vocab_size or pad in (eos, bos, unk) or not is_special(pad):
    return vocab_size
  return pad


def _copy_files(files, out_dir) -> set:
  copied = set()
  for src, name in files:
    if os.path.isfile(src):
      dst = os.path.join(out_dir, name)
      if not (os.path.exists(dst) and os.path.samefile(src, dst)):
        shutil.copyfile(src, dst)
      copied.add(name)
  return copied


def _write_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)
