"""Named GPUs as the ideal model sees them (two datasheet numbers) and what an hour costs.

``--gpu NAME`` on ``calibrate`` (and the planner) reads this table. The FLOP/s are the
datasheet's dense (no sparsity) 16-bit tensor-core peak, the bandwidth its memory's:
the ideal model's roofline (``bench.ideal.Roofline``) at 100 % of both, so a predicted
throughput is an upper bound, never a forecast. Prices are typical on-demand cloud list
prices per GPU-hour (USD, 2025; they vary by provider and over time): replace them with
yours (here) for a real budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from hired_batch.config import ConfigError


@dataclass(frozen=True)
class Gpu:
    """One GPU model."""

    name: str  # what --gpu takes
    flops_per_s: float  # dense fp16/bf16 tensor peak, FLOP/s (datasheet)
    bytes_per_s: float  # memory bandwidth, bytes/s (datasheet)
    memory_bytes: float  # device memory, bytes
    usd_per_hour: float  # typical on-demand price of one GPU-hour (2025)

    def roofline(self):
        """The ideal model's machine for this GPU."""
        from hired_batch.bench.ideal import Roofline

        return Roofline(self.flops_per_s, self.bytes_per_s)


GPUS = {
    g.name: g
    for g in (
        Gpu("h100", 989e12, 3.35e12, 80e9, 3.00),  # H100 SXM
        Gpu("h200", 989e12, 4.8e12, 141e9, 3.80),
        Gpu("a100", 312e12, 2.04e12, 80e9, 1.80),  # A100 SXM 80 GB
        Gpu("l40s", 362e12, 0.864e12, 48e9, 1.00),
        Gpu("l4", 121e12, 0.3e12, 24e9, 0.70),
        Gpu("a10g", 70e12, 0.6e12, 24e9, 1.00),  # AWS g5
    )
}
DEFAULT_GPU = "h100"  # what --gpu defaults to


def get_gpu(name: str) -> Gpu:
    """The named GPU; ConfigError listing the names otherwise."""
    if name not in GPUS:
        raise ConfigError(f"--gpu must be one of {sorted(GPUS)}, got {name!r}")
    return GPUS[name]


def cost_per_million(items_per_s: float, usd_per_hour: float) -> float:
    """USD for a million items at ``items_per_s`` on a GPU costing ``usd_per_hour``."""
    return float("inf") if items_per_s <= 0 else 1e6 / items_per_s / 3600 * usd_per_hour
