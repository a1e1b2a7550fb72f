"""The sentencepiece wrapper on world text."""
import numpy as np
import pytest

from rlhf_jax.data import world
from rlhf_jax.data.tokenizer import Tokenizer


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
