"""``answer_struct``: the schema -> Arrow mapping, and answers parsed into it (null when
they are missing, not JSON, or do not fit)."""

import json

import pyarrow as pa
import pytest

from hired_batch.job.answer_struct import arrow_type, column, parse, untyped_reason

SCHEMA = {
    "type": "object",
    "properties": {
        "place": {
            "type": "object",
            "properties": {"kind": {"type": "string", "enum": ["indoor", "outdoor"]}, "rooms": {"type": "integer"}},
        },
        "people": {"type": "integer"},
        "score": {"type": "number"},
        "busy": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "maybe": {"type": ["integer", "null"]},
        "either": {"anyOf": [{"type": "string"}, {"enum": ["a", "b"]}]},
        "ref": {"$ref": "#/$defs/pair"},
    },
    "$defs": {"pair": {"type": "array", "items": {"type": "number"}}},
}
MAPPED = pa.struct(
    [
        ("place", pa.struct([("kind", pa.string()), ("rooms", pa.int64())])),
        ("people", pa.int64()),
        ("score", pa.float64()),
        ("busy", pa.bool_()),
        ("tags", pa.list_(pa.string())),
        ("maybe", pa.int64()),
        ("either", pa.string()),
        ("ref", pa.list_(pa.float64())),
    ]
)


def test_each_schema_type_maps_to_its_arrow_type():
    assert arrow_type(SCHEMA) == MAPPED
    assert arrow_type(json.dumps(SCHEMA)) == MAPPED  # the JSON text GenerationConfig holds
    assert untyped_reason(SCHEMA) is None
    assert arrow_type({"type": "integer"}) == pa.int64() and arrow_type({"enum": [1, 2]}) == pa.int64()


@pytest.mark.parametrize(
    "schema, reason",
    [
        ({"oneOf": [{"type": "string"}, {"type": "integer"}]}, "schema.oneOf has branches of different types"),
        ({"type": "object"}, "schema is an object without properties"),
        ({"type": "object", "properties": {"x": {"type": "array"}}}, "schema.x is an array without one items schema"),
        ({"type": ["string", "integer"]}, "schema has several types"),
        ({"enum": ["a", 1]}, "enum/const values of different or untyped kinds"),
        (
            {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}}, "$ref": "#/$defs/n"},
            "is recursive",
        ),
    ],
)
def test_a_schema_without_one_arrow_type_is_untyped_and_says_why(schema, reason):
    assert arrow_type(schema) is None
    assert reason in untyped_reason(schema)


def test_answers_parse_into_the_type_and_misfits_are_null():
    good = {
        "place": {"kind": "indoor", "rooms": 2},
        "people": 3,
        "score": 1,
        "busy": True,
        "tags": ["a"],
        "maybe": None,
        "either": "b",
        "ref": [1.5, 2],
    }
    assert parse(json.dumps(good), MAPPED) == {**good, "score": 1.0, "ref": [1.5, 2.0]}
    assert parse('{"people": 3}', MAPPED)["place"] is None  # a missing field is null
    for bad in (None, "not json", '{"people": "three"}', '{"busy": 1}', '{"people": true}', "[1]", '{"people": 1e99}'):
        assert parse(bad, MAPPED) is None, bad
    col = column([json.dumps(good), None, "oops"], MAPPED)
    assert col.type == MAPPED and col.null_count == 2 and col[0].as_py()["people"] == 3
