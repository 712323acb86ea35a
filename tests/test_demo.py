"""``hired-batch demo`` as a user runs it (a subprocess: its own embedded Ray), and the
prompt it shows, which comes from the job's own preprocessing stage."""

import os
import pathlib
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from hired_batch import demo
from hired_batch.job import job_from_options


def test_rendered_prompt_goes_through_the_job_stage_with_the_rows_question(tiny_next, tmp_path):
    data = demo.write_demo_parquet(str(tmp_path / "in.parquet"), 2)
    image = pq.read_table(data, columns=["image"]).column("image")[0].as_py()
    row = {"id": "r1", "image": image, "question": "Which way is north?"}
    o = {
        "input": [data],
        "output": str(tmp_path / "out"),
        "model": str(tiny_next),
        "prompt": "{question} Answer with one word.",
    }
    prompt = demo.rendered_prompt(job_from_options(o), row)
    assert "Which way is north? Answer with one word." in prompt  # the --prompt template applied
    assert prompt.count("<image>") == 1 and prompt.rstrip().endswith("ASSISTANT:")  # the chat template


@pytest.mark.slow
def test_demo_shows_a_prompt_and_answers_and_leaves_no_directory_behind(tmp_path):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(pathlib.Path(demo.__file__).parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    done = subprocess.run(
        [sys.executable, "-m", "hired_batch", "demo", "--rows", "3"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    assert "prompt of row demo-0000 as the model receives it" in out
    assert re.search(r"'<s> USER: <image>\\nWhat is in the picture\? ASSISTANT:'", out), out
    assert "rows: 3 (ok 3, failed 0)" in out
    assert "demo-0001  Q: How many shapes are there?  A: '" in out  # the kept question next to its answer
    work = re.search(r"^working in (\S+) ", out, re.M).group(1)
    assert f"removed {work}" in out and not os.path.exists(work)
    assert list(tmp_path.iterdir()) == []  # nothing written where the user ran it either
