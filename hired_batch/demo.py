"""``hired-batch demo``: the whole pipeline on a tiny checkpoint and synthetic data.

Builds the tiny random-weight checkpoint and a small image/question Parquet set of
mixed sizes, runs the job on an embedded local Ray and prints the summary. Answers
are gibberish (random weights); everything else is the real path.
"""

from __future__ import annotations

import os
import tempfile

SIZES = [(336, 336), (672, 336), (500, 300), (1000, 1000), (300, 800), (640, 480)]  # (w, h)
QUESTIONS = ["What is in the picture?", "How many shapes are there?", "What color is the largest shape?",
             "Is there a circle?", "Describe the image.", "Where is the square?"]


def write_demo_parquet(path: str, n_rows: int = 24) -> str:
    """A Parquet file of synthetic PNG images and questions; returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hired_batch.data import image_to_bytes, make_synthetic_image

    rows = [dict(id=f"demo-{i:04d}",
                 image=image_to_bytes(make_synthetic_image(*SIZES[i % len(SIZES)], seed=i)),
                 question=QUESTIONS[i % len(QUESTIONS)]) for i in range(n_rows)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def demo_main(args) -> int:
    from hired_batch import runner
    from hired_batch.tiny import build_tiny_checkpoint

    work = args.workdir or tempfile.mkdtemp(prefix="hired_batch_demo_")
    model = build_tiny_checkpoint(os.path.join(work, "tiny-llava-next"), "llava_next")
    data = write_demo_parquet(os.path.join(work, "input", "demo.parquet"), args.rows)
    print(f"tiny checkpoint: {model}\ninput: {data} ({args.rows} rows)")
    argv = ["--input", data, "--output", os.path.join(work, "output"), "--model", str(model),
            "--budget", str(args.budget), "--max-new-tokens", "8", "--batch-size", "8",
            "--num-cpus", "2", "--num-gpus", "0"]
    parser = runner.argparse.ArgumentParser()
    runner.add_run_arguments(parser)
    code = runner.run_main(parser.parse_args(argv))
    print(f"look at the answers: python -c \"import pyarrow.parquet as pq; "
          f"print(pq.read_table('{os.path.join(work, 'output')}').to_pandas().head())\"")
    return code


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a tiny model and synthetic data")
    p.add_argument("--workdir", help="where to write the checkpoint, data and output (default: a temp dir)")
    p.add_argument("--rows", type=int, default=24, help="synthetic rows")
    p.add_argument("--budget", type=float, default=0.2, help="HiRED budget")
    p.set_defaults(func=demo_main)
