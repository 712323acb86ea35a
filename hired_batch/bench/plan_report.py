"""What ``hired-batch plan`` computes, without Ray: one row's token plan and the checks the
generation stage makes (``TokenCheck``), the per-row plan table (``plan_table``), the running
totals over a dataset (``Tally``), the ideal model's prediction per engine and GPU type
(``predict``), and the summary, JSON report and plot made from them.

Every per-row decision is the job's own: the error strings come from the preprocessing
stage and from ``stages.context_error`` / ``generation_rules.row_generation``, the visual
tokens from ``engine.token_plan``, the times from ``bench.ideal``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hired_batch.config import ConfigError, GenerationConfig, SelectionConfig
from hired_batch.engine import token_plan
from hired_batch.engine.dims import ItemTokens
from hired_batch.engine.handoff import item_bytes

ERRORS_KEPT = 200  # distinct error strings counted one by one; later new ones are counted as OTHER_ERRORS
OTHER_ERRORS = "(other errors)"
SIZE_EDGES = (256, 512, 1024, 2048, 4096)  # longest image side, px: the size histogram's bin edges
VLLM_MAX_SEQS = 256  # sequences vLLM runs at once when --batch-size is auto (its max_num_seqs default; assumed)
KV_HEADROOM = 0.9  # share of what the weights leave that vLLM's KV cache may take (its gpu_memory_utilization)

# The plan table: one row per input row (what ``plan_table`` returns).
PLAN_FIELDS = {
    "id": pa.string(),
    "error": pa.string(),  # the error the job would write (None: the row would be answered)
    "image_h": pa.int64(),  # 0 where the image did not decode
    "image_w": pa.int64(),
    "n_crops": pa.int64(),  # 0 for a failed row
    "n_visual": pa.int64(),
    "n_visual_full": pa.int64(),
    "n_text": pa.int64(),
    "n_projected": pa.int64(),  # -1: n_visual (a pruning selector projects only what it keeps)
    "measured": pa.bool_(),  # the row went through the engine's whole preprocessing (timed)
    "t_preprocess_s": pa.float64(),  # the row's own preprocessing wall time (the job's column)
    "cpu_s": pa.float64(),  # measured rows: their batch's process CPU time / its rows (all threads)
    "handoff_bytes": pa.int64(),  # bytes the row's handoff columns hold (what crosses the object store)
}


@dataclass(frozen=True)
class TokenCheck:
    """The generation stage's view of a row before it runs: its token plan and whether
    its prompt and answer fit the engine's context."""

    geometry: token_plan.Geometry  # the checkpoint's token geometry (``Geometry.from_config``)
    selection: SelectionConfig  # the job's selection
    generation: GenerationConfig  # the job's generation options (a row's ``sampling`` overrides some)
    max_positions: int  # the engine's context, tokens

    def row(self, image_size, n_prompt_ids: int, sampling: str | None = None):
        """(ItemTokens, None) for a row the job would answer, else (None, its error)."""
        from hired_batch.engine.generation_rules import row_generation
        from hired_batch.job.stages import context_error

        item = token_plan.item_tokens(image_size, self.selection, self.geometry, n_prompt_ids)
        try:
            g = row_generation(self.generation, sampling)
        except ConfigError as e:  # as GenerateStage: a row's bad options are that row's error
            return None, str(e)
        n_new = g.max_new_tokens if g else self.generation.max_new_tokens
        err = context_error(item.n_prompt, n_new, self.max_positions)
        return (None, err) if err else (item, None)


