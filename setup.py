"""Installs ``fgpo_kernels`` (kernels, dispatch, losses) and ``fgpo`` (trainer, data, CLI).

The CUDA extension ``fgpo_kernels._C`` is built by ``csrc/build.py`` when nvcc is found
(``FGPO_BUILD_CUDA=auto|0|1``); without it the package is a complete CPU/Triton install.
"""

from __future__ import annotations

import os
import sys

from setuptools import find_packages, setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

cmdclass = {}
ext_modules = []
try:
    from csrc.build import cuda_extension_setup
except ImportError:  # csrc/build.py not present: pure Python install
    cuda_extension_setup = None
if cuda_extension_setup is not None:
    ext_modules, cmdclass = cuda_extension_setup()

setup(
    name="fgpo",
    version="0.1.0",
    description="Fused kernels and a thin trainer for fine-grained preference optimization "
    "(FiRe-MPO) of medical vision-language models",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["fgpo_kernels*", "fgpo*"]),
    package_data={"fgpo": ["configs/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "pyyaml",
        "tqdm",
        "pillow",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "train": ["transformers>=4.50", "peft>=0.13", "accelerate", "safetensors", "matplotlib"],
        "data": ["pydicom>=2.4"],
        "dev": [
            "pytest>=8",
            "pytest-benchmark",
            "ruff",
            "pybind11>=2.11",
            "transformers>=4.50",
            "peft>=0.13",
            "accelerate",
            "safetensors",
            "matplotlib",
            "pydicom>=2.4",
            "trl>=1.16",  # tests/test_loss.py checks the DPO preset against TRL's sigmoid DPO
        ],
        "bench": ["pytest-benchmark", "matplotlib", "liger-kernel", "cut-cross-entropy", "psutil"],
    },
    entry_points={"console_scripts": ["fgpo=fgpo.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
