"""Stages called directly (no Ray): bad rows, context limit, OOM splitting."""

import io

import numpy as np
import pyarrow as pa
import pytest
import torch

from hired_batch.config import ColumnSpec, DecodeLimits, GenerationConfig, ModelConfig, SelectionConfig
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image
from hired_batch.job.stages import OUTPUT_FIELDS, GenerateStage, PreprocessStage, output_name, pack_kept, question_for


def png(w, h, seed=0):
    return image_to_bytes(make_synthetic_image(w, h, seed))


def jpeg(w, h, **kw):
    buf = io.BytesIO()
    make_synthetic_image(w, h, 1).save(buf, "JPEG", **kw)
    return buf.getvalue()


def bad_rows():
    """(id, image, question, expected error fragment or None)."""
    good = png(400, 300)
    cmyk = io.BytesIO()
    make_synthetic_image(300, 200, 2).convert("CMYK").save(cmyk, "JPEG")
    return [
        ("ok", good, "What is this?", None),
        ("null-image", None, "What?", "image: empty image"),
        ("empty-image", b"", "What?", "image: empty image"),
        ("not-image", b"hello world, not a picture", "What?", "not an image"),
        ("truncated", jpeg(400, 300)[:300], "What?", "image:"),
        ("one-pixel", png(1, 1), "What?", "too small"),
        ("strip", png(2000, 10), "What?", "aspect ratio"),
        ("cmyk", cmyk.getvalue(), "What?", None),
        ("null-q", good, None, "question: missing"),
        ("empty-q", good, "   ", "question: empty"),
        ("missing-path", "/nonexistent/dir/img.png", "What?", "cannot open"),
        ("huge", png(400, 300), "x" * 30, None),
    ]


@pytest.fixture(scope="module")
def generate_stage(tiny_next):
    sel = SelectionConfig(budget=0.2)
    return GenerateStage(ModelConfig(path=str(tiny_next)), sel, GenerationConfig(max_new_tokens=4), ("truth",))


def preprocess(tiny_next, rows, limits=DecodeLimits(), **spec):
    stage = PreprocessStage(str(tiny_next), ColumnSpec(keep_columns=("truth",), **spec), limits)
    batch = {
        "id": np.array([r[0] for r in rows], dtype=object),
        "image": np.array([r[1] for r in rows], dtype=object),
        "question": np.array([r[2] for r in rows], dtype=object),
        "truth": np.array([f"gt-{r[0]}" for r in rows], dtype=object),
    }
    return stage(batch)


def as_numpy(table: pa.Table) -> dict:
    return {k: np.array(table.column(k).to_pylist(), dtype=object) for k in table.column_names}


def test_bad_rows_become_error_rows_and_the_rest_is_answered(tiny_next, generate_stage):
    rows = bad_rows()
    pre = preprocess(tiny_next, rows)
    out = generate_stage.table(as_numpy(pre))
    assert out.column("id").to_pylist() == [r[0] for r in rows]
    for (rid, _, _, want), err, ans in zip(rows, out.column("error").to_pylist(), out.column("answer").to_pylist()):
        if want is None:
            assert err is None and ans is not None, (rid, err)
        else:
            assert err is not None and want in err and ans is None, (rid, err)
    assert out.column("truth").to_pylist() == [f"gt-{r[0]}" for r in rows]
    for name, typ in OUTPUT_FIELDS.items():
        assert out.schema.field(name).type == typ


def test_question_holding_the_image_token_is_an_error_row_on_both_engines_paths(tiny_next, generate_stage):
    rows = [
        ("ok", png(336, 336), "What is this?", None),
        ("img", png(336, 336), "Where is <image> here?", None),
        ("twice", png(336, 336), "<image><image>", None),
        ("ok2", png(300, 200), "And this?", None),
    ]
    for engine in ("hf", "vllm"):  # vLLM's preprocessing needs only the processor, no vLLM
        stage = PreprocessStage(str(tiny_next), ColumnSpec(keep_columns=("truth",)), engine=engine)
        pre = stage(
            {
                "id": np.array([r[0] for r in rows], dtype=object),
                "image": np.array([r[1] for r in rows], dtype=object),
                "question": np.array([r[2] for r in rows], dtype=object),
                "truth": np.array(["t"] * 4, dtype=object),
            }
        )
        errs = pre.column("error").to_pylist()
        assert errs[0] is None and errs[3] is None, (engine, errs)
        assert errs[1] == (
            "question: holds the image token '<image>' (1 time(s)); the model takes one image per "
            "prompt, placed by the chat template"
        ), engine
        assert "(2 time(s))" in errs[2]
    out = generate_stage.table(as_numpy(preprocess(tiny_next, rows)))
    assert [a is not None for a in out.column("answer").to_pylist()] == [True, False, False, True]


