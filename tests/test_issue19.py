"""Issue 19's smaller items, without training: gold-free figures (2), the report's config (3),
PPO's critic initialisation and vf_coef (8, 9), Gao fits (10), seed streams (12) and the
declared dependencies (14). Items 1, 4, 5: test_new_user.py; 13, 15: test_multihost.py;
11: test_reliability.py."""
import ast
import importlib
import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from configs import tiny
from rlhf_jax import pipeline, report
from rlhf_jax.model.transformer import ModelConfig
from rlhf_jax.sampling import SampleConfig
from rlhf_jax.train import state as st
from rlhf_jax.train.optim import make_optimizer

_TOY = ModelConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=16)


# ------------------------------------------------------------------ item 2

def _evaluator(has_gold: bool):
  from rlhf_jax.stages.policy_eval import PolicyEvaluator
  ev = PolicyEvaluator.__new__(PolicyEvaluator)  # the figures only: fixed samples
  ev.ctx = types.SimpleNamespace(gold=types.SimpleNamespace(available=has_gold))  # ctx.gold
  gold = np.array([1.0, 2.0]) if has_gold else np.full(2, np.nan)
  ev.samples = lambda params: {"gold": gold + params, "proxy": np.array([0.5, 0.7]),
                               "kl": np.array([0.1, 0.3]), "length": np.array([4, 6]),
                               "ended": np.array([True, False])}
  ev._sft_gold = gold
  return ev


