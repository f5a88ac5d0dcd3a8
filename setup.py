"""Only the CUDA build: project metadata lives in ``pyproject.toml``.

The extension ``fgpo_kernels._C`` is built by ``csrc/build.py`` when nvcc is found
(``FGPO_BUILD_CUDA=auto|0|1``); without it the package is a complete CPU/Triton install.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

try:
    from csrc.build import cuda_extension_setup
except ImportError:  # csrc/build.py not present: pure Python install
    cuda_extension_setup = None

ext_modules, cmdclass = cuda_extension_setup() if cuda_extension_setup is not None else ([], {})
setup(ext_modules=ext_modules, cmdclass=cmdclass)