def test_system_prompt_holding_the_image_token_is_refused(tiny_next):
    from hired_batch.config import ConfigError
    from hired_batch.engine.weights import Preprocessor

    with pytest.raises(ConfigError, match="holds 2 image tokens.*drop '<image>' from --system-prompt"):
        Preprocessor.from_pretrained(str(tiny_next), "Look at <image> first.")


class RaisingPreprocessor:
    """The real preprocessor, but raising ``error`` for the questions in ``bad``."""

    def __init__(self, real, bad, error=RuntimeError):
        self.real, self.bad, self.error = real, bad, error

    def prompt_ids(self, question):  # what both engines' encode call first
        if question in self.bad:
            raise self.error(f"cannot handle {question!r}\nsecond line")
        return self.real.prompt_ids(question)

    def __getattr__(self, name):  # the rest as the real one
        return getattr(self.real, name)


def test_a_row_that_raises_in_preprocessing_is_an_error_row_unless_every_row_does(tiny_next):
    stage = PreprocessStage(str(tiny_next), ColumnSpec())
    stage.pre = RaisingPreprocessor(stage.pre, {"boom?"})
    batch = {
        "id": np.array(["a", "b", "c"], dtype=object),
        "image": np.array([png(336, 336)] * 3, dtype=object),
        "question": np.array(["Hi?", "boom?", "Ho?"], dtype=object),
    }
    errs = stage(batch).column("error").to_pylist()
    assert errs == [None, "preprocess: RuntimeError: cannot handle 'boom?'", None]
    stage.pre = RaisingPreprocessor(stage.pre.real, {"Hi?", "boom?", "Ho?"}, KeyError)
    with pytest.raises(KeyError, match="cannot handle"):  # every row alike: a bug, not data
        stage(batch)


def test_pixel_limit_flag_refuses_before_decoding(tiny_next):
    pre = preprocess(tiny_next, [("big", png(400, 300), "q", None)], DecodeLimits(max_pixels=1000))
    assert "too many pixels" in pre.column("error")[0].as_py()


def test_prompt_template_and_prompt_only(tiny_next):
    stage = PreprocessStage(str(tiny_next), ColumnSpec(prompt="{question}\nAnswer briefly."))
    assert question_for(stage.columns, "Why?") == ("Why?\nAnswer briefly.", None)
    cap = ColumnSpec(question_column=None, prompt="Describe the image.")
    assert question_for(cap, None) == ("Describe the image.", None)
    with pytest.raises(ValueError, match="--prompt is required"):
        ColumnSpec(question_column=None).check()
    assert output_name("answer") == "gt_answer" and output_name("answers") == "answers"


def test_question_longer_than_context_is_an_error_row(tiny_next, generate_stage):
    long_q = " ".join(["picture"] * 5000)
    pre = preprocess(
        tiny_next,
        [("long", png(336, 336), long_q, None), ("ok", png(336, 336), "Hi?", None)],
        DecodeLimits(max_question_chars=100_000),
    )
    out = generate_stage.table(as_numpy(pre))
    errs = out.column("error").to_pylist()
    assert "prompt too long" in errs[0] and "context 4096" in errs[0]
    assert errs[1] is None


class OomEngine:
    """The real engine, but generate_prepared runs out of memory above a batch size
    and always for one poisoned prompt length."""

    def __init__(self, real, max_ok: int, poison_len: int | None = None):
        self.real, self.max_ok, self.poison_len, self.calls = real, max_ok, poison_len, []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def generate_prepared(self, prepared):
        self.calls.append(len(prepared))
        if len(prepared) > self.max_ok or any(len(p.input_ids) == self.poison_len for p in prepared):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.real.generate_prepared(prepared)