def test_no_gold_scorer_means_no_gold_figures(tmp_path):
  out = _evaluator(False).evaluate(1.0)
  assert "gold_reward" not in out and "win_rate_vs_sft" not in out, out  # absent, not 0 / nan
  assert out["proxy_reward"] == pytest.approx(0.6) and out["kl"] == pytest.approx(0.2)
  out = _evaluator(True).evaluate(1.0)
  assert out["gold_reward"] == pytest.approx(2.5) and out["win_rate_vs_sft"] == 1.0
  # PPO's evaluation points come from the proxy rows of metrics.jsonl, gold or not.
  from rlhf_jax.stages import rollout
  (tmp_path / "ppo").mkdir()
  rows = [{"step": 2, "eval_proxy_reward": 0.4, "eval_kl": 1.0}, {"step": 3, "loss": 0.1}]
  (tmp_path / "ppo" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  pts = rollout.eval_points(str(tmp_path / "ppo"), {"proxy_reward": 0.0},
                            {"flops": 1.0, "tokens_sampled": 2})
  assert [p["iteration"] for p in pts] == [0, 2] and all("gold_reward" not in p for p in pts)
  # The report leaves gold rows and columns out instead of filling them with dashes.
  from test_report import fake_workdir
  wd = fake_workdir(str(tmp_path / "run"), stages=("reward", "ppo", "best_of_k", "evaluate"))
  for stage in ("reward", "ppo", "best_of_k", "evaluate"):
    s = helpers.read_json(os.path.join(wd, stage, "summary.json"))
    s = _strip_gold(s)
    with open(os.path.join(wd, stage, "summary.json"), "w") as f:
      json.dump(s, f)
  md = open(report.build_report(wd)).read()
  assert "gold" not in md.split("## Training curves")[0].lower(), md
  assert "| policy | proxy_reward | kl |" in md and "| n | kl_bound | sqrt_kl | proxy |" in md


def _strip_gold(o):
  if isinstance(o, dict):
    return {k: _strip_gold(v) for k, v in o.items() if "gold" not in k and "win_rate" not in k}
  if isinstance(o, list):
    return [_strip_gold(v) for v in o]
  return o


# ------------------------------------------------------------------ item 3

def test_report_shows_the_latest_config_and_what_changed(tmp_path):
  wd = str(tmp_path)
  first = tiny.get_config("test")
  pipeline._record_config(first.copy_and_resolve_references(), wd)
  later = first.copy_and_resolve_references()
  later.stages = "pretrain,sft,ppo,evaluate"
  later.data.skip_bad = True
  later.ppo.kl_coef = 0.2
  assert pipeline.check_workdir_config(later, wd) == {"data.skip_bad": (False, True),
                                                      "ppo.kl_coef": (0.05, 0.2)}
  pipeline._record_config(later, wd)
  md = open(report.build_report(wd)).read()
  assert "Latest run: stages `pretrain,sft,ppo,evaluate`" in md, md
  assert "Changed since the first run: `data.skip_bad` False → True, `ppo.kl_coef` 0.05 → 0.2." in md
  assert helpers.read_json(os.path.join(wd, "config_first.json"))["stages"] == first.stages


def test_finished_stage_refuses_only_what_it_read(tmp_path):
  wd = str(tmp_path)
  cfg = tiny.get_config("test").copy_and_resolve_references()
  os.makedirs(os.path.join(wd, "sft"))
  pipeline._record_config(cfg, wd)
  pipeline.write_json(os.path.join(wd, "sft", "config.json"), json.loads(cfg.to_json_best_effort()))
  pipeline.write_json(os.path.join(wd, "sft", "summary.json"), {})
  ok = cfg.copy_and_resolve_references()
  ok.data.rl_prompts, ok.ppo.iterations, ok.model.remat = 7, 9, "full"  # SFT read none of these
  assert set(pipeline.check_workdir_config(ok, wd)) == {"data.rl_prompts", "ppo.iterations",
                                                        "model.remat"}
  for key, value in (("data.sft_examples", 100), ("data.vocab_size", 300), ("model.n_layers", 3)):
    bad = cfg.copy_and_resolve_references()
    section, field = key.split(".")
    bad[section][field] = value
    with pytest.raises(Exception, match=f"stage sft finished .*{key} "):
      pipeline.check_workdir_config(bad, wd)


# ------------------------------------------------------------------ items 8, 9

def test_shared_critic_starts_with_zero_values():
  from rlhf_jax.stages import ppo
  model = st.make_model(_TOY)
  sft = st.init_params(model, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 12), 4, 16)
  mask = jnp.ones((3, 12), bool)
  values = lambda p: np.asarray(model.apply({"params": p}, tokens, mask, scalar=True)["scalar"])
  assert np.abs(values(sft)).max() > 0.1  # the SFT checkpoint's head is untrained noise
  np.testing.assert_array_equal(values(ppo.initial_policy(sft, "shared")), 0.0)
  assert ppo.initial_policy(sft, "separate") is sft  # the critic is the RM's copy then
  assert "zero-initialised" in ppo.__doc__


def test_vf_coef_does_not_touch_a_separate_critic():
  """The separate critic has its own AdamW: its step size is critic_lr; a vf_coef scaling
  its loss only moved the gradient clipping threshold (and Adam's eps)."""
  from rlhf_jax.stages.ppo_step import make_iteration
  model = st.make_model(_TOY)
  policy, critic = st.init_params(model, jax.random.key(0)), st.init_params(model, jax.random.key(1))
  frozen = {"ref": policy, "reward": critic, "gain": jnp.float32(1.0), "bias": jnp.float32(0.0)}
  batch = {"prompt": jax.random.randint(jax.random.key(2), (8, 4), 4, 16),
           "prompt_mask": jnp.ones((8, 4), bool), "index": jnp.arange(8)}
  ones = lambda tokens, mask, response, response_mask, ended: jnp.ones(response.shape[0]) * 3.0
  critics = []
  for vf_coef in (0.1, 1.0):
    pc = tiny.get_config("test").ppo.copy_and_resolve_references()
    pc.update(rollout_batch=8, minibatches=2, epochs=1, response_len=6, vf_coef=vf_coef,
              use_eos_penalty=False)
    pc.opt.clip_norm = 1e-4  # active: a loss scale moved this threshold 10x before
    popt, copt = make_optimizer(pc.opt, 10), make_optimizer(pc.opt, 10)
    sc = SampleConfig(max_new_tokens=6, eos_id=3, pad_id=0)
    it = jax.jit(make_iteration(model, model, popt, copt, pc, sc, 4, score_fn=ones))
    state = {"params": policy, "opt_state": popt.init(policy), "critic_params": critic,
             "critic_opt_state": copt.init(critic), "step": jnp.zeros((), jnp.int32),
             "kl_coef": jnp.float32(0.05)}
    state, m = it(state, frozen, batch, jax.random.key(3))
    assert float(m["critic_grad_norm"]) > 0
    critics.append(jax.tree.leaves(state["critic_params"]))
  for a, b in zip(*critics):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ item 10

