"""``hired-batch run --help`` lists the values of its closed-choice flags, as visualize does."""

import pytest

from hired_batch.cli import main
from hired_batch.config import DTYPES, MODES, SELECTORS


def test_run_help_lists_selector_mode_and_dtype_choices(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for values in (SELECTORS, MODES, DTYPES):
        assert "{" + ",".join(values) + "}" in out


def test_run_refuses_an_unknown_selector_in_one_line(capsys):
    # the config checks the value (YAML values too): one line, exit 2, no usage dump
    assert main(["run", "--input", "x.parquet", "--output", "o", "--selector", "hried"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "selector must be one of" in err and "'hried'" in err
