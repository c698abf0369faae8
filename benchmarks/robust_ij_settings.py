"""The sizes, grids and repeat counts of :mod:`benchmarks.robust_ij`, one :class:`Settings` per
mode (its own module, so the measurement modules and the memory worker read it without importing
the command line)."""

from __future__ import annotations

from dataclasses import dataclass

from .pretrained import DEFAULT_CACHE
from .robust_ij_methods import MEMORY_VARIANTS

__all__ = ["Settings"]


@dataclass
class Settings:
    """Sizes, grids and repeat counts of one mode."""

    networks: tuple[str, ...] = ("vision", "gpt")
    vision_epochs: int = 30
    gpt_steps: int = 150
    gpt_task: str = "sst2"
    vision_lower_batch: int = 16
    vision_upper_batch: int = 32
    gpt_lower_batch: int = 4
    gpt_upper_batch: int = 16
    upper_steps: int = 8
    lam: float = 0.001
    dampings: tuple[float, ...] = (10.0, 999.999)
    products: tuple[int, ...] = (2, 5, 10, 20)
    ranks: tuple[int, ...] = (5, 10, 20, 40)
    pcg_rank: int = 20
    peer_products: tuple[int, ...] = (5,)
    repeats: int = 2
    warmup: int = 0
    reference_tol: float = 1e-8
    reference_max_products: int = 2400
    memory: bool = True
    memory_products: int = 5
    memory_variants: tuple[str, ...] = ("fine-tuning step", "cg", "minres", "gn-cg", "gn-pcg",
                                        "gn-nystrom", "reference", "torchopt-normal-cg")
    reference_cache: str | None = str(DEFAULT_CACHE / "references")

    @classmethod
    def for_mode(cls, mode: str, device: str) -> Settings:
        """``quick`` (2-core CPU), ``full`` (recipe batch sizes, every peer N_c) or ``smoke``."""
        if mode == "quick":
            return cls()
        if mode == "full":
            return cls(vision_lower_batch=64, vision_upper_batch=64, gpt_lower_batch=16,
                       gpt_upper_batch=32, peer_products=(2, 5, 10, 20), repeats=5, warmup=1,
                       reference_max_products=4000, memory_variants=MEMORY_VARIANTS)
        if mode == "smoke":
            return cls(networks=("toy",), upper_steps=2, products=(2, 5), ranks=(2, 4),
                       pcg_rank=4, peer_products=(2,), repeats=1, warmup=0,
                       reference_max_products=600, memory=False, memory_products=2,
                       reference_cache=None)
        raise ValueError(f"unknown mode {mode!r}")
