"""Throughput benchmarks (train / reward steps, sampler, one PPO iteration).

  python -m rlhf_jax.bench --config configs/bench.py:tiny --workdir runs/bench/tiny
  python -m rlhf_jax.bench --config configs/bench.py:gpt2_124m --workdir runs/bench/gpt2_124m
  python -m rlhf_jax.bench --config configs/bench.py:llama_1b --workdir runs/bench/llama_1b \
      --config.sections=ppo --config.model.remat=full

Presets: tiny (CPU, seconds), gpt2_124m, gpt2_355m, llama_1b. Random weights and
random tokens: no data, no tokenizer. Our MLP is SwiGLU (three matrices), so the
"GPT-2-class" presets use d_ff = 8/3 * d_model rounded to a multiple of 128
(2048 for d=768, 2816 for d=1024) to keep GPT-2's parameter count.
See docs/performance.md for what each figure means.
"""
import ml_collections as mlc

from rlhf_jax import config_lib as cl

PRESETS = ("tiny", "gpt2_124m", "gpt2_355m", "llama_1b")


def get_config(arg="tiny"):
  arg = arg or "tiny"
  if arg not in PRESETS:
    raise ValueError(f"configs/bench.py: unknown preset {arg!r}; known: {', '.join(PRESETS)}")
  c = mlc.ConfigDict()
  c.preset = arg
  c.seed = 0
  c.sections = "train,reward,sampler,ppo"  # any subset, run in this order
  c.warmup = 2  # untimed calls after compilation
  c.steps = 10  # timed calls per measurement (a section's own `steps` > 0 overrides)
  c.peak_flops = 0.0  # FLOP/s per device for MFU; 0 = detect from device_kind (CPU: measured)
  c.isolate = False  # each section in its own process, so peak memory is per section
  c.compile_only = False  # compile and report XLA's memory analysis, run nothing
  # XLA options for every compile, "name=value,...", e.g. "xla_backend_optimization_level=0"
  # compiles faster on CPU (the tests); timings are then not representative.
  c.compiler_options = ""
  c.hf = True  # compare with HF transformers' LlamaForCausalLM when torch+transformers import
  c.hf_threads = 0  # torch.set_num_threads on CPU (0 = torch's default, one per core)
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.opt = cl.optimizer(3e-4, schedule="constant", b2=0.95, weight_decay=0.1)

  gpu = dict(dtype="bfloat16", attention="cudnn")
  if arg == "tiny":
    c.model = cl.model(vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=384,
                       max_len=128)
  elif arg == "gpt2_124m":
    c.model = cl.model(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                       d_ff=2048, max_len=1024, **gpu)
  elif arg == "gpt2_355m":
    c.model = cl.model(vocab_size=50304, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16,
                       d_ff=2816, max_len=1024, **gpu)
  else:  # llama_1b
    c.model = cl.model(vocab_size=32000, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                       d_ff=8192, max_len=1024, **gpu)

  # LM step (pretrain/SFT). packed=True: no padding mask, so model.attention=cudnn takes
  # the fused causal kernel; packed=False passes a mask as SFT does (XLA attention).
  c.train = dict(batch_size=16, seq_len=1024, grad_accum=1, packed=True, steps=0)
  # Reward-model step: K responses per prompt in one batch element (InstructGPT).
  c.reward = dict(batch_size=8, k=2, seq_len=512, steps=0)
  # Sampler: tokens/s at each batch size; min_new_tokens = new_tokens, so no early stop.
  c.sampler = dict(batch_sizes="64,512", prompt_len=64, new_tokens=128, temperature=1.0, steps=5)
  # One PPO iteration; the fields are those of config.ppo that ppo_step reads.
  c.ppo = dict(
      rollout_batch=64, prompt_len=64, response_len=128, minibatches=4, epochs=2, steps=3,
      frozen_dtype="float32",  # float32 | bfloat16: reference and reward model parameters
      temperature=1.0, kl_mode="fixed", kl_coef=0.05, kl_target=6.0, kl_horizon=10_000,
      kl_estimator="k1", critic="separate", gae_gamma=1.0, gae_lambda=0.95, clip_eps=0.2,
      value_clip_eps=0.2, vf_coef=0.1, entropy_coef=0.0, whiten_rewards=False,
      whiten_advantages=True, reward_clip=0.0, missing_eos_penalty=-1.0, use_eos_penalty=True,
      ptx_coef=0.0,  # PPO-ptx is not benchmarked
      opt=cl.optimizer(1e-5, schedule="constant", b2=0.95, eps=1e-5),
      critic_lr=1e-5,
  )

  if arg == "tiny":
    c.warmup, c.steps = 1, 5
    c.train.update(batch_size=8, seq_len=128)
    c.reward.update(batch_size=4, k=2, seq_len=96)
    c.sampler.update(batch_sizes="8,32", prompt_len=16, new_tokens=32, steps=3)
    c.ppo.update(rollout_batch=16, prompt_len=16, response_len=32, minibatches=2, epochs=1, steps=2)
  elif arg == "gpt2_355m":
    c.train.batch_size = 8
    c.sampler.batch_sizes = "64,256"
  elif arg == "llama_1b":
    # The PPO sizing of docs/performance.md: rollout batch 64 x 512 tokens, four 1B models.
    c.train.update(batch_size=8)
    c.reward.update(batch_size=4)
    c.sampler.update(batch_sizes="64,256", prompt_len=64, new_tokens=128)
    c.ppo.update(prompt_len=256, response_len=256, minibatches=4, epochs=1)
  if arg != "tiny":
    c.isolate = True  # per-section peak memory; one section's OOM leaves the others
  c.lock()
  return c
