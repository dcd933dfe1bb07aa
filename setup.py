"""opd_jax: on-policy distillation of language models in JAX/Flax, one XLA program per step."""

from setuptools import find_packages, setup

JAX = "jax==0.10.2"

setup(
    name="opd_jax",
    version="0.1.0",
    description="On-policy distillation (OPD) of language models in JAX/Flax NNX for TPU pods and GPUs",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["opd_jax", "opd_jax.*"]),  # experiments/ and benchmarks/ run from a checkout
    package_data={"opd_jax.kernels": ["*.cc"]},  # C++ sources, built on first use (opd_jax/kernels/cpu.py)
    install_requires=[
        JAX,
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "numpy",
        "omegaconf>=2.3",
        "pyyaml",
        "safetensors",
        "transformers>=4.51",
        "tokenizers",
        "datasets",
        "tensorflow-datasets",
        "array_record",
        "math-verify",
        "rich",
        "tensorboardX",
        "matplotlib",
        "etils[epath]",
    ],
    extras_require={
        # CPU torch is only for the HF parity tests and the baselines in benchmarks/.
        "test": ["pytest", "pytest-timeout", "torch==2.13.0", "ruff"],
        "bench": ["torch==2.13.0", "trl"],
        "tpu": [f"jax[tpu]=={JAX.split('==')[1]}"],
        "gpu": [f"jax[cuda12]=={JAX.split('==')[1]}"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["opd-jax=opd_jax.cli:main"]},
)
