"""The ``score`` subcommand: score a finished job's output Parquet for a task preset.

``hired-batch score OUTPUT --task NAME [--json PATH] [--s3-endpoint URL]`` reads the
output (a Parquet file or directory, local or ``s3://``), scores it with
``hired_batch.eval.score.score_output``, prints ``format_score``'s report and, with
``--json``, writes the result dict as JSON. ``--truth-column NAME --metric M`` instead
scores against any kept column of the user's (``score.score_truth``, what ``calibrate``
uses).

S3 credentials come from the usual AWS environment (``AWS_ACCESS_KEY_ID``, ...);
``--s3-endpoint`` points at an S3-compatible server (MinIO, moto, a private
endpoint). This module does no scoring of its own and imports neither torch nor Ray.
"""

from __future__ import annotations

import pathlib


def _run(args) -> int:
    _check_choice(args)
    from hired_batch.eval.score import format_score, format_truth_score, score_output, score_truth
    from hired_batch.job.sources import output_filesystem
    from hired_batch.jsonio import write_json

    filesystem, path = output_filesystem(args.output, args.s3_endpoint)
    if filesystem is None and "://" not in path and not pathlib.Path(path).exists():
        raise FileNotFoundError(f"no job output at {path!r} (expected a Parquet file or directory)")
    if args.task:
        result = score_output(path, args.task, filesystem=filesystem)
        print(format_score(result))
    else:
        result = score_truth(path, args.truth_column, args.metric, filesystem=filesystem)
        print(format_truth_score(result))
    if args.json:
        print(f"wrote {write_json(args.json, result, indent=2)}")
    return 0


def _check_choice(args) -> None:
    """Exactly one of --task and --truth-column (with --metric); ConfigError otherwise."""
    from hired_batch.config import ConfigError
    from hired_batch.eval.score import check_truth_metric

    if bool(args.task) == bool(args.truth_column):
        raise ConfigError("give either --task NAME (a benchmark preset) or --truth-column NAME with --metric")
    if args.truth_column:
        if not args.metric:
            raise ConfigError("--truth-column needs --metric (exact, vqa, anls, relaxed or choice)")
        check_truth_metric(args.metric)
    elif args.metric:
        raise ConfigError("--metric goes with --truth-column; a --task preset has its own metric")


def add_parser(sub) -> None:
    """Register ``hired-batch score``."""
    from hired_batch.job.tasks import TASKS  # light: no torch, no Ray

    p = sub.add_parser(
        "score",
        help="score a job's output Parquet against a task's ground truth",
        description="Score a finished job's output for a benchmark task preset, or against your own "
        "labels (--truth-column NAME --metric M).",
    )
    p.add_argument("output", help="job output: Parquet file or directory, local or s3://")
    from hired_batch.eval.score import TRUTH_METRICS

    p.add_argument("--task", choices=sorted(TASKS), help="task preset (or --truth-column with --metric)")
    p.add_argument("--truth-column", metavar="NAME", help="your own labels: the output's kept column to score against")
    p.add_argument(
        "--metric",
        metavar="{" + ",".join(TRUTH_METRICS) + "}",
        help="with --truth-column: " + "; ".join(f"{k}: {v[1]}" for k, v in TRUTH_METRICS.items()),
    )
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    p.add_argument(
        "--s3-endpoint",
        metavar="URL",
        help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (credentials from AWS_* env)",
    )
    p.set_defaults(func=_run)
