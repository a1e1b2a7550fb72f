"""A small sentencepiece wrapper: train from in-memory texts, encode, decode.

Special ids are fixed so every stage agrees on them: PAD=0, UNK=1, BOS=2, EOS=3.
PAD is distinct from EOS: a policy's "I am done" (EOS) must not be confused with
batch padding, or masking and EOS-based reward handling silently break (Huang et
al. 2024, "The N+ implementation details of RLHF with PPO", on pad vs EOS tokens).

BPE rather than unigram: on the synthetic world it trains in well under a second on
50k documents and maps every world word to a single piece.
"""
import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
    """Thin wrapper around `sentencepiece.SentencePieceProcessor`."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str = "<memory>"):
        self._sp = processor
        self.path = path
        ids = (processor.pad_id(), processor.unk_id(), processor.bos_id(), processor.eos_id())
        if ids != (PAD_ID, UNK_ID, BOS_ID, EOS_ID):
            raise ValueError(f"tokenizer {path}: special ids (pad, unk, bos, eos) = {ids}, "
                             f"expected {(PAD_ID, UNK_ID, BOS_ID, EOS_ID)}")

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
            character_coverage=1.0, normalization_rule_name="identity",
            minloglevel=2)  # errors only: training is otherwise very chatty
        os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
        path = model_prefix + ".model"
        with open(path, "wb") as f:
            f.write(model.getvalue())
        return cls.load(path)

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model not found: {path}")
        sp = spm.SentencePieceProcessor()
        try:
            with open(path, "rb") as f:
                sp.LoadFromSerializedProto(f.read())
        except Exception as e:  # sentencepiece raises RuntimeError/OSError variants
            raise ValueError(f"cannot read tokenizer model {path}: {e}") from e
        return cls(sp, path)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    def encode(self, text: str) -> list:
        """Token ids of `text`; no BOS/EOS added (the caller decides where they go)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list:
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids` up to (excluding) the first EOS; PAD and BOS are skipped.

        Ids outside the vocabulary (a model head padded past vocab_size) decode as UNK.
        """
        out, n = [], self.vocab_size
        for i in ids:
            i = int(i)
            if i == EOS_ID:
                break
            if i != PAD_ID and i != BOS_ID:
                out.append(i if 0 <= i < n else UNK_ID)
        return self._sp.decode(out)

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list:
        return [self.decode(ids) for ids in batch]
