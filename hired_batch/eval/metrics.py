"""Accuracy metrics of the benchmarks in the HiRED paper, as their official scripts define them.

One function per metric, on plain Python strings, so a score can be recomputed by hand:

- VQAv2 / TextVQA: ``vqa_accuracy`` (official VQA answer normalization + 10-way
  leave-one-out accuracy).
- DocVQA / InfoVQA: ``anls`` (Average Normalized Levenshtein Similarity).
- ChartQA: ``relaxed_accuracy`` (5 % relative tolerance on numbers).
- ScienceQA: ``extract_choice_letter`` + ``exact_match``.
- POPE: ``yes_no`` + ``pope_scores``.
- MME: ``mme_answer_label`` + ``mme_scores`` (acc, acc+, perception/cognition sums).
- OCRBench: ``ocrbench_match``.

Per-item functions return a float in [0, 1]; aggregates return dicts of fractions
(MME: points, as MME reports them). Where our code departs from a reference script,
the docstring says so.

This module does not read files, know dataset column names, or import torch or Ray:
mapping a job's output rows onto these functions is ``hired_batch.eval.score``'s job.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from typing import Iterable, Mapping, Sequence

# --------------------------------------------------------------------------- VQA tables
# Written from the official VQA evaluation script (GT-Vision-Lab/VQA,
# PythonEvaluationTools/vqaEvaluation/vqaEval.py), which lmms-eval copies as
# EvalAIAnswerProcessor. Keys with capitals ("Im", "Ive", ...) can never match because
# words are lowercased first; they are kept so the table reads like the original.

_CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    # sic: the official table maps this one *away* from the apostrophe form.
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}

# "none" -> "0" is in the official manual map too.
_MANUAL_MAP = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}

_ARTICLES = frozenset({"a", "an", "the"})

# Not in the list: "." (handled by _PERIOD_STRIP), "'" (contractions), ":", "%", "$"...
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")

# A comma between digits ("1,000") anywhere in the answer makes *every* punctuation
# mark vanish instead of becoming a space, as in the official script.
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# Official pattern "(?!<=\d)(\.)(?!\d)": the first group is a (buggy) look-ahead, so in
# effect a period is removed unless a digit follows it ("3.5" keeps its period).
# The official call also passes re.UNICODE as `count` (32); we remove all periods.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")


def _process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: drop or space out punctuation, strip periods."""
    digit_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for p in _PUNCT:
        if digit_comma or (p + " " in text) or (" " + p in text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out)


def _process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lowercase, number words -> digits, drop articles,
    restore contractions."""
    words = [_MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """The official VQA answer normalization, applied to a prediction or a reference.

    Newlines/tabs become spaces, punctuation is removed or spaced out (a comma between
    digits removes all of it: "1,000" -> "1000"), periods not followed by a digit are
    removed ("yes." -> "yes", "3.5" stays), then words are lowercased, "zero".."ten"
    (and "none") become digits, "a"/"an"/"the" are dropped and contractions written
    without apostrophe get it back ("dont" -> "don't").

    Reference: GT-Vision-Lab/VQA ``vqaEval.py`` (processPunctuation,
    processDigitArticle); lmms-eval ``EvalAIAnswerProcessor``.
    """
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (VQAv2, TextVQA).

    Both sides go through :func:`normalize_vqa_answer`. For each reference i, the
    accuracy against the *other* references is min(1, #matches / 3); the result is the
    mean over the leave-one-out subsets (10 for VQAv2/TextVQA; with fewer answers, over
    the subsets that exist, so a single reference can never score above 0).
    With 10 answers of which k equal the prediction: k=1 -> 0.3, 2 -> 0.6, 3 -> 0.9,
    4+ -> 1.0.

    Reference: Antol et al., VQA (ICCV 2015) and the official ``vqaEval.py``; lmms-eval
    ``textvqa_process_results`` (which, like us, normalizes every reference; the
    official script normalizes references only when they disagree, which differs
    only for unnormalized references).
    """
    if len(answers) == 0:
        raise ValueError("vqa_accuracy expected at least one reference answer, got none")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    accs = []
    for i in range(len(refs)):
        matches = sum(1 for j, ref in enumerate(refs) if j != i and ref == pred)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


