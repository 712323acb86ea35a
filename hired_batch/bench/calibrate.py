"""``hired-batch calibrate``: choose the selector and budget from the user's own data.

A stratified sample of the input (``job.sample``) runs through the job once per setting
(``--try``), in one Ray session: selection is one engine-wide option (not a per-row one),
so each setting is one job on the sample and loads the model once. Every setting's answers
are compared with ``full``'s on the same rows (``eval.agreement``: exact after the VQA
normalisation, ANLS, field by field for JSON answers; 95 % Wilson intervals), scored
against ``--truth-column`` when given (``eval.score.score_truth_rows``, what ``score``
uses), timed here, and priced by the ideal model on a named GPU (``bench.ideal``,
``bench.gpus``). The recommendation: the cheapest setting whose agreement's lower bound
meets ``--target``, printed as the ``hired-batch run`` command for the whole input.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass

from hired_batch.config import SELECTORS, ConfigError, JobConfig, SelectionConfig
from hired_batch.eval.agreement import MEASURES, REFERENCE, TARGET_MEASURE, Candidate, Share, agreement, recommend
from hired_batch.job.sample import MIN_SAMPLE

DEFAULT_TRY = "full,hired:0.1,hired:0.2,hired:0.3,hired:0.5,random:0.2,spatial:0.2,visionzip:0.2"  # --try's default
DEFAULT_SAMPLE = 200  # --sample's default
DEFAULT_TARGET = 0.95  # --target's default: agreement with full to keep (its lower 95 % bound)
IDEAL_AUTO_BATCH = 32  # the ideal model's batch when --batch-size is auto


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Setting:
    """One ``--try`` entry: a selector and its budget."""

    name: str  # as written: "hired:0.2", "full"
    selector: str
    budget: float  # fraction of the patch tokens (1.0 for full)

    def selection(self, base: SelectionConfig) -> SelectionConfig:
        """``base`` with this setting's selector and budget."""
        return dataclasses.replace(base, selector=self.selector, budget=self.budget, budget_tokens=None)

    def flags(self) -> list[str]:
        """The ``run`` flags that choose it."""
        if self.selector == REFERENCE:
            return ["--selector", REFERENCE]
        return ["--selector", self.selector, "--budget", f"{self.budget:g}"]


def parse_settings(text: str, selectors=SELECTORS) -> list[Setting]:
    """``--try``: comma-separated ``SELECTOR:BUDGET`` (``full`` alone); ``full`` is added
    first when missing (it is the reference). ConfigError naming the bad entry."""
    out: list[Setting] = []
    for word in [w.strip() for w in str(text).split(",") if w.strip()]:
        selector, _, budget = word.partition(":")
        if selector not in selectors:
            raise ConfigError(
                f"--try: unknown setting {word!r}; expected SELECTOR:BUDGET with a selector of {selectors}"
            )
        if selector == REFERENCE:
            if budget:
                raise ConfigError(f"--try: {word!r}: full keeps every token and takes no budget; write full")
            out.append(Setting(word, REFERENCE, 1.0))
            continue
        try:
            value = float(budget)
        except ValueError:
            raise ConfigError(f"--try: {word!r}: expected {selector}:BUDGET with BUDGET a fraction in (0, 1]") from None
        if not 0 < value <= 1:
            raise ConfigError(f"--try: {word!r}: the budget must be a fraction in (0, 1], got {budget}")
        out.append(Setting(word, selector, value))
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"--try names a setting twice: {names}")
    if not out:
        raise ConfigError("--try: expected at least one setting, e.g. full,hired:0.2")
    if REFERENCE not in names:
        out.insert(0, Setting(REFERENCE, REFERENCE, 1.0))
    return out


def check_target(target) -> float:
    """``--target`` as a float in (0, 1]; ConfigError otherwise."""
    try:
        value = float(target)
    except (TypeError, ValueError):
        value = math.nan
    if not 0 < value <= 1:
        raise ConfigError(f"--target must be an agreement share in (0, 1], e.g. 0.95; got {target!r}")
    return value


