"""Constrained answers (``--json-schema``, ``--choice``, ``--regex``) on the HF engine: the
tiny random-weight model answers validly because xgrammar masks its logits; an answer the
token limit cuts is an error row; per-row constraints; each mistake fails fast (one line,
exit 2, before Ray). The same answers on vLLM: tests_vllm/test_constraints.py."""

import json
import re

import jsonschema
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.cli import run_before_ray
from support.images import noise_images

from hired_batch.bench import constraint_cost
from hired_batch.config import ConfigError, GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine import constraints
from hired_batch.engine.generation_rules import row_generation, sampling_kwargs
from hired_batch.engine.hf import HiredEngine
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
from hired_batch.engine.weights import load_llava
from hired_batch.job.answer_struct import arrow_type
from hired_batch.job.stages import OUTPUT_FIELDS, ColumnSpec, GenerateStage, PreprocessStage

SIZES = [(336, 336), (300, 800), (500, 300), (200, 200)]
QUESTIONS = ["Describe the scene as JSON.", "Indoor or outdoor?", "How many?", "What is this?"]
SCHEMA = {  # the bench's record (a nested object, an enum, integers, a boolean, an array) and a bounded free string
    **constraint_cost.SCHEMA,
    "properties": {**constraint_cost.SCHEMA["properties"], "note": {"type": "string", "maxLength": 6}},
    "required": [*constraint_cost.SCHEMA["required"], "note"],
}
LABELS = ("indoor", "outdoor", "not sure")
PATTERN = r"[0-9]{1,3} (cats|dogs)"


@pytest.fixture(scope="module")
def loaded(tiny_next):
    return load_llava(ModelConfig(path=str(tiny_next)))


def answers(loaded, selection=SelectionConfig(), **gen):
    model, proc = loaded
    eng = HiredEngine(model, proc, selection, GenerationConfig(**gen))
    return eng.generate(noise_images(SIZES), QUESTIONS).items


def ok(items):
    return [i["answer"] for i in items if i.get("error") is None]


# --------------------------------------------------------------------------- the HF engine


def test_every_json_answer_is_valid_against_the_schema(loaded):
    items = answers(loaded, max_new_tokens=160, json_schema=json.dumps(SCHEMA))
    assert len(ok(items)) == len(SIZES), [i.get("error") for i in items]
    for a in ok(items):
        jsonschema.validate(json.loads(a), SCHEMA)
    assert len(set(ok(items))) > 1  # the images still matter: not one forced answer


def test_every_choice_answer_is_a_label_and_every_regex_answer_matches(loaded):
    labels = ok(answers(loaded, max_new_tokens=12, choices=LABELS))
    assert len(labels) == len(SIZES) and set(labels) <= set(LABELS)
    matched = ok(answers(loaded, max_new_tokens=16, regex=PATTERN))
    assert len(matched) == len(SIZES) and all(re.fullmatch(PATTERN, a) for a in matched)
    free = ok(answers(loaded, max_new_tokens=12))
    assert not set(free) <= set(LABELS)  # unconstrained, the random model says anything


def test_an_answer_the_token_limit_cuts_is_an_error_row(loaded):
    """4 tokens never close the schema's object: every row is the same error, no answer;
    a label set long enough for the limit is whole."""
    items = answers(loaded, max_new_tokens=4, json_schema=json.dumps(SCHEMA))
    assert {(i["answer"], i["error"]) for i in items} == {(None, constraints.cut_error(4))}
    assert constraints.cut_error(4).startswith("answer: cut at max_new_tokens (4)")
    assert len(ok(answers(loaded, max_new_tokens=4, choices=("yes", "no")))) == len(SIZES)


def test_constraints_compile_once_and_the_grammar_is_vllms():
    assert constraints.choice_grammar(['a"b', "c\nd"]) == r'root ::= "a\"b" | "c\nd"'
    assert constraints.vllm_kwargs(constraints.Constraint("choice", ("x", "y"))) == {"choice": ["x", "y"]}
    kw = sampling_kwargs(GenerationConfig(regex="[ab]+"))
    assert kw["structured_outputs"] == {"regex": "[ab]+"}
    assert "structured_outputs" not in sampling_kwargs(GenerationConfig())