# --------------------------------------------------------------------------- ANLS


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; each costs 1)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        cur = [i]
        for j, cb in enumerate(b, start=1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _anls_normalize(text: str) -> str:
    return " ".join(text.strip().lower().split())


def anls(prediction: str, answers: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalized Levenshtein Similarity of one prediction (DocVQA, InfoVQA).

    As lmms-eval scores it (the scorer of the HiRED paper's tables): the edit distance
    is taken between the normalized strings (lowercased, stripped, inner whitespace
    collapsed) but divided by the length of the longer *raw* string (as given,
    upper-cased, which is how lmms-eval counts it), so whitespace that normalization
    removed still counts in the denominator: ``'q '`` against ``['q 3', '']`` scores
    0.5 (distance 1 to ``''`` over length 2). For each reference, similarity =
    1 - distance / length (1 when both raw strings are empty); the item's score is
    the best similarity, or 0 if it is below ``threshold`` (exactly at the threshold
    is kept).

    Reference: Biten et al., "Scene Text Visual Question Answering" (ICCV 2019);
    lmms-eval ``api/metrics.py`` ``anls``, itself taken from Qwen-VL's InfographicVQA
    evaluation.
    """
    if len(answers) == 0:
        raise ValueError("anls expected at least one reference answer, got none")
    pred = _anls_normalize(prediction)
    best = 0.0
    for answer in answers:
        length = max(len(answer.upper()), len(prediction.upper()))  # raw strings
        sim = 1.0 if length == 0 else 1.0 - levenshtein(pred, _anls_normalize(answer)) / length
        best = max(best, sim)
    return 0.0 if best < threshold else best


# --------------------------------------------------------------------------- ChartQA


def _to_float(text: str) -> float | None:
    """lmms-eval's ``_to_float``, plus thousands separators: "1,234" -> 1234.0,
    "12%" -> 0.12, anything else non-numeric -> None."""
    text = text.strip().replace(",", "")
    try:
        if text.endswith("%"):
            return float(text.rstrip("%")) / 100.0
        return float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, answer: str, tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy of one prediction: 1.0 or 0.0.

    If both sides parse as numbers ("%" divides by 100, commas are thousands
    separators) and the target is non-zero, correct when
    |pred - target| / |target| <= tolerance (boundary included). Otherwise (text
    answers, or a target of 0) an exact, case-insensitive match of the stripped strings.
    Note that "50%" (0.5) does not match a target "50", as in lmms-eval.

    Reference: Masry et al., ChartQA (ACL Findings 2022), following Methani et al.
    PlotQA; lmms-eval ``chartqa`` ``relaxed_correctness`` (comma handling is ours).
    """
    pred_f, target_f = _to_float(prediction), _to_float(answer)
    if pred_f is not None and target_f:
        return float(abs(pred_f - target_f) / abs(target_f) <= tolerance)
    return float(prediction.strip().lower() == answer.strip().lower())


# --------------------------------------------------------------------------- exact / choices


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the strings are equal after stripping whitespace and lowercasing.

    Reference: the ``exact_match`` metric of lmms-eval / lm-evaluation-harness with
    ``ignore_case`` and surrounding whitespace ignored.
    """
    return float(prediction.strip().lower() == answer.strip().lower())


# (A) / A. / A) / A: at the start followed by text.
_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:\)|[.:])(?:\s|$)")
# "the answer is (B)", "Answer: C", "option D" -- the letter must stand alone.
_PHRASED_LETTER = re.compile(r"(?i:answer|option|choice)(?:\s+(?i:is))?\s*:?\s*\(?([A-Z])\)?(?=$|[\s.,;:!)])")


def extract_choice_letter(prediction: str, n_choices: int) -> str | None:
    """The option letter a multiple-choice answer names ("A".."E" for ScienceQA), or None.

    Accepted, in order: a bare letter with optional brackets/period ("A", "a", "A.",
    "(A)"); a letter opening the answer ("B. Paris", "(C) 4", "D) no"); a letter after
    "answer"/"option"/"choice" ("The answer is B.", "Answer: (C)"). Letters beyond the
    first ``n_choices`` don't count. A lone lowercase letter is accepted only bare,
    so "a dog" is not read as option A.

    Reference: lmms-eval ``scienceqa`` ``sqa_process_results`` accepts an exact letter
    or "X." at the start; LLaVA's ``eval_science_qa.py`` also reads "The answer is X".
    """
    if not 1 <= n_choices <= 26:
        raise ValueError(f"n_choices must be in 1..26, got {n_choices}")
    valid = string.ascii_uppercase[:n_choices]
    text = prediction.strip()
    bare = re.fullmatch(r"\(?([A-Za-z])\)?\.?", text)
    candidates = [bare.group(1).upper()] if bare else []
    candidates += [m.group(1) for m in (_LEADING_LETTER.match(text),) if m]
    candidates += [m.group(1) for m in _PHRASED_LETTER.finditer(text)]
    return next((c for c in candidates if c in valid), None)


# --------------------------------------------------------------------------- POPE


def yes_no(prediction: str | None) -> str | None:
    """Read a yes/no answer the way POPE's and LLaVA's ``eval_pope.py`` do.

    Keep the text before the first period, drop commas, split on spaces: "no" if
    "No", "no" or "not" is one of the words, otherwise "yes" (so "Yes", "There is a
    dog" and even "Nope" count as yes, as in the reference). We strip the text first
    and return None for a missing or blank prediction, which the reference would call
    "yes"; a None counts as neither answer in :func:`pope_scores`.

    Reference: AoiDragon/POPE ``evaluate.py``; haotian-liu/LLaVA
    ``llava/eval/eval_pope.py``.
    """
    if prediction is None or not prediction.strip():
        return None
    text = prediction.strip().split(".")[0].replace(",", "")
    words = text.split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


def pope_scores(preds: Sequence[str | None], labels: Sequence[str]) -> dict:
    """POPE accuracy, precision, recall, F1 and yes-ratio, with "yes" as the positive class.

    ``preds`` are parsed answers ("yes", "no" or None, see :func:`yes_no`), ``labels``
    the ground truth ("yes"/"no", any case). A None prediction is wrong and is not a
    predicted positive (a missed "yes" is a false negative). Ratios with a zero
    denominator are 0. yes_ratio = share of predictions that are "yes".

    Reference: Li et al., POPE (EMNLP 2023), ``evaluate.py``; lmms-eval ``pope``.
    """
    if len(preds) != len(labels):
        raise ValueError(
            f"pope_scores expected as many predictions as labels, got {len(preds)} predictions and {len(labels)} labels"
        )
    labels = [lab.strip().lower() for lab in labels]
    tp = sum(p == "yes" and t == "yes" for p, t in zip(preds, labels))
    fp = sum(p == "yes" and t != "yes" for p, t in zip(preds, labels))
    tn = sum(p == "no" and t == "no" for p, t in zip(preds, labels))
    fn = sum(t == "yes" for t in labels) - tp
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    return {
        "accuracy": _ratio(tp + tn, len(labels)),
        "precision": precision,
        "recall": recall,
        "f1": _ratio(2 * precision * recall, precision + recall),
        "yes_ratio": _ratio(tp + fp, len(labels)),
    }


# --------------------------------------------------------------------------- MME

MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_answer_label(prediction: str | None) -> str:
    """MME's reading of an answer: "yes", "no" or "other".

    Lowercase, strip, remove periods; an exact "yes"/"no" wins, else "yes" or "no"
    appearing in the first 4 characters, else "other" (always wrong).

    Reference: MME ``eval_tool/calculation.py`` ``parse_pred_ans``; lmms-eval ``mme``.
    """
    text = (prediction or "").lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    prefix = text[:4]
    return "yes" if "yes" in prefix else "no" if "no" in prefix else "other"


def _mme_category(rows: list[Mapping]) -> dict:
    """acc, acc+ and score of one category's rows."""
    by_image: dict[str, list[bool]] = defaultdict(list)
    for row in rows:
        ok = mme_answer_label(row["prediction"]) == str(row["answer"]).strip().lower()
        by_image[str(row["question_id"])].append(ok)
    acc = sum(sum(v) for v in by_image.values()) / len(rows)
    acc_plus = sum(all(v) for v in by_image.values()) / len(by_image)
    return {"acc": acc, "acc_plus": acc_plus, "score": 100.0 * (acc + acc_plus)}


def mme_scores(rows: Iterable[Mapping]) -> dict:
    """MME scores from rows with ``category``, ``question_id`` (the image), ``prediction``
    and ``answer`` ("Yes"/"No").

    Per category: acc = share of questions right, acc+ = share of images whose
    questions (two per image) are all right, score = 100 * (acc + acc+), at most 200.
    ``perception`` sums the 10 perception categories (max 2000), ``cognition`` the 4
    cognition ones (max 800); categories absent from ``rows`` add 0 and are listed in
    ``missing_categories``; unknown categories are scored but in neither sum.

    Reference: Fu et al., MME (2023), ``eval_tool/calculation.py``; lmms-eval ``mme``.
    """
    grouped: dict[str, list[Mapping]] = defaultdict(list)
    for row in rows:
        grouped[str(row["category"])].append(row)
    per_category = {cat: _mme_category(r) for cat, r in sorted(grouped.items())}

    def total(names):
        return sum(per_category[c]["score"] for c in names if c in per_category)

    missing = [c for c in MME_PERCEPTION + MME_COGNITION if c not in per_category]
    return {
        "per_category": per_category,
        "perception": total(MME_PERCEPTION),
        "cognition": total(MME_COGNITION),
        "missing_categories": missing,
    }


# --------------------------------------------------------------------------- OCRBench


def ocrbench_match(prediction: str, answers: str | Sequence[str], dataset: str | None = None) -> float:
    """OCRBench: 1.0 if any reference answer is a substring of the prediction.

    Newlines become spaces and both sides are stripped and lowercased; for the
    handwritten-math source ``dataset == "HME100k"`` case is kept and all spaces are
    removed from both sides instead (LaTeX spacing is arbitrary).

    Reference: Liu et al., OCRBench (2023), ``MultimodalOCR`` ``example.py``;
    lmms-eval ``ocrbench_process_results``.
    """
    refs = [answers] if isinstance(answers, str) else list(answers)
    if dataset == "HME100k":

        def norm(s):
            return s.strip().replace("\n", " ").replace(" ", "")
    else:

        def norm(s):
            return s.lower().strip().replace("\n", " ")

    pred = norm(prediction)
    return float(any(norm(ref) in pred for ref in refs))
