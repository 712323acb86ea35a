"""``hired-batch run``: flags and/or a YAML file -> JobConfig -> Ray -> Parquet + summary.

Checks everything it can before Ray starts (columns, ranges, model directory, output
location) so a bad configuration costs one clear line, not a cluster hour. With no
``--address`` (and no RAY_ADDRESS) it starts an embedded local Ray; under
``ray job submit`` it joins the cluster it runs on.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from hired_batch.config import (DTYPES, MODES, SELECTORS, SUPPORTED_MODEL_TYPES, ConfigError, GenerationConfig, ModelConfig,
                                SelectionConfig)
from hired_batch.engine.inputs import DecodeLimits
from hired_batch.engine.batching import parse_batch_size
from hired_batch.job.pipeline import (JobConfig, Resources, build_pipeline,
                                  clear_output, configure_checkpoint, existing_outputs, is_hf_job, preflight,
                                  record_checkpoint, write_output)
from hired_batch.job.sources import S3Options
from hired_batch.job.stages import ColumnSpec

# ----------------------------------------------------------------------------- flags


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``run`` (shared by jobs/batch_qa.py). Defaults are None so YAML can fill them."""
    g = p.add_argument_group("data")
    g.add_argument("--config", help="YAML file with any of these options (flags override it)")
    g.add_argument("--input", action="append", help="Parquet file/dir/glob (local or s3://), hf:NAME[:CONFIG][:SPLIT], or a save_to_disk dir; repeatable")
    g.add_argument("--output", help="output directory (local or s3://)")
    g.add_argument("--task", help="benchmark preset (see `hired-batch score`): sets columns, prompt, max tokens")
    g.add_argument("--id-column", help=f"unique id column (default: {ColumnSpec.id_column}; generated file#row if absent)")
    g.add_argument("--image-column", help="image column: bytes, {bytes,path} struct, or path/URL (default: " + ColumnSpec.image_column + ")")
    g.add_argument("--question-column", help=f"question column (default: {ColumnSpec.question_column}; 'none' = prompt only)")
    g.add_argument("--prompt", help="fixed instruction, or a template with {question}; literal braces as {{ }}")
    g.add_argument("--keep-column", action="append", help="input column copied to the output; repeatable")
    g.add_argument("--s3-endpoint", help="S3-compatible endpoint URL (default: AWS_ENDPOINT_URL_S3 or AWS)")
    g.add_argument("--max-pixels", type=int, help=f"refuse images above this many pixels (default {DecodeLimits.max_pixels / 1e6:g}e6)")
    g.add_argument("--checkpoint",
                   help="Ray Data checkpoint directory (local or s3://): a killed run reruns with the same one and adds only missing rows")
    g.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=None,
                   help="start over: delete the Parquet files already in --output (and --checkpoint) first "
                        "(default: refuse a used output dir)")
    m = p.add_argument_group("model and HiRED")
    m.add_argument("--model", help="hub id or local checkpoint directory")
    # metavar, not choices: check() refuses a bad value in one line; argparse would dump the usage
    m.add_argument("--selector", metavar="{" + ",".join(SELECTORS) + "}", help=f"token selector (default {SelectionConfig.selector})")
    m.add_argument("--mode", metavar="{" + ",".join(MODES) + "}", help=f"HiRED mode (default {SelectionConfig.mode})")
    m.add_argument("--budget", type=float, help=f"fraction of visual tokens kept (default {SelectionConfig.budget})")
    m.add_argument("--budget-tokens", type=int, help="visual tokens kept per image (overrides --budget)")
    m.add_argument("--alpha", type=float, help=f"share of the budget for the full image (default {SelectionConfig.alpha})")
    m.add_argument("--max-new-tokens", type=int, help=f"answer length cap (default {GenerationConfig.max_new_tokens})")
    m.add_argument("--temperature", type=float, help="0 = greedy (default)")
    m.add_argument("--top-p", type=float, help="nucleus mass when sampling")
    m.add_argument("--seed", type=int, help="sampling seed")
    m.add_argument("--dtype", metavar="{" + ",".join(DTYPES) + "}", help=f"weights precision (default {ModelConfig.dtype})")
    m.add_argument("--vision-chunk", type=int,
                   help=f"image crops per vision-tower call (default {ModelConfig.vision_chunk}): bounds CLIP's memory")
    m.add_argument("--save-indices", action="store_true", default=None, help="write kept_indices per row")
    r = p.add_argument_group("resources")
    r.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else an embedded local Ray)")
    r.add_argument("--batch-size", help=f"items per generate call (default {Resources.batch_size}), or 'auto': the most that fit memory")
    r.add_argument("--memory-limit", help="with --batch-size auto: bytes a batch may use, e.g. 24GB (default: free GPU memory)")
    r.add_argument("--window", type=int, help=f"with --batch-size auto: rows each generation actor receives at once, "
                   f"grouped by prompt length inside; caps the auto batch (default {Resources.window})")
    r.add_argument("--num-actors", type=int, help="GPU actors (sets min and max)")
    r.add_argument("--min-actors", type=int, help="autoscaling lower bound")
    r.add_argument("--max-actors", type=int, help="autoscaling upper bound")
    r.add_argument("--gpus-per-actor", type=float,
                   help="GPUs per actor, at most 1: the model runs on one device (default 1 if the cluster has GPUs, else 0)")
    r.add_argument("--preprocess-cpus", type=float, help=f"CPUs per preprocessing actor (default {Resources.preprocess_cpus})")
    r.add_argument("--generate-cpus", type=float, help=f"CPUs per generation actor (default {Resources.generate_cpus})")
    r.add_argument("--generate-memory",
                   help="host memory each generation actor reserves in Ray's scheduler, e.g. 16GB (default none)")
    r.add_argument("--preprocess-actors", type=int, help=f"preprocessing actors (default {Resources.preprocess_actors})")
    r.add_argument("--rows-per-file", type=int, help="output rows per Parquet file at most")
    r.add_argument("--num-cpus", type=int, help="embedded Ray only: CPUs to declare")
    r.add_argument("--num-gpus", type=int, help="embedded Ray only: GPUs to declare")


