"""Every stage's data, tokenized and batched: the synthetic world or local files.

`config.data.source = "synthetic"` (the embedded default) generates the
pretraining corpus, demonstrations and prompt splits from `data.seed` and
scores responses with the world's gold scorer. `"files"` reads local data
through the TFDS builders (`config.data.files.*` name manual_dir folders
holding train/test files, see docs/data_formats.md); there is no gold
scorer then, so gold figures are absent from summaries.

The tokenizer is trained once into DIR/tokenizer.model, or loaded from
`data.tokenizer` (our .model, a tokenizer.json, or a Hugging Face model folder:
`tokenizer.load_tokenizer`), and reused by every stage.

Lengths: prompts and responses have separate token budgets, the same for SFT,
reward and generation. `data.max_prompt_len` (BOS included; 0 = data.prompt_len)
keeps an over-long prompt's END, its most recent turns; `data.max_response_len`
(EOS included; 0 = whatever the prompt leaves of data.max_len) cuts an over-long
response. Rows are data.max_len wide. `data.overlong="drop"` drops instead of
cutting. The counts (prompt_truncated, response_truncated, dropped, skipped_rows)
go into each stage's summary.
"""
from __future__ import annotations

import functools
import json
import os
import threading
import zlib

import jax
import numpy as np

from rlhf_jax.data import batching, formats, world
from rlhf_jax.data.formats import DataError
from rlhf_jax.data.tokenizer import BaseTokenizer, Tokenizer, load_tokenizer

# Each prompt split has its own seed stream ("prompts/reward", ..) so splits do not overlap.
PROMPT_SPLITS = ("reward", "rl", "eval")
EVAL_FRACTION = 0.05  # of the corpus / demonstrations held out for eval loss


def stream_seed(seed: int, *names: str) -> int:
  """The seed of one random stream: numpy's SeedSequence over (seed, CRC-32 of each name).

  Streams of different names, or of the same name under different seeds, are
  independent; seed + offset (or seed * 1000 + a character sum) made seed 1's
  stream A equal seed 0's stream B, or two anagrams' streams equal.
  """
  words = [int(seed) % 2**32, int(seed) // 2**32 % 2**32] + [zlib.crc32(n.encode()) for n in names]
  return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0]) >> 1  # a 63-bit int


def _has_token_ids(path: str) -> bool:
  """Whether a label-stage JSONL carries the sampled token ids (older ones hold text only)."""
  if not os.path.isfile(path):
    return False
  with open(path, "rb") as f:
    for line in f:
      if line.strip():
        try:
          return "response_ids" in json.loads(line)
        except ValueError:
          return False
  return False


def _split(arrays: dict, frac: float, name: str):
  n = len(next(iter(arrays.values())))
  n_eval = max(1, int(n * frac))
  if n - n_eval < 1:
    raise DataError(f"{name}: only {n} examples; not enough to hold out an evaluation split")
  return ({k: v[:-n_eval] for k, v in arrays.items()}, {k: v[-n_eval:] for k, v in arrays.items()})