def plan_table(handoff: pa.Table, check: TokenCheck, measured: bool, cpu_s: float = 0.0) -> pa.Table:
    """One plan row per handoff row (the preprocessing stage's output table); ``cpu_s``:
    the process CPU time the batch took, when ``measured``."""
    n = handoff.num_rows
    col = {k: handoff.column(k).to_pylist() for k in ("id", "error", "input_ids", "image_h", "image_w")}
    sampling = handoff.column("sampling").to_pylist() if "sampling" in handoff.column_names else [None] * n
    nbytes = [item_bytes(r.values()) for r in handoff.to_pylist()]  # the job's own count (engine.handoff)
    out = {k: [] for k in PLAN_FIELDS}
    for i in range(n):
        err, item, hw = col["error"][i], None, (int(col["image_h"][i] or 0), int(col["image_w"][i] or 0))
        if err is None:
            item, err = check.row(hw, len(col["input_ids"][i]) // 8, sampling[i] or None)  # int64 ids as bytes
        out["id"].append(col["id"][i])
        out["error"].append(err)
        out["image_h"].append(hw[0])
        out["image_w"].append(hw[1])
        out["n_crops"].append(item.n_crops if item else 0)
        out["n_visual"].append(item.n_visual if item else 0)
        out["n_visual_full"].append(token_plan.full_count(hw, check.geometry) if item else 0)
        out["n_text"].append(item.n_text if item else 0)
        out["n_projected"].append(-1 if item is None or item.n_projected is None else item.n_projected)
    out["measured"] = [measured] * n
    out["t_preprocess_s"] = handoff.column("t_preprocess_s").to_pylist()
    out["cpu_s"] = [cpu_s / n if measured and n else 0.0] * n
    out["handoff_bytes"] = nbytes
    return pa.table({k: pa.array(v, type=t) for k, v in out.items() for t in [PLAN_FIELDS[k]]})


def size_bin(longest: int) -> str:
    """The size histogram's bin of an image whose longest side is ``longest`` px."""
    lo = 0
    for edge in SIZE_EDGES:
        if longest <= edge:
            return f"{lo + 1}-{edge}" if lo else f"<={edge}"
        lo = edge
    return f">{SIZE_EDGES[-1]}"


def size_bins() -> list[str]:
    """Every bin of the size histogram, smallest first."""
    return [size_bin(e) for e in SIZE_EDGES] + [size_bin(SIZE_EDGES[-1] + 1)]


@dataclass
class Tally:
    """Running totals over plan tables: memory bounded by the distinct values, not the rows."""

    rows: int = 0
    failed: int = 0
    errors: Counter = field(default_factory=Counter)  # error string -> rows (ERRORS_KEPT kinds, then OTHER_ERRORS)
    sizes: Counter = field(default_factory=Counter)  # size_bin -> rows whose image decoded
    grids: Counter = field(default_factory=Counter)  # crops per ok row -> rows
    visual: Counter = field(default_factory=Counter)  # visual tokens per ok row -> rows
    visual_full: int = 0  # sum of the ok rows' visual tokens at `full`
    items: Counter = field(default_factory=Counter)  # (n_crops, n_visual, n_text, n_projected) -> ok rows
    measured_rows: int = 0  # rows through the engine's whole preprocessing
    measured_s: float = 0.0  # their t_preprocess_s (wall), summed
    measured_cpu_s: float = 0.0  # the CPU time their batches took (process time, every thread), summed
    measured_bytes: int = 0  # their handoff bytes, summed

    @property
    def ok(self) -> int:
        return self.rows - self.failed

    def add(self, t: pa.Table) -> None:
        """Count one plan table's rows."""
        self.rows += t.num_rows
        err = t.column("error")
        bad = err.drop_null().to_pylist()
        self.failed += len(bad)
        for e in bad:
            key = e if e in self.errors or len(self.errors) < ERRORS_KEPT else OTHER_ERRORS
            self.errors[key] += 1
        h, w = (t.column(k).to_numpy() for k in ("image_h", "image_w"))
        longest = np.maximum(h, w)
        self.sizes.update(size_bin(int(v)) for v in longest[longest > 0])
        ok = t.filter(err.is_null())
        cols = [ok.column(k).to_numpy() for k in ("n_crops", "n_visual", "n_text", "n_projected")]
        self.grids.update(cols[0].tolist())
        self.visual.update(cols[1].tolist())
        self.visual_full += int(ok.column("n_visual_full").to_numpy().sum())
        self.items.update(zip(*(c.tolist() for c in cols)))
        m = t.filter(t.column("measured"))
        self.measured_rows += m.num_rows
        self.measured_s += float(pc.sum(m.column("t_preprocess_s")).as_py() or 0.0)
        self.measured_cpu_s += float(pc.sum(m.column("cpu_s")).as_py() or 0.0)
        self.measured_bytes += int(pc.sum(m.column("handoff_bytes")).as_py() or 0)

    def item_tokens(self) -> list[tuple[ItemTokens, int]]:
        """Each distinct ok item's tokens, with its number of rows."""
        return [(ItemTokens(c, v, t, None if p < 0 else p), k) for (c, v, t, p), k in sorted(self.items.items())]

    @property
    def items_per_cpu_s(self) -> float | None:
        """The data path's measured items/s per CPU: timed rows / the CPU-seconds their
        batches took (process time over every thread, so CPUs shared with other work do
        not lower it)."""
        return self.measured_rows / self.measured_cpu_s if self.measured_cpu_s > 0 else None

    @property
    def items_per_wall_s(self) -> float | None:
        """Timed rows / their summed ``t_preprocess_s`` (the rows' own wall times, as the job reports them)."""
        return self.measured_rows / self.measured_s if self.measured_s > 0 else None

    def mean_visual(self) -> float:
        return sum(v * k for v, k in self.visual.items()) / self.ok if self.ok else 0.0


@dataclass(frozen=True)
class Prediction:
    """The ideal model's generation cost of a plan's ok rows on one engine and GPU type."""

    engine: str
    gpu: str
    usd_per_hour: float
    batch_size: int | None  # None: not even one item fits the GPU's memory
    items_per_s: float | None  # per GPU
    gpu_hours: float | None
    cost_usd: float | None
    cpus_per_gpu: float | None  # CPUs the measured data path needs to feed one GPU


def batch_for(engine: str, dims, items: list[ItemTokens], max_new_tokens: int, gpu, batch_size, vision_chunk):
    """Items per batch the engine would run on ``gpu``: ``batch_size`` when it is a number;
    for ``auto`` the HF engine's memory model (``batching.auto_batch_size``) on the GPU's
    memory, or for vLLM the sequences its KV cache holds at the mean prompt, at most
    ``VLLM_MAX_SEQS``. None when not even one item fits."""
    from hired_batch.engine.batching import auto_batch_size
    from hired_batch.engine.dims import kv_bytes_per_token, weight_bytes

    if batch_size != "auto":
        return int(batch_size)
    if engine == "hf":
        try:
            return auto_batch_size(dims, items, max_new_tokens, gpu.memory_bytes, vision_chunk=vision_chunk)
        except ValueError:
            return None
    free = KV_HEADROOM * gpu.memory_bytes - weight_bytes(dims)
    seq = max(i.n_prompt for i in items) + max_new_tokens
    n = int(free // (kv_bytes_per_token(dims) * seq)) if free > 0 else 0
    return min(n, VLLM_MAX_SEQS) or None


def predict(tally: Tally, dims, gpu, engine: str, max_new_tokens: int, batch_size, vision_chunk=None) -> Prediction:
    """The ideal model's time for the plan's ok rows: each distinct item type in batches
    of its own kind (no padding, every answer ``max_new_tokens`` long), on ``gpu``'s
    datasheet roofline: an upper bound on speed, a lower bound on GPU-hours."""
    from hired_batch.bench import ideal

    counted = tally.item_tokens()
    none = Prediction(engine, gpu.name, gpu.usd_per_hour, None, None, None, None, None)
    if not counted:
        return none
    b = batch_for(engine, dims, [i for i, _ in counted], max_new_tokens, gpu, batch_size, vision_chunk)
    if b is None:
        return none
    roof = gpu.roofline()
    seconds = sum(k * ideal.batch_time(dims, [i] * b, max_new_tokens, roof).total_s / b for i, k in counted)
    rate = tally.ok / seconds
    per_cpu = tally.items_per_cpu_s
    hours = seconds / 3600
    return Prediction(
        engine=engine,
        gpu=gpu.name,
        usd_per_hour=gpu.usd_per_hour,
        batch_size=b,
        items_per_s=rate,
        gpu_hours=hours,
        cost_usd=hours * gpu.usd_per_hour,
        cpus_per_gpu=rate / per_cpu if per_cpu else None,
    )


@dataclass(frozen=True)
class PlanReport:
    """Everything ``plan`` reports (``as_dict`` is the JSON report)."""

    tally: Tally
    selection: str  # the selection in words, e.g. "hired 20%"
    engine: str  # the job's --engine: whose preprocessing was run and timed
    model: str  # what the prediction's shapes are (a --preset or the --model)
    max_new_tokens: int
    wall_s: float  # the plan's pipeline wall time
    cpus: float  # CPUs of the Ray cluster it ran on
    measure_every: int  # one preprocessing batch in this many ran the engine's whole preprocessing
    predictions: tuple = ()  # Prediction per (engine, gpu)
    unreadable_rows: int = 0  # input rows in row groups that could not be read

    @property
    def rows_per_s_per_cpu(self) -> float:
        return self.tally.rows / self.wall_s / self.cpus if self.wall_s > 0 and self.cpus else 0.0

    def as_dict(self) -> dict:
        t = self.tally
        return dict(
            rows=t.rows,
            ok=t.ok,
            failed=t.failed,
            unreadable_rows=self.unreadable_rows,
            errors=dict(t.errors.most_common()),
            image_sizes_longest_side={b: t.sizes.get(b, 0) for b in size_bins()},
            crops_per_item={str(k): v for k, v in sorted(t.grids.items())},
            visual_tokens_per_item={str(k): v for k, v in sorted(t.visual.items())},
            mean_visual_tokens=t.mean_visual(),
            mean_visual_tokens_full=t.visual_full / t.ok if t.ok else 0.0,
            selection=self.selection,
            engine=self.engine,
            model=self.model,
            max_new_tokens=self.max_new_tokens,
            data_path=dict(
                measured_rows=t.measured_rows,
                measure_every=self.measure_every,
                items_per_s_per_cpu=t.items_per_cpu_s,
                items_per_s_of_row_wall_times=t.items_per_wall_s,
                handoff_bytes_per_item=t.measured_bytes / t.measured_rows if t.measured_rows else None,
            ),
            plan_wall_s=self.wall_s,
            cluster_cpus=self.cpus,
            plan_rows_per_s_per_cpu=self.rows_per_s_per_cpu,
            predictions=[asdict(p) for p in self.predictions],
        )

    def format(self) -> str:
        """The terminal summary."""
        t = self.tally
        share = f"{100 * t.failed / t.rows:.2f} %" if t.rows else "-"
        lost = f", {self.unreadable_rows} in unreadable row groups" if self.unreadable_rows else ""
        lines = [f"rows: {t.rows} (ok {t.ok}, would fail {t.failed}: {share}{lost})"]
        lines += [f"  {k:>9}  {e}" for e, k in t.errors.most_common(10)]
        if len(t.errors) > 10:
            lines.append(f"  ... {len(t.errors) - 10} more kinds of error (--report lists them)")
        lines.append("image sizes, longest side px: " + ", ".join(f"{b}: {t.sizes.get(b, 0)}" for b in size_bins()))
        crops = ", ".join(f"{c} crops: {k}" for c, k in sorted(t.grids.items()))
        full = t.visual_full / t.ok if t.ok else 0.0
        lo_hi = f"{min(t.visual)}-{max(t.visual)}" if t.visual else "-"
        lines.append(
            f"visual tokens per item ({self.selection}): mean {t.mean_visual():.1f} ({lo_hi}; full: {full:.1f}); {crops}"
        )
        per_cpu = t.items_per_cpu_s
        handoff = t.measured_bytes / t.measured_rows / 1e6 if t.measured_rows else 0.0
        lines.append(
            f"data path (--engine {self.engine} {_timed_work(self.engine)}, {t.measured_rows} rows timed): "
            + (
                f"{per_cpu:.1f} items/s per CPU ({t.items_per_wall_s:.1f} by the rows' own wall times), "
                f"{handoff:.3f} MB handed off per item"
                if per_cpu
                else "not timed"
            )
        )
        lines.append(
            f"plan: {self.wall_s:.1f} s on {self.cpus:g} CPUs, {t.rows / max(self.wall_s, 1e-9):.3g} rows/s "
            f"({self.rows_per_s_per_cpu:.3g} rows/s per CPU, the actors' start included)"
        )
        if self.predictions:
            lines.append(
                f"predicted generation of {t.ok} items (ideal model: an upper bound on speed; {self.model}, "
                f"answers of {self.max_new_tokens} tokens):"
            )
            lines.append("| engine | gpu | $/GPU-h | batch | items/s per GPU | GPU-hours | cost $ | CPUs per GPU |")
            lines.append("|---|---|---|---|---|---|---|---|")
            lines += [_prediction_row(p) for p in self.predictions]
        return "\n".join(lines)


def _prediction_row(p: Prediction) -> str:
    if p.batch_size is None:
        return f"| {p.engine} | {p.gpu} | {p.usd_per_hour:.2f} | does not fit | - | - | - | - |"
    cpus = f"{p.cpus_per_gpu:.1f}" if p.cpus_per_gpu is not None else "-"
    return (
        f"| {p.engine} | {p.gpu} | {p.usd_per_hour:.2f} | {p.batch_size} | {p.items_per_s:.1f} | "
        f"{p.gpu_hours:.3g} | {p.cost_usd:.3g} | {cpus} |"
    )


def plot(report: PlanReport, path) -> None:
    """Image sizes, visual tokens per item and GPU-hours per engine and GPU, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = report.tally
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    bins = size_bins()
    ax[0].bar(bins, [t.sizes.get(b, 0) for b in bins])
    ax[0].set(title="image sizes", xlabel="longest side, px", ylabel="rows")
    ax[0].tick_params(axis="x", labelrotation=30)
    vis = sorted(t.visual.items())
    ax[1].bar([str(v) for v, _ in vis], [k for _, k in vis])
    ax[1].set(title=f"visual tokens per item ({report.selection})", xlabel="visual tokens", ylabel="ok rows")
    ax[1].tick_params(axis="x", labelrotation=90)
    preds = [p for p in report.predictions if p.gpu_hours is not None]
    ax[2].bar([f"{p.engine}\n{p.gpu}" for p in preds], [p.gpu_hours for p in preds])
    ax[2].set(title="predicted GPU-hours (ideal model)", ylabel="GPU-hours")
    fig.suptitle(f"plan: {t.rows} rows, {t.failed} would fail")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _timed_work(engine: str) -> str:
    """What a timed plan batch runs on ``engine`` (``plan.PlanStage``)."""
    return "preprocessing and the generation actor's pixels" if engine == "hf" else "preprocessing"
