"""``hired_batch.job.options``: an option is written once, as a config field declared with
``config.option``; its flag, its ``job_from_options`` key and its row in the options
reference follow from that field alone."""

import re
from dataclasses import dataclass, field

import pytest

from hired_batch.cli import build_parser
from hired_batch.config import ConfigError, FailurePolicy, JobConfig, option
from hired_batch.job import options as job_options
from hired_batch.job import options_doc, runner
from hired_batch.job.options import field_options, job_from_options, run_options

MINIMAL = ["--input", "in.parquet", "--output", "out"]


@dataclass(frozen=True)
class FailurePolicyPlus(FailurePolicy):
    """A part with three options no code anywhere else knows about."""

    max_retries: int = option(3, help="tries per row before it becomes an error row")
    labels: tuple = option((), flag="label", help="a label the answer may take", vllm="allowed_labels")
    retry_slow: bool = option(False, help="also retry rows that timed out")


@dataclass(frozen=True)
class JobPlus(JobConfig):
    failures: FailurePolicyPlus = field(default_factory=FailurePolicyPlus)


@pytest.fixture
def new_options(monkeypatch):
    """JobConfig with FailurePolicyPlus as its failures part: the only edit is the fields above."""
    monkeypatch.setattr(job_options, "JobConfig", JobPlus)


def parse_run(*argv):
    args = build_parser().parse_args(["run", *MINIMAL, *argv])
    return job_from_options(runner.job_options(runner.merged_options(args)))


def test_a_new_field_with_metadata_is_a_flag_an_option_and_a_documented_row(new_options, capsys):
    job = parse_run("--max-retries", "5", "--label", "yes", "--label", "no", "--retry-slow")
    assert (job.failures.max_retries, job.failures.labels, job.failures.retry_slow) == (5, ("yes", "no"), True)
    assert parse_run().failures == FailurePolicyPlus()  # left out: the field's default
    # from Python and YAML: the same key, typed by the field's annotation
    assert job_from_options({"input": "a", "output": "o", "label": "x"}).failures.labels == ("x",)
    with pytest.raises(ConfigError, match=r"option 'max_retries' expects int, got '5' \(str\)"):
        job_from_options({"input": "a", "output": "o", "max_retries": "5"})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-retries MAX_RETRIES tries per row before it becomes an error row (default 3)" in help_text
    assert "--label LABEL a label the answer may take; repeatable (default none)" in help_text
    doc = options_doc.markdown()
    # a vllm key gives the failures table a SamplingParams column, empty where a field has none
    assert "| `--max-retries` | `3` |  | Tries per row before it becomes an error row. |" in doc
    assert "| `--retry-slow` | off |  | Also retry rows that timed out. |" in doc
    assert "| `--label` (repeatable) | none | `allowed_labels` | A label the answer may take. |" in doc


def test_without_the_new_fields_none_of_it_exists():
    # the property above is not vacuous: the stock JobConfig has no such option anywhere
    assert "max_retries" not in {o.name for o in run_options()}
    assert "--max-retries" not in options_doc.markdown()
    with pytest.raises(ConfigError, match="unknown option"):
        job_from_options({"input": "a", "output": "o", "max_retries": 5})


def test_every_option_has_a_short_help_that_leaves_the_default_to_the_field():
    names = [o.name for o in run_options()]
    assert len(names) == len(set(names))
    for o in field_options():
        assert o.help and o.help == o.help.strip() and o.help[-1] != ".", o.name
        # the default is appended from the field (or its default_text); a help stating it would drift
        assert not re.search(r"\bdefault\b", o.help), o.name
        assert set(o.meta) <= {
            "help",
            "flag",
            "choices",
            "default_text",
            "required",
            "negatable",
            "engine",
            "engine_notes",
            "vllm",
            "doc",
        }, o.name


def test_flag_kinds_follow_the_field_types():
    kinds = {o.name: o.kind for o in run_options()}
    assert (kinds["input"], kinds["keep_column"], kinds["stop"]) == ("append",) * 3
    assert (kinds["save_indices"], kinds["skip_unreadable"], kinds["overwrite"]) == ("switch", "switch", "negatable")
    p = build_parser()
    assert p.parse_args(["run", "--no-overwrite"]).overwrite is False  # overrides overwrite: true in YAML
    args = p.parse_args(["run", "--budget", "0.3", "--max-new-tokens", "4", "--batch-size", "auto"])
    assert (args.budget, args.max_new_tokens, args.batch_size) == (0.3, 4, "auto")
    assert all(v is None for k, v in vars(p.parse_args(["run"])).items() if k not in ("command", "func"))