# --------------------------------------------------------------------------- flags

# Options of calibrate's own (name -> default); a YAML --config may set them too.
OWN = {
    "sample": DEFAULT_SAMPLE,
    "sample_seed": 0,
    "try": DEFAULT_TRY,
    "target": DEFAULT_TARGET,
    "truth_column": None,
    "metric": None,
    "gpu": None,
    "report": None,
    "plot": None,
    "workdir": None,
}
# run options calibrate sets itself per setting (or does not use): given, they are refused
SET_PER_SETTING = ("selector", "budget", "budget_tokens", "checkpoint")


def add_flags(p: argparse.ArgumentParser) -> None:
    """``run``'s flags plus calibrate's own."""
    from hired_batch.bench.gpus import DEFAULT_GPU, GPUS
    from hired_batch.eval.score import TRUTH_METRICS
    from hired_batch.job.runner import add_run_arguments

    add_run_arguments(p)
    g = p.add_argument_group("calibrate")
    g.add_argument("--sample", type=int, help=f"rows drawn, stratified by anyres grid (default {DEFAULT_SAMPLE})")
    g.add_argument("--sample-seed", type=int, help="seed of the draw (default 0); --seed is the sampling seed of run")
    g.add_argument("--try", metavar="SETTINGS", help=f"comma-separated SELECTOR:BUDGET (default {DEFAULT_TRY})")
    g.add_argument(
        "--target",
        type=float,
        help=f"agreement with full to keep: the lower 95%% bound of exact agreement, in (0, 1] (default {DEFAULT_TARGET})",
    )
    g.add_argument("--truth-column", metavar="NAME", help="input column of your labels: also report accuracy")
    g.add_argument("--metric", metavar="{" + ",".join(TRUTH_METRICS) + "}", help="the metric for --truth-column")
    g.add_argument(
        "--gpu", metavar="{" + ",".join(GPUS) + "}", help=f"GPU the ideal model prices (default {DEFAULT_GPU})"
    )
    g.add_argument("--report", metavar="PATH", help="write the JSON report here")
    g.add_argument("--plot", metavar="PATH", help="write the agreement vs items/s plot here (PNG)")
    g.add_argument("--workdir", help="keep the sample and each setting's output here (default: a temporary directory)")


def add_parser(sub) -> None:
    """Register ``hired-batch calibrate``."""
    p = sub.add_parser(
        "calibrate",
        help="choose the selector and budget on a sample of your data (agreement with full, speed, cost)",
        description=__doc__.split("\n\n")[0]
        + " --output is where the recommended `run` writes: calibrate itself writes only to --workdir.",
    )
    add_flags(p)
    p.set_defaults(func=calibrate_main)


@dataclass(frozen=True)
class Plan:
    """A checked calibration, before any row is read."""

    job: JobConfig  # the job the recommendation runs (the user's options)
    settings: tuple  # Setting, full first
    sample: int
    sample_seed: int
    target: float
    truth_column: str | None
    metric: str | None
    gpu: object  # bench.gpus.Gpu
    report: str | None
    plot: str | None
    workdir: str | None


