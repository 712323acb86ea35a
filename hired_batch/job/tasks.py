"""Task presets: one ``TaskPreset`` per benchmark of the HiRED paper, and the prompt
each one sends.

``TASKS`` says where the lmms-lab copy of the dataset lives on the Hugging Face Hub,
which columns hold the id, image, question and ground truth, the LLaVA prompt lmms-eval
uses (``render_prompt``), and the metric ``hired_batch.eval.score`` scores it with. It belongs
to the job layer: ``run --task`` reads it to build a job (the preprocessing stage renders
the prompt), and scoring reads it afterwards.

Dataset ids, configs, splits, prompts and ``max_new_tokens`` were checked against the
lmms-eval task YAMLs and ``utils.py`` (see ``TaskPreset``), and column names against the
datasets' Hub cards (``dataset_info: features``); where the hub is reachable,
``datasets.load_dataset_builder(hf_dataset, hf_config).info.features`` shows them too.

GQA is not a preset: lmms-lab/GQA keeps questions and images in separate configs
joined by ``imageId``, which a single-table reader does not do.

This module imports neither torch nor Ray.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from hired_batch.config import ConfigError
from hired_batch.engine.prompts import render_template, template_fields

_SHORT = "\nAnswer the question using a single word or phrase."


# --------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class TaskPreset:
    """How to run and score one benchmark. Column names are the dataset's own.

    Presets checked against lmms-eval as vendored in hasanar1f/HiRED (commit 502d6dd,
    lmms_eval 0.1.2; the copy the paper ran, ``--model llava_hf``) and against
    EvolvingLMMs-Lab/lmms-eval main (commit 75571cf): test_split, dataset_name, the
    ``default`` pre/post prompts, doc_to_text and max_new_tokens agree between the two;
    main reads the same datasets from ``lmms-lab-encoder/*`` copies, we keep the paper's
    ``lmms-lab/*`` ids.
    """

    name: str  # key in TASKS and value of `--task`
    hf_dataset: str  # Hugging Face dataset id (lmms-lab copy lmms-eval reads)
    hf_config: str | None  # dataset config name; None for the default config
    split: str  # split with public ground truth that lmms-eval scores
    id_column: str | None  # unique row id; None: the dataset has none, number the rows
    image_column: str  # column holding the image (HF Image feature)
    question_column: str  # column holding the question text
    answer_columns: tuple[str, ...]  # ground-truth columns to keep in the output
    prompt: str  # template over dataset columns (hired_batch.engine.prompts syntax), see render_prompt
    max_new_tokens: int  # generation budget per answer, tokens (lmms-eval's value)
    metric: str  # key of METRICS: how rows are scored and aggregated
    category_column: str | None  # column to break the score down by; None for none
    paper_full: float | None = None  # paper: LLaVA-NeXT-7B, all visual tokens
    paper_hired20: float | None = None  # paper: LLaVA-NeXT-7B, HiRED 20 % budget
    question_style: str = "raw"  # key of QUESTION_STYLES: lmms-eval's question cleanup

    @property
    def kept_columns(self) -> tuple[str, ...]:
        """Dataset columns the job must carry to the output (ground truth + category)."""
        extra = (self.category_column,) if self.category_column else ()
        return tuple(dict.fromkeys(self.answer_columns + extra))

    @property
    def prompt_fields(self) -> tuple[str, ...]:
        """Dataset columns the prompt template reads."""
        return template_fields(self.prompt, f"task {self.name!r} prompt")


TASKS: dict[str, TaskPreset] = {
    p.name: p
    for p in (
        TaskPreset(
            name="vqav2",
            hf_dataset="lmms-lab/VQAv2",
            hf_config=None,
            split="validation",
            id_column="question_id",
            image_column="image",
            question_column="question",
            answer_columns=("answers",),  # list of {answer, answer_confidence, answer_id}
            prompt="{question}" + _SHORT,
            max_new_tokens=16,
            metric="vqa_accuracy",
            category_column="answer_type",
            paper_full=80.3,
            paper_hired20=77.5,
        ),
        TaskPreset(
            name="textvqa",
            hf_dataset="lmms-lab/textvqa",
            hf_config=None,
            split="validation",
            id_column="question_id",
            image_column="image",
            question_column="question",
            answer_columns=("answers",),  # list of strings
            # lmms-eval's textvqa YAML sets no max_new_tokens (only until "ASSISTANT:"), so
            # llava_hf's default of 1024 applies; doc_to_text uses question.capitalize().
            prompt="{question}" + _SHORT,
            max_new_tokens=1024,
            metric="vqa_accuracy",
            category_column=None,
            paper_full=64.8,
            paper_hired20=61.4,
            question_style="capitalize",
        ),
        TaskPreset(
            name="docvqa",
            hf_dataset="lmms-lab/DocVQA",
            hf_config="DocVQA",
            split="validation",
            id_column="questionId",
            image_column="image",
            question_column="question",
            answer_columns=("answers",),
            prompt="{question}" + _SHORT,
            max_new_tokens=32,
            metric="anls",
            category_column=None,
            paper_full=73.4,
            paper_hired20=60.8,
        ),
        TaskPreset(
            name="chartqa",
            hf_dataset="lmms-lab/ChartQA",
            hf_config=None,
            split="test",
            id_column=None,
            image_column="image",
            question_column="question",
            answer_columns=("answer",),
            prompt="{question}\nAnswer the question with a single word.",
            max_new_tokens=16,
            metric="relaxed_accuracy",
            category_column="type",  # human_test / augmented_test
            paper_full=54.8,
            paper_hired20=42.0,
        ),
        TaskPreset(
            name="pope",
            hf_dataset="lmms-lab/POPE",
            hf_config=None,
            split="test",
            id_column="id",  # question_id repeats across the three categories
            image_column="image",
            question_column="question",
            answer_columns=("answer",),
            prompt="{question}" + _SHORT,
            max_new_tokens=128,
            metric="pope",
            category_column="category",  # adversarial / popular / random
            paper_full=87.6,
            paper_hired20=87.0,
            question_style="strip",
        ),
        TaskPreset(
            name="mme",
            hf_dataset="lmms-lab/MME",
            hf_config=None,
            split="test",
            id_column=None,  # question_id names the image, shared by its two questions
            image_column="image",
            question_column="question",
            answer_columns=("question_id", "answer"),
            # lmms-eval drops the question's own " Please answer yes or no." before its
            # post_prompt (mme_doc_to_text)
            prompt="{question}" + _SHORT,
            max_new_tokens=16,
            metric="mme",
            category_column="category",
            question_style="mme",
        ),
        TaskPreset(
            name="scienceqa_img",
            hf_dataset="lmms-lab/ScienceQA",
            hf_config="ScienceQA-IMG",
            split="test",
            id_column=None,
            image_column="image",
            question_column="question",
            answer_columns=("answer", "choices"),  # answer: index into choices
            prompt="{hint}{question}\n{choices}\nAnswer with the option's letter from the given choices directly.",
            max_new_tokens=16,
            metric="choice_accuracy",
            category_column="subject",
        ),
        TaskPreset(
            name="ocrbench",
            hf_dataset="echo840/OCRBench",
            hf_config=None,
            split="test",
            id_column=None,
            image_column="image",
            question_column="question",
            answer_columns=("answer", "dataset"),  # dataset: source, HME100k is special
            prompt="{question}",
            max_new_tokens=128,
            metric="ocrbench_match",
            category_column="question_type",
            question_style="strip",
        ),
    )
}


def get_task(name: str) -> TaskPreset:
    """The preset called ``name``; ValueError listing the known ones otherwise."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


# --------------------------------------------------------------------------- prompts


def _hint_field(value: Any) -> str:
    """ScienceQA context line, lmms-eval style: empty when there is no hint."""
    return f"Context: {value}\n" if value else ""


def _choices_field(value: Any) -> str:
    """ScienceQA options as "A. first\\nB. second"."""
    return "\n".join(f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(value))


_FIELD_FORMATTERS: dict[str, Callable[[Any], str]] = {"hint": _hint_field, "choices": _choices_field}

_MME_SUFFIX = " Please answer yes or no."  # in every MME question; lmms-eval removes it

QUESTION_STYLES: dict[str, Callable[[str], str]] = {  # as each doc_to_text treats it
    "raw": lambda q: q,  # vqav2, docvqa, chartqa, scienceqa: used as is
    "strip": lambda q: q.strip(),  # pope, ocrbench
    "capitalize": lambda q: q.capitalize(),  # textvqa: first letter up, rest lowered
    "mme": lambda q: q.strip().replace(_MME_SUFFIX, ""),
}


def render_prompt(preset: TaskPreset, row: Mapping[str, Any]) -> str:
    """The preset's prompt for one dataset row.

    Fields are the row's columns; ``hint`` and ``choices`` are rendered as lmms-eval's
    ScienceQA prompt does (a "Context: ..." line, lettered options), and the question
    column goes through the preset's ``question_style`` (QUESTION_STYLES).
    """
    missing = [f for f in preset.prompt_fields if f not in row]
    if missing:
        raise ConfigError(
            f"task {preset.name!r}: prompt expected columns {list(preset.prompt_fields)}, row has {sorted(row)}"
        )
    fields = {f: _FIELD_FORMATTERS.get(f, str)(row[f]) for f in preset.prompt_fields}
    if preset.question_column in fields:
        question = QUESTION_STYLES[preset.question_style]
        fields[preset.question_column] = question(fields[preset.question_column])
    return render_template(preset.prompt, fields)
