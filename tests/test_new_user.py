"""What a new user hits with real files (issue 19 items 1, 4, 5), through the real CLI.

One workdir, four launches: a bad SFT row stops the run after pretraining; re-running
with data.skip_bad=True keeps the finished pretraining (the change announced in one
line) and trains SFT and the reward model; a changed model shape is refused in one
line naming the key; TFDS preparation prints one line of ours and no download talk.
"""
import json
import re

import helpers
from rlhf_jax.data import world

SMALL = ("--config.pretrain.steps=4", "--config.sft.steps=2", "--config.reward.steps=2",
         "--config.data.vocab_size=200", "--config.data.source=files",
         "--config.data.files.ranking_format=hh_rlhf")


def _fixtures(root):
  corpus, sft, hh = root / "corpus", root / "sft", root / "hh"
  for d in (corpus, sft, hh):
    d.mkdir()
  (corpus / "train.txt").write_text("\n\n".join(world.make_corpus(0, 300)) + "\n")
  pairs = world.make_sft(1, 100)
  with open(sft / "train.jsonl", "w") as f:
    for i, (p, r) in enumerate(pairs[:80]):
      f.write(json.dumps({"prompt": p + " =>", "response": "" if i == 40 else r}) + "\n")
  with open(sft / "test.jsonl", "w") as f:
    for p, r in pairs[80:]:
      f.write(json.dumps({"prompt": p + " =>", "response": r}) + "\n")
  prompts = world.make_prompts(2, 48)
  good, other = world.make_responses(3, prompts, "demo"), world.make_responses(4, prompts, "mixed")
  with open(hh / "train.jsonl", "w") as f:
    for p, a, b in zip(prompts, good, other):
      head = f"\n\nHuman: {p}\n\nAssistant:"
      f.write(json.dumps({"chosen": f"{head} {a}", "rejected": f"{head} {b}"}) + "\n")
  return (f"--config.data.files.pretrain={corpus}", f"--config.data.files.sft={sft}",
          f"--config.data.files.ranking={hh}")


_NOISE = ("Downloading and preparing", "downloaded and prepared", "dataset_info.json", "Unknown size")


def test_skip_bad_rerun_keeps_pretraining_and_model_change_is_refused(tmp_path):
  files = _fixtures(tmp_path)
  work = tmp_path / "work"
  args = (*SMALL, *files, "--config.stages=pretrain,sft,reward")

  p = helpers.run_cli(work, *args, timeout=300)
  assert p.returncode == 2, p.stderr[-3000:]
  assert re.search(r"train\.jsonl:41: .*response", helpers.message_lines(p.stderr)[-1]), p.stderr[-2000:]
  assert (work / "pretrain" / "summary.json").exists()
  # Item 4: one line of ours per preparation, no tfds download talk anywhere.
  for stream in (p.stdout, p.stderr):
    assert not [l for l in stream.splitlines() if any(n in l for n in _NOISE)], stream[-3000:]
  prep = [l for l in p.stdout.splitlines() if l.startswith("preparing ")]
  assert any(re.fullmatch(r"preparing \S+ from \S+corpus/train\.txt: 300 rows, 0 skipped", l)
             for l in prep), p.stdout

  # Item 1: the same command with skip_bad keeps the finished pretraining.
  p = helpers.run_cli(work, *args, "--config.data.skip_bad=True", timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  assert "changed since the last run: data.skip_bad False -> True" in p.stdout.splitlines(), p.stdout
  assert "[pretrain] finished earlier" in p.stdout
  assert helpers.read_json(work / "sft" / "summary.json")["skipped_rows"] == 1
  assert any(re.fullmatch(r"preparing \S+ from \S+sft/train\.jsonl, \S+sft/test\.jsonl: "
                          r"99 rows, 1 skipped", l) for l in p.stdout.splitlines()), p.stdout
  assert not [l for l in p.stderr.splitlines() if any(n in l for n in _NOISE)], p.stderr[-3000:]
  # Item 5: the reward stage counts K x length tokens per comparison.
  tps = [float(m.group(1).replace(",", "")) for m in
         re.finditer(r"^\[reward\] step \d+/\d+ loss \S+ tok/s (\S+)", p.stdout, re.M)]
  assert tps and all(t > 0 for t in tps), p.stdout
  assert helpers.read_json(work / "sft" / "config.json")["data"]["skip_bad"] is True
  assert helpers.read_json(work / "config_first.json")["data"]["skip_bad"] is False

  # A model shape change would make the finished stages' checkpoints unreadable: refused.
  p = helpers.run_cli(work, *args, "--config.data.skip_bad=True", "--config.model.d_model=48",
                      timeout=120)
  assert p.returncode == 2, p.stderr[-3000:]
  lines = helpers.message_lines(p.stderr)
  assert len(lines) == 1 and "model.d_model 32 -> 48" in lines[0] and "pretrain" in lines[0], lines
  # So is a change of the data a finished stage read (the SFT file's folder).
  p = helpers.run_cli(work, *args, "--config.data.skip_bad=True", "--config.data.max_len=40",
                      timeout=120)
  assert p.returncode == 2 and "data.max_len 48 -> 40" in p.stderr, p.stderr[-3000:]
  assert helpers.read_json(work / "config.json")["model"]["d_model"] == 32  # refused runs record nothing
