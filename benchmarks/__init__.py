"""Benchmarks of fgpo_kernels against the materialized path and peer libraries.

``python -m benchmarks.run`` (runner, CSV), ``python -m benchmarks.plot`` (PNG charts),
``pytest benchmarks/ --benchmark-only`` (pytest-benchmark suite); see ``benchmarks/README.md``.
"""
