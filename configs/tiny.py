"""The embedded default: the whole InstructGPT recipe on the synthetic world, on a laptop CPU.

  python -m rlhf_jax.main --config configs/tiny.py --workdir runs/tiny

Variants: `configs/tiny.py:test` shrinks everything for the test suite;
`configs/tiny.py:gpu` is the same pipeline and ablation at a larger size for one
accelerator (a 24M-parameter model, bf16, bigger batches and datasets):

  python -m rlhf_jax.main --config configs/tiny.py:gpu --workdir runs/gpu
  python -m experiments.ppo_vs_bok --config configs/tiny.py:gpu --workdir runs/ablation_gpu
Stages: pretrain -> sft -> label -> reward -> ppo -> best_of_k -> evaluate; the policy
stages dpo and grpo (DPO/IPO, GRPO/RLOO/Dr. GRPO) run beside ppo when listed:

  python -m rlhf_jax.main --config configs/tiny.py --workdir runs/tiny \
      --config.stages=pretrain,sft,label,reward,dpo,grpo
"""
import ml_collections as mlc

from rlhf_jax import config_lib as cl


def get_config(arg=None):
  c = mlc.ConfigDict()
  c.seed = 0
  c.stages = "pretrain,sft,label,reward,ppo,best_of_k,evaluate"
  c.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1 fills the available devices
  c.distributed = dict(enabled=False, coordinator_address="", num_processes=0, process_id=-1)
  c.checkpoint = dict(keep=2, async_save=True)
  c.compile_cache = "~/.cache/rlhf_jax/jax_cache"  # persistent XLA compilation cache ("" = off)
  # ppo, best_of_k, dpo and grpo listed next to each other run at once on a one-device CPU
  # run (pipeline.INDEPENDENT; same results as one at a time, both cores busy).
  c.concurrent_stages = True
  c.model = cl.model(d_model=128, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=384, max_len=96)

  c.data = dict(
      source="synthetic",  # synthetic | files
      seed=1234,
      corpus_docs=40_000, sft_examples=4_000, reward_prompts=2_000, rl_prompts=2_000,
      eval_prompts=128,
      # Our sentencepiece .model, a tokenizer.json or a Hugging Face model folder;
      # "" = train one into the workdir (rlhf_jax.data.tokenizer.load_tokenizer).
      tokenizer="",
      vocab_size=512,
      seq_len=96,  # pretraining rows (packed)
      max_len=80,  # prompt + response for SFT / reward
      prompt_len=16,  # left-padded prompts for generation (the world's are <= 15 tokens with BOS)
      # Token budgets for SFT, reward and generation (rlhf_jax.data.sources). A longer
      # prompt keeps its END (most recent turns) plus BOS; a longer response is cut.
      max_prompt_len=0,  # BOS included; 0 = prompt_len
      max_response_len=0,  # EOS included; 0 = what the prompt leaves of max_len
      overlong="truncate",  # truncate | drop over-length examples (counted in the summary)
      skip_bad=False,  # skip (and count) malformed rows instead of failing
      files=dict(pretrain="", sft="", ranking="", ranking_format="kway"),  # data.source=files
  )
  c.pretrain = cl.train(steps=400, batch_size=32, lr=3e-3, warmup_steps=40, eval_every=100,
                        log_every=20, ckpt_every=100, weight_decay=0.01)
  c.sft = cl.train(steps=150, batch_size=32, lr=1e-3, warmup_steps=10, eval_every=50,
                   log_every=10, ckpt_every=50)

  # InstructGPT step 2: K samples per prompt ranked by the simulated annotators.
  c.label = dict(k=4, batch_size=64, sample_temperature=1.0,
                 annotator_temperature=0.25,  # Plackett-Luce noise on gold scores
                 flip_rate=0.0,
                 # Who plays the annotators and the gold scorer: "world" (the synthetic
                 # world) or a reward model, Gao et al. 2022: another workdir (DIR or
                 # DIR/reward) or a Hugging Face *ForSequenceClassification folder.
                 annotator="world")
  # ~2.8 epochs of the 1,800 training comparisons: RMs overfit fast (InstructGPT: 1 epoch), but
  # 120 steps left gold accuracy at 0.747 and 160 reach 0.757 (issue 18's bar: 0.75; the
  # held-out set's ~1,000 pairs put about +-0.014 of noise on that figure).
  c.reward = cl.train(steps=160, batch_size=32, lr=3e-4, warmup_steps=10, eval_every=40,
                      log_every=10, ckpt_every=40)
  c.reward.eval_frac = 0.1  # held-out fraction of labelled prompts
  c.reward.normalize_samples = 512  # SFT samples on RL prompts for the gain/bias (Ziegler et al. 2019)
  # Reward-model ensembles (Coste et al. 2024; Eisenstein et al. 2023): N members trained in one
  # vmapped program, each with its own head init; every proxy score is their aggregate.
  c.reward.ensemble = 1  # members; 1 = one reward model (InstructGPT)
  c.reward.aggregate = "mean"  # mean | wco: min over members | uwo: mean - uwo_coef * var (Coste et al. 2024)
  c.reward.uwo_coef = 1.0  # UWO's variance weight, lambda in Coste et al. 2024 eq. 4
  c.reward.ensemble_data = "shuffle"  # shuffle: all comparisons, own order (Coste et al. 2024) | bootstrap: own resample
  c.reward.member = -1  # -1: train every member; m: only member m, alone (its init and data as in the ensemble)

  c.ppo = dict(
      iterations=24, rollout_batch=64, minibatches=4, epochs=2, response_len=32,
      score_chunks=1,  # the four scoring passes over this many slices of the rollout's rows (memory)
      temperature=1.0,  # sampling temperature; log-probs use it everywhere (Huang et al. 2024)
      kl_mode="fixed",  # fixed | adaptive (Ziegler et al. 2019)
      kl_coef=0.05, kl_target=6.0,
      # Adaptive KL: the coefficient moves by at most 0.2 x rollout_batch / kl_horizon per
      # iteration. Ziegler et al. use 10,000 episodes with batches of 512 over far longer
      # runs; at 64 x 24-48 iterations that would move it by 6% at most, so 1,000 here.
      kl_horizon=1_000,
      kl_estimator="k1",  # per-token penalty: k1 = logp - ref_logp (InstructGPT)
      critic="separate",  # separate model from the reward model (InstructGPT) | shared backbone
      gae_gamma=1.0, gae_lambda=0.95,  # Ziegler et al. 2019 defaults
      clip_eps=0.2, value_clip_eps=0.2, vf_coef=0.1, entropy_coef=0.0,
      whiten_rewards=False,  # whiten rewards without shifting the mean (lm-human-preferences)
      whiten_advantages=True,  # over the valid tokens of the batch (Huang et al. 2024)
      reward_clip=0.0,  # clip normalised scores to +-value (0 = off)
      missing_eos_penalty=-1.0,  # score for responses without EOS (Huang et al. 2024); nan-free
      use_eos_penalty=True,
      ptx_coef=0.0,  # PPO-ptx: gamma_ptx * pretraining LM loss (InstructGPT)
      ptx_batch=8,  # pretraining rows per minibatch update (fresh for each)
      eval_every=6, log_every=1, ckpt_every=6,
      nonfinite="stop",  # stop | skip: a non-finite minibatch update is always dropped; skip goes on
      opt=cl.optimizer(1e-4, b1=0.9, b2=0.95, eps=1e-5, schedule="constant", clip_norm=1.0),
      critic_lr=3e-4,
  )
  # Offline preference optimisation on the label stage's rankings (or data.files.ranking):
  # the policy and the frozen reference both start from SFT.
  c.dpo = cl.train(steps=60, batch_size=32, lr=1e-4, warmup_steps=5, eval_every=20, log_every=5,
                   ckpt_every=20, schedule="constant")  # batch_size: pairs per step
  c.dpo.update(dict(
      beta=0.1,  # KL strength: implicit reward = beta log(pi / pi_ref) (Rafailov et al. 2023)
      loss_type="sigmoid",  # sigmoid: DPO (Rafailov et al. 2023) | ipo: IPO (Azar et al. 2023)
      label_smoothing=0.0,  # conservative DPO: labels flipped w.p. ls (Mitchell 2023)
      pairs="all",  # all untied pairs of a ranking (InstructGPT's C(K,2)) | best_vs_rest
      eval_frac=0.1,  # held-out rankings for pair loss / accuracy (as reward.eval_frac)
      response_len=32,  # held-out policy samples; = ppo.response_len so arms compare
      # Online DPO: batch_size prompts x 2 fresh samples per step, ranked by the reward model
      # (Guo et al. 2024); the rankings above are then unused.
      online=False,
  ))
  # Critic-free RL: K samples per prompt, the group is the baseline (no value model).
  c.grpo = dict(
      iterations=24, prompts_per_iteration=16, minibatches=4, epochs=1, response_len=32,
      score_chunks=1,  # scoring passes over this many slices of the rows (as ppo.score_chunks)
      k=4,  # samples per prompt (GRPO: 64, Shao et al. 2024; RLOO: 2-4, Ahmadian et al. 2024)
      temperature=1.0,  # sampling temperature, used for every log-prob (Huang et al. 2024)
      advantage="grpo",  # grpo: (s-mean)/std (Shao et al.) | rloo: leave-one-out (Ahmadian et
                         # al. 2024) | dr_grpo: s-mean (Liu et al. 2025)
      kl_mode="loss",  # loss: beta * k3 KL term in the loss (GRPO eq. 3) | reward: -beta * summed
                       # per-token KL in the sequence reward (InstructGPT; RLOO's form)
      kl_coef=0.05,  # beta (GRPO used 0.04)
      loss_agg="sequence",  # token: DAPO (Yu et al. 2025) | sequence: 1/|o| mean, GRPO |
                            # constant: sum / response_len, Dr. GRPO (Liu et al. 2025)
      clip_eps=0.2,  # PPO clip on the ratio (Schulman et al. 2017; GRPO keeps it)
      entropy_coef=0.0,
      missing_eos_penalty=-1.0, use_eos_penalty=True,  # as ppo (Huang et al. 2024)
      reward_clip=0.0,  # clip normalised scores to +-value (0 = off)
      eval_every=6, log_every=1, ckpt_every=6,
      nonfinite="stop",  # stop | skip, as ppo
      opt=cl.optimizer(1e-4, b1=0.9, b2=0.95, eps=1e-5, schedule="constant", clip_norm=1.0),
  )
  # Best-of-n evaluation (Stiennon et al. 2020; Gao et al. 2022) and rejection-sampling
  # fine-tuning: sample K, keep the RM's best, fine-tune, repeat (Dong et al. 2023 "RAFT";
  # Touvron et al. 2023 "Llama 2" rejection sampling).
  c.best_of_k = dict(
      eval_pool=16,  # N samples per held-out prompt for the best-of-n curve, n = 1..N/2
      rounds=3, k=8, prompts_per_round=256, sample_batch=64, temperature=1.0,
      keep="best",  # best | threshold | top_frac
      threshold=0.0, top_frac=0.5,
      train=cl.train(steps=40, batch_size=32, lr=3e-4, warmup_steps=5, log_every=10,
                     ckpt_every=20, schedule="constant"),
  )
  # Iterated online RLHF (stages/online.py; Bai et al. 2022 sec. 4.5): rounds of label the
  # current policy's samples -> retrain the RM on all comparisons -> PPO from the current policy.
  c.online = dict(
      rounds=3,  # round 1 = PPO on the reward stage's RM; rounds 2.. refresh the RM first
      ppo_iterations=8,  # PPO iterations per round (config.ppo otherwise)
      prompts_per_round=512,  # reward prompts labelled per refresh (rotating slice; 0 = all)
      rm_init="continue",  # continue: from the previous round's RM | sft: a fresh head on SFT
      reward_steps=20,  # RM training steps per refresh (0 = reward.steps; reward.* otherwise)
  )
  c.evaluate = dict(batch_size=64, temperature=1.0)
  c.lora = cl.lora()  # rank 0: full fine-tuning; --config.lora.rank=8 trains LoRA adapters

  if arg == "test":
    _shrink(c)
  elif arg == "gpu":
    _grow(c)
  elif arg:
    raise ValueError(f"configs/tiny.py: unknown variant {arg!r}; known: test, gpu")
  c.lock()
  return c