def test_oom_splits_the_batch_down_to_single_items(tiny_next, generate_stage):
    qs = ["a?", "what is it?", "b?", "c?", "d?", "how many are there in the image?"]
    rows = [(f"r{i}", png(300 + 40 * i, 300), q, None) for i, q in enumerate(qs)]
    pre = as_numpy(preprocess(tiny_next, rows))
    poison = len(np.frombuffer(pre["input_ids"][5], dtype=np.int64))
    fake = OomEngine(generate_stage.runner.engine, max_ok=2, poison_len=poison)
    stage = GenerateStage(
        ModelConfig(path=str(tiny_next)), SelectionConfig(), GenerationConfig(max_new_tokens=4), ("truth",), engine=fake
    )
    out = stage.table(pre)
    errs = out.column("error").to_pylist()
    assert errs[:5] == [None] * 5
    assert "out of memory even alone" in errs[5]
    assert out.column("id").to_pylist() == [r[0] for r in rows]
    assert fake.calls[0] == 6 and max(out.column("batch_size").to_pylist()[:5]) <= 2


def test_non_oom_errors_are_not_swallowed(tiny_next, generate_stage):
    class Broken(OomEngine):
        def generate_prepared(self, prepared):
            raise KeyError("a bug")

    stage = GenerateStage(
        ModelConfig(path=str(tiny_next)),
        SelectionConfig(),
        GenerationConfig(max_new_tokens=4),
        ("truth",),
        engine=Broken(generate_stage.runner.engine, 9),
    )
    with pytest.raises(KeyError):
        stage.table(as_numpy(preprocess(tiny_next, [("x", png(300, 300), "q?", None)])))


def test_a_row_the_engine_fails_on_alone_is_an_error_row(tiny_next, generate_stage):
    class Poisoned(OomEngine):
        def generate_prepared(self, prepared):
            self.calls.append(len(prepared))
            if any(len(p.input_ids) == self.poison_len for p in prepared):
                raise IndexError("index 7 is out of bounds")
            return self.real.generate_prepared(prepared)

    qs = ["a?", "what is it?", "how many are there in the image?"]
    pre = as_numpy(preprocess(tiny_next, [(f"r{i}", png(336, 336), q, None) for i, q in enumerate(qs)]))
    fake = Poisoned(generate_stage.runner.engine, 9, poison_len=len(np.frombuffer(pre["input_ids"][1], dtype=np.int64)))
    stage = GenerateStage(
        ModelConfig(path=str(tiny_next)), SelectionConfig(), GenerationConfig(max_new_tokens=2), ("truth",), engine=fake
    )
    out = stage.table(pre)
    assert out.column("error").to_pylist() == [None, "generate: IndexError: index 7 is out of bounds", None]
    assert out.column("answer").to_pylist()[1] is None and fake.calls == [3, 1, 1, 1]


def test_rows_are_grouped_by_prompt_length_within_the_batch_size(tiny_next, generate_stage):
    sizes = [(336, 336), (1000, 1000), (340, 330), (900, 950), (500, 300), (320, 340)]
    rows = [(f"g{i}", png(w, h, i), "What?", None) for i, (w, h) in enumerate(sizes)]
    pre = as_numpy(preprocess(tiny_next, rows))
    stage = GenerateStage(
        ModelConfig(path=str(tiny_next)),
        SelectionConfig(selector="full"),
        GenerationConfig(max_new_tokens=2),
        ("truth",),
        engine=generate_stage.runner.engine,
        batch_size=2,
    )
    out = stage.table(pre).to_pylist()
    by_batch = {}
    for r in out:
        by_batch.setdefault(r["batch_id"], []).append(r["n_prompt_tokens"])
    assert sorted(len(v) for v in by_batch.values()) == [2, 2, 2]
    # the two longest prompts share a batch, the two shortest share another
    lengths = sorted(r["n_prompt_tokens"] for r in out)
    assert sorted(lengths[-2:]) in [sorted(v) for v in by_batch.values()]
    assert sorted(lengths[:2]) in [sorted(v) for v in by_batch.values()]


def test_auto_batch_size_follows_the_memory_limit(tiny_next, generate_stage):
    rows = [(f"a{i}", png(336 + 20 * i, 336), "What?", None) for i in range(4)]
    pre = as_numpy(preprocess(tiny_next, rows))

    def run(limit):
        stage = GenerateStage(
            ModelConfig(path=str(tiny_next)),
            SelectionConfig(),
            GenerationConfig(max_new_tokens=2),
            ("truth",),
            engine=generate_stage.runner.engine,
            batch_size="auto",
            memory_limit=limit,
        )
        return set(stage.table(pre).column("batch_size").to_pylist())

    assert run("100GB") == {4}
    assert run("1MB") == {1}  # below one item's estimate: items run one at a time


