"""opd_jax: on-policy distillation of language models in JAX/Flax, one XLA program per step."""

from setuptools import find_packages, setup

# Tested ranges, not pins: the lowest versions are what CI installs (.ci/constraints-lowest.txt); the upper bounds
# are the newest minor releases seen to run (jax 0.11.2 / flax 0.12.10 on an H200, OPD_NOTES.md).
JAX_RANGE = ">=0.10.2,<0.12"

setup(
    name="opd_jax",
    version="0.1.0",
    description="On-policy distillation (OPD) of language models in JAX/Flax NNX for TPU pods and GPUs",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["opd_jax", "opd_jax.*"]),  # experiments/ and benchmarks/ run from a checkout
    package_data={"opd_jax.kernels": ["*.cc"],  # C++ sources, built on first use (opd_jax/kernels/cpu.py)
                  # the demo's teacher and student (opd_jax/miniature/prepare.py: PRETRAINED)
                  "opd_jax.miniature": ["pretrained/*/*.json", "pretrained/*/*/*.json",
                                        "pretrained/*/*/*.safetensors"]},
    install_requires=[
        f"jax{JAX_RANGE}",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "numpy>=2.0",
        "omegaconf>=2.3",
        "pyyaml",
        "safetensors>=0.4",
        "transformers>=4.51",
        "tokenizers",
        "huggingface_hub>=0.30",
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
        "tpu": [f"jax[tpu]{JAX_RANGE}"],
        # JAX's CUDA wheels bring their own CUDA libraries: pick the major version the machine's driver supports.
        "gpu": [f"jax[cuda12]{JAX_RANGE}"],
        "cuda12": [f"jax[cuda12]{JAX_RANGE}"],
        "cuda13": [f"jax[cuda13]{JAX_RANGE}"],
        "wandb": ["wandb"],
    },
    entry_points={"console_scripts": ["opd-jax=opd_jax.cli:main"]},
)
