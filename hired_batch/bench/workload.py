"""What the bench feeds the model, how it parses selectors, times and plans batches, and how
its tables and JSON print numbers: shared by the sweep (``engine_bench``), ``--ideal-only``
(``ideal_bench``), ``--pipeline`` (``job_bench``) and the engine comparison
(``engine_compare`` and its ``compare_*`` modules), which is why it is its own module
(they import it; it imports none of them). JSON is written by ``hired_batch.jsonio``.
"""

from __future__ import annotations

from dataclasses import dataclass

from hired_batch.config import SELECTORS, ConfigError, SelectionConfig

# (height, width): a 2x2 LLaVA-NeXT canvas filled exactly, a 4:3 photo (2x2 with
# padding), a tall 3x1 and a wide 1x2: 2928, 2340, 2376, 1752 full visual tokens.
SIZES = [(672, 672), (480, 640), (1008, 336), (336, 672)]
QUESTIONS = [
    "What is in the image?",
    "How many people are there?",
    "What color is the car?",
    "Is there a dog in the picture?",
]
# The long-answer workload's prompts (bench --engine ...vllm, workload "long").
CAPTIONS = [
    "Describe the image in detail.",
    "Write a caption for this picture.",
    "What is happening in this scene? Describe it.",
    "Describe the colors and shapes you see.",
]


# The shortest answer the long workload draws when its lengths are drawn (``answer_lengths``).
DRAWN_SHORTEST = 8


def answer_lengths(n: int, seed: int, longest: int, shortest: int = DRAWN_SHORTEST) -> list[int]:
    """n answer lengths drawn uniformly from [shortest, longest] (seeded: same n and seed,
    same lengths): the long workload's uneven answers on random weights, which never emit
    EOS (greedy decoding there settles into a loop of one or two tokens)."""
    import numpy as np

    rng = np.random.default_rng([seed, 1])  # a stream apart from the pixels' (seed)
    return [int(v) for v in rng.integers(min(shortest, longest), longest + 1, n)]


def workload(n: int, seed: int = 0, questions=QUESTIONS):
    """n (PIL image, question) pairs cycling through SIZES and ``questions`` (seeded: same n, same pixels)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = SIZES[i % len(SIZES)]
        out.append((Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), questions[i % len(questions)]))
    return out


def fmt(v, spec="{:.2f}"):
    """A table cell: ``-`` for a missing value."""
    return "-" if v is None else spec.format(v)


def speedups_over_full(rows: list[dict], key: str, is_auto) -> list:
    """``row[key]`` over the same key of the ``full`` row at the same batch size (an
    automatic-batch row: over full's automatic row), per row; None where there is none."""
    out = []
    for r in rows:
        ref = [
            f
            for f in rows
            if f["selector"] == "full"
            and is_auto(f) == is_auto(r)
            and (is_auto(r) or f["batch_size"] == r["batch_size"])
        ]
        out.append(r[key] / ref[0][key] if ref else None)
    return out


# --------------------------------------------------------------------------- shared by the sweep and the engine comparison


@dataclass(frozen=True)
class Spec:
    """One selector setting of the sweep."""

    selector: str  # full | hired | spatial | random
    budget: float  # fraction of P*576 tokens (1.0 for full)

    @property
    def label(self) -> str:
        return "full" if self.selector == "full" else f"{self.selector}:{self.budget:g}"

    def selection(self, mode: str):
        """The engine's SelectionConfig for this setting in HiRED ``mode``."""
        return SelectionConfig(selector=self.selector, budget=self.budget, mode=mode)


def parse_selectors(text: str) -> list[Spec]:
    """'full,hired:0.2,spatial:0.2' -> Specs; a bare selector other than full means budget 0.2."""
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        name, _, budget = part.partition(":")
        if name not in SELECTORS:
            raise ConfigError(f"--selectors: {name!r} is not one of {SELECTORS}")
        try:
            b = 1.0 if name == "full" else float(budget or 0.2)
        except ValueError:
            raise ConfigError(f"--selectors: budget of {part!r} must be a fraction such as 0.2") from None
        if not 0.0 < b <= 1.0:
            raise ConfigError(f"--selectors: budget of {part!r} must be in (0, 1]")
        out.append(Spec(name, b))
    if not out:
        raise ConfigError("--selectors: expected at least one selector, e.g. full,hired:0.2")
    return out


def roofline(args, device: str, dtype: str):
    """The roofline: ``--peak-tflops`` / ``--mem-bw-gbs`` where given, else calibrated on ``device``."""
    from hired_batch.bench import ideal

    roof = None
    if args.peak_tflops is None or args.mem_bw_gbs is None:
        roof = ideal.calibrate(device, dtype)
    flops = args.peak_tflops * 1e12 if args.peak_tflops else roof.flops_per_s
    bw = args.mem_bw_gbs * 1e9 if args.mem_bw_gbs else roof.bytes_per_s
    return ideal.Roofline(flops, bw)


def n_items(args, batch: int) -> int:
    """Items per repeat: ``--items`` (default one per size) rounded up to a multiple of the batch."""
    base = args.items or len(SIZES)
    return -(-max(base, batch) // batch) * batch


def cpu_stall_us() -> int | None:
    """Linux PSI: total microseconds some runnable task waited for a CPU (None if absent).

    On a shared machine this says how much of a repeat other processes disturbed.
    """
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


# CPU features torch's float32/bfloat16 matmuls lean on; the bench header names those present.
CPU_FEATURES = ("avx512f", "avx512_bf16", "amx_bf16")


def machine(device: str) -> str:
    """The processor a bench ran on, for its header: the GPU's name on CUDA, else the CPU
    model, the CPUs this process may use and which of ``CPU_FEATURES`` it has (rows from
    two hosts of one VM pool can differ 3x in speed)."""
    import os

    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    has = [x for x in CPU_FEATURES if x in flags]
    return f"{model}, {len(os.sched_getaffinity(0))} CPUs ({', '.join(has) or 'none of ' + ', '.join(CPU_FEATURES)})"


def plan_batches(engine, prepared, batch: int, order: str) -> list[list[int]]:
    """Item indices per HF-engine batch: grouped by planned prompt length, or in the given order."""
    from hired_batch.engine.batching import group_by_count

    if order == "given":
        return [list(range(i, min(i + batch, len(prepared)))) for i in range(0, len(prepared), batch)]
    # Planned prompt length (visual + text): equal lengths in a batch need no padding
    # mask, and SDPA keeps its causal fast path.
    return group_by_count([planned_tokens(engine, p).n_prompt for p in prepared], batch)


def planned_tokens(engine, p):
    """The token plan of one prepared item (``engine.planned_item``): auto batch sizing and
    grouping by prompt length both read it."""
    return engine.planned_item(tuple(int(v) for v in p.image_size), len(p.input_ids))


def resolve_model(args) -> tuple[str, str]:
    """(checkpoint path, name for the header)."""
    if args.model:
        return args.model, args.model
    from hired_batch.bench.model_sizes import ensure_checkpoint

    name = args.preset or "scaled"
    return str(ensure_checkpoint(name, args.cache_dir)), f"preset {name}"