class DataSources:

  def __init__(self, data_cfg, workdir: str, seed: int, labelled: bool = False):
    self.cfg, self.workdir, self.seed = data_cfg, workdir, seed
    self.synthetic = data_cfg.source == "synthetic"
    # A reward-model annotator (label.annotator, stages/gold.py) ranks the label stage's
    # samples: the proxy RM and DPO learn from those, even with data.files.ranking (which
    # then gives the prompts and demonstrations only; Gao et al. 2022's setup).
    self.labelled = labelled
    self.tfds_dir = os.path.join(workdir, "tfds")
    self.prompt_counts = {}  # split -> what prompt_set's budget did (truncated / dropped)
    # Stages that run at once (pipeline.INDEPENDENT) share this object: one TFDS
    # preparation of a folder at a time.
    self._prepare_lock = threading.RLock()

  # ----------------------------------------------------------------- tokenizer
  @functools.cached_property
  def tokenizer(self) -> BaseTokenizer:
    if self.cfg.tokenizer:
      return load_tokenizer(os.path.expanduser(self.cfg.tokenizer))
    path = os.path.join(self.workdir, "tokenizer.model")
    if jax.process_index() == 0 and not os.path.exists(path):
      os.makedirs(self.workdir, exist_ok=True)
      tmp = os.path.join(self.workdir, f"tokenizer.tmp{os.getpid()}")
      Tokenizer.train(self.corpus_texts, tmp, self.cfg.vocab_size)
      os.replace(tmp + ".model", path)  # atomic: a kill never leaves half a tokenizer
      if os.path.exists(tmp + ".vocab"):
        os.remove(tmp + ".vocab")
    if jax.process_count() > 1:  # every process waits for process 0's tokenizer
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("tokenizer")
    return Tokenizer.load(path)

  @property
  def max_prompt_len(self) -> int:
    """Prompt budget in tokens, BOS included (SFT, reward and generation prompts)."""
    return self.cfg.get("max_prompt_len", 0) or self.cfg.prompt_len

  @property
  def max_response_len(self) -> int:
    """Response budget in tokens, EOS included; 0 = what the prompt leaves of max_len."""
    return self.cfg.get("max_response_len", 0)

  def _budgets(self) -> dict:
    return {"max_prompt_len": self.max_prompt_len, "max_response_len": self.max_response_len}

  def prompt_text(self, prompt: str) -> str:
    """What the model sees before a response (the world's separator ends the prompt)."""
    return prompt + world.SEP.rstrip() if self.synthetic else prompt

  # ------------------------------------------------------------------ raw text
  @functools.cached_property
  def corpus_texts(self) -> list[str]:
    if self.synthetic:
      return world.make_corpus(self.seed_for("corpus"), self.cfg.corpus_docs)
    if self.cfg.files.pretrain:
      recs, _ = self._records("text", self.cfg.files.pretrain, "train")
      return [r["text"] for r in recs]
    # No corpus given: the demonstrations' dialogues (prompt + reply) are the text to
    # (continue to) pretrain on, and the text a tokenizer is trained on.
    return [p + r for p, r in self._demos("train")[0]]

  def seed_for(self, name: str) -> int:
    """The synthetic data's stream `name` under data.seed (see `stream_seed`)."""
    return stream_seed(self.cfg.seed, "data", name)

  def _records(self, kind: str, manual_dir: str, split: str, config=None, data_dir=None):
    from rlhf_jax.data.builders import load_records
    import tensorflow_datasets as tfds
    tfds.disable_progress_bar()
    if not manual_dir:
      raise DataError(f"config.data.files: no folder given for {kind} data (data.source=files)")
    data_dir = data_dir or os.path.join(self.tfds_dir, kind)

    def load():
      try:
        return load_records(kind, data_dir, manual_dir=manual_dir, split=split,
                            builder_config=config, skip_bad=self.cfg.skip_bad,
                            verbose=jax.process_index() == 0)
      except (ValueError, KeyError) as e:
        if isinstance(e, DataError):
          raise
        raise DataError(f"{manual_dir}: {e}") from None

    if jax.process_count() == 1:
      with self._prepare_lock:
        return load()
    # Preparation writes one folder (on a shared file system for a pod): process 0
    # prepares, the others wait at a barrier, then read what it wrote. A bad file
    # fails on process 0 after the barrier, and then on the others the same way.
    from jax.experimental import multihost_utils
    out, error = None, None
    if jax.process_index() == 0:
      try:
        out = load()
      except DataError as e:
        error = e
    multihost_utils.sync_global_devices(f"tfds {data_dir} {split}")
    if error is not None:
      raise error
    return out if out is not None else load()

  # ------------------------------------------------------------ stage datasets
  def corpus_rows(self):
    """Packed pretraining rows -> (train, eval) LM examples."""
    tok = self.tokenizer
    rows = batching.pack_corpus(tok.encode_batch(self.corpus_texts), self.cfg.seq_len,
                                tok.eos_id, tok.bos_id)
    if len(rows) == 0:
      raise DataError("pretraining corpus is empty after packing")
    return _split(batching.lm_examples(rows), EVAL_FRACTION, "pretraining corpus")

  def sft(self):
    """Demonstrations -> ((train, eval) examples, counts of truncated/dropped/skipped rows)."""
    if self.synthetic:
      pairs = world.make_sft(self.seed_for("sft"), self.cfg.sft_examples)
      skipped = 0
    else:
      pairs, skipped = self._demos("train")
    tok = self.tokenizer
    ex, counts = batching.sft_examples(
        tok.encode_batch([self.prompt_text(p) for p, _ in pairs]),
        tok.encode_batch([r for _, r in pairs]), self.cfg.max_len, tok.bos_id, tok.eos_id,
        tok.pad_id, overlong=self.cfg.overlong, **self._budgets())
    return _split(ex, EVAL_FRACTION, "SFT demonstrations"), {**counts, "skipped_rows": skipped}

  def prompts(self, split: str) -> list[str]:
    if self.synthetic:
      n = {"reward": self.cfg.reward_prompts, "rl": self.cfg.rl_prompts,
           "eval": self.cfg.eval_prompts}[split]
      return world.make_prompts(self.seed_for(f"prompts/{split}"), n)
    return [p for p, _ in self._demos("test" if split == "eval" else "train")[0]]

  def _demos(self, split: str) -> tuple[list[tuple[str, str]], int]:
    """(prompt, response) demonstrations of a split and the rows skipped: data.files.sft,
    or without it each comparison's best response in data.files.ranking (HH-RLHF's chosen
    reply: Bai et al. 2022 fine-tune on the same dialogues as their preference model).
    Without a test file there, the last data.eval_prompts comparisons are the held-out
    split and are left out of train."""
    if self.cfg.files.sft:
      recs, stats = self._records("sft", self.cfg.files.sft, split)
      return [(r["prompt"], r["response"]) for r in recs], stats.num_skipped
    if not self.cfg.files.ranking:
      raise DataError("config.data.files: data.source=files needs data.files.sft or "
                      "data.files.ranking for demonstrations and prompts")
    from rlhf_jax.data.builders import split_files
    has_test = "test" in split_files(self.cfg.files.ranking, (".jsonl",))
    recs, stats = self._records("ranking", self.cfg.files.ranking,
                                "test" if split == "test" and has_test else "train",
                                config=self.cfg.files.ranking_format)
    rows = [(r["prompt"], r["responses"][int(np.argmin(r["ranks"]))]) for r in recs]
    if not has_test:
      n_eval = min(self.cfg.eval_prompts, len(rows) // 2)
      rows = rows[len(rows) - n_eval:] if split == "test" else rows[:len(rows) - n_eval]
    return rows, stats.num_skipped

  def prompt_set(self, split: str):
    """(prompt texts, left-padded prompt arrays with `index` into the texts).

    Prompts over the budget keep their end; the counts land in `prompt_counts[split]`.
    """
    texts = self.prompts(split)
    tok = self.tokenizer
    ids = tok.encode_batch([self.prompt_text(p) for p in texts])
    ex, self.prompt_counts[split] = batching.prompt_examples(
        ids, self.max_prompt_len, tok.bos_id, tok.pad_id, overlong="truncate")
    return texts, ex

  def rankings(self, label_dir: str | None, max_k: int, eval_frac: float):
    """K-way rankings -> ((train, eval) reward examples, raw eval rows, counts).

    Synthetic: the label stage's output, token ids as sampled with their `ended`
    flags (issue 19 item 7: no decode/re-encode, EOS only where a sample ended).
    Files: data.files.ranking in data.files.ranking_format (hh_rlhf | tldr | kway),
    read through the TFDS builder and tokenized here. The held-out split is the
    last `eval_frac` of the comparisons that survive length filtering (item 6).
    raw eval rows are (prompt text, response texts, ended flags), aligned with eval.
    """
    tok = self.tokenizer
    recs, prompt_ids, responses_ids, ended, stats = self.ranking_tokens(label_dir)
    ex, counts = batching.reward_examples(
        prompt_ids, responses_ids, [r["ranks"] for r in recs], self.cfg.max_len, tok.bos_id,
        tok.eos_id, tok.pad_id, max_k=max_k, overlong=self.cfg.overlong, ended=ended,
        **self._budgets())
    index = ex.pop("index")
    n = len(index)
    n_eval = max(1, int(n * eval_frac))
    if n - n_eval < 1:
      raise DataError(f"rankings: only {n} comparisons fit the length budgets; not enough "
                      f"to hold out reward.eval_frac={eval_frac}")
    train = {k: v[:-n_eval] for k, v in ex.items()}
    evals = {k: v[-n_eval:] for k, v in ex.items()}
    raw = [(recs[i]["prompt"], list(recs[i]["responses"]),
            list(ended[i]) if ended is not None else [True] * len(recs[i]["responses"]))
           for i in index[-n_eval:]]
    return (train, evals), raw, {**counts, "skipped_rows": stats.num_skipped}

  def ranking_tokens(self, label_dir: str | None):
    """(records, prompt ids, response ids, ended flags or None, read stats) of the K-way
    rankings the reward model and DPO learn from. The label stage's output carries the
    token ids as sampled and whether each sample ended (issue 19 item 7: no decode and
    re-encode, EOS only where a sample ended); real rankings are text, tokenized here, and
    their responses are finished (ended = None)."""
    from_label = self.synthetic or not self.cfg.files.ranking or self.labelled
    sampled = os.path.join(label_dir, "train.jsonl") if from_label else None
    if sampled and _has_token_ids(sampled):
      stats = formats.ReadStats()
      recs = list(formats.read_sampled_ranking(sampled, skip_bad=self.cfg.skip_bad, stats=stats))
      return (recs, [r["prompt_ids"] for r in recs], [r["response_ids"] for r in recs],
              [r["ended"] for r in recs], stats)
    recs, prompts, stats = self.ranking_records(label_dir)
    recs = list(recs)
    tok = self.tokenizer
    return (recs, tok.encode_batch(prompts), [tok.encode_batch(r["responses"]) for r in recs],
            None, stats)

  def ranking_records(self, label_dir: str | None):
    """The K-way ranking records as text (label stage or data.files.ranking), each prompt
    as the model sees it: (records, prompt texts, TFDS read stats)."""
    if self.synthetic or not self.cfg.files.ranking or self.labelled:
      manual, fmt, data_dir = label_dir, "kway", os.path.join(label_dir, "tfds")
    else:
      manual, fmt, data_dir = self.cfg.files.ranking, self.cfg.files.ranking_format, None
    recs, stats = self._records("ranking", manual, "train", config=fmt, data_dir=data_dir)
    prompts = [self.prompt_text(r["prompt"]) if self.synthetic else r["prompt"] for r in recs]
    return recs, prompts, stats

  # --------------------------------------------------------------------- gold
  # The world's scorer only; stages use ctx.gold (stages/gold.py), which is this or a
  # reward model (config.label.annotator).
  @property
  def has_gold(self) -> bool:
    return self.synthetic

  def gold(self, prompts, responses, ended=None):
    """The world's gold scores of responses (synthetic only; None for real data)."""
    if not self.synthetic:
      return None
    return world.gold_score(list(prompts), list(responses),
                            None if ended is None else np.asarray(ended, bool))
