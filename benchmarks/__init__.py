"""Benchmarks of implicitbilevel against its peers (run with ``python benchmarks/run.py``).

- :mod:`benchmarks.workloads` builds the models and batches (ResNet-18, a small GPT, an MLP).
- :mod:`benchmarks.peers` holds the peers' versions of the same implicit-Jacobian solve
  (TorchOpt, Betty, a plain double-backward reference scheme) and their install status.
- :mod:`benchmarks.measure` holds the measurements; :mod:`benchmarks.run` the command line.
"""
