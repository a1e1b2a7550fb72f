"""A reward model as the annotators and the gold scorer (config.label.annotator; Gao et al. 2022).

One tiny "gold" workdir (pretrain, sft, label, reward on configs/tiny.py:test) plays the
annotators of a second run that starts from a copy of its SFT policy and runs label ->
reward -> ppo: the labels, the proxy RM's gold accuracy and PPO's gold figures all come
from the gold RM, and every summary with gold figures names it.
"""
import os
import pathlib
import shutil

import numpy as np
import pytest

import helpers

# One worker runs the module, so its module-scoped fixture runs once (pytest-xdist loadgroup).
pytestmark = [pytest.mark.xdist_group("gold_rm"), pytest.mark.reference_run]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  from test_reliability import reference_run
  # The gold RM is the suite's reference run's reward model (read only); the main run starts
  # from copies of its pretrain and SFT stages.
  gold = pathlib.Path(reference_run(tmp_path_factory))
  main = tmp_path_factory.mktemp("gold_rm") / "main"
  main.mkdir()
  for name in ("pretrain", "sft"):
    shutil.copytree(gold / name, main / name)
  for name in ("tokenizer.model", "config.json", "config_first.json"):
    shutil.copy(gold / name, main / name)
  p = helpers.run_cli(main, "--config.stages=label,reward,ppo", f"--config.label.annotator={gold}",
                      "--config.label.annotator_temperature=0", "--config.ppo.iterations=2",
                      timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  return gold, main


def _ctx(workdir, annotator, **data):
  from configs import tiny
  from rlhf_jax import pipeline
  from rlhf_jax.train import sharding as sh
  config = tiny.get_config("test")
  with config.unlocked():
    config.label.annotator = str(annotator)
    config.data.update(data)
  return pipeline.Context(config, str(workdir), sh.make_mesh(config.mesh))


def test_temperature_zero_annotator_reproduces_the_gold_rm_order(runs):
  gold_dir, main = runs
  ctx = _ctx(main, gold_dir)
  rows = helpers.read_jsonl(main / "label" / "data" / "train.jsonl")
  k = len(rows[0]["responses"])
  prompts = [r["prompt"] for r in rows for _ in range(k)]
  responses = [x for r in rows for x in r["responses"]]
  ended = [e for r in rows for e in r["ended"]]
  scores = ctx.gold.score(prompts, responses, ended).reshape(len(rows), k)
  ranks = np.array([r["ranking"] for r in rows])
  # rank 0 = the RM's best; ties (identical samples) go to the lower index as in world.annotate
  expected = np.argsort(np.argsort(-scores, axis=1, kind="stable"), axis=1)
  np.testing.assert_array_equal(ranks, expected)
  label = helpers.read_json(main / "label" / "summary.json")
  assert label["label_gold_agreement"] == 1.0
  assert len(set(map(tuple, ranks.tolist()))) > 1  # not one constant ranking


def test_ctx_gold_world_and_reward_model(runs):
  gold_dir, main = runs
  world_ctx = _ctx(main, "world")
  assert world_ctx.gold.available and world_ctx.gold.name == "world"
  assert not _ctx(main, "world", source="files").gold.available  # real data: no world scorer
  assert _ctx(main, "world", source="files").gold.score(["a"], ["b"], [True]) is None
  g = _ctx(main, gold_dir / "reward").gold  # DIR/reward is the same as DIR
  assert g.available and str(gold_dir / "reward") in g.name and "RM" in g.name
  # A real-data run (data.source=files) still has this gold scorer.
  assert _ctx(main, gold_dir, source="files").gold.available
  rows = helpers.read_jsonl(main / "label" / "data" / "train.jsonl")
  prompts = [r["prompt"] for r in rows for _ in r["responses"]]
  responses = [x for r in rows for x in r["responses"]]
  s = g.score(prompts, responses, [True] * len(responses))
  assert s.shape == (len(responses),) and np.isfinite(s).all()
  np.testing.assert_allclose(g.score(prompts[:5], responses[:5], [True] * 5), s[:5], atol=1e-5)
  # The gold run's normalisation (SFT samples mean 0, std 1): these are SFT samples too.
  assert abs(s.mean()) < 1.5 and 0.2 < s.std() < 5, (s.mean(), s.std())
  # EOS where a response ended, as the proxy RM sees it: a cut response scores differently.
  cut = g.score(prompts[:8], responses[:8], [False] * 8)
  assert not np.allclose(cut, s[:8])


def test_pipeline_gold_figures_name_the_gold_rm(runs):
  gold_dir, main = runs
  for stage in ("label", "reward", "ppo"):
    s = helpers.read_json(main / stage / "summary.json")
    assert str(gold_dir / "reward") in s["gold_scorer"], (stage, s.get("gold_scorer"))
  assert "gold_accuracy" in helpers.read_json(main / "reward" / "summary.json")
  ppo = helpers.read_json(main / "ppo" / "summary.json")
  assert np.isfinite(ppo["gold_reward"]) and np.isfinite(ppo["sft_gold_reward"])
  # The gold run's own summaries: the world scored them.
  assert helpers.read_json(gold_dir / "reward" / "summary.json")["gold_scorer"] == "world"
  from rlhf_jax import report
  text = open(report.build_report(str(main))).read()
  assert f"gold = {ppo['gold_scorer']}" in text


def test_changing_the_annotator_of_a_finished_label_stage_is_refused(runs):
  from rlhf_jax import pipeline
  from rlhf_jax.train.checkpoint import CheckpointMismatch
  gold_dir, main = runs
  ctx = _ctx(main, "world")
  with pytest.raises(CheckpointMismatch, match="label.annotator"):
    pipeline.check_workdir_config(ctx.config, str(main))
  pipeline.check_workdir_config(_ctx(main, gold_dir).config, str(main))  # unchanged: fine


def test_bad_annotator_fails_before_compiling_with_one_line(tmp_path, runs):
  from rlhf_jax.config_lib import ConfigError
  from rlhf_jax.stages import gold
  missing = tmp_path / "nope"
  p = helpers.run_cli(tmp_path / "w", "--config.stages=label", f"--config.label.annotator={missing}",
                      timeout=120)
  assert p.returncode == 2, p.stderr[-3000:]
  lines = helpers.message_lines(p.stderr)
  assert len(lines) == 1 and "label.annotator" in lines[0] and str(missing) in lines[0], lines
  with pytest.raises(ConfigError, match="no finished reward stage"):
    gold.resolve(str(tmp_path))  # a folder that is no workdir with a reward stage
  with pytest.raises(ConfigError, match="no reward_gain: not a reward stage"):
    gold.resolve(str(runs[1] / "sft"))  # another stage
  llama = os.path.join(helpers.REPO, "tests", "fixtures", "hf", "llama")
  with pytest.raises(ConfigError, match="ForSequenceClassification"):
    gold.resolve(llama)  # a causal LM is no reward model


def test_hugging_face_seq_cls_gold(tmp_path, runs):
  """A *ForSequenceClassification folder scores raw, with its own tokenizer."""
  import jax
  from rlhf_jax import hf
  from rlhf_jax.data.tokenizer import Tokenizer
  from rlhf_jax.stages.policy_eval import reward_scores
  folder = tmp_path / "rm"
  shutil.copytree(os.path.join(helpers.REPO, "tests", "fixtures", "hf", "llama_reward"), folder)
  words = ["the cat sat on the mat", "a dog ran far away", "good answer", "bad answer"] * 20
  Tokenizer.train(words, str(folder / "tokenizer"), vocab_size=60)  # ids < the fixture's 97
  g = _ctx(runs[1], folder).gold
  assert "HF RM" in g.name
  s = g.score(["the cat", "a dog"], ["sat on the mat", "ran"], [True, False])
  rows = g.rows(["the cat", "a dog"], ["sat on the mat", "ran"], [True, False])
  assert rows["tokens"][0, rows["mask"][0].sum() - 1] == g.tokenizer.eos_id  # ended: EOS
  assert rows["tokens"][1, rows["mask"][1].sum() - 1] != g.tokenizer.eos_id
  model, params = hf.load(str(folder))
  _, raw = jax.jit(lambda p, t, m: reward_scores(model, p, t, m, 1.0, 0.0))(
      params, rows["tokens"], rows["mask"])
  np.testing.assert_allclose(s, np.asarray(raw), atol=1e-4)  # raw: no normalisation
