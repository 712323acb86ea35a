"""Many questions per image (``--ask``, list<string> question columns) on the HF engine:
one output row per input row, answers equal to asking the questions as separate rows
(greedy, float32), the vision tower run once per image, partial failures named, and
every contradiction refused before Ray starts."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.ask_rows import ASKS, as_batch, ask_batch, column, separate_batch, vision_runs
from support.cli import run_before_ray
from support.images import noise_images

from hired_batch.config import ColumnSpec, ConfigError, GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine.hf import HiredEngine
from hired_batch.engine.inputs import image_to_bytes
from hired_batch.engine.vision import VISION_LOG_ENV
from hired_batch.job.ask import Ask, parse_asks
from hired_batch.job.stages import GenerateStage, PreprocessStage

GEN = GenerationConfig(max_new_tokens=5)
SEL = SelectionConfig(budget_tokens=32)  # few visual tokens: the equality, not the model, is under test
SIZES = [(40 + 7 * i, 90 - 3 * i) for i in range(20)]  # (h, w): 20 images, several anyres grids


@pytest.fixture(scope="module")
def engine(tiny_next):
    return HiredEngine.load(ModelConfig(str(tiny_next), dtype="float32", device="cpu"), SEL, GEN)


def stage(tiny_next, engine, **kw):
    return GenerateStage(ModelConfig(str(tiny_next), dtype="float32"), SEL, GEN, engine=engine, batch_size=8, **kw)


def images(n=20):
    return [image_to_bytes(im) for im in noise_images(SIZES[:n])]


def test_ask_parses_flags_and_yaml_mappings_with_their_own_options():
    assert parse_asks(["a=What?", "b_2=Is it = 2?"]) == (Ask("a", "What?"), Ask("b_2", "Is it = 2?"))
    got = parse_asks({"n": {"question": "How many?", "max_new_tokens": 4, "stop": ["."]}, "p": "Where?"})
    assert got[0].name == "n" and got[0].overrides == {"max_new_tokens": 4, "stop": ["."]}
    assert got[1] == Ask("p", "Where?")
    assert parse_asks(got) == got  # already parsed: unchanged
    # the top level's spellings (flag names) name the same options in a question's entry
    flagged = parse_asks({"k": {"question": "Kind?", "choice": ["a", "b"], "max-new-tokens": 4, "json-schema": None}})
    assert flagged[0].overrides == {"choices": ["a", "b"], "max_new_tokens": 4, "json_schema": None}
    for bad, message in [
        (["1x=What?"], "--ask name must be a letter or _"),
        (["a=What?", "a=Why?"], "--ask names must be unique, got 'a' twice"),
        (["what"], "--ask expects NAME=QUESTION"),
        (["a=  "], "--ask a: expected a question, got an empty one"),
        ({"a": {"max_new_tokens": 3}}, "ask: 'a' expects a question"),
        (["struct_a=What?"], "must not start with 'struct_'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_asks(bad)


def test_ask_answers_equal_separate_rows_and_each_image_is_encoded_once(tiny_next, engine, tmp_path, monkeypatch):
    """20 images, three named questions (one with its own answer length): one row per
    image, three answer columns equal to the separate rows' answers; the vision tower
    runs once per image (logged), against once per row when asked separately."""
    log = tmp_path / "vision.log"
    monkeypatch.setenv(VISION_LOG_ENV, str(log))
    imgs = images()
    out = stage(tiny_next, engine, asks=ASKS).table(ask_batch(tiny_next, imgs)).to_pylist()
    assert sum(vision_runs(log)) == 20 and len(vision_runs(log)) == 3  # 20 images in calls of 8: once each
    log.unlink()
    separate = stage(tiny_next, engine).table(separate_batch(tiny_next, imgs)).to_pylist()
    assert sum(vision_runs(log)) == 60  # once per row: what --ask saves
    by_id = {r["id"]: r for r in separate}
    assert [r["id"] for r in out] == [f"img{i}" for i in range(20)]
    for r in out:
        assert r["error"] is None and r["answer"] is None
        for a in ASKS:
            alone = by_id[f"{r['id']}/{a.name}"]
            assert r[f"answer_{a.name}"] == alone["answer"]
            assert r[f"n_generated_tokens_{a.name}"] == alone["n_generated_tokens"]
            assert r[f"n_prompt_tokens_{a.name}"] == alone["n_prompt_tokens"]
        assert r["n_generated_tokens_count"] <= 3 < r["n_generated_tokens_what"]  # its own max_new_tokens
        assert r["answer_place"] in ("indoor", "outdoor")  # its own constraint (engine.constraints)
        assert r["n_generated_tokens"] == sum(r[f"n_generated_tokens_{a.name}"] for a in ASKS)
    assert any(r["answer_what"] for r in out)


# questions of one image that share their options run in one batched pass over their own
# tokens (engine/shared_prefix.py): lengths from 1 word to many, so rows hold padding
# between prefix and question; a repetition penalty reads the re-laid prompt ids
SAME_OPTIONS = parse_asks(
    {
        "a": "Why?",
        "b": "What is the colour of the largest object on the left side of this picture?",
        "c": "How many?",
        "d": "Is there a person, an animal or a vehicle anywhere in the image at all?",
    }
)


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_an_images_questions_in_one_pass_answer_as_separate_rows(tiny_next, penalty, monkeypatch):
    from hired_batch.engine import shared_prefix

    passes = []
    real = shared_prefix._suffix_pass
    monkeypatch.setattr(shared_prefix, "_suffix_pass", lambda *a: passes.append(len(a[4])) or real(*a))
    gen = GenerationConfig(max_new_tokens=6, repetition_penalty=penalty)
    eng = HiredEngine.load(ModelConfig(str(tiny_next), dtype="float32", device="cpu"), SEL, gen)
    model = ModelConfig(str(tiny_next), dtype="float32")
    imgs = images(6)
    out = GenerateStage(model, SEL, gen, engine=eng, batch_size=24, asks=SAME_OPTIONS)
    got = out.table(ask_batch(tiny_next, imgs, asks=SAME_OPTIONS)).to_pylist()
    alone = GenerateStage(model, SEL, gen, engine=eng, batch_size=1)
    by_id = {r["id"]: r for r in alone.table(separate_batch(tiny_next, imgs, asks=SAME_OPTIONS)).to_pylist()}
    for r in got:
        assert r["error"] is None
        for a in SAME_OPTIONS:
            one = by_id[f"{r['id']}/{a.name}"]
            assert (r[f"answer_{a.name}"], r[f"n_prompt_tokens_{a.name}"]) == (one["answer"], one["n_prompt_tokens"])
        assert len({r[f"n_prompt_tokens_{a.name}"] for a in SAME_OPTIONS}) == 4  # four lengths side by side
    assert sum(passes) == 24 and max(passes) > 1  # several questions of an image in one pass


def test_a_list_question_column_answers_each_rows_own_questions_and_names_a_failed_one(tiny_next, engine):
    """Lists of different lengths; a question too long for the context fails alone (the
    row keeps its other answers); a bad image, a null or an empty list is one error row."""
    imgs = images(3)
    long = "a " * 5000  # fits max_question_chars (20000), not the tiny model's context (4096 tokens)
    rows = [
        ("a", imgs[0], ["What is this?", "Where?"]),
        ("b", imgs[1], ["Color?", long, "What is this?"]),
        ("bad-image", b"not an image", ["What?"]),
        ("null", imgs[2], None),
        ("empty", imgs[2], []),
        ("blank", imgs[2], ["  "]),
    ]
    pre = PreprocessStage(str(tiny_next), ColumnSpec(question_list=True))
    batch = as_batch(pre({k: column([r[j] for r in rows]) for j, k in enumerate(("id", "image", "question"))}))
    out = stage(tiny_next, engine, question_list=True).table(batch)
    assert out.schema.field("answers").type == pa.list_(pa.string())
    got = {r["id"]: r for r in out.to_pylist()}
    assert len(got) == len(rows)
    alone = stage(tiny_next, engine).table(
        as_batch(
            PreprocessStage(str(tiny_next), ColumnSpec())(
                {
                    "id": column(["x", "y"]),
                    "image": column([imgs[1]] * 2),
                    "question": column(["Color?", "What is this?"]),
                }
            )
        )
    )
    b = got["b"]
    assert b["answers"][0] == alone.column("answer")[0].as_py() and b["answers"][2] == alone.column("answer")[1].as_py()
    assert b["answers"][1] is None and b["n_generated_tokens_each"][1] is None
    assert b["error"].startswith("question 1: question: prompt too long")
    assert len(got["a"]["answers"]) == 2 and got["a"]["error"] is None
    assert got["bad-image"]["error"].startswith("image:") and got["bad-image"]["answers"] is None
    assert got["null"]["error"] == "question: missing (null list)"
    assert got["empty"]["error"] == "question: empty list (no question to ask)"
    assert got["blank"]["error"].startswith("question 0: question: empty")


@pytest.fixture()
def dataset(tmp_path):
    img = image_to_bytes(noise_images([(48, 64)])[0])
    pq.write_table(pa.table({"id": ["a", "b"], "image": [img, img], "question": ["q1", "q2"]}), tmp_path / "in.parquet")
    return tmp_path


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--ask", "1a=What?"], "--ask name must be a letter or _ then letters, digits or _, got '1a'"),
        (["--ask", "a=What?", "--ask", "a=Why?"], "--ask names must be unique, got 'a' twice"),
        (["--ask", "What?"], "--ask expects NAME=QUESTION"),
        (["--ask", "a=What?", "--question-column", "question"], "--ask gives every image its questions"),
        (["--ask", "a=What?", "--task", "textvqa"], "--ask cannot be combined with --task textvqa"),
    ],
)
def test_bad_ask_flags_fail_with_one_line_before_ray(capsys, dataset, tiny_next, extra, message):
    base = ["--input", str(dataset / "in.parquet"), "--output", str(dataset / "out"), "--model", str(tiny_next)]
    code, err = run_before_ray(capsys, *base, *extra)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1


def test_bad_per_question_options_in_yaml_fail_with_one_line_before_ray(capsys, dataset, tiny_next):
    (dataset / "job.yaml").write_text(json.dumps({"ask": {"n": {"question": "How many?", "max_new_tokens": 0}}}))
    base = ["--input", str(dataset / "in.parquet"), "--output", str(dataset / "out"), "--model", str(tiny_next)]
    code, err = run_before_ray(capsys, *base, "--config", str(dataset / "job.yaml"))
    assert code == 2
    assert err.endswith("--ask n: sampling: max_new_tokens must be >= 1, got 0") and len(err.splitlines()) == 1
    (dataset / "job.yaml").write_text(json.dumps({"ask": {"n": {"question": "How many?", "color": "red"}}}))
    code, err = run_before_ray(capsys, *base, "--config", str(dataset / "job.yaml"))
    assert code == 2 and "--ask n: sampling: unknown option(s) ['color']" in err


def test_ask_takes_a_prompt_template_and_needs_no_question_column(dataset, tiny_next):
    from hired_batch.job import job_from_options

    job = job_from_options(
        dict(input=str(dataset / "in.parquet"), output="o", ask=["a=What?"], prompt="Answer briefly: {question}")
    )
    assert job.columns.question_column is None and job.columns.ask == (Ask("a", "What?"),)
    assert job_from_options(dict(input="i", output="o", ask={"a": "What?"}, question_column="none")).columns.ask


def test_question_list_of_reads_the_input_schema(tmp_path):
    from hired_batch.job import job_from_options
    from hired_batch.job.pipeline import question_list_of

    pq.write_table(pa.table({"image": [b"x"], "question": [["a?", "b?"]]}), tmp_path / "l.parquet")
    pq.write_table(pa.table({"image": [b"x"], "question": ["a?"]}), tmp_path / "s.parquet")
    assert question_list_of(job_from_options(dict(input=str(tmp_path / "l.parquet"), output=str(tmp_path / "o"))))
    assert not question_list_of(job_from_options(dict(input=str(tmp_path / "s.parquet"), output=str(tmp_path / "o"))))


@pytest.mark.slow
def test_the_job_with_ask_from_yaml_writes_one_row_per_image(tmp_path, tiny_next, monkeypatch):
    """The whole job (embedded Ray): three named questions from YAML, one with its own
    answer length, on 8 images of which one is broken: 8 rows, the broken one a single
    error row, the others three answers each; the tower ran once per good image."""
    from hired_batch.cli import main

    log = tmp_path / "vision.log"
    monkeypatch.setenv(VISION_LOG_ENV, str(log))  # the job's actors inherit it
    imgs = images(7) + [b"not an image"]
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(8)], "image": imgs}), tmp_path / "in.parquet")
    asks = {a.name: {"question": a.question, **(a.overrides or {})} for a in ASKS}
    (tmp_path / "job.yaml").write_text(json.dumps({"ask": asks, "max-new-tokens": 5, "budget-tokens": 32}))
    import ray

    try:
        code = main(
            [
                "run",
                "--input",
                str(tmp_path / "in.parquet"),
                "--output",
                str(tmp_path / "out"),
                "--model",
                str(tiny_next),
            ]
            + ["--config", str(tmp_path / "job.yaml"), "--num-cpus", "2", "--max-failed-fraction", "0.5"]
        )
    finally:
        ray.shutdown()  # the embedded Ray it started: later tests check that none is up
    assert code == 0
    out = {r["id"]: r for r in pq.read_table(tmp_path / "out").to_pylist()}
    assert sorted(out) == [f"r{i}" for i in range(8)]
    assert out["r7"]["error"].startswith("image:") and out["r7"]["answer_what"] is None
    for i in range(7):
        r = out[f"r{i}"]
        assert r["error"] is None and all(r[f"answer_{a.name}"] is not None for a in ASKS)
        assert r["n_generated_tokens_count"] <= 3 < r["n_generated_tokens_what"]
    assert sum(vision_runs(log)) == 7
