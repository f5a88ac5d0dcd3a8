"""A training step at real size on meta tensors, tracked (``python -m benchmarks.memory_model``).

Every number from here is simulated with fake tensors, not measured on a GPU.

- ``step``: ``simulate(SimSpec)``, the trainer's own step on a model built from a config;
  ``real_vs_simulated`` (the CI check on tiny models);
- ``values``: real values of small tensors beside meta ones (data-dependent ops), flash-style
  attention memory on meta;
- ``tracker``: ``MemTracker`` adapted to a trainer's step;
- ``materialized``: the straightforward way as a mode of the same trainer;
- ``report``: table, validation, goal, plot.
"""
