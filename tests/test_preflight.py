"""Input schemas and --prompt templates are checked before Ray starts (issue 14, items 3-4).

Every case goes through the CLI: exit code 2, one line naming what was expected and
what was found, and Ray never started.
"""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hired_batch.cli import main
from hired_batch.config import ColumnSpec, ConfigError, JobConfig, SelectionConfig
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
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


@pytest.mark.parametrize(
    "column, first, second",
    [
        ("image", pa.array([IMG], pa.binary()), pa.array(["/photos/b.png"], pa.string())),
        ("question", pa.array(["q"], pa.string()), pa.array([7], pa.int64())),
        ("answers", pa.array([["x"]], pa.list_(pa.string())), pa.array(["x"], pa.string())),
    ],
)
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
    from hired_batch.job.preflight import preflight

    shard(
        shards / "shards/a.parquet",
        id=pa.array([1], pa.int64()),
        image=pa.array([IMG], pa.binary()),
        question=pa.array(["q"], pa.string()),
        score=pa.array([1], pa.int32()),
        extra=["ignored"],
    )
    shard(
        shards / "shards/b.parquet",
        id=pa.array(["b"]),
        image=pa.array([IMG], pa.large_binary()),
        question=pa.array(["q"], pa.large_string()),
        score=pa.array([None], pa.null()),
    )
    job = JobConfig(
        inputs=(str(shards / "shards"),), output=str(shards / "out"), columns=ColumnSpec(keep_columns=("score",))
    )
    preflight(job)  # raises on any refusal


# ------------------------------------------------------------------ item 4: --prompt templates


@pytest.fixture()
def one_file(tmp_path):
    shard(tmp_path / "in.parquet", id=["a"], image=[IMG], question=["q"])
    return tmp_path


@pytest.mark.parametrize(
    "prompt, fragment",
    [
        ('{question} Reply as JSON like {"answer": "..."}', 'unknown field(s) {"answer"}; allowed fields: {question}'),
        ("{qestion} Answer briefly.", "unknown field(s) {qestion}; allowed fields: {question}"),
        ("Answer {question", "is not a valid template"),
        ("Answer } briefly", "is not a valid template"),
        ("{} Answer briefly.", "positional field {}"),
        ("{question!r}", "takes no conversion or format spec"),
        ("{question.upper}", "unknown field(s) {question.upper}"),
    ],
)
def test_bad_prompt_templates_are_refused(capsys, one_file, tiny_next, prompt, fragment):
    code, err = run(
        capsys,
        "--input",
        str(one_file / "in.parquet"),
        "--output",
        str(one_file / "out"),
        "--model",
        str(tiny_next),
        "--prompt",
        prompt,
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert fragment in err


def test_question_field_without_a_question_column_is_refused(capsys, one_file, tiny_next):
    code, err = run(
        capsys,
        "--input",
        str(one_file / "in.parquet"),
        "--output",
        str(one_file / "out"),
        "--model",
        str(tiny_next),
        "--question-column",
        "none",
        "--prompt",
        "Describe {question}",
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert "uses {question} but --question-column is none" in err


def rendered_prompt(model, spec: ColumnSpec, question="What is it?") -> str:
    """The text the model gets for one row, through the preprocessing stage."""
    stage = PreprocessStage(str(model), spec.check())
    table = stage(
        {
            "id": np.array(["a"], dtype=object),
            "image": np.array([IMG], dtype=object),
            "question": np.array([question], dtype=object),
        }
    )
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


# ------------------------------------------------------------------ issue 19: ids, question types


@pytest.mark.parametrize("ids", [["a", None, "c", "d"], ["a", None, "None", "d"]])
def test_null_ids_are_refused_naming_file_and_row(capsys, shards, tiny_next, ids):
    """A null id would be written as the text 'None' (and clash with a real 'None')."""
    shard(shards / "shards/a.parquet", id=["x", "y"], image=[IMG] * 2, question=["q"] * 2)
    shard(shards / "shards/b.parquet", id=pa.array(ids, pa.string()), image=[IMG] * 4, question=["q"] * 4)
    code, err = run(capsys, *args(shards, tiny_next))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"id column 'id' is null in {shards / 'shards/b.parquet'} row 1, counting rows from 0" in err
    assert "duplicate" not in err and "a.parquet" not in err


def test_duplicate_id_advice_says_drop_id_column_only_when_it_was_given(capsys, shards, tiny_next):
    shard(shards / "shards/a.parquet", id=["a", "a"], uid=["u", "u"], image=[IMG] * 2, question=["q"] * 2)
    code, err = run(capsys, *args(shards, tiny_next))
    assert code == 2 and "1 duplicate id(s)" in err and "column 'id'" in err
    assert "drop" not in err and "name a column of unique values with --id-column" in err
    code, err = run(capsys, *args(shards, tiny_next, "--id-column", "uid"))
    assert code == 2 and "1 duplicate id(s)" in err and "column 'uid'" in err
    assert "give --id-column a column of unique values, or drop it" in err


def test_id_column_whose_pages_cannot_be_decoded_is_refused_naming_the_file(capsys, shards, tiny_next):
    from support.bad_parquet import garble_row_group

    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(4)], "image": [IMG] * 4, "question": ["q"] * 4}),
        shards / "shards/a.parquet",
        row_group_size=2,
        compression="none",
    )
    garble_row_group(shards / "shards/a.parquet", 1, "id")
    code, err = run(capsys, *args(shards, tiny_next))
    assert code == 2 and len(err.splitlines()) == 1 and err.isprintable(), err
    assert f"id column 'id' of input file {shards / 'shards/a.parquet'} cannot be read: OSError: " in err


