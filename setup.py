"""megads: package metadata, console script and the native MoE ops (csrc/)."""
import os

from setuptools import find_packages, setup

from setup_ext import ext_modules_and_cmdclass  # native extension build (csrc/)

ext_modules, cmdclass = ext_modules_and_cmdclass()

setup(
    name="megads",
    version="0.1.0",
    description="DeepSeek-style LLM training: MLA, DeepSeekMoE, MTP, Megatron-style parallelism, DeepSpeed",
    packages=find_packages(include=["megads", "megads.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",  # open range for GPU users; the Makefile pins the CPU build on CPU-only machines
        "deepspeed>=0.15",
        "pyyaml>=6",
        "tensorboard>=2.14",
        "mpi4py>=3.1",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.24",
        "math-verify>=0.5",  # answer checking for the accuracy reward (megads.rl.rewards)
        "matplotlib>=3.6",  # recipe / run plots
        "scipy>=1.10",
    ],
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "transformers>=4.48"],
        "bench": ["trl>=0.20"],  # the GRPO peer in bench/grpo.py
        "mpi": ["mpich"],
    },
    entry_points={"console_scripts": ["megads=megads.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    include_package_data=True,
)
