"""What synchronised BatchNorm costs on two data-parallel ranks: SyncBatchNorm over BatchNorm.

    python benchmarks/sync_batchnorm.py [--batch 16] [--repeats 5] [--backend gloo]

Two ranks (gloo on CPU, or NCCL with one GPU per rank) each hold a ResNet-18 (random init, train
mode, 32x32 images, ``--batch`` per rank) twice: with plain BatchNorm and converted by
:func:`~implicitbilevel.parallel.sync_batchnorm.convert_sync_batchnorm`. Per rank, interleaved as in
``benchmarks/run.py``, it times a gradient, the kept first-order graph's build (the gradient with
``create_graph=True``) and one Hessian-vector product on that graph, and reports the median
SyncBatchNorm/BatchNorm time ratio of each. The gradient averaging across ranks, the same for
both, is left out. Writes ``sync_batchnorm-<device>.{json,md}`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (  # noqa: E402
    add_out,
    add_repeats,
    add_threads,
    median,
    paired_times,
    parser,
    ratio,
    row,
    table_head,
    write_results,
)
from benchmarks.workloads import classification_loss, cnn  # noqa: E402
from implicitbilevel import HessianOperator  # noqa: E402
from implicitbilevel.parallel.sync_batchnorm import convert_sync_batchnorm  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _callables(model: torch.nn.Module, batch: tuple, tangent: dict) -> dict[str, Any]:
    loss = classification_loss(model)
    params = {n: p.detach() for n, p in model.named_parameters()}
    leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    operator = HessianOperator(loss, params, batch)

    def gradient() -> None:
        torch.autograd.grad(loss(leaves, batch), list(leaves.values()))

    return {
        "gradient": gradient,
        "graph build": lambda: HessianOperator(loss, params, batch),
        "HVP": lambda: operator(tangent),
    }


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group(args.backend, rank=rank, world_size=world)
    try:
        torch.set_num_threads(args.threads)
        device = torch.device(f"cuda:{rank}" if args.backend == "nccl" else "cpu")
        torch.manual_seed(0)
        plain = cnn("resnet18", 10).to(device).train()
        synced = convert_sync_batchnorm(copy.deepcopy(plain))
        gen = torch.Generator().manual_seed(rank)
        batch = (torch.randn(args.batch, 3, 32, 32, generator=gen).to(device),
                 torch.randint(0, 10, (args.batch,), generator=gen).to(device))
        tangent = {n: torch.randn_like(p) for n, p in plain.named_parameters()}
        fns = {f"{kind} {name}": fn
               for kind, model in (("BatchNorm", plain), ("SyncBatchNorm", synced))
               for name, fn in _callables(model, batch, tangent).items()}
        times = paired_times(fns, args.repeats, warmup=1, device=device)
        if rank == 0:
            result = {
                "ratios": {name: ratio(times, f"SyncBatchNorm {name}", f"BatchNorm {name}")
                           for name in ("gradient", "graph build", "HVP")},
                "median_s": {k: median(v) for k, v in times.items()},
                "settings": {**vars(args), "world": world, "torch": torch.__version__},
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            }
            Path(path).write_text(json.dumps(result, indent=2))
    finally:
        dist.destroy_process_group()


def render_markdown(result: dict[str, Any]) -> str:
    """The table: per measurement, the time ratio and the BatchNorm time."""
    s = result["settings"]
    lines = [
        f"## SyncBatchNorm over BatchNorm, ResNet-18, 2 ranks ({s['backend']}), "
        f"batch {s['batch']} per rank",
        "",
        f"- date: {result['date']}; torch {s['torch']}; "
        f"{s['threads']} thread(s) per rank; median of {s['repeats']} interleaved repeats",
        "",
        *table_head("measurement", "time SyncBatchNorm / BatchNorm", "BatchNorm (s)"),
    ]
    for name, value in result["ratios"].items():
        lines.append(row(name, f"{value:.2f}", f"{result['median_s'][f'BatchNorm {name}']:.3f}"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the two-rank measurement; returns (and writes) the results."""
    p = parser(__doc__)
    p.add_argument("--batch", type=int, default=16, help="images per rank")
    add_repeats(p, 5)
    add_threads(p, 1, help="torch CPU threads per rank")
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    add_out(p)
    args = p.parse_args(argv)
    if args.backend == "nccl" and torch.cuda.device_count() < 2:
        raise SystemExit("--backend nccl needs two GPUs (one per rank); use gloo on CPU")
    device = "cuda" if args.backend == "nccl" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(2, _free_port(), args, path), nprocs=2, join=True)
        result = json.loads(Path(path).read_text())
    markdown = render_markdown(result)
    write_results(args.out, f"sync_batchnorm-{device}", result, markdown)
    print(markdown, end="")
    return result


if __name__ == "__main__":
    main()
