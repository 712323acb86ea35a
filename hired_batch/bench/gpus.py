"""GPU types the cost predictions name (``hired-batch plan --gpu``): datasheet peaks and an
assumed price, the one table of them.

The peaks are the vendors' datasheet figures for dense float16/bfloat16 tensor math
(no sparsity) and memory bandwidth; the ideal model (``ideal.Roofline``) takes them as
a machine, so what it predicts is an upper bound on speed (docs/performance.md, "The
ideal model"). The prices are assumptions: typical on-demand list prices per GPU-hour
at cloud providers in 2025, rounded; yours differ, so ``--gpu-price`` overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass

from hired_batch.config import ConfigError


@dataclass(frozen=True)
class Gpu:
    """One GPU type as the ideal model and the cost estimate see it."""

    name: str  # what --gpu takes
    tflops: float  # dense float16/bfloat16 tensor peak, TFLOP/s (datasheet)
    mem_bw_gbs: float  # memory bandwidth, GB/s (datasheet)
    memory_gb: float  # device memory, GB (what --batch-size auto sizes batches against)
    usd_per_hour: float  # assumed on-demand price per GPU-hour (override: --gpu-price)
    model: str  # the exact part the figures are for

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gb * 1e9)

    def roofline(self):
        """The ideal model's machine for this GPU (its datasheet peaks)."""
        from hired_batch.bench.ideal import Roofline

        return Roofline(self.tflops * 1e12, self.mem_bw_gbs * 1e9)


GPUS = {
    g.name: g
    for g in (
        Gpu("h100", 989.0, 3350.0, 80.0, 2.99, "H100 SXM5 80 GB"),
        Gpu("h200", 989.0, 4800.0, 141.0, 3.79, "H200 SXM 141 GB"),
        Gpu("a100", 312.0, 2039.0, 80.0, 1.79, "A100 SXM4 80 GB"),
        Gpu("l40s", 362.0, 864.0, 48.0, 1.29, "L40S 48 GB"),
        Gpu("a10g", 125.0, 600.0, 24.0, 1.01, "A10G 24 GB (A10 datasheet figures; AWS g5)"),
        Gpu("l4", 121.0, 300.0, 24.0, 0.80, "L4 24 GB"),
    )
}

DEFAULT_GPU = "h100"  # what --gpu names when not given


def get_gpu(name: str, price: float | None = None) -> Gpu:
    """The GPU type ``name`` (case-insensitive), at ``price`` $/hour when given;
    ConfigError naming the known types otherwise."""
    from dataclasses import replace

    key = name.strip().lower()
    if key not in GPUS:
        raise ConfigError(f"--gpu must be one of {', '.join(GPUS)}, got {name!r}")
    if price is None:
        return GPUS[key]
    if not price > 0:
        raise ConfigError(f"--gpu-price must be a price per GPU-hour > 0, got {price!r}")
    return replace(GPUS[key], usd_per_hour=float(price))


def cost_per_million(items_per_s: float, usd_per_hour: float) -> float:
    """USD for a million items at ``items_per_s`` on a GPU costing ``usd_per_hour``."""
    return float("inf") if items_per_s <= 0 else 1e6 / items_per_s / 3600 * usd_per_hour
