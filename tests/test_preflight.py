"""Input schemas and --prompt templates are checked before Ray starts (issue 14, items 3-4).

Every case goes through the CLI: exit code 2, one line naming what was expected and
what was found, and Ray never started.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hired_batch.cli import main
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
from hired_batch.config import ColumnSpec
from hired_batch.job.stages import PreprocessStage

IMG = image_to_bytes(make_synthetic_image(64, 48, 0))


def run(capsys, *argv):
    import ray

    code = main(["run", *argv])
    err = capsys.readouterr().err.strip()
    assert not ray.is_initialized(), "configuration errors must be found before Ray starts"
    return code, err


def shard(path, **columns):
    pq.write_table(pa.table(columns), path)
    return path


def args(d, model, *extra):
    return ["--input", str(d / "shards"), "--output", str(d / "out"), "--model", str(model), *extra]


@pytest.fixture()
def shards(tmp_path):
    (tmp_path / "shards").mkdir()
    return tmp_path


# ------------------------------------------------------------------ item 3: every file's schema


def test_second_shard_without_a_kept_column_is_refused(capsys, shards, tiny_next):
    shard(shards / "shards/a.parquet", id=["a"], image=[IMG], question=["q"], answers=[["x"]])
    shard(shards / "shards/b.parquet", id=["b"], image=[IMG], question=["q"])
    code, err = run(capsys, *args(shards, tiny_next, "--keep-column", "answers"))
    assert code == 2 and len(err.splitlines()) == 1
    assert "column(s) ['answers'] not found in" in err and "b.parquet" in err and "a.parquet" not in err


def test_id_column_in_some_shards_only_is_refused(capsys, shards, tiny_next):
    shard(shards / "shards/a.parquet", id=["a"], image=[IMG], question=["q"])
    shard(shards / "shards/b.parquet", image=[IMG], question=["q"])
    code, err = run(capsys, *args(shards, tiny_next))
    assert code == 2 and len(err.splitlines()) == 1
    assert "id column 'id'" in err and "a.parquet" in err and "b.parquet" in err


@pytest.mark.parametrize("column, first, second", [
    ("image", pa.array([IMG], pa.binary()), pa.array(["/photos/b.png"], pa.string())),
    ("question", pa.array(["q"], pa.string()), pa.array([7], pa.int64())),
    ("answers", pa.array([["x"]], pa.list_(pa.string())), pa.array(["x"], pa.string())),
])
def test_needed_column_of_different_kinds_is_refused(capsys, shards, tiny_next, column, first, second):
    base = {"id": pa.array(["a"]), "image": pa.array([IMG]), "question": pa.array(["q"]), "answers": pa.array([["x"]])}
    shard(shards / "shards/a.parquet", **{**base, column: first})
    shard(shards / "shards/b.parquet", **{**base, "id": pa.array(["b"]), column: second})
    code, err = run(capsys, *args(shards, tiny_next, "--keep-column", "answers"))
    assert code == 2 and len(err.splitlines()) == 1
    read = [pq.read_schema(shards / f"shards/{n}.parquet").field(column).type for n in "ab"]  # as stored
    assert f"column {column!r} is {read[0]} in" in err and f"but {read[1]} in" in err
    assert "a.parquet" in err and "b.parquet" in err


def test_duplicate_ids_across_shards_of_int_and_string_ids(capsys, shards, tiny_next):
    """ids are read as text, so 1 in one shard and '1' in another are the same id."""
    shard(shards / "shards/a.parquet", id=pa.array([1, 2], pa.int64()), image=[IMG, IMG], question=["q", "q"])
    shard(shards / "shards/b.parquet", id=pa.array(["1"]), image=[IMG], question=["q"])
    code, err = run(capsys, *args(shards, tiny_next))
    assert code == 2 and "1 duplicate id(s) in 2 input file(s)" in err and "'1'" in err


def test_schemas_that_differ_only_in_width_or_extra_columns_pass_preflight(shards):
    """string/large_string, int32/int64, int/string ids, extra and all-null columns are read alike."""
    from hired_batch.config import JobConfig
    from hired_batch.job.preflight import preflight

    shard(shards / "shards/a.parquet", id=pa.array([1], pa.int64()), image=pa.array([IMG], pa.binary()),
          question=pa.array(["q"], pa.string()), score=pa.array([1], pa.int32()), extra=["ignored"])
    shard(shards / "shards/b.parquet", id=pa.array(["b"]), image=pa.array([IMG], pa.large_binary()),
          question=pa.array(["q"], pa.large_string()), score=pa.array([None], pa.null()))
    job = JobConfig(inputs=(str(shards / "shards"),), output=str(shards / "out"),
                    columns=ColumnSpec(keep_columns=("score",)))
    preflight(job)  # raises on any refusal


# ------------------------------------------------------------------ item 4: --prompt templates


@pytest.fixture()
def one_file(tmp_path):
    shard(tmp_path / "in.parquet", id=["a"], image=[IMG], question=["q"])
    return tmp_path


@pytest.mark.parametrize("prompt, fragment", [
    ('{question} Reply as JSON like {"answer": "..."}', "unknown field(s) {\"answer\"}; allowed fields: {question}"),
    ("{qestion} Answer briefly.", "unknown field(s) {qestion}; allowed fields: {question}"),
    ("Answer {question", "is not a valid template"),
    ("Answer } briefly", "is not a valid template"),
    ("{} Answer briefly.", "positional field {}"),
    ("{question!r}", "takes no conversion or format spec"),
    ("{question.upper}", "unknown field(s) {question.upper}"),
])
def test_bad_prompt_templates_are_refused(capsys, one_file, tiny_next, prompt, fragment):
    code, err = run(capsys, "--input", str(one_file / "in.parquet"), "--output", str(one_file / "out"),
                    "--model", str(tiny_next), "--prompt", prompt)
    assert code == 2 and len(err.splitlines()) == 1
    assert fragment in err


def test_question_field_without_a_question_column_is_refused(capsys, one_file, tiny_next):
    code, err = run(capsys, "--input", str(one_file / "in.parquet"), "--output", str(one_file / "out"),
                    "--model", str(tiny_next), "--question-column", "none", "--prompt", "Describe {question}")
    assert code == 2 and len(err.splitlines()) == 1
    assert "uses {question} but --question-column is none" in err


def rendered_prompt(model, spec: ColumnSpec, question="What is it?") -> str:
    """The text the model gets for one row, through the preprocessing stage."""
    stage = PreprocessStage(str(model), spec.check())
    table = stage({"id": np.array(["a"], dtype=object), "image": np.array([IMG], dtype=object),
                   "question": np.array([question], dtype=object)})
    assert table.column("error")[0].as_py() is None
    ids = np.frombuffer(table.column("input_ids")[0].as_py(), dtype=np.int64)
    return stage.pre.tokenizer.decode(ids)


def test_literal_braces_are_rendered_single(tiny_next):
    text = rendered_prompt(tiny_next, ColumnSpec(prompt='{question} Reply as JSON like {{"answer": "..."}}'))
    assert 'What is it? Reply as JSON like {"answer": "..."}' in text
    fixed = rendered_prompt(tiny_next, ColumnSpec(prompt="Answer in {{literal}} braces."))
    assert "What is it?\nAnswer in {literal} braces." in fixed
    caption = rendered_prompt(tiny_next, ColumnSpec(question_column=None, prompt="Describe it as {{json}}."))
    assert "Describe it as {json}." in caption and "What is it?" not in caption


def test_budget_tokens_up_to_the_most_an_image_has_is_taken(tiny_next, tiny_llava):
    from hired_batch.config import ConfigError, SelectionConfig
    from hired_batch.job.preflight import check_budget_tokens

    check_budget_tokens(str(tiny_next), SelectionConfig(budget_tokens=2880))  # 1 + 2x2 crops x 576
    check_budget_tokens(str(tiny_next), SelectionConfig(selector="full", budget_tokens=10**6))  # no budget used
    with pytest.raises(ConfigError, match="at most 576 visual tokens \\(1 crop, x 576 patches\\)"):
        check_budget_tokens(str(tiny_llava), SelectionConfig(budget_tokens=577))
