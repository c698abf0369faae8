"""Benchmarks of implicitbilevel against its peers; each script writes ``results/<name>-<device>``.

- :mod:`benchmarks.run` (``python benchmarks/run.py --quick``): HVP cost, solver accuracy and
  cost, memory and time per upper step against TorchOpt, Betty and the original BiSSL scheme;
  :mod:`benchmarks.workloads` builds the models and batches (ResNet-18, a small GPT, an MLP),
  :mod:`benchmarks.peers` holds the peers' versions of the same solve, :mod:`benchmarks.measure`
  the measurements.
- :mod:`benchmarks.robust_ij`: the implicit-Jacobian solvers on the recipes' pretrained networks
  (:mod:`benchmarks.pretrained`), against a converged solution.
- :mod:`benchmarks.beyond_ij`: BN-only IJ, appendix G and M-FAC on the pretrained small ResNet.
- :mod:`benchmarks.external`: every solver and peer (TorchOpt, JAXopt, Betty) on problems with
  closed-form hypergradients (:mod:`benchmarks.external_problems`,
  :mod:`benchmarks.external_methods`).
- :mod:`benchmarks.sync_batchnorm`: the cost of SyncBatchNorm on two ranks.
"""