def plan_from_options(o: dict) -> Plan:
    """Every check that needs neither the data nor Ray; ConfigError naming the mistake."""
    from hired_batch.bench.gpus import DEFAULT_GPU, get_gpu
    from hired_batch.eval.score import check_truth_metric
    from hired_batch.job.options import job_from_options
    from hired_batch.job.runner import job_options

    own = {k: (o[k] if o.get(k) is not None else d) for k, d in OWN.items()}
    given = [k for k in SET_PER_SETTING if o.get(k) is not None]
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise ConfigError(f"calibrate sets the selection per --try setting and writes only to --workdir; drop {flags}")
    settings = parse_settings(own["try"])
    target = check_target(own["target"])
    if not isinstance(own["sample"], int) or own["sample"] < MIN_SAMPLE:
        raise ConfigError(
            f"--sample must be at least {MIN_SAMPLE} rows (fewer say nothing at 95 %), got {own['sample']!r}"
        )
    if bool(own["truth_column"]) != bool(own["metric"]):
        raise ConfigError("--truth-column and --metric go together: name the labels' column and how to score them")
    if own["metric"]:
        check_truth_metric(own["metric"])
    gpu = get_gpu(own["gpu"] or DEFAULT_GPU)
    job_opts = {k: v for k, v in job_options(o).items() if k not in OWN}
    if own["truth_column"]:
        keep = job_opts.get("keep_column") or []
        keep = [keep] if isinstance(keep, str) else list(keep)
        job_opts["keep_column"] = list(dict.fromkeys(keep + [own["truth_column"]]))
    job = job_from_options(job_opts)
    return Plan(
        job, tuple(settings), own["sample"], own["sample_seed"], target, own["truth_column"], own["metric"], gpu,
        own["report"], own["plot"], own["workdir"],
    )  # fmt: skip


def check_truth_in_input(job: JobConfig, column: str | None) -> None:
    """ConfigError when ``--truth-column`` is not a column of the input."""
    if not column:
        return
    from hired_batch.job.image_folder import image_folder
    from hired_batch.job.sources import is_hf_job, list_parquet_files, parquet_schema_names

    if is_hf_job(job):
        return  # the sampler refuses it with its own line
    if image_folder(job):
        raise ConfigError(
            f"--truth-column {column!r}: a folder of images has no columns but the image and its path; "
            "put the images and their labels in Parquet to score against labels"
        )
    names = parquet_schema_names(list_parquet_files(list(job.inputs), job.s3)[0], job.s3)
    if column not in names:
        raise ConfigError(f"--truth-column {column!r}: expected a column of the input, found {sorted(names)}")


# --------------------------------------------------------------------------- running


@dataclass
class Result:
    """One setting's measurements."""

    setting: Setting
    output: str  # its output on the sample
    seconds: float  # the job's wall time (pipeline), s
    items_per_s: float  # sample rows / seconds (the model load included: small samples understate)
    engine_items_per_s: float  # rows / the generate calls' time (t_batch_s of each batch, once)
    mean_visual_tokens: float
    failed: int  # rows with an error
    answers: dict  # id -> answer (None: the row failed)
    ideal_items_per_s: float = math.nan
    cost_per_million: float = math.nan
    agreement: dict | None = None  # measure -> Share (None for full)
    accuracy: Share | None = None  # against --truth-column


def calibrate_main(args: argparse.Namespace) -> int:
    """The ``calibrate`` handler: checks, sample, one job per setting, the report."""
    from hired_batch.job.run import check_job, init_ray
    from hired_batch.job.runner import merged_options
    from hired_batch.job.sample import draw_sample

    o = merged_options(args)
    plan = plan_from_options(o)
    check_truth_in_input(plan.job, plan.truth_column)
    check_job(plan.job)  # the inputs and the model, as run checks them
    workdir = plan.workdir or tempfile.mkdtemp(prefix="hired_batch_calibrate_")
    t0 = time.perf_counter()
    sample = draw_sample(plan.job, plan.sample, plan.sample_seed, os.path.join(workdir, "sample"))
    print(_sample_line(sample))
    jobs = [_sample_job(plan.job, s, sample.path, workdir) for s in plan.settings]
    for job in jobs:
        check_job(job)
    init_ray(o.get("address"), o.get("num_cpus"), o.get("num_gpus"))
    results = [_run_setting(s, job) for s, job in zip(plan.settings, jobs)]
    report = build_report(plan, sample, results, time.perf_counter() - t0, getattr(args, "command_line", None))
    print(format_report(report))
    if plan.report:
        from hired_batch.jsonio import write_json

        print(f"wrote {write_json(plan.report, report, indent=2)}")
    if plan.plot:
        print(f"wrote {plot_report(report, plan.plot)}")
    if not plan.workdir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _sample_line(sample) -> str:
    grids = ", ".join(f"{g} {n}" for g, n in sample.grids.items())
    return (
        f"sample: {len(sample.ids)} rows of {sample.input_rows} ({sample.usable} usable of {sample.pool} looked at), "
        f"by anyres grid: {grids}"
    )


