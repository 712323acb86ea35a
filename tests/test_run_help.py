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


def test_run_refuses_an_unknown_selector_before_anything_starts(capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "--input", "x.parquet", "--output", "o", "--selector", "hried"])
    assert e.value.code == 2
    assert "invalid choice: 'hried'" in capsys.readouterr().err
