"""``hired-batch score`` end to end through ``cli.main`` on small Parquet outputs."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hired_batch.cli import main

REFS = ["stop"] * 10


def _textvqa_output(path):
    """4 rows: right, wrong, wrong, error -> 25 %."""
    pq.write_table(
        pa.table(
            {
                "id": [1, 2, 3, 4],
                "answer": ["STOP.", "go", "yield", None],
                "error": [None, None, None, "image: truncated file"],
                "gt_answers": [REFS] * 4,
            }
        ),
        path,
    )
    return str(path)


def test_score_prints_report_and_writes_json(tmp_path, capsys):
    out = _textvqa_output(tmp_path / "out.parquet")
    js = tmp_path / "reports" / "textvqa.json"
    assert main(["score", out, "--task", "textvqa", "--json", str(js)]) == 0
    printed = capsys.readouterr().out
    assert "task       textvqa (metric: vqa_accuracy)" in printed
    assert "score      25.00 %" in printed
    assert "rows       4 (3 scored, 1 errors counted as wrong)" in printed
    assert "paper      LLaVA-NeXT-7B full 64.8, HiRED-20% 61.4" in printed
    assert json.loads(js.read_text()) == {
        "task": "textvqa",
        "metric": "vqa_accuracy",
        "score": 25.0,
        "unit": "%",
        "n_rows": 4,
        "n_scored": 3,
        "n_errors": 1,
    }


def test_score_pope_json_has_details_and_categories(tmp_path, capsys):
    path = tmp_path / "out"
    path.mkdir()  # a directory of parts, as Ray Data writes it
    rows = {
        "id": ["0", "1", "2", "3"],
        "answer": ["Yes", "No", "yes", "no"],
        "error": [None] * 4,
        "gt_answer": ["yes", "no", "no", "yes"],
        "gt_category": ["random", "random", "popular", "popular"],
    }
    table = pa.table(rows)
    pq.write_table(table.slice(0, 2), path / "part-0.parquet")
    pq.write_table(table.slice(2), path / "part-1.parquet")
    js = tmp_path / "pope.json"
    assert main(["score", str(path), "--task", "pope", "--json", str(js)]) == 0
    assert "score      50.00 % (F1)" in capsys.readouterr().out
    result = json.loads(js.read_text())
    assert result["n_rows"] == 4 and result["score"] == pytest.approx(50.0)
    assert result["details"]["accuracy"] == pytest.approx(50.0)
    assert result["per_category"] == {"popular": 0.0, "random": 100.0}


def test_score_missing_columns_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "out.parquet"
    pq.write_table(pa.table({"id": [1], "answer": ["x"], "error": [None]}), path)
    assert main(["score", str(path), "--task", "textvqa"]) == 2
    err = capsys.readouterr().err
    assert "hired-batch score: error:" in err and "gt_answers" in err


def test_one_answer_per_row_is_refused_not_scored_zero(tmp_path, capsys):
    """Perfect answers against one reference each would score 0 % under vqa_accuracy."""
    path = tmp_path / "out.parquet"
    pq.write_table(
        pa.table(
            {
                "id": ["a", "b", "c"],
                "answer": ["stop", "go", "cat"],
                "error": [None] * 3,
                "gt_answers": ["stop", "go", "cat"],
            }
        ),
        path,
    )
    js = tmp_path / "score.json"
    assert main(["score", str(path), "--task", "textvqa", "--json", str(js)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("hired-batch score: error: task 'textvqa': vqa_accuracy")
    assert "expects a list of 10 human answers" in err and "column 'answers'" in err
    assert "found a single string 'stop' in row id='a' (3 of 3 rows do not fit)" in err
    assert "score" not in captured.out and not js.exists()


def test_score_missing_output_and_unknown_task(tmp_path, capsys):
    assert main(["score", str(tmp_path / "nope.parquet"), "--task", "textvqa"]) == 2
    assert "no job output" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["score", str(tmp_path), "--task", "nope"])
    assert exc.value.code == 2
    assert "textvqa" in capsys.readouterr().err  # argparse lists the known tasks


@pytest.mark.slow
@pytest.mark.parametrize("endpoint_from", ["flag", "AWS_ENDPOINT_URL_S3"])
def test_score_reads_s3_with_custom_endpoint(tmp_path, capsys, monkeypatch, endpoint_from):
    """score reaches S3 the way run does: --s3-endpoint, or AWS_ENDPOINT_URL_S3 alone."""
    pytest.importorskip("moto.server")
    from support.moto_output import output_on_s3

    with output_on_s3(monkeypatch, _textvqa_output(tmp_path / "out.parquet")) as endpoint:
        if endpoint_from == "flag":
            code = main(["score", "s3://jobs/run1", "--task", "textvqa", "--s3-endpoint", endpoint])
        else:
            monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
            code = main(["score", "s3://jobs/run1", "--task", "textvqa"])
    assert code == 0
    assert "score      25.00 %" in capsys.readouterr().out


def test_score_s3_filesystem_is_the_jobs_s3fs_client_with_its_retry_policy(monkeypatch):
    import s3fs

    from hired_batch.job.sources import S3_BOTOCORE_RETRIES, output_filesystem

    fs, path = output_filesystem("s3://jobs/run1", "http://127.0.0.1:9")
    assert path == "jobs/run1"
    inner = fs.handler.fs
    assert isinstance(inner, s3fs.S3FileSystem)
    assert inner.client_kwargs["endpoint_url"] == "http://127.0.0.1:9"
    assert inner.config_kwargs["retries"] == S3_BOTOCORE_RETRIES
