"""rlhf_jax: the InstructGPT recipe and its alternatives in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name="rlhf_jax",
    version="0.1.0",
    description="RLHF in JAX/Flax: pretrain, SFT, reward model, PPO, best-of-K",
    packages=find_packages(include=["rlhf_jax", "rlhf_jax.*", "experiments", "experiments.*"]),
    python_requires=">=3.10",
    install_requires=[
        "jax>=0.8",
        "flax>=0.11",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "sentencepiece>=0.2",
        "tokenizers>=0.19",  # a model folder's tokenizer.json (rlhf_jax.data.tokenizer)
        "tensorflow-datasets>=4.9.7",
        "array-record>=0.5",  # the file format the TFDS builders write
        "ml-collections>=1.0",
        "absl-py>=2.0",
        "numpy>=1.26",
        "matplotlib>=3.8",
        "safetensors>=0.4",  # Hugging Face import / export
        "tqdm>=4.66",
    ],
    extras_require={
        # The suite runs on two workers. pytest 9.2.0 breaks pytest-xdist 3.8's
        # `--dist loadgroup` (the xdist_group marks are lost: a group's tests and its module
        # fixtures, e.g. the every-stage reference run, run on both workers), so < 9.2.
        "test": ["pytest>=8,<9.2", "pytest-xdist>=3.5"],
        "hf": ["torch", "transformers"],
    },
)