def test_grammars_cache_compiled_constraints(tiny_next):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_next))
    g = constraints.grammars_for(tok, len(tok))
    c = constraints.Constraint("choice", LABELS)
    assert g.compile(c) is g.compile(c) and constraints.grammars_for(tok, len(tok)) is g


def test_a_rows_constraint_replaces_the_jobs():
    job = GenerationConfig(max_new_tokens=8, choices=("a", "b"))
    row = row_generation(job, {"json_schema": {"type": "object", "properties": {"n": {"type": "integer"}}}})
    assert (row.choices, row.regex, json.loads(row.json_schema)) == (
        (),
        None,
        {"type": "object", "properties": {"n": {"type": "integer"}}},
    )
    assert row_generation(job, '{"choices": ["x", "y"]}').choices == ("x", "y")
    assert row_generation(job, {"regex": "[0-9]+"}).regex == "[0-9]+"
    with pytest.raises(ConfigError, match=r"sampling: choice: each label once, got \['x'\]"):
        row_generation(job, {"choices": ["x", "x"]})
    with pytest.raises(ConfigError, match="sampling: --choice with --stop"):
        row_generation(job, {"stop": "."})


# --------------------------------------------------------------------------- the job's stages


def test_the_stages_add_answer_struct_typed_from_the_schema_null_on_error_rows(tiny_next, loaded):
    gen = GenerationConfig(max_new_tokens=160, json_schema=json.dumps(SCHEMA))
    imgs = noise_images(SIZES[:3])
    batch = {
        "id": np.array(["a", "b", "bad"], dtype=object),
        "image": np.array([image_to_bytes(imgs[0]), image_to_bytes(imgs[1]), b"not an image"], dtype=object),
        "question": np.array(QUESTIONS[:3], dtype=object),
    }
    pre = PreprocessStage(str(tiny_next), ColumnSpec())(batch)
    model, proc = loaded
    stage = GenerateStage(
        ModelConfig(path=str(tiny_next)),
        SelectionConfig(),
        gen,
        engine=HiredEngine(model, proc, SelectionConfig(), gen),
    )
    out = stage.table({k: np.array(pre.column(k).to_pylist(), dtype=object) for k in pre.column_names})
    assert out.schema == pa.schema([*OUTPUT_FIELDS.items(), ("answer_struct", arrow_type(SCHEMA))])
    rows = out.to_pylist()
    assert [r["error"] is None for r in rows] == [True, True, False]
    assert [r["answer_struct"] for r in rows[:2]] == [json.loads(r["answer"]) for r in rows[:2]]
    assert rows[2]["answer_struct"] is None and rows[2]["answer"] is None


# --------------------------------------------------------------------------- fail fast


@pytest.fixture()
def dataset(tmp_path):
    img = image_to_bytes(make_synthetic_image(64, 48, 0))
    pq.write_table(pa.table({"id": ["a", "b"], "image": [img, img], "question": ["q1", "q2"]}), tmp_path / "in.parquet")
    return tmp_path


def base(d, model):
    return ["--input", str(d / "in.parquet"), "--output", str(d / "out"), "--model", str(model)]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--json-schema", "{not json"], "json_schema: '{not json' is not JSON"),
        (
            ["--json-schema", "[1, 2]"],
            "json_schema: expected inline JSON or a schema file, got '[1, 2]' (no such file)",
        ),
        (["--json-schema", '{"type": "strng"}'], "--json-schema: xgrammar cannot compile"),
        (
            ["--json-schema", '{"type": "integer", "multipleOf": 3}'],
            "json_schema: multipleOf is not enforced by xgrammar",
        ),
        (["--choice", "yes", "--choice", ""], "choice: labels must be non-empty strings, got ['yes', '']"),
        (["--choice", "yes", "--choice", "yes"], "choice: each label once, got ['yes'] more than once"),
        (["--regex", "(ab"], "--regex: xgrammar cannot compile '(ab'"),
        (
            ["--regex", "[0-9]+", "--choice", "a"],
            "give at most one of --json-schema, --choice and --regex per question",
        ),
        (["--choice", "a", "--choice", "b", "--stop", "."], "--choice with --stop: the stop string would cut"),
        (["--constrain-task"], "--constrain-task needs a constraint"),
        (
            ["--task", "pope", "--regex", "yes|no"],
            "--task pope with --regex: the paper's scores are measured unconstrained",
        ),
    ],
)
def test_constraint_mistakes_fail_with_one_line_before_ray(capsys, dataset, tiny_next, extra, message):
    code, err = run_before_ray(capsys, *base(dataset, tiny_next), *extra)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err


