"""Issue 19 item 7: the reward model is trained on the label stage's token-level truth.

The label stage keeps each sample's ids as sampled (no decode/re-encode), with `ended`
flags; the reward rows put EOS only where a sample ended, keep an empty sample empty,
and the reward is read at the last real token, where PPO reads it."""
import json

import numpy as np

from rlhf_jax.data import world
from rlhf_jax.data.sources import DataSources
from rlhf_jax.data.tokenizer import Tokenizer
from rlhf_jax.stages.label import sampled_prompt_ids, sampled_response_ids
from rlhf_jax.stages.policy_eval import last_index

PAD, BOS, EOS = 0, 2, 3


def test_sampled_ids_are_kept_exactly():
  # Left-padded prompts (BOS first) and right-padded responses as the sampler returns them.
  prompt = np.array([[PAD, BOS, 7, 8], [BOS, 9, 10, 11]])
  prompt_mask = prompt != PAD
  response = np.array([[40, 41, EOS, PAD], [42, 43, 44, 45], [EOS, PAD, PAD, PAD]])
  response_mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
  ended = np.array([True, False, True])
  assert sampled_prompt_ids(prompt, prompt_mask, BOS) == [[7, 8], [9, 10, 11]]
  assert sampled_prompt_ids(prompt, prompt_mask, None) == [[BOS, 7, 8], [BOS, 9, 10, 11]]
  # Ended: EOS stripped (the reward rows add it back); cut: every id kept; empty: empty.
  got = sampled_response_ids(response, response_mask, ended, EOS)
  assert got == [[40, 41], [42, 43, 44, 45], []]


def test_reward_rows_from_label_output_keep_ids_eos_and_empty(tmp_path):
  tok = Tokenizer.train(world.make_corpus(0, 500), str(tmp_path / "tok"), 200)
  from configs import tiny
  cfg = tiny.get_config("test")
  with cfg.unlocked():
    cfg.data.tokenizer = tok.path
  label_dir = tmp_path / "label" / "data"
  label_dir.mkdir(parents=True)
  prompt = "is the lamp worth it ?"
  # Ids a decode/encode round trip would not give back (a split of one word's pieces).
  odd = [tok._sp.piece_to_id(c) for c in ("\u2581", "l", "a", "m", "p")]
  assert tok.encode(tok.decode(odd)) != odd and tok.unk_id not in odd
  samples = [(odd, True), (tok.encode("the lamp is great . the lamp is"), False), ([], True)]
  rows = []
  for i in range(20):
    rows.append({"prompt": prompt, "responses": [tok.decode(r) for r, _ in samples],
                 "ranking": [0, 2, 1], "prompt_ids": tok.encode(prompt + " =>"),
                 "response_ids": [r for r, _ in samples], "ended": [e for _, e in samples]})
  with open(label_dir / "train.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  src = DataSources(cfg.data, str(tmp_path / "work"), cfg.seed)
  (train, evals), raw, counts = src.rankings(str(label_dir), max_k=None, eval_frac=0.1)
  assert counts["dropped"] == 0 and counts["truncated"] == 0 and len(evals["ranks"]) == 2
  head = [BOS] + tok.encode(prompt + " =>")
  toks, mask = train["tokens"][0], train["mask"][0]
  got = [t[m].tolist() for t, m in zip(toks, mask)]
  assert got[0] == head + odd + [EOS]  # the sampled ids, then EOS: it ended
  assert got[1] == head + samples[1][0]  # never ended: no EOS, read at its last token
  assert got[2] == head + [EOS]  # empty stays empty (was ".")
  idx = np.asarray(last_index(mask))
  assert [toks[k, idx[k]] for k in range(3)] == [EOS, samples[1][0][-1], EOS]
  assert raw[0] == (prompt, rows[0]["responses"], [True, False, True])  # gold sees `ended`


def test_bad_label_rows_name_file_and_line(tmp_path):
  import pytest
  from rlhf_jax.data.formats import DataError, read_sampled_ranking
  good = {"prompt": "p", "responses": ["a", ""], "ranking": [0, 1], "prompt_ids": [5],
          "response_ids": [[6], []], "ended": [False, True]}
  bad = [dict(good, ended=[True]), dict(good, response_ids=[[6], [-1]]),
         dict(good, ended=[False, False])]  # an empty sample that never ended is impossible
  path = tmp_path / "train.jsonl"
  for i, row in enumerate(bad):
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: "):
      list(read_sampled_ranking(str(path)))
  path.write_text(json.dumps(good) + "\n")
  assert list(read_sampled_ranking(str(path)))[0]["response_ids"] == [[6], []]