def test_gao_fits_need_three_points_besides_the_anchor(tmp_path):
  d = np.array([0.0, 1.0, 2.0])
  assert report.gao_fit("rl", d, d * (0.5 - 0.2 * np.log(np.maximum(d, 1)))) is None  # anchor + 2
  d = np.array([0.0, 1.0, 2.0, 3.0])
  assert report.gao_fit("bon", d, d * (0.8 - 0.2 * d))["n"] == 4
  methods = report.frontier_points(__import__("test_report").fake_workdir(str(tmp_path / "w")))
  _, fits = report.plot_frontier(methods, str(tmp_path))
  kinds = {(f["method"], f["quantity"]): f["kind"] for f in fits}
  assert kinds[("ppo", "gold")] == kinds[("best_of_n", "gold")] == "Gao et al."
  assert kinds[("ppo", "proxy")] == kinds[("best_of_k", "gold")] == "descriptive"


# ------------------------------------------------------------------ item 12

def test_seed_streams_do_not_alias_across_seeds_or_names():
  from rlhf_jax.data.sources import DataSources, stream_seed
  from rlhf_jax.stages import common
  from rlhf_jax.train import sharding as sh
  mesh = sh.mesh_of((1, 1, 1), jax.devices()[:1])
  arrays = {"x": np.arange(64)}

  def order(seed, stream):
    ctx = types.SimpleNamespace(config=types.SimpleNamespace(seed=seed), mesh=mesh)
    b = common.host_batcher(ctx, arrays, 8, stream)
    return np.concatenate([b.get(s)["x"] for s in range(16)])

  # seed + offset made seed 1's pretraining order seed 0's SFT order.
  a, b = order(1, "pretrain"), order(0, "sft")
  assert not any(np.array_equal(a[i:i + 32], b[j:j + 32]) for i in range(0, 96, 8)
                 for j in range(0, 96, 8))
  assert np.array_equal(order(0, "sft"), order(0, "sft"))  # a pure function of (seed, name)
  seeds = {stream_seed(s, "data", n) for s in range(4) for n in ("corpus", "sft", "fts", "prompts/rl")}
  assert len(seeds) == 16  # anagrams and neighbouring seeds are distinct streams
  src = [DataSources(types.SimpleNamespace(seed=s, source="synthetic"), "", 0) for s in (0, 1)]
  assert src[0].seed_for("prompts/reward") != src[1].seed_for("prompts/reward")


# ------------------------------------------------------------------ item 14

# Distribution -> module, and why it is declared where no module imports it directly.
_MODULES = {"jax": "jax", "flax": "flax", "optax": "optax", "orbax-checkpoint": "orbax.checkpoint",
            "sentencepiece": "sentencepiece", "tensorflow-datasets": "tensorflow_datasets",
            "array-record": "array_record", "ml-collections": "ml_collections", "absl-py": "absl",
            "numpy": "numpy", "matplotlib": "matplotlib",
            "safetensors": "safetensors", "tqdm": "tqdm", "tokenizers": "tokenizers"}
_INDIRECT = {"array-record": "tensorflow_datasets writes and reads array_record files with it"}


