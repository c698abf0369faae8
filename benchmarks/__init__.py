"""Benchmarks of implicitbilevel against its peers; each script writes ``results/<name>-<device>``.

Every script runs on one harness, :mod:`benchmarks.harness`: threads and seeds, the interleaved
timing (median of per-repeat ratios taken side by side in one process), the machine record, the
JSON and Markdown writers, tables and plots, peak memory in a fresh process, and the flags that
mean the same in every script (``--out``, ``--threads``, ``--quick``/``--full``, ``--device``,
``--repeats``).

- :mod:`benchmarks.run` (``python benchmarks/run.py --quick``): HVP cost, solver accuracy and
  cost, memory and time per upper step against TorchOpt, Betty and the original BiSSL scheme;
  :mod:`benchmarks.workloads` builds the models and batches (ResNet-18, a small GPT, an MLP) and
  the BiSSL problem, :mod:`benchmarks.peers` holds the peers' versions of the same solve,
  :mod:`benchmarks.reference` the original BiSSL scheme (and the converged float64 solutions),
  :mod:`benchmarks.measure` the measurements.
- :mod:`benchmarks.robust_ij` (``python benchmarks/robust_ij.py --quick``): the implicit-Jacobian
  solvers on the recipes' pretrained networks (:mod:`benchmarks.pretrained`), against a converged
  solution; its methods in :mod:`benchmarks.robust_ij_methods`, one network and μ in
  :mod:`benchmarks.robust_ij_system`, the converged ``u*`` in :mod:`benchmarks.reference`, peak
  memory in :mod:`benchmarks.robust_ij_memory`, targets, tables and plot in
  :mod:`benchmarks.robust_ij_report`.
- :mod:`benchmarks.beyond_ij` (``python benchmarks/beyond_ij.py``): BN-only IJ, appendix G and
  M-FAC on the pretrained small ResNet.
- :mod:`benchmarks.recycled_ij` (``python benchmarks/recycled_ij.py --quick``): one matrix, many
  right-hand sides: recycled CG/MINRES and Lanczos preconditioning, deflation and Woodbury over the
  8 solves of one alternation of the pretrained small ResNet, at μ = 1000 and 10.001.
- :mod:`benchmarks.recycled_upper_step` (``python benchmarks/recycled_upper_step.py --arch
  vision``): one BiSSL upper step with a matrix reused across the alternation against the
  original scheme, at the original's accuracy.
- :mod:`benchmarks.recycled_recipe_ij` (``python benchmarks/recycled_recipe_ij.py --run ...``):
  the vision recipe's IJ residual per alternation under several ``bissl.ij`` settings, read from
  the runs' ``metrics.jsonl``; :mod:`benchmarks.photo_folder` builds the real-photo ImageFolder
  those runs use (no measurement).
- :mod:`benchmarks.bissllight` (``python benchmarks/bissllight.py``): global against block-wise
  M-FAC on the tiny LoRA ViT's system (printed only); :mod:`benchmarks.bissllight_cost`
  (``python benchmarks/bissllight_cost.py``): cost, peak memory and accuracy of one upper step on
  LoRA ViTs (tiny and ViT-B/16), CG against global and block-wise M-FAC.
- :mod:`benchmarks.external` (``python benchmarks/external.py``): every solver and peer (TorchOpt,
  JAXopt, Betty) on problems with closed-form hypergradients (:mod:`benchmarks.external_problems`,
  :mod:`benchmarks.external_methods`).
- :mod:`benchmarks.sync_batchnorm` (``python benchmarks/sync_batchnorm.py``): the cost of
  SyncBatchNorm on two ranks.
- :mod:`benchmarks.bilevel_suite` (``python benchmarks/bilevel_suite.py --quick``): the stochastic
  methods of :mod:`implicitbilevel.stochastic` and the implicit baselines on benchopt's bilevel
  benchmark problems (:mod:`benchmarks.bilevel_problems`, :mod:`benchmarks.bilevel_classification`),
  against time and oracle calls; the runners in :mod:`benchmarks.bilevel_methods`, the optional
  ``jaxopt-implicit`` baseline (JAXopt's implicit hypergradient) in
  :mod:`benchmarks.bilevel_jaxopt`.
- :mod:`benchmarks.paper_scale_ij` (``python benchmarks/paper_scale_ij.py``): every
  implicit-Jacobian option on CPU proxies of the three paper networks (ResNet-18, ResNet-50, the
  12-layer GPT, built from the paper configs by :mod:`benchmarks.paper_scale_nets`) at
  initialisation and after a short pretraining: the Lanczos extremes of the lower
  Hessian, breakdowns, residuals, cost and memory (measured by
  :mod:`benchmarks.paper_scale_measure`); targets and tables in
  :mod:`benchmarks.paper_scale_report`.
- :mod:`benchmarks.quickstart_times` (``python benchmarks/quickstart_times.py sizes`` / ``run``):
  the size of the install and the time of the README's quick-start commands from a clean clone.
- :mod:`benchmarks.embedded_runs` (``python benchmarks/embedded_runs.py vision`` / ``gpt``): the
  recipes' embedded default runs as the README states them (time, IJ residuals, the result).
- ``benchmarks/gpu_check.sh``: every check that needs a GPU, in one run.
"""
