"""``hired-batch plan``: what a dataset will cost before any GPU is paid for.

The job's own read -> decode -> validate -> token plan over every row, on the same Ray
cluster and with the same options as ``run`` (its flags and ``--config`` YAML, generated
from the same declarations), but with no model weights: only the checkpoint's processor
and config. It reports the rows, the rows that would fail by reason (the error strings
the job writes: the preprocessing stage's own, and the generation stage's context check),
the image sizes, the visual tokens per item at the chosen selection, the data path's
measured items/s per CPU, and the ideal model's generation time, GPU-hours and cost per
``--engines`` and ``--gpu`` type, with the CPUs per GPU preprocessing needs to keep up.

Preprocessing runs as the job's ``PreprocessStage``. One batch in ``--measure-every``
goes through the engine's whole preprocessing (the image processor's pixels, timed: the
data path's rate); the others stop after the prompt ids, which is every check a row can
fail before generation, so the counts cover every row. The pieces without Ray are in
``plan_report.py``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time

from hired_batch.config import ConfigError

# run's options that name where the job writes: plan writes nothing there; it takes them
# so that one --config file serves both commands
OUTPUT_OPTIONS = ("output", "checkpoint", "overwrite")
PLAN_OPTIONS = ("gpu", "gpu_price", "engines", "preset", "measure_every", "report", "plot")
PROGRESS_EVERY_S = 15.0  # seconds between progress lines


def add_flags(p: argparse.ArgumentParser) -> None:
    """``run``'s flags (``options.run_options``) and plan's own."""
    from hired_batch.bench import PRESET_NAMES
    from hired_batch.bench.gpus import DEFAULT_GPU, GPUS
    from hired_batch.job.options import run_options
    from hired_batch.job.runner import flag_arguments

    groups = {}
    for opt in run_options():
        if opt.group not in groups:
            groups[opt.group] = p.add_argument_group(opt.group)
        kw = flag_arguments(opt)
        if opt.name in OUTPUT_OPTIONS:
            kw["help"] = "not used by plan (taken so that run's --config serves plan too)"
        groups[opt.group].add_argument(opt.flag, **kw)
    g = p.add_argument_group("plan")
    g.add_argument(
        "--gpu",
        default=DEFAULT_GPU,
        help=f"GPU type(s) to predict for, comma-separated: {', '.join(GPUS)} (default {DEFAULT_GPU})",
    )
    g.add_argument(
        "--gpu-price", type=float, help="$ per GPU-hour for the one --gpu given (default: an assumed list price)"
    )
    g.add_argument("--engines", help="engines to predict for, comma-separated: hf, vllm (default: --engine)")
    g.add_argument(
        "--preset",
        help=f"predict for this model size's shapes ({', '.join(PRESET_NAMES)}) instead of --model's config",
    )
    g.add_argument(
        "--measure-every",
        type=int,
        default=10,
        help="one preprocessing batch in N runs the engine's whole preprocessing, timed (1: every row; default 10)",
    )
    g.add_argument("--report", help="write the plan as JSON to this file")
    g.add_argument("--plot", help="write the plan's histograms and predictions as a PNG to this file")


def add_parser(sub) -> None:
    p = sub.add_parser("plan", help="count, check and cost a dataset without loading the model (same flags as run)")
    add_flags(p)
    p.set_defaults(func=plan_main)


# ----------------------------------------------------------------------------- checks


def plan_settings(args: argparse.Namespace, job) -> dict:
    """Plan's own flags, checked (ConfigError before Ray starts): the GPU types, the
    engines, the preset, ``--measure-every``."""
    from hired_batch.bench.gpus import get_gpu
    from hired_batch.bench.model_sizes import get_preset
    from hired_batch.config import ENGINES

    names = [n for n in str(args.gpu).split(",") if n.strip()]
    if not names:
        raise ConfigError("--gpu needs at least one GPU type")
    if args.gpu_price is not None and len(names) > 1:
        raise ConfigError(f"--gpu-price is the price of one GPU type, but --gpu names {len(names)}: {args.gpu}")
    gpus = [get_gpu(n, args.gpu_price) for n in names]
    engines = [e.strip() for e in (args.engines or job.model.engine).split(",") if e.strip()]
    wrong = [e for e in engines if e not in ENGINES]
    if wrong or not engines:
        raise ConfigError(f"--engines takes a comma-separated list of {', '.join(ENGINES)}, got {args.engines!r}")
    if args.preset is not None:
        get_preset(args.preset)
    if args.measure_every is None or args.measure_every < 1:
        raise ConfigError(f"--measure-every must be >= 1 (1: time every row), got {args.measure_every!r}")
    return dict(gpus=gpus, engines=list(dict.fromkeys(engines)))


def plan_job(o: dict, scratch: str):
    """The job ``run`` would run with options ``o``, writing nothing: its output is
    ``scratch`` (where unreadable row groups are recorded), no checkpoint."""
    from hired_batch.job.options import job_from_options
    from hired_batch.job.runner import job_options

    o = {k: v for k, v in o.items() if k not in OUTPUT_OPTIONS + PLAN_OPTIONS}
    if not o.get("input"):
        raise ConfigError("--input is required: the dataset to plan")
    return job_from_options(job_options({**o, "output": scratch}))


# ----------------------------------------------------------------------------- the stage


def _count_encode(pre, image, question) -> dict:
    """The handoff the checks need: the prompt ids (``PromptError`` as the engines raise
    it) and the image size, without the engine's pixels."""
    return dict(input_ids=pre.prompt_ids(question).tobytes(), image_h=image.height, image_w=image.width)


