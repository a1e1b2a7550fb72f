"""Tokenizers behind one interface: our sentencepiece on world text, and model folders'
tokenizer.json / sentencepiece tokenizer.model (built here with `tokenizers` and
`sentencepiece`: no network, no torch); `save` round-trips through transformers when it
imports."""
import io
import json
import os

import numpy as np
import pytest
import sentencepiece as spm

from rlhf_jax.data import world
from rlhf_jax.data.tokenizer import Tokenizer, load_tokenizer

# One worker runs the module, so its module-scoped fixture runs once (pytest-xdist loadgroup).
pytestmark = pytest.mark.xdist_group("tokenizer")

HH_TEXT = ("\n\nHuman: What's a good  gift?\n\nAssistant: Maybe a lamp.  Or a kettle!\t"
           "\u00e9\u00fc")


@pytest.fixture(scope="module")
def docs():
    return world.make_corpus(0, 3000)


@pytest.fixture(scope="module")
def tok(docs, tmp_path_factory):
    return Tokenizer.train(docs, str(tmp_path_factory.mktemp("tok") / "spm"), vocab_size=512)


def test_round_trip_on_world_text(tok, docs):
    held_out = world.make_corpus(1, 200) + [p for p, _ in world.make_sft(1, 50)]
    for text in held_out:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode_batch(tok.encode_batch(held_out)) == held_out


def test_special_ids_and_vocab(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert tok.pad_id != tok.eos_id
    assert tok.vocab_size == 512
    ids = tok.encode(world.format_example("how is the price of the lamp ?", "it is great ."))
    assert tok.bos_id not in ids and tok.eos_id not in ids and tok.pad_id not in ids
    # World words are single pieces, so a whole document fits a small context.
    assert len(ids) <= len(world.format_example("how is the price of the lamp ?",
                                                "it is great .").split()) + 1


def test_training_twice_gives_identical_models(tok, docs, tmp_path):
    again = Tokenizer.train(docs, str(tmp_path / "again"), vocab_size=512)
    with open(tok.path, "rb") as a, open(again.path, "rb") as b:
        assert a.read() == b.read()
    sample = docs[:100]
    assert again.encode_batch(sample) == tok.encode_batch(sample)


def test_decode_stops_at_eos_and_skips_pad(tok):
    ids = tok.encode("the lamp is great .")
    tail = tok.encode("the lamp is awful .")
    row = [tok.bos_id] + ids + [tok.eos_id] + tail + [tok.pad_id] * 3
    assert tok.decode(row) == "the lamp is great ."
    assert tok.decode(np.array([tok.pad_id] + ids + [tok.pad_id])) == "the lamp is great ."
    assert tok.decode([tok.eos_id] + ids) == ""
    assert tok.decode_batch([ids + [tok.eos_id] + tail, tail]) == ["the lamp is great .",
                                                                   "the lamp is awful ."]
    assert "lamp" in tok.decode(ids + [tok.vocab_size + 5])  # padded head ids do not crash


def test_missing_or_broken_model_file_names_the_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        Tokenizer.load(str(missing))
    broken = tmp_path / "broken.model"
    broken.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="broken.model"):
        Tokenizer.load(str(broken))


def test_saved_copy_and_bare_model_file_load_with_the_same_ids(tok, docs, tmp_path):
  again = load_tokenizer(tok.path)
  assert isinstance(again, Tokenizer)
  assert again.encode_batch(docs[:50]) == tok.encode_batch(docs[:50])
  tok.save(str(tmp_path / "folder"))
  folder = load_tokenizer(str(tmp_path / "folder"))  # its tokenizer.json, through `tokenizers`
  assert (folder.bos_id, folder.eos_id, folder.pad_id, folder.vocab_size) == (2, 3, 0, 512)
  texts = docs[:50] + [HH_TEXT, " leading space", "  two  spaces ", "x \u2603\u2603 y", ""]
  assert folder.encode_batch(texts) == tok.encode_batch(texts)
  assert folder.decode_batch(folder.encode_batch(docs[:50])) == docs[:50]


def test_whitespace_is_kept_as_written(tmp_path):
  """HH-RLHF has double spaces and newlines; decode(encode(x)) must give x back."""
  t = Tokenizer.train(world.make_corpus(0, 300) + [HH_TEXT] * 5, str(tmp_path / "t"), 200)
  assert t.decode(t.encode(HH_TEXT)) == HH_TEXT


# ------------------------------------------------------------- model folders