def _sample_job(job: JobConfig, setting: Setting, sample_path: str, workdir: str) -> JobConfig:
    """``job`` on the sample with ``setting``'s selection, writing to the workdir."""
    slug = setting.name.replace(":", "_")
    return dataclasses.replace(
        job,
        inputs=(sample_path,),
        output=os.path.join(workdir, "runs", slug),
        checkpoint=None,
        overwrite=True,
        selection=setting.selection(job.selection).check(),
        columns=dataclasses.replace(job.columns, id_column_given=True),
    )


def _run_setting(setting: Setting, job: JobConfig) -> Result:
    from hired_batch.job.run import execute

    print(f"running {setting.name} ...", file=sys.stderr)
    summary = execute(job)
    answers, engine_s = read_answers(job.output)
    return Result(
        setting=setting,
        output=job.output,
        seconds=summary.seconds,
        items_per_s=summary.items_per_s,
        engine_items_per_s=len(answers) / engine_s if engine_s > 0 else math.nan,
        mean_visual_tokens=summary.mean_visual_tokens_kept,
        failed=summary.failed,
        answers={i: a for i, a in answers.items()},
    )


def read_answers(output: str) -> tuple[dict, float]:
    """({id: answer or None}, seconds in generate calls) of a finished output."""
    import pyarrow.dataset as ds

    t = ds.dataset(output, format="parquet").to_table(columns=["id", "answer", "error", "batch_id", "t_batch_s"])
    rows = t.to_pylist()
    batches = {r["batch_id"]: r["t_batch_s"] or 0.0 for r in rows if r["batch_id"] is not None}
    return {r["id"]: (r["answer"] or "") if r["error"] is None else None for r in rows}, sum(batches.values())


def read_column(output: str, column: str) -> dict:
    """{id: value} of one output column (a kept column by its output name)."""
    import pyarrow.dataset as ds

    from hired_batch.eval.score import truth_output_column

    dataset = ds.dataset(output, format="parquet")
    name = truth_output_column(column, dataset.schema.names)
    t = dataset.to_table(columns=["id", name])
    return dict(zip(t.column("id").to_pylist(), t.column(name).to_pylist()))


# --------------------------------------------------------------------------- the ideal model


def ideal_items_per_s(job: JobConfig, setting: Setting, sample, text_tokens: dict, gpu) -> float:
    """Items/s the ideal model predicts for ``setting`` on ``gpu`` (16-bit weights), over
    the sample's images and prompts, in batches of ``--batch-size`` (``IDEAL_AUTO_BATCH``
    for auto), each answer ``--max-new-tokens`` long."""
    from transformers import AutoConfig

    from hired_batch.bench import ideal
    from hired_batch.engine.dims import ModelDims

    cfg = AutoConfig.from_pretrained(job.model.path, trust_remote_code=False)
    d = ModelDims.from_hf(cfg, bytes_per_param=2)
    pins = getattr(cfg, "image_grid_pinpoints", None) or ideal.ANYRES_PINPOINTS
    selection = setting.selection(job.selection)
    ids = [i for i in sample.ids if i in text_tokens and sample.size_of.get(i)]
    items = [ideal.item_tokens(d, sample.size_of[i], selection, text_tokens[i], pins) for i in ids]
    if not items:
        return math.nan
    b = job.resources.batch_size if isinstance(job.resources.batch_size, int) else IDEAL_AUTO_BATCH
    batches = [items[k : k + b] for k in range(0, len(items), b)]
    seconds = ideal.workload_time(d, batches, job.generation.max_new_tokens, gpu.roofline())
    return len(items) / seconds