class PlanStage:
    """CPU actor: the job's ``PreprocessStage`` on a batch, then the generation stage's
    checks and token plan per row (``plan_report.plan_table``): one small row out per row in."""

    def __init__(self, model_path, columns, limits, system_prompt, engine, check, measure_every: int):
        from hired_batch.engine import backends
        from hired_batch.job.stages import PreprocessStage

        self.full = PreprocessStage(model_path, columns, limits, system_prompt, engine)
        self.count = copy.copy(self.full)  # the same processor, a handoff of the prompt ids alone
        self.count.backend = backends.Backend(name="plan", handoff={}, encode=_count_encode, start=None)
        self.count.types = backends.handoff_types(self.count.backend)
        self.check = check
        self.every = measure_every
        self.calls = 0

    def __call__(self, batch: dict):
        from hired_batch.bench.plan_report import plan_table

        measured = self.calls % self.every == 0
        self.calls += 1
        if not measured:
            return plan_table(self.count(batch), self.check, False)
        c0 = time.process_time()  # every thread of this actor (the image decoding pool's too)
        handoff = self.full(batch)
        if self.full.backend.name == "hf":
            _make_pixels(self.full.pre, handoff)  # the generation actor's share of the data path
        return plan_table(handoff, self.check, True, cpu_s=time.process_time() - c0)


def _make_pixels(pre, handoff) -> None:
    """The float pixels the HF generation actor makes from each ok row's handoff (the lean
    data path moves the image processor there): CPU work per item a GPU node must supply."""
    from hired_batch.engine.handoff import pixel_values

    t = handoff.select(["error", "image", "image_kind", "n_parts"]).to_pylist()
    for r in t:
        if r["error"] is None:
            pixel_values(pre, r["image"], r["image_kind"], int(r["n_parts"]))


def token_check(job):
    """The generation stage's checks for ``job`` from the checkpoint's config alone."""
    from transformers import AutoConfig

    from hired_batch.bench.plan_report import TokenCheck
    from hired_batch.engine import token_plan
    from hired_batch.engine.hf_backend import max_positions

    cfg = AutoConfig.from_pretrained(job.model.path, trust_remote_code=False)
    # vLLM's context is --max-model-len, else what it reads from the same config entry
    context = job.model.max_model_len if job.model.engine == "vllm" and job.model.max_model_len else max_positions(cfg)
    return TokenCheck(token_plan.Geometry.from_config(cfg), job.selection, job.generation, int(context)), cfg


# ----------------------------------------------------------------------------- run