def _bytelevel_folder(folder, specials, *, bos=None, tokenizer_config=None, config=None):
  """A byte-level BPE tokenizer.json (GPT-2 / Llama 3 / Qwen style), optionally with a
  post-processor that prepends `bos`, and the folder's JSON configs."""
  from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, processors, trainers
  t = HFTok(models.BPE())
  t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  t.decoder = decoders.ByteLevel()
  t.train_from_iterator(world.make_corpus(0, 300) + [HH_TEXT], trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  if bos:
    t.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, t.token_to_id(bos))])
  os.makedirs(folder)
  t.save(os.path.join(folder, "tokenizer.json"))
  for name, obj in (("tokenizer_config.json", tokenizer_config), ("config.json", config)):
    if obj is not None:
      with open(os.path.join(folder, name), "w") as f:
        json.dump(obj, f)
  return str(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  root = tmp_path_factory.mktemp("folders")
  out = {
      # Llama 3: BOS from the post-processor, no PAD token -> pad_id = vocab_size.
      "llama3": _bytelevel_folder(root / "llama3", ["<|begin_of_text|>", "<|end_of_text|>"],
                                  bos="<|begin_of_text|>", tokenizer_config={
                                      "bos_token": "<|begin_of_text|>",
                                      "eos_token": "<|end_of_text|>"}),
      # Qwen2.5 base: no BOS, PAD == EOS, and a model head larger than the vocabulary.
      "qwen": _bytelevel_folder(root / "qwen", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                tokenizer_config={"bos_token": None, "eos_token": "<|endoftext|>",
                                                  "pad_token": "<|endoftext|>"},
                                config={"vocab_size": 320, "eos_token_id": 0}),
      # Gemma-like: a PAD token of its own (id 0), BOS added by the post-processor.
      "gemma": _bytelevel_folder(root / "gemma", ["<pad>", "<eos>", "<bos>"], bos="<bos>",
                                 tokenizer_config={"bos_token": {  # the older AddedToken form
                                                       "__type": "AddedToken", "content": "<bos>",
                                                       "lstrip": False, "rstrip": False,
                                                       "normalized": False, "special": True,
                                                       "single_word": False},
                                                   "eos_token": "<eos>", "pad_token": "<pad>"}),
  }
  # Llama 2: sentencepiece tokenizer.model with its own ids (unk 0, bos 1, eos 2, no pad).
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(world.make_corpus(0, 300)), model_writer=model, vocab_size=400,
      model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama 2's
      hard_vocab_limit=False, minloglevel=2, num_threads=1)
  llama2 = root / "llama2"
  llama2.mkdir()
  (llama2 / "tokenizer.model").write_bytes(model.getvalue())
  (llama2 / "tokenizer_config.json").write_text(json.dumps(
      {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
       "unk_token": "<unk>", "add_bos_token": True}))
  out["llama2"] = str(llama2)
  return out


@pytest.mark.parametrize("name,bos,eos,pad,vocab", [
    ("llama3", 0, 1, 300, 300), ("qwen", None, 0, 320, 320), ("gemma", 2, 1, 0, 300),
    ("llama2", 1, 2, "vocab", "vocab")])
def test_folder_special_ids(folders, name, bos, eos, pad, vocab):
  t = load_tokenizer(folders[name])
  vocab = t.vocab_size if vocab == "vocab" else vocab
  pad = vocab if pad == "vocab" else pad
  assert (t.bos_id, t.eos_id, t.pad_id, t.vocab_size) == (bos, eos, pad, vocab)
  assert t.pad_id != t.eos_id  # always: padding must never read as "I am done"
  text = "the lamp is great . " + HH_TEXT
  ids = t.encode(text)
  assert t.bos_id not in ids and t.eos_id not in ids and t.pad_id not in ids
  assert t.decode(ids) == text
  # decode: stop at EOS, skip BOS and PAD (even one past the vocabulary), no crash on head ids
  pre = [] if t.bos_id is None else [t.bos_id]
  assert t.decode(pre + ids + [t.eos_id] + ids + [t.pad_id]) == t.decode(ids)
  assert t.decode([t.pad_id] + ids + [t.vocab_size + 3, t.pad_id]).startswith(t.decode(ids)[:10])
  # Same answer from the folder, its tokenizer file, and the batch API.
  inner = os.path.join(folders[name], "tokenizer.json" if name != "llama2" else "tokenizer.model")
  assert load_tokenizer(inner).encode(text) == ids and t.encode_batch([text, "x"])[0] == ids


def test_an_ordinary_token_named_as_pad_is_not_used(tmp_path):
  """GPT-2 fine-tunes often set pad_token_id=0, which is "!": decode would drop real text."""
  folder = _bytelevel_folder(tmp_path / "gpt2", ["<|endoftext|>"],
                             tokenizer_config={"eos_token": "<|endoftext|>"},
                             config={"pad_token_id": 5, "eos_token_id": 0})
  t = load_tokenizer(folder)
  assert t.bos_id is None and t.pad_id == t.vocab_size == 300
  assert t.decode([5]) != "" and t.decode(t.encode("wow!! ok")) == "wow!! ok"  # id 5 is text


def test_missing_folder_files_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
    load_tokenizer(str(tmp_path))
  folder = _bytelevel_folder(tmp_path / "noeos", ["<s>"], tokenizer_config={})
  with pytest.raises(ValueError, match="no EOS token"):
    load_tokenizer(folder)


@pytest.mark.parametrize("name", ["ours", "llama3", "qwen", "gemma", "llama2"])
def test_save_loads_in_transformers_with_the_same_ids(tok, folders, docs, name, tmp_path):
  transformers = pytest.importorskip("transformers")
  t = tok if name == "ours" else load_tokenizer(folders[name])
  out = str(tmp_path / "out")
  t.save(out)
  hf = transformers.AutoTokenizer.from_pretrained(out)
  texts = docs[:30] + ["the lamp is great .", "  two  spaces ", " leading", HH_TEXT, ""]
  for text in texts:
    assert hf.encode(text, add_special_tokens=False) == t.encode(text), repr(text)
  assert hf.eos_token_id == t.eos_id
  assert hf.bos_token_id == t.bos_id or (t.bos_id is None and name == "qwen")
  full = hf.encode("the lamp", add_special_tokens=True)
  assert full[:1] == [t.bos_id] if t.bos_id is not None else full == t.encode("the lamp")
  if t.pad_id < t.vocab_size:
    assert hf.pad_token_id == t.pad_id
  assert load_tokenizer(out).encode_batch(texts) == t.encode_batch(texts)