def text_tokens_of(output: str) -> dict:
    """{id: text tokens of the prompt} from an output (the prompt less its visual tokens)."""
    import pyarrow.dataset as ds

    t = ds.dataset(output, format="parquet").to_table(
        columns=["id", "error", "n_prompt_tokens", "n_visual_tokens_kept"]
    )
    return {
        r["id"]: r["n_prompt_tokens"] - r["n_visual_tokens_kept"]
        for r in t.to_pylist()
        if r["error"] is None and r["n_prompt_tokens"] is not None
    }


# --------------------------------------------------------------------------- the report


def build_report(plan: Plan, sample, results: list[Result], seconds: float, command_line) -> dict:
    """Agreement, accuracy, speed and cost per setting, the recommendation and its command."""
    from hired_batch.bench.gpus import cost_per_million
    from hired_batch.eval.score import score_truth_rows

    full = next(r for r in results if r.setting.name == REFERENCE)
    text = text_tokens_of(full.output)
    truth = read_column(full.output, plan.truth_column) if plan.truth_column else None
    for r in results:
        r.ideal_items_per_s = ideal_items_per_s(plan.job, r.setting, sample, text, plan.gpu)
        r.cost_per_million = cost_per_million(r.ideal_items_per_s, plan.gpu.usd_per_hour)
        r.agreement = agreement(r.answers, full.answers)
        if truth is not None:
            ids = list(sample.ids)
            values = score_truth_rows([r.answers.get(i) for i in ids], [truth[i] for i in ids], plan.metric)
            r.accuracy = Share.of(sum(values), len(values))
    candidates = [
        Candidate(r.setting.name, r.cost_per_million, r.engine_items_per_s, r.agreement[TARGET_MEASURE].low)
        for r in results
    ]
    best, met = recommend(candidates, plan.target)
    chosen = next(r for r in results if r.setting.name == best)
    return {
        "sample": {
            "rows": len(sample.ids),
            "input_rows": sample.input_rows,
            "usable_of_pool": [sample.usable, sample.pool],
            "grids": sample.grids,
            "seed": plan.sample_seed,
        },
        "target": plan.target,
        "target_measure": TARGET_MEASURE,
        "gpu": dataclasses.asdict(plan.gpu),
        "truth": {"column": plan.truth_column, "metric": plan.metric} if plan.truth_column else None,
        "settings": [_setting_row(r) for r in results],
        "recommendation": {
            "setting": best,
            "meets_target": met,
            "reason": _reason(best, met, plan.target, chosen),
            "command": shlex.join(run_command(command_line, chosen.setting)),
        },
        "seconds": seconds,
    }


def _setting_row(r: Result) -> dict:
    def share(s: Share | None):
        return None if s is None else dataclasses.asdict(s)

    return {
        "setting": r.setting.name,
        "selector": r.setting.selector,
        "budget": r.setting.budget,
        "items_per_s": r.items_per_s,
        "engine_items_per_s": r.engine_items_per_s,
        "seconds": r.seconds,
        "mean_visual_tokens": r.mean_visual_tokens,
        "failed": r.failed,
        "ideal_items_per_s": r.ideal_items_per_s,
        "cost_per_million": r.cost_per_million,
        "agreement": {m: share(r.agreement.get(m)) for m in MEASURES},
        "accuracy": share(r.accuracy),
    }


def _reason(best: str, met: bool, target: float, chosen: Result) -> str:
    if not met:
        return (
            f"no setting's lower 95 % bound of {TARGET_MEASURE} agreement with full reaches {target:g}: "
            "recommending full"
        )
    low = chosen.agreement[TARGET_MEASURE].low
    return (
        f"{best} is the cheapest setting whose lower 95 % bound of {TARGET_MEASURE} agreement with full "
        f"({low:.3f}) reaches {target:g}"
    )