def test_task_preset_renders_its_own_prompt():
    spec = ColumnSpec(question_column="question", task="scienceqa_img", prompt_columns=("hint", "choices"))
    text, err = question_for(
        spec, "Which animal is shown?", fields={"hint": "A farm photo.", "choices": ["cat", "dog"]}
    )
    assert err is None
    assert "Context: A farm photo." in text and "A. cat" in text and "B. dog" in text
    assert text.endswith("Answer with the option's letter from the given choices directly.")
    assert question_for(spec, None, fields={"hint": "", "choices": []})[1].startswith("question:")


def test_task_preset_with_another_question_column_renders_that_column():
    """``--task X --question-column Y``: Y's text fills the preset's question slot; the
    preset's own question column is not read (issue 19, item 10)."""
    from hired_batch.job.options import job_from_options
    from hired_batch.job.preflight import needed_columns

    c = job_from_options(
        {"input": "in.parquet", "output": "out", "task": "scienceqa_img", "question_column": "asked"}
    ).columns
    assert "question" not in needed_columns(c) and {"asked", "hint", "choices"} <= set(needed_columns(c))
    text, err = question_for(c, "Which animal is shown?", fields={"hint": "", "choices": ["cat", "dog"]})
    assert err is None and text.startswith("Which animal is shown?\nA. cat\nB. dog\n")
    default = job_from_options({"input": "in.parquet", "output": "out", "task": "scienceqa_img"}).columns
    assert (
        question_for(default, "Which animal is shown?", fields={"hint": "", "choices": ["cat"]})[0]
        == "Which animal is shown?\nA. cat\nAnswer with the option's letter from the given choices directly."
    )


def ray_numpy(table: pa.Table) -> dict:
    """A batch as Ray Data hands it to a numpy stage: integers with nulls become float."""
    return {k: table.column(k).to_numpy(zero_copy_only=False) for k in table.column_names}


def test_kept_columns_keep_their_arrow_type_and_values(tiny_next, generate_stage):
    """Integers with nulls (one above 2**53), lists of them, int32, timestamps: as in the
    input, though the stages see numpy batches (issue 19, item 10)."""
    kept = pa.table(
        {
            "n": pa.array([2**60 + 1, None, 3], pa.int64()),
            "small": pa.array([1, None, 2], pa.int32()),
            "votes": pa.array([[1, None], None, [2**60 + 1]], pa.list_(pa.int64())),
            "at": pa.array([0, None, 10**15], pa.timestamp("us", tz="UTC")),
        }
    )
    rows = {
        "id": pa.array(["a", "b", "c"]),
        "image": pa.array([png(64, 48)] * 3),
        "question": pa.array(["What?", None, "What?"]),
    }  # row b becomes an error row: kept columns still pass
    table = pack_kept(pa.table({**rows, **{k: kept.column(k) for k in kept.column_names}}), tuple(kept.column_names))
    assert ray_numpy(kept)["n"].dtype == np.float64  # what happened to them before
    pre = PreprocessStage(str(tiny_next), ColumnSpec(keep_columns=tuple(kept.column_names)))(ray_numpy(table))
    stage = GenerateStage(
        ModelConfig(path=str(tiny_next)),
        SelectionConfig(),
        GenerationConfig(max_new_tokens=2),
        kept.schema,
        engine=generate_stage.runner.engine,
    )
    out = stage.table(ray_numpy(pre))
    assert out.select(kept.column_names).equals(kept)
    assert out.column("error").to_pylist()[1].startswith("question:")


def test_hanging_image_urls_of_one_batch_are_read_at_once(tiny_next, tmp_path):
    """Two URLs that never answer within --image-timeout: both rows time out, the good
    row is prepared, and both hanging URLs were asked before either was retried (read at
    once: the rows after a hanging one are not held for its tries)."""
    from support.gated_images import GatedImages

    with GatedImages(tmp_path / "served") as images:
        urls = [
            images.add("a.png", png(336, 336), gated=True),
            images.add("b.png", png(336, 336), gated=True),
            images.add("c.png", png(300, 200), gated=False),
        ]
        pre = preprocess(
            tiny_next, [(u.rsplit("/", 1)[1], u, "What is it?", None) for u in urls], DecodeLimits(image_timeout=1.0)
        )
        asked = [p for p in images.requests if p.startswith("/gated/")]
    errs = pre.column("error").to_pylist()
    assert errs[2] is None
    for err, url in zip(errs[:2], urls):
        assert err == f"image: timed out after 1 s (2 tries): {url}"
    assert sorted(asked[:2]) == ["/gated/a.png", "/gated/b.png"], asked  # a read one after another asks a, a, b, b