NOT_OPTIONS = ("func", "command", "config", "command_line")  # Namespace entries that are not job options


def merged_options(args: argparse.Namespace) -> dict:
    """YAML values overridden by flags that were given; keys use underscores."""
    opts = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            loaded = yaml.safe_load(f) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {args.config} must hold a mapping of options, got {type(loaded).__name__}")
        opts = {k.replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(opts) - set(vars(args)))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} in {args.config}")
    opts.update({k: v for k, v in vars(args).items() if v is not None and k not in NOT_OPTIONS})
    return opts


def _listify(v):
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)


# ----------------------------------------------------------------------------- config


def job_from_options(o: dict, gpus_available: bool) -> JobConfig:
    """Build and validate the JobConfig (raises ConfigError with one clear line)."""
    task = _task(o.get("task"))
    inputs, output = _listify(o.get("input")), o.get("output")
    if not inputs or not output:
        raise ConfigError("--input and --output are required")
    return JobConfig(
        inputs=tuple(inputs), output=output, columns=_columns(o, task),
        model=ModelConfig(path=o.get("model", ModelConfig.path), dtype=o.get("dtype", ModelConfig.dtype),
                          vision_chunk=int(o.get("vision_chunk", ModelConfig.vision_chunk))).check(),
        selection=_selection(o), generation=_generation(o, task), resources=_resources(o, gpus_available),
        limits=DecodeLimits(max_pixels=int(o.get("max_pixels", DecodeLimits.max_pixels))),
        s3=S3Options(endpoint=o.get("s3_endpoint")), checkpoint=o.get("checkpoint"),
        overwrite=bool(o.get("overwrite", False)),
    )


def _task(name):
    if not name:
        return None
    from hired_batch.job.tasks import get_task

    return get_task(name)


def _columns(o, task) -> ColumnSpec:
    q = o.get("question_column", task.question_column if task else ColumnSpec.question_column)
    keep = tuple(_listify(o.get("keep_column"))) + (tuple(task.kept_columns) if task else ())
    return ColumnSpec(
        id_column=o.get("id_column", (task.id_column if task else None) or ColumnSpec.id_column),
        image_column=o.get("image_column", task.image_column if task else ColumnSpec.image_column),
        question_column=None if str(q).lower() == "none" else q,
        prompt=o.get("prompt"),  # a --task renders its own template (render_prompt)
        keep_columns=tuple(dict.fromkeys(keep)),
        storage_options=_storage(o),
        task=task.name if task and "prompt" not in o else None,
        prompt_columns=tuple(f for f in task.prompt_fields if f != q) if task and "prompt" not in o else (),
    ).check()