# calibrate's own flags that take a value (dropped from the printed run command)
_OWN_FLAGS = tuple("--" + k.replace("_", "-") for k in OWN)


def run_command(command_line, setting: Setting) -> list[str]:
    """The ``hired-batch run`` command for the whole input with ``setting``: the calibrate
    command's words with ``calibrate`` made ``run``, calibrate's own flags dropped and the
    setting's selection flags added."""
    words = list(command_line or ["hired-batch", "calibrate"])
    i = words.index("calibrate") if "calibrate" in words else len(words)
    head, rest = words[:i] + ["run"], words[i + 1 :]
    kept, skip = [], False
    for w in rest:
        if skip:
            skip = False
            continue
        name = w.split("=", 1)[0]
        if name in _OWN_FLAGS:
            skip = "=" not in w
            continue
        kept.append(w)
    return head + kept + setting.flags()


def _fmt(v, spec="{:.2f}") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


def _share_text(s: dict | None) -> str:
    return "-" if s is None else f"{s['value']:.3f} [{s['low']:.2f}, {s['high']:.2f}]"


def format_report(report: dict) -> str:
    """The terminal table, the recommendation and its command."""
    gpu = report["gpu"]["name"]
    head = ["setting", "items/s", "engine items/s", f"ideal {gpu} items/s", "$/M items", "exact [95%]", "anls [95%]"]
    fields = any(r["agreement"]["fields"] for r in report["settings"])
    head += ["fields [95%]"] if fields else []
    head += ["accuracy [95%]"] if report["truth"] else []
    rows = []
    for r in report["settings"]:
        mark = " *" if r["setting"] == report["recommendation"]["setting"] else ""
        row = [
            r["setting"] + mark,
            _fmt(r["items_per_s"]),
            _fmt(r["engine_items_per_s"]),
            _fmt(r["ideal_items_per_s"], "{:.1f}"),
            _fmt(r["cost_per_million"], "{:.3g}"),
            _share_text(r["agreement"]["exact"]),
            _share_text(r["agreement"]["anls"]),
        ]
        row += [_share_text(r["agreement"]["fields"])] if fields else []
        row += [_share_text(r["accuracy"])] if report["truth"] else []
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *rows]]
    rec = report["recommendation"]
    lines += [
        f"target: lower 95 % bound of {report['target_measure']} agreement with full >= {report['target']:g}; "
        f"$/M items: the ideal model on one {gpu} at ${report['gpu']['usd_per_hour']:.2f}/h",
        f"recommendation (*): {rec['reason']}",
        f"run it on the whole input:\n  {rec['command']}",
    ]
    return "\n".join(lines)


def plot_report(report: dict, path: str) -> str:
    """Agreement with full (exact, with its 95 % interval) against the items/s measured in
    the generate calls (the model load left out: on a small sample it would hide the
    difference), one point per setting, the target as a line, the recommendation ringed; a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    rec = report["recommendation"]["setting"]
    for r in report["settings"]:
        s = r["agreement"][report["target_measure"]]
        x = r["engine_items_per_s"]
        ax.errorbar(x, s["value"], yerr=[[s["value"] - s["low"]], [s["high"] - s["value"]]], fmt="o", capsize=3,
                    color="tab:red" if r["setting"] == rec else "tab:blue")  # fmt: skip
        ax.annotate(r["setting"], (x, s["value"]), textcoords="offset points", xytext=(5, -12), fontsize=8)
        if r["setting"] == rec:
            ax.plot(x, s["value"], "o", ms=14, mfc="none", mec="tab:red", label=f"recommended: {rec}")
    ax.axhline(report["target"], color="grey", ls="--", label=f"target {report['target']:g} (lower bound)")
    ax.set_xlabel("items/s in the generate calls, measured here")
    ax.set_ylabel(f"{report['target_measure']} agreement with full")
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"calibrate: {report['sample']['rows']} rows, 95 % Wilson intervals")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
