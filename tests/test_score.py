"""score_output end to end on small Parquet outputs, plus the task presets."""

import dataclasses

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hired_batch.eval import score
from hired_batch.eval.score import format_score, score_output
from hired_batch.job import tasks
from hired_batch.job.tasks import TASKS


def _write(path, columns: dict, n_files: int = 1):
    """Write a job output: one file, or a directory split into n_files parts."""
    table = pa.table(columns)
    if n_files == 1:
        pq.write_table(table, path)
        return str(path)
    path.mkdir()
    step = -(-table.num_rows // n_files)
    for k in range(n_files):
        pq.write_table(table.slice(k * step, step), path / f"part-{k}.parquet")
    return str(path)


# --------------------------------------------------------------------------- presets


def test_presets_cover_the_paper_benchmarks():
    assert set(TASKS) >= {"vqav2", "textvqa", "docvqa", "chartqa", "pope", "mme", "scienceqa_img", "ocrbench"}
    for name, preset in TASKS.items():
        assert preset.name == name
        assert preset.metric in score.METRICS
        assert preset.question_column in preset.prompt_fields
        assert preset.max_new_tokens > 0


def test_preset_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        TASKS["textvqa"].split = "train"


def test_paper_numbers():
    got = {n: (p.paper_full, p.paper_hired20) for n, p in TASKS.items() if p.paper_full is not None}
    assert got == {
        "vqav2": (80.3, 77.5),
        "textvqa": (64.8, 61.4),
        "docvqa": (73.4, 60.8),
        "chartqa": (54.8, 42.0),
        "pope": (87.6, 87.0),
    }
    assert "| textvqa | lmms-lab/textvqa | vqa_accuracy | 64.8 | 61.4 |" in score.readme_table()


def test_kept_columns_include_category():
    assert TASKS["mme"].kept_columns == ("question_id", "answer", "category")
    assert TASKS["textvqa"].kept_columns == ("answers",)


def test_render_prompt():
    row = {"question": "What is written?"}
    assert tasks.render_prompt(TASKS["textvqa"], row) == (
        "What is written?\nAnswer the question using a single word or phrase."
    )
    sqa = {"hint": "A hot day.", "question": "Which is warm?", "choices": ["ice", "sun"]}
    assert tasks.render_prompt(TASKS["scienceqa_img"], sqa) == (
        "Context: A hot day.\nWhich is warm?\nA. ice\nB. sun\n"
        "Answer with the option's letter from the given choices directly."
    )
    with pytest.raises(ValueError, match="choices"):
        tasks.render_prompt(TASKS["scienceqa_img"], {"question": "q"})


def test_render_prompt_question_styles_follow_lmms_eval():
    for preset in TASKS.values():
        assert preset.question_style in tasks.QUESTION_STYLES
    # textvqa_doc_to_text: question.capitalize()
    assert tasks.render_prompt(TASKS["textvqa"], {"question": "what does IT say?"}) == (
        "What does it say?\nAnswer the question using a single word or phrase."
    )
    # mme_doc_to_text: the question's own yes/no instruction gives way to post_prompt
    mme = {"question": "Is there a dog in the image? Please answer yes or no."}
    assert tasks.render_prompt(TASKS["mme"], mme) == (
        "Is there a dog in the image?\nAnswer the question using a single word or phrase."
    )
    assert tasks.render_prompt(TASKS["pope"], {"question": " Is there a cat? "}) == (
        "Is there a cat?\nAnswer the question using a single word or phrase."
    )


def test_max_new_tokens_match_lmms_eval():
    got = {n: p.max_new_tokens for n, p in TASKS.items()}
    assert got == {
        "vqav2": 16,
        "textvqa": 1024,
        "docvqa": 32,
        "chartqa": 16,
        "pope": 128,
        "mme": 16,
        "scienceqa_img": 16,
        "ocrbench": 128,
    }


def test_unknown_task_lists_known_tasks(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'nope'.*textvqa"):
        score_output(str(tmp_path), "nope")


# --------------------------------------------------------------------------- end to end


def test_score_textvqa_with_error_row(tmp_path):
    refs = ["stop"] * 10
    path = _write(
        tmp_path / "out",
        {
            "id": [1, 2, 3, 4],
            "answer": ["STOP.", "stop", "go", None],
            "error": [None, None, None, "decode failed: truncated image"],
            "gt_answers": [refs, ["dog"] * 3 + ["cat"] * 7, refs, refs],
        },
        n_files=2,
    )
    result = score_output(path, "textvqa")
    # rows: 1.0, 0.0 ("stop" vs dog/cat), 0.0, error -> 0
    assert result["score"] == pytest.approx(25.0)
    assert (result["n_rows"], result["n_scored"], result["n_errors"]) == (4, 3, 1)
    assert result["task"] == "textvqa" and result["metric"] == "vqa_accuracy"
    assert "per_category" not in result


def test_score_textvqa_unprefixed_ground_truth(tmp_path):
    path = _write(tmp_path / "out.parquet", {"id": ["a"], "answer": ["Two"], "error": [None], "answers": [["2"] * 10]})
    assert score_output(path, "textvqa")["score"] == pytest.approx(100.0)


def test_score_vqav2_answer_dicts(tmp_path):
    answers = [{"answer": "yes", "answer_confidence": "yes", "answer_id": i} for i in range(1, 11)]
    path = _write(
        tmp_path / "out.parquet",
        {
            "id": [10, 11],
            "answer": ["Yes", "no"],
            "error": [None, None],
            "gt_answers": [answers, answers],
            "gt_answer_type": ["yes/no", "yes/no"],
        },
    )
    result = score_output(path, "vqav2")
    assert result["score"] == pytest.approx(50.0)
    assert result["per_category"] == {"yes/no": pytest.approx(50.0)}


def test_score_pope(tmp_path):
    path = _write(
        tmp_path / "out.parquet",
        {
            "id": ["0", "1", "2", "3", "4"],
            "answer": ["Yes", "No, there is not.", "yes", "no", None],
            "error": [None, None, None, None, "CUDA out of memory"],
            "gt_answer": ["yes", "no", "no", "yes", "yes"],
            "gt_category": ["random", "random", "popular", "popular", "adversarial"],
        },
    )
    result = score_output(path, "pope")
    # TP=1 FP=1 TN=1 FN=2 (one of them the error row)
    d = result["details"]
    assert d["accuracy"] == pytest.approx(40.0)
    assert d["precision"] == pytest.approx(50.0)
    assert d["recall"] == pytest.approx(100 / 3)
    assert result["score"] == pytest.approx(d["f1"]) == pytest.approx(40.0)
    assert d["yes_ratio"] == pytest.approx(40.0)
    assert result["n_errors"] == 1
    assert result["per_category"] == {"adversarial": 0.0, "popular": 0.0, "random": pytest.approx(100.0)}


def test_score_mme(tmp_path):
    path = _write(
        tmp_path / "out.parquet",
        {
            "id": [0, 1, 2, 3, 4, 5],
            "answer": ["Yes", "No", "Yes", "Yes", "Yes", None],
            "error": [None, None, None, None, None, "timeout"],
            "gt_question_id": ["e/1.jpg", "e/1.jpg", "e/2.jpg", "e/2.jpg", "c/1.png", "c/1.png"],
            "gt_answer": ["Yes", "No", "Yes", "No", "Yes", "No"],
            "gt_category": ["existence"] * 4 + ["code_reasoning"] * 2,
        },
    )
    result = score_output(path, "mme")
    # existence: acc 3/4, acc+ 1/2 -> 125; code_reasoning: acc 1/2, acc+ 0 -> 50
    assert result["per_category"] == {"code_reasoning": pytest.approx(50.0), "existence": pytest.approx(125.0)}
    assert result["score"] == pytest.approx(125.0)
    assert result["details"]["cognition"] == pytest.approx(50.0)
    assert result["details"]["total"] == pytest.approx(175.0)
    assert result["n_errors"] == 1 and result["n_scored"] == 5


def test_score_chartqa_docvqa_scienceqa_ocrbench(tmp_path):
    chart = _write(
        tmp_path / "chart.parquet",
        {
            "id": [0, 1],
            "answer": ["105", "Brazil"],
            "error": [None, None],
            "gt_answer": ["100", "Chile"],
            "gt_type": ["human_test", "augmented_test"],
        },
    )
    assert score_output(chart, "chartqa")["per_category"] == {"augmented_test": 0.0, "human_test": pytest.approx(100.0)}
    doc = _write(tmp_path / "doc.parquet", {"id": [0], "answer": ["hellp"], "error": [None], "gt_answers": [["hello"]]})
    assert score_output(doc, "docvqa")["score"] == pytest.approx(80.0)
    sqa = _write(
        tmp_path / "sqa.parquet",
        {
            "id": [0, 1],
            "answer": ["B", "The answer is A"],
            "error": [None, None],
            "gt_answer": [1, 1],
            "gt_choices": [["x", "y"], ["x", "y", "z"]],
            "gt_subject": ["natural science", "language science"],
        },
    )
    assert score_output(sqa, "scienceqa_img")["score"] == pytest.approx(50.0)
    ocr = _write(
        tmp_path / "ocr.parquet",
        {
            "id": [0, 1],
            "answer": ["It says Hello", "x ^ 2"],
            "error": [None, None],
            "gt_answer": [["hello"], ["x^2"]],
            "gt_dataset": ["IIIT5K", "HME100k"],
            "gt_question_type": ["Regular Text Recognition", "HME"],
        },
    )
    assert score_output(ocr, "ocrbench")["score"] == pytest.approx(100.0)


# --------------------------------------------------------------------------- boundary errors


def test_missing_ground_truth_column_says_expected_and_found(tmp_path):
    path = _write(tmp_path / "out.parquet", {"id": [0], "answer": ["yes"], "error": [None], "gt_answer": ["yes"]})
    with pytest.raises(ValueError) as info:
        score_output(path, "pope")
    msg = str(info.value)
    assert "missing ['gt_category']" in msg
    assert "found columns ['answer', 'error', 'gt_answer', 'id']" in msg


def test_job_answer_column_is_not_taken_for_ground_truth(tmp_path):
    # ChartQA's ground truth is called "answer", like the prediction: it must be gt_.
    path = _write(tmp_path / "out.parquet", {"id": [0], "answer": ["3"], "error": [None], "gt_type": ["human_test"]})
    with pytest.raises(ValueError, match=r"missing \['gt_answer'\]"):
        score_output(path, "chartqa")


def test_null_ground_truth_is_reported(tmp_path):
    path = _write(
        tmp_path / "out.parquet",
        {"id": [7], "answer": ["x"], "error": [None], "gt_answers": pa.array([None], type=pa.list_(pa.string()))},
    )
    with pytest.raises(ValueError, match="row id=7.*public answers"):
        score_output(path, "textvqa")


def test_empty_output(tmp_path):
    path = _write(
        tmp_path / "out.parquet",
        {
            "id": pa.array([], pa.int64()),
            "answer": pa.array([], pa.string()),
            "error": pa.array([], pa.string()),
            "gt_answers": pa.array([], pa.list_(pa.string())),
        },
    )
    with pytest.raises(ValueError, match="found 0 rows"):
        score_output(path, "textvqa")


# --------------------------------------------------------------------------- report


def test_format_score(tmp_path):
    path = _write(
        tmp_path / "out.parquet",
        {
            "id": [0, 1],
            "answer": ["Yes", None],
            "error": [None, "boom"],
            "gt_answer": ["yes", "no"],
            "gt_category": ["random", "popular"],
        },
    )
    text = format_score(score_output(path, "pope"))
    assert "task       pope (metric: pope)" in text
    assert "1 scored, 1 errors counted as wrong" in text
    assert "LLaVA-NeXT-7B full 87.6, HiRED-20% 87.0" in text
    assert "per category" in text and "random" in text
    assert "precision" in text


# --------------------------------------------------------------------------- ground-truth shapes

GOOD_TRUTH = {  # one row of ground truth per task, in the shape its metric needs
    "vqav2": {
        "answers": [{"answer": "yes", "answer_confidence": "yes", "answer_id": i} for i in range(10)],
        "answer_type": "yes/no",
    },
    "textvqa": {"answers": ["stop"] * 10},
    "docvqa": {"answers": ["hello"]},
    "chartqa": {"answer": "12", "type": "human_test"},
    "pope": {"answer": "yes", "category": "random"},
    "mme": {"question_id": "e/1.jpg", "answer": "Yes", "category": "existence"},
    "scienceqa_img": {"answer": 1, "choices": ["x", "y"], "subject": "natural science"},
    "ocrbench": {"answer": ["hello"], "dataset": "IIIT5K", "question_type": "Regular Text Recognition"},
}

BAD_TRUTH = {  # task -> (column, a value of the wrong shape, what the message must say)
    "vqav2": ("answers", [{"answer": "yes"}], "a list of 10 human answers"),
    "textvqa": ("answers", "stop", "a list of 10 human answers"),
    "docvqa": ("answers", [], "a non-empty list of reference answer strings"),
    "chartqa": ("answer", ["12"], "a single answer (a string or a number)"),
    "pope": ("answer", "maybe", '"yes" or "no"'),
    "mme": ("answer", "True", '"Yes" or "No"'),
    "scienceqa_img": ("answer", "B", "the index of the right choice"),
    "ocrbench": ("answer", 42, "a string or a non-empty list"),
}


def _output_with_truth(path, truth: dict):
    return _write(
        path, {"id": [0], "answer": ["yes"], "error": [None], **{score.gt_column(k): [v] for k, v in truth.items()}}
    )


def test_every_metric_has_its_ground_truth_shapes_and_every_preset_keeps_those_columns():
    assert set(score.TRUTH_SHAPES) == set(score.METRICS)
    assert set(GOOD_TRUTH) == set(BAD_TRUTH) == set(TASKS)
    for preset in TASKS.values():
        assert {s.column for s in score.TRUTH_SHAPES[preset.metric]} <= set(preset.kept_columns), preset.name


@pytest.mark.parametrize("task", sorted(TASKS))
def test_ground_truth_of_the_wrong_shape_is_refused_with_the_expected_shape(tmp_path, task):
    score_output(_output_with_truth(tmp_path / "good.parquet", GOOD_TRUTH[task]), task)  # the right shape scores
    column, value, expects = BAD_TRUTH[task]
    path = _output_with_truth(tmp_path / "bad.parquet", {**GOOD_TRUTH[task], column: value})
    with pytest.raises(ValueError) as info:
        score_output(path, task)
    msg = str(info.value)
    assert expects in msg and f"column {column!r}" in msg and "row id=0" in msg and "1 of 1 rows" in msg


# --------------------------------------------------------------------------- --truth-column --metric


@pytest.mark.parametrize(
    "metric, pred, truth, expected",
    [
        ("exact", " Cat ", "cat", 1.0),
        ("exact", "cat", ["dog", "CAT"], 1.0),
        ("vqa", "Two.", "2", 1.0),  # the VQA normalisation: numbers, punctuation
        ("vqa", "2", ["2", "2", "2", "two", "3", "3", "3", "3", "3", "3"], 1.0),  # ten answers: VQA accuracy
        ("vqa", "2", ["2"] + ["3"] * 9, 0.3),
        ("anls", "invoice 1234", "Invoice 1235", pytest.approx(1 - 1 / 12)),
        ("relaxed", "10.4", 10, 1.0),
        ("relaxed", "11", "10", 0.0),
        ("choice", "The answer is B.", "B", 1.0),
        ("choice", "(C)", 2, 1.0),
        ("choice", "A", 2, 0.0),
    ],
)
def test_truth_metrics_per_row(metric, pred, truth, expected):
    assert score.score_truth_rows([pred], [truth], metric) == [expected]


def test_a_failed_row_scores_zero_and_a_null_truth_is_refused():
    assert score.score_truth_rows([None, "cat"], ["cat", "cat"], "exact") == [0.0, 1.0]
    with pytest.raises(score.ConfigError, match="row 1 has None"):
        score.score_truth_rows(["cat", "cat"], ["cat", None], "exact")


def test_score_cli_with_a_truth_column(tmp_path, capsys):
    from hired_batch.cli import main

    out = _write(
        tmp_path / "out.parquet",
        {
            "id": ["a", "b", "c", "d"],
            "answer": ["cat", "Dog.", "bird", None],
            "error": [None, None, None, "image: not an image"],
            "label": ["cat", "dog", "fish", "cat"],
        },
    )
    assert main(["score", out, "--truth-column", "label", "--metric", "vqa", "--json", str(tmp_path / "s.json")]) == 0
    printed = capsys.readouterr().out
    assert "score      50.00 %" in printed and "1 errors counted as wrong" in printed
    import json

    result = json.loads((tmp_path / "s.json").read_text())
    assert result["n_rows"] == 4 and result["low"] < 50 < result["high"]
    for argv, says in [
        (["--truth-column", "nope", "--metric", "exact"], "--truth-column 'nope': expected it in the output"),
        (["--truth-column", "label"], "needs --metric"),
        (["--truth-column", "label", "--metric", "bleu"], "--metric must be one of"),
        (["--task", "textvqa", "--truth-column", "label", "--metric", "exact"], "either --task"),
        ([], "either --task"),
    ]:
        assert main(["score", out, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert says in err and len(err.splitlines()) == 1, err