def _shrink(c):
  """Seconds-scale variant for tests."""
  # Two KV heads: the suite's 8-device mesh tests (mesh.tensor=2) shard this very model.
  c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, d_ff=64, max_len=64)
  c.data.update(corpus_docs=2_000, sft_examples=256, reward_prompts=64, rl_prompts=64,
                eval_prompts=16, vocab_size=256, seq_len=48, max_len=48, prompt_len=24)
  c.pretrain.update(steps=20, batch_size=8, eval_every=10, log_every=5, ckpt_every=10, eval_batches=2)
  c.sft.update(steps=10, batch_size=8, eval_every=5, log_every=5, ckpt_every=5, eval_batches=2)
  c.reward.update(steps=10, batch_size=8, eval_every=5, log_every=5, ckpt_every=5, eval_batches=2)
  c.reward.normalize_samples = 32
  c.label.update(k=3, batch_size=16)
  c.ppo.update(iterations=3, rollout_batch=8, minibatches=2, epochs=1, response_len=16,
               eval_every=2, ckpt_every=2, ptx_batch=4)
  c.dpo.update(steps=4, batch_size=8, eval_every=2, log_every=1, ckpt_every=2, eval_batches=2,
               response_len=16)
  c.grpo.update(iterations=3, prompts_per_iteration=4, k=2, minibatches=2, response_len=16,
                eval_every=2, ckpt_every=2)
  c.best_of_k.update(eval_pool=4, rounds=2, k=2, prompts_per_round=16, sample_batch=8)
  c.best_of_k.train.update(steps=4, batch_size=8, log_every=2, ckpt_every=4)
  c.online.update(rounds=2, ppo_iterations=2, prompts_per_round=16, reward_steps=4)
  c.evaluate.batch_size = 8


