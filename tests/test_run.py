"""What a finished run reports (``job/run.py``'s ``JobSummary``, printed by ``runner.print_summary``):
a run ends with exit 1 when every row failed or more than ``--max-failed-fraction`` of
them, or when input row groups could not be read (issue 19, items 3 and 9)."""

import dataclasses

import pytest

from hired_batch.config import FailurePolicy, JobConfig, S3Options
from hired_batch.job.run import JobSummary, summarize
from hired_batch.job.runner import job_options, merged_options, print_summary

DONE = JobSummary(
    rows=10,
    ids=10,
    ok=10,
    failed=0,
    processed=10,
    actors=1,
    seconds=1.0,
    items_per_s=10.0,
    mean_visual_tokens_kept=100.0,
    output="out",
)
UNREADABLE = (
    {"file": "in/b.parquet", "row_group": 1, "rows": 2, "rows_read": 0, "error": "OSError: bad page"},
    {"file": "in/b.parquet", "row_group": 3, "rows": 4, "rows_read": 1, "error": "OSError: bad page"},
)


def failing(failed: int, **more) -> JobSummary:
    return dataclasses.replace(
        DONE, ok=DONE.rows - failed, failed=failed, top_error="image: cannot decode", top_error_rows=failed, **more
    )


def test_every_row_failed_exits_1_by_default_with_the_most_common_error(capsys):
    assert print_summary(failing(10)) == 1
    err = capsys.readouterr().err.strip()
    assert err == "error: every row failed; most common error (10 row(s)): image: cannot decode"
    assert print_summary(failing(9)) == 0  # the default 1.0: only when every row failed
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("fraction, failed, code", [(0.0, 1, 1), (0.0, 0, 0), (0.5, 5, 0), (0.5, 6, 1)])
def test_more_than_max_failed_fraction_exits_1(capsys, fraction, failed, code):
    assert print_summary(failing(failed), FailurePolicy(max_failed_fraction=fraction)) == code
    err = capsys.readouterr().err.strip()
    if code:
        assert err == (
            f"error: {failed} of 10 rows failed, more than --max-failed-fraction {fraction:g}; "
            f"most common error ({failed} row(s)): image: cannot decode"
        )
    else:
        assert err == ""


def test_unreadable_row_groups_exit_1_naming_them_with_the_resume_command(capsys):
    summary = dataclasses.replace(DONE, unreadable=UNREADABLE)
    assert summary.lost == 6
    assert print_summary(summary, resume="resume with: hired-batch run --checkpoint ck") == 1
    out, err = capsys.readouterr()
    assert "lost 6 in unreadable input" in out
    assert err.strip() == (
        "error: 6 input row(s) could not be read: in/b.parquet row group(s) 1, 3 "
        "(OSError: bad page); "
        "every other row is written: fix or remove the file; resume with: hired-batch run "
        "--checkpoint ck"
    )
    assert print_summary(summary, FailurePolicy(skip_unreadable=True)) == 1  # counted as lost, still a failure
    assert capsys.readouterr().err.startswith(
        "error: 6 input row(s) could not be read and were skipped (--skip-unreadable): in/b.parquet row group(s) 1, 3"
    )


def test_a_run_that_wrote_nothing_because_its_input_was_unreadable_is_summarized(tmp_path):
    from hired_batch.job.sources import record_unreadable

    out = str(tmp_path / "out")
    record_unreadable(out, S3Options(), dict(UNREADABLE[0]))
    summary = summarize(JobConfig(inputs=("in",), output=out), 1.0)
    assert (summary.rows, summary.lost, summary.unreadable) == (0, 2, (UNREADABLE[0],))
    assert print_summary(summary) == 1


def test_failure_flags_set_the_failure_policy():
    from hired_batch.cli import build_parser
    from hired_batch.job.options import job_from_options

    args = build_parser().parse_args(
        ["run", "--input", "in", "--output", "out", "--skip-unreadable", "--max-failed-fraction", "0.25"]
    )
    assert job_from_options(job_options(merged_options(args))).failures == FailurePolicy(0.25, True)
    assert job_from_options({"input": "in", "output": "out"}).failures == FailurePolicy()


def test_the_summary_says_the_bytes_per_item_through_the_object_store_when_recorded():
    assert "object store" not in DONE.format()  # an output written before the column existed
    line = dataclasses.replace(DONE, handoff_bytes_per_item=254_321.0).format().splitlines()[0]
    assert line.endswith("|  object store 0.254 MB per item (preprocessing -> generation)")
