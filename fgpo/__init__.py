"""fgpo: FiRe-MPO training of medical vision-language models on top of ``fgpo_kernels``.

Uses only the public API of ``fgpo_kernels``.
"""

__version__ = "0.1.0"
