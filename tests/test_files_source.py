"""Real-data path: pretrain, SFT and the reward model from local files through the TFDS
builders (data.source=files), with an HH-RLHF-format comparison file (K = 2)."""
import json
import math

from rlhf_jax.data import world
from tests.helpers import run_cli


def _write_fixtures(root):
  corpus, sft, hh = root / "corpus", root / "sft", root / "hh"
  for d in (corpus, sft, hh):
    d.mkdir()
  (corpus / "train.txt").write_text("\n\n".join(world.make_corpus(0, 600)) + "\n")
  pairs = world.make_sft(1, 160)
  for name, part in (("train", pairs[:128]), ("test", pairs[128:])):
    with open(sft / f"{name}.jsonl", "w") as f:
      for p, r in part:
        f.write(json.dumps({"prompt": p + " =>", "response": r}) + "\n")
  # HH-RLHF dialogues: the chosen answer is a demonstration, the rejected one a worse
  # answer from the mixed corpus style (gold decides which is which).
  prompts = world.make_prompts(2, 96)
  good, other = world.make_responses(3, prompts, "demo"), world.make_responses(4, prompts, "mixed")
  gold_good, gold_other = world.gold_score(prompts, good), world.gold_score(prompts, other)
  with open(hh / "train.jsonl", "w") as f:
    for p, a, b, ga, gb in zip(prompts, good, other, gold_good, gold_other):
      chosen, rejected = (a, b) if ga >= gb else (b, a)
      head = f"\n\nHuman: {p}\n\nAssistant:"
      f.write(json.dumps({"chosen": f"{head} {chosen}", "rejected": f"{head} {rejected}"}) + "\n")
  return corpus, sft, hh


def test_reward_stage_trains_from_hh_rlhf_files(tmp_path):
  corpus, sft, hh = _write_fixtures(tmp_path)
  work = tmp_path / "work"
  p = run_cli(work, "--config.stages=pretrain,sft,reward", "--config.data.source=files",
              f"--config.data.files.pretrain={corpus}", f"--config.data.files.sft={sft}",
              f"--config.data.files.ranking={hh}", "--config.data.files.ranking_format=hh_rlhf",
              "--config.data.vocab_size=200", "--config.reward.steps=20")
  assert p.returncode == 0, p.stderr[-3000:]
  s = json.loads((work / "reward" / "summary.json").read_text())
  # 96 comparisons, 10% held out; K = 2 so one pair per prompt.
  assert s["train_comparisons"] + s["eval_comparisons"] == 96
  assert 0 < s["eval_pairs"] <= s["eval_comparisons"]  # whole eval batches
  assert math.isfinite(s["loss"]) and 0.0 <= s["accuracy"] <= 1.0
  assert s["eval_loss"] < s["init_eval_loss"]  # it learned something from the file
  assert "gold_accuracy" not in s  # real data has no gold scorer
  assert math.isfinite(s["reward_gain"]) and s["reward_gain"] > 0
  # Prepared through the TFDS builder as array_record files.
  assert list((work / "tfds").rglob("*.array_record*"))