def _install_requires() -> list[str]:
  tree = ast.parse(open(os.path.join(helpers.REPO, "setup.py")).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "install_requires":
      return [ast.literal_eval(e).split(">")[0].split("=")[0].split("<")[0].strip()
              for e in node.value.elts]
  raise AssertionError("setup.py has no install_requires")


def _imported_modules() -> set[str]:
  names = set()
  for root in ("rlhf_jax", "experiments"):
    for d, _, files in os.walk(os.path.join(helpers.REPO, root)):
      for f in files:
        if f.endswith(".py"):
          for node in ast.walk(ast.parse(open(os.path.join(d, f)).read())):
            if isinstance(node, ast.Import):
              names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
              names.add(node.module)
  return names


def test_every_declared_dependency_is_installed_and_used():
  declared = _install_requires()
  assert sorted(declared) == sorted(_MODULES), "declare a dependency here with where it is used"
  used = _imported_modules()
  for dist in declared:
    module = _MODULES[dist]
    importlib.import_module(module)
    if dist not in _INDIRECT:
      assert any(u == module or u.startswith(module + ".") for u in used), \
          f"{dist} is declared in setup.py but nothing imports {module}"


# ------------------------------------------------------- issue 14: report samples

def test_sample_log_and_the_reports_samples_section(tmp_path):
  from rlhf_jax.stages.policy_eval import SampleLog
  path = str(tmp_path / "evaluate" / "samples.jsonl")
  os.makedirs(os.path.dirname(path))
  prompts = [f"prompt {i} | <b>" for i in range(5)]

  def samples(shift, gold=True):
    return {"index": np.array([4, 3, 2, 1, 0]), "texts": [f"resp {shift}.{i}" for i in range(5)],
            "proxy": np.arange(5) + shift, "ended": np.array([True, True, False, True, True]),
            "gold": np.arange(5) * 0.5 if gold else np.full(5, np.nan)}

  log = SampleLog(path)
  log.write({"policy": "sft"}, samples(0), prompts)
  log.write({"policy": "ppo", "iteration": 2}, samples(1), prompts)
  log.write({"policy": "ppo", "iteration": 4}, samples(2), prompts)
  log.write({"policy": "ppo", "iteration": 4}, samples(9), prompts)  # already there: skipped
  rows = helpers.read_jsonl(path)
  assert len(rows) == 15 and rows[0] == {"policy": "sft", "prompt_index": 4, "prompt": prompts[4],
                                         "response": "resp 0.0", "proxy": 0.0, "ended": True,
                                         "gold": 0.0}
  # A resume keeps the evaluations it will not redo, and writes none of them twice.
  log = SampleLog(path, keep=lambda r: r["policy"] == "ppo" and r["iteration"] <= 2)
  log.write({"policy": "ppo", "iteration": 2}, samples(7), prompts)
  log.write({"policy": "ppo", "iteration": 4}, samples(2), prompts)
  assert [(r["iteration"], r["response"]) for r in helpers.read_jsonl(path)][::5] == \
      [(2, "resp 1.0"), (4, "resp 2.0")]
  log = SampleLog(path)
  log.write({"policy": "sft"}, samples(0), prompts)
  log.write({"policy": "ppo", "iteration": 4}, samples(2), prompts)
  md = "\n".join(report._samples_section(str(tmp_path)))
  assert md.count("**Prompt ") == 3 and "**Prompt 0**: prompt 0 \\| &lt;b>" in md
  assert "| sft | resp 0.4 | 4 | 2 |" in md and "| ppo (iteration 4) | resp 2.4 | 6 | 2 |" in md
  assert "resp 0.2 [no EOS]" in md
  log = SampleLog(path)  # without a gold scorer: no gold in the rows, no gold column
  log.write({"policy": "sft"}, samples(0, gold=False), prompts)
  assert "gold" not in helpers.read_jsonl(path)[0]
  md = "\n".join(report._samples_section(str(tmp_path)))
  assert "| policy | response | proxy |" in md and "| sft | resp 0.4 | 4 |" in md