def _storage(o) -> dict:
    from hired_batch.job.sources import fsspec_options

    return fsspec_options(S3Options(endpoint=o.get("s3_endpoint")))


def _selection(o) -> SelectionConfig:
    return SelectionConfig(
        selector=o.get("selector", SelectionConfig.selector), mode=o.get("mode", SelectionConfig.mode),
        budget=float(o.get("budget", SelectionConfig.budget)),
        budget_tokens=o.get("budget_tokens"), alpha=float(o.get("alpha", SelectionConfig.alpha)),
        return_indices=bool(o.get("save_indices", SelectionConfig.return_indices)),
    ).check()


def _generation(o, task) -> GenerationConfig:
    default_tokens = task.max_new_tokens if task else GenerationConfig.max_new_tokens
    return GenerationConfig(
        max_new_tokens=int(o.get("max_new_tokens", default_tokens)), temperature=float(o.get("temperature", GenerationConfig.temperature)),
        top_p=float(o.get("top_p", GenerationConfig.top_p)), seed=o.get("seed"),
    ).check()


def _resources(o, gpus_available: bool) -> Resources:
    n = o.get("num_actors")
    lo = int(o.get("min_actors", n or Resources.min_actors))
    hi = int(o.get("max_actors", n or max(lo, 1)))
    return Resources(
        batch_size=parse_batch_size(o.get("batch_size", Resources.batch_size)), min_actors=lo, max_actors=hi,
        memory_limit=o.get("memory_limit"), window=int(o.get("window", Resources.window)),
        gpus_per_actor=float(o.get("gpus_per_actor", 1.0 if gpus_available else 0.0)),
        preprocess_cpus=float(o.get("preprocess_cpus", Resources.preprocess_cpus)),
        generate_cpus=float(o.get("generate_cpus", Resources.generate_cpus)),
        generate_memory=o.get("generate_memory"),
        preprocess_actors=int(o.get("preprocess_actors", Resources.preprocess_actors)),
        rows_per_file=int(o.get("rows_per_file", Resources.rows_per_file)),
    ).check()


def check_model(path: str) -> None:
    """Fail fast on a model that cannot be read (before any Ray work)."""
    from transformers import AutoConfig

    looks_local = path.startswith((".", "/", "~")) or os.path.exists(path)
    if looks_local and not os.path.isdir(os.path.expanduser(path)):
        raise ConfigError(f"model directory {path!r} does not exist")
    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read model {path!r}: {str(e).splitlines()[0]}") from None
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"model {path!r} is {cfg.model_type!r}; expected {' or '.join(SUPPORTED_MODEL_TYPES)}")


# ----------------------------------------------------------------------------- run


def init_ray(o: dict) -> bool:
    """Join RAY_ADDRESS/--address, else start an embedded Ray; True if GPUs exist."""
    import ray

    address = o.get("address") or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            # address="local": a fresh embedded Ray even when a `ray start` cluster
            # runs on this machine (joining one needs --address or RAY_ADDRESS)
            ray.init(address="local", num_cpus=o.get("num_cpus"), num_gpus=o.get("num_gpus"),
                     include_dashboard=False)
    return ray.cluster_resources().get("GPU", 0) > 0


def run_job(job: JobConfig) -> dict:
    """Run the pipeline, then read the output back and summarize it."""
    t0 = time.perf_counter()
    configure_checkpoint(job)
    clear_output(job)
    record_checkpoint(job)
    before = set(existing_outputs(job))  # a resumed run's earlier files
    try:
        write_output(build_pipeline(job), job)
        return summarize(job, time.perf_counter() - t0, before)
    except FileNotFoundError as e:
        # not a user mistake once the job runs: a file vanished under us (the CLI would
        # otherwise report it as a bad path and exit 2)
        raise RuntimeError(f"a file went missing while the job ran: {e}") from e