def test_yaml_takes_the_schema_as_a_mapping_and_the_labels_as_a_list(dataset, tiny_next):
    from hired_batch.cli import build_parser
    from hired_batch.job import job_from_options
    from hired_batch.job.runner import job_options, merged_options

    (dataset / "schema.json").write_text(json.dumps(SCHEMA))
    (dataset / "job.yaml").write_text("json-schema:\n  type: object\n  properties:\n    n: {type: integer}\n")
    args = build_parser().parse_args(["run", *base(dataset, tiny_next), "--config", str(dataset / "job.yaml")])
    gen = job_from_options(job_options(merged_options(args))).generation
    assert json.loads(gen.json_schema) == {"type": "object", "properties": {"n": {"type": "integer"}}}
    from_file = job_from_options({"input": "x", "output": "y", "json_schema": str(dataset / "schema.json")})
    assert json.loads(from_file.generation.json_schema) == SCHEMA
    labels = job_from_options(
        {"input": "x", "output": "y", "choice": ["in", "out"], "task": "pope", "constrain_task": True}
    )
    assert labels.generation.choices == ("in", "out") and labels.generation.constrain_task


def test_an_untyped_schema_is_said_at_start_and_a_typed_one_is_not(capsys, dataset, tiny_next):
    from hired_batch.job import job_from_options
    from hired_batch.job.preflight import check_constraints

    untyped = {"oneOf": [{"type": "string"}, {"type": "integer"}]}
    check_constraints(job_from_options({"input": "x", "output": "y", "model": str(tiny_next), "json_schema": untyped}))
    err = capsys.readouterr().err
    assert "note: --json-schema has no one Arrow type (schema.oneOf has branches of different types" in err
    check_constraints(job_from_options({"input": "x", "output": "y", "model": str(tiny_next), "json_schema": SCHEMA}))
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- the job, end to end


@pytest.mark.slow
def test_a_json_schema_job_writes_valid_answers_and_their_struct(tiny_next, tmp_path, capsys):
    """One Ray job (schema from a file, a broken image among the rows): every ok answer
    validates, ``answer_struct`` is the schema's Arrow type and equals the parsed answer,
    null on the error row."""
    import ray

    from hired_batch.cli import main

    imgs = [image_to_bytes(im) for im in noise_images(SIZES)] + [b"broken"]
    ids = [f"r{i}" for i in range(len(imgs))]
    pq.write_table(pa.table({"id": ids, "image": imgs, "question": ["What?"] * len(imgs)}), tmp_path / "in.parquet")
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    try:
        code = main(
            [*["run", *base(tmp_path, tiny_next)], "--json-schema", str(tmp_path / "schema.json")]
            + ["--max-new-tokens", "160", "--batch-size", "4"]
        )
    finally:
        ray.shutdown()
    assert code == 0, capsys.readouterr().err
    t = pq.read_table(tmp_path / "out")
    assert t.schema.field("answer_struct").type == arrow_type(SCHEMA)
    rows = {r["id"]: r for r in t.to_pylist()}
    assert sorted(rows) == sorted(ids)
    assert rows["r4"]["error"].startswith("image:") and rows["r4"]["answer_struct"] is None
    for r in (rows[i] for i in ids[:4]):
        assert r["error"] is None, r["error"]
        jsonschema.validate(json.loads(r["answer"]), SCHEMA)
        assert r["answer_struct"] == json.loads(r["answer"])


def test_the_cost_bench_times_the_mask_until_every_answer_is_whole(tiny_next, capsys):
    rows = constraint_cost.mask_cost(tiny_next, ["short", "long"], batch=2, steps=400)
    assert [r["workload"] for r in rows] == ["short", "long"]
    for r in rows:  # the grammar ends each answer well inside the step limit
        assert 10 < r["steps"] < 400 and r["mask_ms_per_step"] > 0 and r["compile_ms"] > 0
