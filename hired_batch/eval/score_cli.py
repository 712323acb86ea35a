"""The ``score`` subcommand: score a finished job's output Parquet for a task preset.

``hired-batch score OUTPUT --task NAME [--json PATH] [--s3-endpoint URL]`` reads the
output (a Parquet file or directory, local or ``s3://``), scores it with
``hired_batch.eval.score.score_output``, prints ``format_score``'s report and, with
``--json``, writes the result dict as JSON.

S3 credentials come from the usual AWS environment (``AWS_ACCESS_KEY_ID``, ...);
``--s3-endpoint`` points at an S3-compatible server (MinIO, moto, a private
endpoint). This module does no scoring of its own and imports neither torch nor Ray.
"""

from __future__ import annotations

import json
import pathlib

from hired_batch.config import ConfigError


def output_filesystem(path: str, endpoint: str | None):
    """(filesystem, path) for pyarrow: s3:// goes through ``sources.pyarrow_fs``, the one
    S3 client every command uses (s3fs: ``--s3-endpoint``, else ``AWS_ENDPOINT_URL_S3``,
    and the job's retry policy), so ``score`` reads wherever ``run`` wrote.
    Other paths are returned as they are, for pyarrow to resolve.
    """
    if endpoint is not None and not path.startswith("s3://"):
        raise ConfigError(f"--s3-endpoint expects an s3:// OUTPUT, got {path!r}")
    if not path.startswith("s3://"):
        return None, path
    from hired_batch.config import S3Options
    from hired_batch.job.sources import pyarrow_fs

    return pyarrow_fs(path, S3Options(endpoint=endpoint))


def _run(args) -> int:
    from hired_batch.bench.workload import json_safe
    from hired_batch.eval.score import format_score, score_output

    filesystem, path = output_filesystem(args.output, args.s3_endpoint)
    if filesystem is None and "://" not in path and not pathlib.Path(path).exists():
        raise FileNotFoundError(f"no job output at {path!r} (expected a Parquet file or directory)")
    result = score_output(path, args.task, filesystem=filesystem)
    print(format_score(result))
    if args.json:
        out = pathlib.Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(json_safe(result), indent=2, allow_nan=False) + "\n")
        print(f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    """Register ``hired-batch score``."""
    from hired_batch.job.tasks import TASKS  # light: no torch, no Ray

    p = sub.add_parser("score", help="score a job's output Parquet against a task's ground truth",
                       description="Score a finished job's output for a benchmark task preset.")
    p.add_argument("output", help="job output: Parquet file or directory, local or s3://")
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="task preset")
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON here")
    p.add_argument("--s3-endpoint", metavar="URL",
                   help="S3-compatible endpoint, e.g. http://127.0.0.1:9000 (credentials from AWS_* env)")
    p.set_defaults(func=_run)