def summarize(job: JobConfig, seconds: float, earlier_files=frozenset()) -> dict:
    """Rows ok/failed in the whole output, distinct ids, rows this run wrote, the
    generation actors that made them (distinct ``worker`` host:pid values: an actor Ray
    restarted counts again) and its items/s, mean visual tokens kept, where the output
    is (listed afresh)."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from hired_batch.job.sources import pyarrow_fs

    fs, path = pyarrow_fs(job.output, job.s3)
    ds = pads.dataset(path, filesystem=fs, format="parquet")
    t = ds.to_table(columns=["id", "error", "n_visual_tokens_kept"])
    earlier = {e.split("://")[-1] for e in earlier_files}
    mine = [f for f in ds.get_fragments() if f.path.split("://")[-1] not in earlier]
    fresh = sum(f.count_rows() for f in mine)
    actors = {w for f in mine for w in f.to_table(columns=["worker"]).column("worker").to_pylist()} - {None}
    ok = t.filter(t["error"].is_null())
    kept = ok["n_visual_tokens_kept"].to_pylist()
    return dict(rows=t.num_rows, ids=pc.count_distinct(t["id"]).as_py() if t.num_rows else 0,
                ok=ok.num_rows, failed=t.num_rows - ok.num_rows, processed=fresh, actors=len(actors),
                seconds=seconds, items_per_s=fresh / seconds if seconds > 0 else 0.0,
                mean_visual_tokens_kept=(sum(kept) / len(kept)) if kept else 0.0, output=job.output)


def format_summary(s: dict) -> str:
    return (f"rows: {s['rows']} (ok {s['ok']}, failed {s['failed']})  |  "
            f"this run: {s['processed']} rows by {s['actors']} generation actor(s), "
            f"{s['items_per_s']:.2f} items/s over {s['seconds']:.1f} s  |  "
            f"mean visual tokens kept {s['mean_visual_tokens_kept']:.1f}\n"
            f"output: {s['output']}")


def duplicate_rows_error(s: dict) -> str | None:
    """The line to print when the output holds some id more than once (else None)."""
    if s["rows"] == s["ids"]:
        return None
    return (f"output {s['output']} holds {s['rows']} rows but only {s['ids']} distinct ids: "
            f"{s['rows'] - s['ids']} row(s) are duplicates; the output is not exactly once")


def run_main(args: argparse.Namespace) -> int:
    """The ``run`` handler: validate, start/join Ray, run, print the summary.

    Exit codes: 0 done; 1 nothing written, or duplicate ids in the output; 2 a
    configuration mistake (raised as ConfigError, printed by the CLI); 130 interrupted.
    """
    o = merged_options(args)
    try:
        job = job_from_options(o, gpus_available=False)
        preflight(job)  # 1) everything checkable without Ray
        check_model(o.get("model", ModelConfig.path))
        if is_hf_job(job):
            from hired_batch.job.sources import check_hf_input

            check_hf_input(job.inputs[0])
        job = job_from_options(o, gpus_available=init_ray(o))  # 2) GPU default from the cluster
        summary = run_job(job)
    except KeyboardInterrupt:
        print(interrupted_message(o, getattr(args, "command_line", None)), file=sys.stderr)
        return 130
    print(format_summary(summary))
    problem = duplicate_rows_error(summary)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    return 0 if summary["rows"] else 1


def interrupted_message(o: dict, command_line) -> str:
    """One line after Ctrl-C: the exact command that resumes the run (or restarts it)."""
    import shlex

    words = [w for w in (command_line or ["hired-batch", "run", "..."]) if w != "--overwrite"]
    if o.get("checkpoint"):
        if o.get("overwrite") and "--no-overwrite" not in words:
            words.append("--no-overwrite")  # --overwrite came from --config: a resume must keep the files
        return f"interrupted; resume with: {shlex.join(words)}"
    if "--no-overwrite" in words:
        words.remove("--no-overwrite")
    return (f"interrupted; this run had no --checkpoint, so it cannot be resumed: start again with "
            f"{shlex.join(words + ['--overwrite'])} (add --checkpoint DIR to make a run resumable)")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the batch job over a dataset")
    add_run_arguments(p)
    p.set_defaults(func=run_main)
