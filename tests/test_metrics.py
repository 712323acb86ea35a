"""Metrics on hand-made cases whose scores follow from the official definitions."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hired_batch.eval import metrics as m

# --------------------------------------------------------------------------- VQA normalization


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two", "2"),
        ("the cat.", "cat"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("yes.", "yes"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("none", "0"),  # the official manual map has it
        ("An Apple", "apple"),
        ("red, white", "red white"),
        ("left-right", "left right"),  # no "- " or " -": the hyphen becomes a space
        ("left - right", "left right"),
        ("1,000 (approx)", "1000 approx"),  # digit comma: every mark is removed
        ("  yes\n", "yes"),
        ("isnt it", "isn't it"),
    ],
)
def test_normalize_vqa_answer_official_corner_cases(raw, normalized):
    assert m.normalize_vqa_answer(raw) == normalized


@pytest.mark.parametrize(
    "pred, refs",
    [
        ("Two", ["2"]),
        ("the cat.", ["cat"]),
        ("dont", ["don't"]),
        ("1,000", ["1000"]),
        ("yes.", ["yes"]),
    ],
)
def test_vqa_accuracy_matches_after_normalization(pred, refs):
    assert m.vqa_accuracy(pred, refs * 10) == pytest.approx(1.0)


@pytest.mark.parametrize("agree, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(agree, expected):
    answers = ["dog"] * agree + ["cat"] * (10 - agree)
    assert m.vqa_accuracy("dog", answers) == pytest.approx(expected)


def test_vqa_accuracy_fewer_than_ten_answers():
    # 3 answers, 2 match: subsets without a match-answer have 1 match (1/3), the
    # subset without the other answer has 2 matches (2/3): mean = (1/3+1/3+2/3)/3.
    assert m.vqa_accuracy("dog", ["dog", "dog", "cat"]) == pytest.approx(4 / 9)


def test_vqa_accuracy_needs_answers():
    with pytest.raises(ValueError, match="at least one"):
        m.vqa_accuracy("dog", [])


# --------------------------------------------------------------------------- ANLS


def test_levenshtein():
    assert m.levenshtein("kitten", "sitting") == 3
    assert m.levenshtein("", "abc") == 3
    assert m.levenshtein("abc", "abc") == 0


def test_anls_exact_and_case_whitespace_insensitive():
    assert m.anls("  Hello   World ", ["hello world"]) == 1.0


def test_anls_partial_match_and_best_of_answers():
    assert m.anls("hellp", ["hello"]) == pytest.approx(0.8)
    assert m.anls("hellp", ["xyz", "hello"]) == pytest.approx(0.8)


def test_anls_divides_by_the_raw_lengths_as_lmms_eval():
    # distance on normalized strings, length of the raw ones: 'q ' -> 'q' is 1 edit
    # from '' over max(len(''), len('q ')) = 2; a normalized length would give 0.
    assert m.anls("q ", ["q 3", ""]) == pytest.approx(0.5)
    assert m.anls("ab  ", ["abc"]) == pytest.approx(1 - 1 / 4)  # not 1 - 1/3
    assert m.anls("", [""]) == 1.0
    assert m.anls("   ", ["x"]) == pytest.approx(2 / 3)  # '' vs 'x': 1 edit over the raw 3


def test_anls_threshold():
    assert m.anls("ab", ["ax"]) == pytest.approx(0.5)  # exactly 0.5 is kept
    assert m.anls("abc", ["axy"]) == 0.0  # 1/3 < 0.5
    assert m.anls("abc", ["axy"], threshold=0.3) == pytest.approx(1 / 3)


@given(st.text(max_size=20), st.lists(st.text(max_size=20), min_size=1, max_size=4))
def test_anls_in_unit_interval_and_one_on_itself(pred, answers):
    assert 0.0 <= m.anls(pred, answers) <= 1.0
    assert m.anls(pred, answers + [pred]) == 1.0


# --------------------------------------------------------------------------- ChartQA


def test_relaxed_accuracy_tolerance_boundary():
    assert m.relaxed_accuracy("105", "100") == 1.0  # exactly 5 %: included
    assert m.relaxed_accuracy("95", "100") == 1.0
    assert m.relaxed_accuracy("105.1", "100") == 0.0
    assert m.relaxed_accuracy("94.9", "100") == 0.0
    assert m.relaxed_accuracy("110", "100", tolerance=0.1) == 1.0


def test_relaxed_accuracy_percent_and_commas():
    assert m.relaxed_accuracy("12%", "0.12") == 1.0
    assert m.relaxed_accuracy("1,020", "1000") == 1.0
    assert m.relaxed_accuracy("50%", "50") == 0.0  # 0.5 vs 50, as in lmms-eval


def test_relaxed_accuracy_text_and_zero_target():
    assert m.relaxed_accuracy(" Yes ", "yes") == 1.0
    assert m.relaxed_accuracy("Brazil", "Chile") == 0.0
    assert m.relaxed_accuracy("0", "0") == 1.0  # zero target: string match
    assert m.relaxed_accuracy("0.0", "0") == 0.0


# --------------------------------------------------------------------------- choices


def test_exact_match():
    assert m.exact_match(" Paris ", "paris") == 1.0
    assert m.exact_match("Paris.", "paris") == 0.0


@pytest.mark.parametrize(
    "pred, letter",
    [
        ("A", "A"),
        ("A.", "A"),
        ("(A)", "A"),
        ("b", "B"),
        ("C)", "C"),
        ("The answer is B", "B"),
        ("The answer is (B).", "B"),
        ("Answer: C", "C"),
        ("B. Paris", "B"),
        ("(D) four", "D"),
        ("option D", "D"),
        ("E", None),  # only 4 choices
        ("a dog", None),
        ("A dog", None),
        ("I don't know", None),
        ("", None),
    ],
)
def test_extract_choice_letter(pred, letter):
    assert m.extract_choice_letter(pred, 4) == letter


def test_extract_choice_letter_five_choices():
    assert m.extract_choice_letter("E.", 5) == "E"


def test_extract_choice_letter_rejects_bad_n():
    with pytest.raises(ValueError, match="n_choices"):
        m.extract_choice_letter("A", 0)


# --------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    "pred, parsed",
    [
        ("Yes", "yes"),
        ("yes.", "yes"),
        ("No", "no"),
        ("No.", "no"),
        ("No, there is not.", "no"),
        ("There is not a dog.", "no"),
        ("Yes, there is a dog. No cat.", "yes"),  # only the first sentence counts
        ("Nope", "yes"),  # as the reference parser does
        ("", None),
        (None, None),
        ("   ", None),
    ],
)
def test_yes_no(pred, parsed):
    assert m.yes_no(pred) == parsed


def test_pope_scores_confusion_matrix():
    # TP=3, FP=1, TN=4, FN=2 -> precision 3/4, recall 3/5, accuracy 7/10.
    preds = ["yes"] * 3 + ["yes"] + ["no"] * 4 + ["no"] * 2
    labels = ["yes"] * 3 + ["no"] + ["no"] * 4 + ["yes"] * 2
    s = m.pope_scores(preds, labels)
    assert s["accuracy"] == pytest.approx(0.7)
    assert s["precision"] == pytest.approx(0.75)
    assert s["recall"] == pytest.approx(0.6)
    assert s["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert s["yes_ratio"] == pytest.approx(0.4)


def test_pope_scores_none_prediction_is_a_missed_positive():
    s = m.pope_scores([None, "no"], ["Yes", "no"])
    assert s == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}


def test_pope_scores_length_mismatch():
    with pytest.raises(ValueError, match="1 predictions and 2 labels"):
        m.pope_scores(["yes"], ["yes", "no"])


# --------------------------------------------------------------------------- MME


@pytest.mark.parametrize(
    "pred, label",
    [
        ("Yes", "yes"),
        ("No.", "no"),
        ("yes, it is", "yes"),
        ("no way", "no"),
        ("Maybe", "other"),
        (None, "other"),
        ("I think yes", "other"),
    ],
)
def test_mme_answer_label(pred, label):
    assert m.mme_answer_label(pred) == label


def _mme_row(cat, img, pred, ans):
    return {"category": cat, "question_id": img, "prediction": pred, "answer": ans}


def test_mme_scores_acc_plus_on_pairs():
    rows = [
        # existence: image 1 both right, image 2 one right -> acc 3/4, acc+ 1/2
        _mme_row("existence", "1.jpg", "Yes", "Yes"),
        _mme_row("existence", "1.jpg", "No", "No"),
        _mme_row("existence", "2.jpg", "Yes", "Yes"),
        _mme_row("existence", "2.jpg", "Yes", "No"),
        # code_reasoning: one image, both right -> 200
        _mme_row("code_reasoning", "a.png", "yes", "Yes"),
        _mme_row("code_reasoning", "a.png", "no.", "No"),
    ]
    s = m.mme_scores(rows)
    ex = s["per_category"]["existence"]
    assert ex["acc"] == pytest.approx(0.75) and ex["acc_plus"] == pytest.approx(0.5)
    assert ex["score"] == pytest.approx(125.0)
    assert s["per_category"]["code_reasoning"]["score"] == pytest.approx(200.0)
    assert s["perception"] == pytest.approx(125.0)
    assert s["cognition"] == pytest.approx(200.0)
    assert "count" in s["missing_categories"]
    assert "existence" not in s["missing_categories"]


def test_mme_category_lists():
    assert len(m.MME_PERCEPTION) == 10 and len(m.MME_COGNITION) == 4
    assert "OCR" in m.MME_PERCEPTION


# --------------------------------------------------------------------------- OCRBench


def test_ocrbench_substring_case_insensitive():
    assert m.ocrbench_match("The sign says STOP here", ["stop"]) == 1.0
    assert m.ocrbench_match("The sign says GO", ["stop", "halt"]) == 0.0
    assert m.ocrbench_match("line one\nline two", "one line") == 1.0


def test_ocrbench_hme100k_removes_spaces_and_keeps_case():
    assert m.ocrbench_match("x ^ { 2 } + 1", ["x^{2}+1"], dataset="HME100k") == 1.0
    assert m.ocrbench_match("X^{2}", ["x^{2}"], dataset="HME100k") == 0.0
    assert m.ocrbench_match("x ^ { 2 }", ["x^{2}"]) == 0.0  # other sources keep spaces