def _grow(c):
  """One accelerator: same world and recipe, ~24M parameters, bf16 compute."""
  c.model.update(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=1408, max_len=128,
                 dtype="bfloat16")
  c.data.update(corpus_docs=400_000, sft_examples=20_000, reward_prompts=8_000, rl_prompts=8_000,
                eval_prompts=512, vocab_size=1024, seq_len=128, max_len=96, prompt_len=32)
  c.pretrain.update(steps=3_000, batch_size=128, eval_every=500, log_every=50, ckpt_every=500)
  c.pretrain.opt.update(lr=1e-3, warmup_steps=200)
  c.sft.update(steps=600, batch_size=64, eval_every=200, log_every=50, ckpt_every=200)
  c.sft.opt.update(lr=3e-4, warmup_steps=50)
  c.label.update(batch_size=256)
  c.reward.update(steps=500, batch_size=64, eval_every=100, log_every=50, ckpt_every=100)
  c.reward.opt.lr = 1e-4
  c.reward.normalize_samples = 2048
  c.ppo.update(iterations=100, rollout_batch=256, minibatches=4, eval_every=10, ckpt_every=10,
               log_every=5)
  c.ppo.opt.lr = 2e-5
  c.ppo.critic_lr = 5e-5
  c.dpo.update(steps=300, batch_size=64, eval_every=50, ckpt_every=50, log_every=10)
  c.dpo.opt.lr = 2e-5
  c.grpo.update(iterations=100, prompts_per_iteration=32, k=8, eval_every=10, ckpt_every=10,
                log_every=5)
  c.grpo.opt.lr = 2e-5
  c.best_of_k.update(eval_pool=64, rounds=4, k=16, prompts_per_round=1024, sample_batch=256)
  c.best_of_k.train.update(steps=200, batch_size=64, ckpt_every=100, log_every=20)
  c.best_of_k.train.opt.lr = 5e-5
  c.online.update(ppo_iterations=30, prompts_per_round=2048, reward_steps=100)
  c.evaluate.batch_size = 256