def plan_main(args: argparse.Namespace) -> int:
    """The ``plan`` handler: every check ``run`` makes before Ray, then the plan pass on
    Ray, the summary, and the report and plot when asked. Exit 0, or 2 for a mistake."""
    import shutil
    import tempfile

    from hired_batch.job.run import check_job, init_ray
    from hired_batch.job.runner import merged_options

    o = merged_options(args)
    scratch = tempfile.mkdtemp(prefix="hired-batch-plan-")
    try:
        job = plan_job(o, scratch)
        settings = plan_settings(args, job)
        check_job(job)
        init_ray(o.get("address"), o.get("num_cpus"), o.get("num_gpus"))
        report = run_plan(job, settings, args.preset, args.measure_every)
    except KeyboardInterrupt:  # nothing written: a plan is rerun, not resumed
        print("interrupted; plan wrote nothing", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(report.format())
    if args.report:
        from hired_batch.jsonio import write_json

        print(f"report: {write_json(args.report, report.as_dict())}")
    if args.plot:
        from hired_batch.bench.plan_report import plot

        plot(report, args.plot)
        print(f"plot: {args.plot}")
    return 0


def run_plan(job, settings: dict, preset: str | None = None, measure_every: int = 10):
    """The plan pass over ``job``'s input on the Ray this process has joined: a PlanReport."""
    import ray
    from ray.data import ActorPoolStrategy

    from hired_batch.bench.plan_report import PlanReport, Tally
    from hired_batch.job.pipeline import read_input
    from hired_batch.job.resources import READ_CPUS, preprocess_batch
    from hired_batch.job.sources import ROW_ID, unreadable_records

    check, cfg = token_check(job)
    r = job.resources.check()
    cpus = float(ray.cluster_resources().get("CPU", 1))
    t0 = time.perf_counter()
    ds, _ = read_input(job)
    columns = dataclasses.replace(job.columns, id_column=ROW_ID)  # as build_pipeline: the id the job writes
    actors = max(r.preprocess_actors, int((cpus - READ_CPUS) // r.preprocess_cpus))  # no GPU stage: all CPUs
    ds = ds.map_batches(
        PlanStage,
        fn_constructor_args=(
            job.model.path,
            columns,
            job.limits,
            job.generation.system_prompt,
            job.model.engine,
            check,
            measure_every,
        ),
        batch_size=preprocess_batch(r),
        batch_format="numpy",
        num_cpus=r.preprocess_cpus,
        compute=ActorPoolStrategy(min_size=1, max_size=max(actors, 1)),
    )
    tally, shown = Tally(), time.perf_counter()
    for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        tally.add(table)
        if time.perf_counter() - shown > PROGRESS_EVERY_S:
            shown = time.perf_counter()
            rate = tally.rows / (shown - t0)
            print(f"plan: {tally.rows} rows, {tally.failed} would fail, {rate:.0f} rows/s", file=sys.stderr)
    wall = time.perf_counter() - t0
    lost = sum(x["rows"] for x in unreadable_records(job.output, job.s3))
    model, dims = prediction_model(job, cfg, preset)
    predictions = tuple(
        predict_one(tally, dims, gpu, engine, job) for engine in settings["engines"] for gpu in settings["gpus"]
    )
    return PlanReport(
        tally=tally,
        selection=describe_selection(job.selection),
        engine=job.model.engine,
        model=model,
        max_new_tokens=job.generation.max_new_tokens,
        wall_s=wall,
        cpus=cpus,
        measure_every=measure_every,
        predictions=predictions,
        unreadable_rows=lost,
    )


def predict_one(tally, dims, gpu, engine: str, job):
    from hired_batch.bench.plan_report import predict

    return predict(
        tally, dims, gpu, engine, job.generation.max_new_tokens, job.resources.batch_size, job.model.vision_chunk
    )


def prediction_model(job, cfg, preset: str | None):
    """(what the prediction is for, in words; its ``ModelDims``): a ``--preset``'s shapes,
    or ``--model``'s config, in float16 unless ``--dtype`` says otherwise (GPUs run half precision)."""
    from hired_batch.engine.dims import ModelDims, bytes_per_param

    dtype = "float16" if job.model.dtype == "auto" else job.model.dtype
    if preset:
        from hired_batch.bench.model_sizes import get_preset

        return f"{preset} shapes, {dtype}", get_preset(preset).dims(bytes_per_param(dtype))
    return f"{job.model.path}, {dtype}", ModelDims.from_hf(cfg, bytes_per_param=bytes_per_param(dtype))


def describe_selection(s) -> str:
    """The selection in words: "full", "hired 20%", "hired 128 tokens"."""
    if s.selector == "full":
        return "full"
    if s.budget_tokens is not None:
        return f"{s.selector} {s.budget_tokens} tokens"
    return f"{s.selector} {100 * s.budget:g}%"
