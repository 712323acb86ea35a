"""docs/options.md is generated from the config fields' metadata and checked in; it must
match what the code generates now."""

import pathlib

from hired_batch.job import options_doc
from hired_batch.job.options import run_options

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "options.md"


def test_checked_in_reference_matches_the_code():
    assert DOC.read_text() == options_doc.markdown(), (
        f"docs/options.md differs from the options in hired_batch/config.py: regenerate it with "
        f"`{options_doc.COMMAND}` and commit it"
    )


def test_every_flag_has_one_row_and_generation_options_name_their_sampling_params():
    doc = options_doc.markdown()
    for o in run_options():
        assert doc.count(f"| `{o.flag}`") == 1, o.flag
    assert "| `--max-new-tokens` | `64` | `max_tokens` |" in doc
    assert "| `--top-k` | `0` | `top_k` |" in doc