@pytest.mark.parametrize(
    "question",
    [
        pa.array([[7]], pa.list_(pa.int64())),  # list<string> is each row's own questions (tests/test_ask.py)
        pa.array([{"text": "what?"}]),
        pa.array([7], pa.int64()),
        pa.array([1.5]),
        pa.array([True]),
    ],
)
def test_question_column_that_can_never_hold_text_is_refused(capsys, shards, tiny_next, question):
    shard(shards / "shards/a.parquet", id=["a"], image=[IMG], asked=question)
    code, err = run(capsys, *args(shards, tiny_next, "--question-column", "asked"))
    assert code == 2 and len(err.splitlines()) == 1, err
    stored = pq.read_schema(shards / "shards/a.parquet").field("asked").type
    assert f"question column 'asked' is {stored} in {shards / 'shards/a.parquet'}; expected text" in err


def test_question_columns_that_hold_text_pass_preflight(shards):
    """string, large_string, UTF-8 binary, a categorical of strings, and all-null (each
    row then says the question is missing) are read as questions."""
    from hired_batch.job.preflight import preflight

    for n, q in enumerate(
        [
            pa.array(["q"], pa.large_string()),
            pa.array([b"q"], pa.binary()),
            pa.array(["q"]).dictionary_encode(),
            pa.array([None], pa.null()),
        ]
    ):
        path = shard(shards / f"shards/{n}.parquet", id=["a"], image=[IMG], question=q)
        preflight(JobConfig(inputs=(str(path),), output=str(shards / "out")))  # raises on a refusal


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_max_failed_fraction_out_of_range_is_refused(capsys, one_file, tiny_next, value):
    code, err = run(
        capsys,
        "--input",
        str(one_file / "in.parquet"),
        "--output",
        str(one_file / "out"),
        "--model",
        str(tiny_next),
        "--max-failed-fraction",
        value,
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert "max_failed_fraction must be a fraction in [0, 1]" in err


def test_budget_tokens_up_to_the_most_an_image_has_is_taken(tiny_next, tiny_llava):
    from hired_batch.job.preflight import check_budget_tokens

    check_budget_tokens(str(tiny_next), SelectionConfig(budget_tokens=2880))  # 1 + 2x2 crops x 576
    check_budget_tokens(str(tiny_next), SelectionConfig(selector="full", budget_tokens=10**6))  # no budget used
    with pytest.raises(ConfigError, match="at most 576 visual tokens \\(1 crop, x 576 patches\\)"):
        check_budget_tokens(str(tiny_llava), SelectionConfig(budget_tokens=577))
