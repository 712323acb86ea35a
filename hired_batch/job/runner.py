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

from hired_batch.config import ConfigError, FailurePolicy
from hired_batch.job.engine_health import EngineFailed
from hired_batch.job.options import OTHER_OPTIONS, RAY_GROUP, Option, job_from_options, run_options
from hired_batch.job.output import OutputWriteError
from hired_batch.job.run import JobSummary, run_job

# ----------------------------------------------------------------------------- flags


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``run`` (shared by jobs/batch_qa.py), one per ``options.run_options()``,
    generated from the config fields' metadata. Defaults are None so YAML can fill them."""
    groups = {}
    for opt in run_options():
        if opt.group not in groups:
            groups[opt.group] = p.add_argument_group(opt.group)
        groups[opt.group].add_argument(opt.flag, **flag_arguments(opt))


def flag_arguments(opt: Option) -> dict:
    """``add_argument`` keywords for one option."""
    kw = {"help": opt.help_line().replace("%", "%%"), "default": None}  # argparse %-formats help
    if opt.kind == "switch":
        return {**kw, "action": "store_true"}
    if opt.kind == "negatable":
        return {**kw, "action": argparse.BooleanOptionalAction}
    if opt.kind == "append":
        return {**kw, "action": "append"}
    if "choices" in opt.meta:
        # metavar, not choices: check() refuses a bad value in one line; argparse would dump the usage
        kw["metavar"] = "{" + ",".join(opt.meta["choices"]) + "}"
    return {**kw, "type": opt.type} if opt.type else kw


NOT_OPTIONS = ("func", "command", "config", "command_line")  # Namespace entries that are not options
RAY_OPTIONS = tuple(o.name for o in OTHER_OPTIONS if o.group == RAY_GROUP)  # run_job's arguments, not the job's


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
                raise ConfigError(
                    f"--config {args.config} is not valid YAML{where}: "
                    f"{getattr(e, 'problem', None) or type(e).__name__}"
                ) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--config {args.config} must hold a mapping of options, got {type(loaded).__name__}")
        keys = {k: str(k).replace("-", "_") for k in loaded}
        twice = sorted(k for k in loaded if list(keys.values()).count(keys[k]) > 1)
        if twice:
            raise ConfigError(f"--config {args.config} sets one option under two spellings: {twice}")
        opts = {keys[k]: v for k, v in loaded.items()}
        unknown = sorted(k for k in loaded if keys[k] not in vars(args))
        if unknown:
            raise ConfigError(
                f"unknown option(s) {unknown} in {args.config}; the keys are the flag names "
                "without the leading dashes (e.g. max-new-tokens)"
            )
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
    problems = [
        summary.duplicates_error,
        summary.failed_error(failures.max_failed_fraction),
        f"{unreadable}; {resume}" if unreadable and resume else unreadable,
    ]
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
    return (
        f"{what}; this run had no --checkpoint, so it cannot be resumed: start again with "
        f"{shlex.join(words + ['--overwrite'])} (add --checkpoint DIR to make a run resumable)"
    )


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="run the batch job over a dataset")
    add_run_arguments(p)
    p.set_defaults(func=run_main)
