"""Peak memory of one upper step of :mod:`benchmarks.robust_ij`, each method against one
fine-tuning step, in a fresh interpreter per network (:func:`memory_subprocess`)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch

from .harness import device_type, error_line, quietly
from .memory import in_subprocess, peak_memory
from .pretrained import Network
from .robust_ij_methods import FAMILIES, PEER_MODULE, net_problem, networks, peer_step, workload
from .workloads import finetune_step

if TYPE_CHECKING:
    from .robust_ij_settings import Settings

__all__ = ["memory_subprocess", "memory_worker"]


def memory_worker(spec: Mapping[str, Any]) -> dict[str, Any]:
    """In this (fresh) process: peak memory of one upper step of every variant on one network.

    Each variant builds what one upper step of an alternation needs (the curvature operator, the
    Nyström approximation where used) and takes one step; it runs once unmeasured (one-time
    allocations), then once measured. CPU: peak RSS (``VmHWM``, reset through
    ``/proc/self/clear_refs``) minus RSS before, with the process started under
    ``MALLOC_MMAP_THRESHOLD_=65536`` and ``malloc_trim(0)`` before the step, so that freed memory
    has gone back to the system and the step's allocations show in RSS; the first variant is
    measured again at the end as a check. CUDA: ``torch.cuda.max_memory_allocated`` minus the
    memory allocated before.
    """
    from .robust_ij_settings import Settings

    torch.set_num_threads(spec.get("threads", 1))
    device = spec["device"]
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v
                    for k, v in spec["settings"].items()})
    net = [n for n in networks(s, device, lambda *_: None) if n.name == spec["network"]][0]
    mu, lam, n = spec["mu"], s.lam, s.memory_products
    fam = {f.key: f for f in FAMILIES}

    def variant_fn(key: str) -> Callable[[], Any]:
        if key == "fine-tuning step":
            return finetune_step(net.downstream_loss, net.upper, net.upper_batches[0])
        f = fam[key]
        if f.curvature == "peer":
            return lambda: peer_step(key, workload(net, mu, lam, 0), n)
        value = n if f.sweep == "N_c" else s.pcg_rank
        problem = net_problem(net, mu, lam, f.curvature, f.solver(value, s.pcg_rank))

        def step() -> None:
            op = problem.lower_hessian(net.upper, net.lower, net.lower_batch)
            problem.upper_grad(net.upper, net.lower, net.upper_batches[0], lower_hessian=op)
        return step

    results: dict[str, Any] = {}
    variants = list(spec["variants"])
    for key in variants + variants[:1]:
        label = key if key not in results else key + " (again, check)"
        try:
            fn = variant_fn(key)
            quietly(fn)  # warm-up: one-time allocations (kernels, caches) are not the step's
            gc.collect()
            before, peak = peak_memory(lambda fn=fn: quietly(fn), device, release=True)
            results[label] = {"delta_mib": (peak - before) / 2**20}
        except Exception as err:
            results[label] = {"error": error_line(err)}
        fn = None
        gc.collect()
    return {"network": net.name, "mu": mu, "products": n, "rank": s.pcg_rank,
            "variants": results}


def memory_subprocess(net: Network, mu: float, s: Settings, device: str,
                      status: Mapping[str, Any], threads: int) -> dict[str, Any]:
    """Run :func:`memory_worker` for ``net`` in a fresh interpreter."""
    variants = [v for v in s.memory_variants if PEER_MODULE.get(v) is None
                or status.get(PEER_MODULE[v], {}).get("available")]
    spec = {"device": device, "settings": asdict(s), "network": net.name, "mu": mu,
            "variants": variants, "threads": threads}
    out, error = in_subprocess("benchmarks.robust_ij_memory:memory_worker", spec,
                               env={"MALLOC_MMAP_THRESHOLD_": "65536"}, timeout=1800)
    method = ("torch.cuda.max_memory_allocated delta over memory allocated before the step, "
              "one fresh subprocess per network, each step after one unmeasured warm-up run"
              if device_type(device) == "cuda" else
              "peak RSS (VmHWM) delta over VmRSS before the step, one fresh subprocess per network "
              "(MALLOC_MMAP_THRESHOLD_=65536), each step after one unmeasured warm-up run and "
              "malloc_trim(0)")
    if error is not None:
        return {"method": method, "error": error}
    out["method"] = method
    return out
