"""The job as a library: ``job_from_options`` (what flags and YAML go through) and
``run_job`` from plain Python, as docs/python.md's "The job in Python" shows."""

import argparse
import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hired_batch.config import (
    ColumnSpec,
    ConfigError,
    DecodeLimits,
    GenerationConfig,
    JobConfig,
    ModelConfig,
    Resources,
    S3Options,
    SelectionConfig,
)
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
from hired_batch.job import JobSummary, job_from_options, run_job, runner
from hired_batch.job import options as job_options

MINIMAL = {"input": "in.parquet", "output": "out"}


def test_left_out_options_keep_the_dataclass_defaults():
    job = job_from_options(MINIMAL)
    assert job.inputs == ("in.parquet",) and job.output == "out"
    assert (job.model, job.selection, job.generation, job.resources, job.limits, job.s3) == (
        ModelConfig(),
        SelectionConfig(),
        GenerationConfig(),
        Resources(),
        DecodeLimits(),
        S3Options(),
    )
    assert dataclasses.replace(job.columns, storage_options={}) == ColumnSpec()
    assert (job.checkpoint, job.overwrite) == (JobConfig.checkpoint, JobConfig.overwrite)


def test_options_set_their_fields():
    job = job_from_options(
        {
            **MINIMAL,
            "input": ["a.parquet", "b.parquet"],
            "budget": 1,
            "save_indices": True,
            "model": "/m",
            "seed": 7,
            "s3_endpoint": "http://127.0.0.1:9000",
            "keep_column": "gt",
            "question_column": "none",
            "prompt": "Describe it.",
            "batch_size": "auto",
            "num_actors": 3,
        }
    )
    assert job.inputs == ("a.parquet", "b.parquet")
    assert job.selection.budget == 1.0 and isinstance(job.selection.budget, float) and job.selection.save_indices
    assert job.model.path == "/m" and job.generation.seed == 7 and job.selection.seed == SelectionConfig.seed
    assert job.s3.endpoint == "http://127.0.0.1:9000"
    assert job.columns.storage_options["client_kwargs"]["endpoint_url"] == "http://127.0.0.1:9000"
    assert job.columns.keep_columns == ("gt",) and job.columns.question_column is None
    assert job.resources.batch_size == "auto" and job.resources.min_actors == job.resources.max_actors == 3
    assert job_from_options({**MINIMAL, "min_actors": 2}).resources.max_actors == 2  # the upper bound follows


def test_a_task_preset_fills_what_was_not_given():
    from hired_batch.job.tasks import get_task

    task = get_task("scienceqa_img")
    job = job_from_options({**MINIMAL, "task": task.name})
    assert job.columns.question_column == task.question_column and job.columns.task == task.name
    assert job.generation.max_new_tokens == task.max_new_tokens
    assert set(task.kept_columns) <= set(job.columns.keep_columns)
    assert job_from_options({**MINIMAL, "task": task.name, "max_new_tokens": 3}).generation.max_new_tokens == 3


@pytest.mark.parametrize(
    "options, fragments",
    [
        ({"budgett": 0.2}, ["unknown option(s) ['budgett']", "budget"]),
        ({"budget": "half"}, ["option 'budget'", "expects float", "'half' (str)"]),
        ({"max_new_tokens": True}, ["option 'max_new_tokens'", "expects int", "True (bool)"]),
        ({"max_new_tokens": 2.5}, ["option 'max_new_tokens'", "expects int", "2.5 (float)"]),
        ({"input": ["a", 3]}, ["option 'input'", "a string or a list of strings"]),
        ({"overwrite": "yes"}, ["option 'overwrite'", "expects bool", "'yes' (str)"]),
        ({"budget": 1.5}, ["budget must be a fraction in (0, 1]"]),
        ({"output": None}, ["--input and --output are required"]),
    ],
)
def test_bad_options_are_refused_naming_the_option(options, fragments):
    with pytest.raises(ConfigError) as e:
        job_from_options({**MINIMAL, **options})
    assert all(f in str(e.value) for f in fragments), str(e.value)


def test_every_run_flag_is_an_option_and_every_option_a_flag_and_a_field():
    p = argparse.ArgumentParser()
    runner.add_run_arguments(p)
    flags = {a.dest for a in p._actions} - {"help"} - set(runner.NOT_OPTIONS) - set(runner.RAY_OPTIONS)
    assert flags == set(job_options.known_options())
    for opt in job_options.field_options():
        cls = type(getattr(JobConfig(), opt.part)) if opt.part else JobConfig
        assert opt.field in {f.name for f in dataclasses.fields(cls)}, opt


@pytest.fixture
def no_ray():
    """run_job starts its own embedded Ray here; it is stopped afterwards."""
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


@pytest.mark.slow
def test_run_job_from_python_writes_every_row_once(tiny_next, tmp_path, no_ray):
    ids = [f"r{i}" for i in range(5)]
    sizes = [(336, 336), (672, 336), (500, 300), (300, 800), (640, 480)]
    pq.write_table(
        pa.table(
            {
                "id": ids,
                "image": (
                    files := [image_to_bytes(make_synthetic_image(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
                ),
                "question": ["What is it?"] * 5,
            }
        ),
        tmp_path / "in.parquet",
    )
    job = job_from_options(
        {
            "input": str(tmp_path / "in.parquet"),
            "output": str(tmp_path / "out"),
            "model": str(tiny_next),
            "max_new_tokens": 2,
            "batch_size": 4,
        }
    )
    s = run_job(job, num_cpus=2, num_gpus=0)
    assert isinstance(s, JobSummary)
    assert (s.rows, s.ids, s.ok, s.failed, s.processed, s.actors) == (5, 5, 5, 0, 5, 1)
    assert s.output == str(tmp_path / "out") and s.seconds > 0 and s.mean_visual_tokens_kept > 0
    assert s.duplicates_error is None and s.format().startswith("rows: 5 (ok 5, failed 0)")
    assert sorted(pq.read_table(tmp_path / "out", columns=["id"]).column("id").to_pylist()) == ids
    # per item through the object store: at most 1.2x the encoded image plus prompt ids, as the summary says
    out = pq.read_table(tmp_path / "out", columns=["id", "handoff_bytes"]).to_pylist()
    for r in out:
        assert 0 < r["handoff_bytes"] <= 1.2 * len(files[ids.index(r["id"])]) + 8 * 200  # ids: < 200 tokens
    assert s.handoff_bytes_per_item == pytest.approx(sum(r["handoff_bytes"] for r in out) / 5)
    assert f"object store {s.handoff_bytes_per_item / 1e6:.3f} MB per item" in s.format()
    with pytest.raises(ConfigError, match="already holds"):  # checked before anything runs: no second copy
        run_job(job)
