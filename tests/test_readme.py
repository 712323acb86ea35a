"""Every command in the README runs as written.

The README's fenced ``bash`` blocks are split into commands (continuation lines joined,
comments dropped). Each command is run exactly as written, in a fresh temporary
directory as its working directory (the only thing chosen for it), by ``bash -c``, with
this checkout's ``hired_batch`` and its ``hired-batch`` entry point. Commands are sorted
by explicit rules (``SKIP``: never run here, each with its reason; ``STARTS_RAY``: run
end to end in the slow test) and everything else runs in the fast loop; a command that
matches no rule is run, never dropped."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()

# (command prefix, why it is not run by this test). Nothing else is skipped.
SKIP = {
    "pip ": "installs packages: it would change the environment these tests run in; .ci/run "
    "runs the install, and tests/test_install_recipe.py checks its versions",
    "python -m pytest": "the test suite itself: running it from a test recurses; .ci/run runs it",
    "ray job submit": "needs a running Ray cluster and an S3 bucket; tests/test_job_submit.py "
    "submits the same entrypoint to a local cluster, tests/test_cluster_manifests.py "
    "checks its flags",
}
# Commands that start Ray and load a model: run end to end, in README order, in the slow test.
STARTS_RAY = ("hired-batch demo", "hired-batch plan", "hired-batch run", "hired-batch calibrate")
DEMO_ROWS = 24  # rows `hired-batch demo` writes to demo/input/ (hired_batch.demo.DEMO_ROWS)
TIMEOUT_S = 900  # one command; a demo takes minutes on a busy 2-core machine


def readme_commands(text: str = README) -> list[str]:
    """The commands of every ```bash block of ``text``, in order."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.M | re.S):
        current = ""
        for line in block.splitlines():
            code = strip_comment(line).rstrip()
            if not code.strip():  # blank or comment-only (also inside a continued command)
                continue
            if code.endswith("\\"):
                current += code[:-1].rstrip() + " "
                continue
            commands.append((current + code.strip()).strip())
            current = ""
        assert not current, f"a bash block ends inside a continued command: {current!r}"
    return commands


def strip_comment(line: str) -> str:
    """``line`` without a trailing ``# comment`` (a ``#`` outside quotes, after a space)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def skip_reason(command: str) -> str | None:
    return next((why for prefix, why in SKIP.items() if command.startswith(prefix)), None)


def fast_commands() -> list[str]:
    return [c for c in readme_commands() if not skip_reason(c) and not c.startswith(STARTS_RAY)]


def ray_commands() -> list[str]:
    return [c for c in readme_commands() if not skip_reason(c) and c.startswith(STARTS_RAY)]


def run_as_written(command: str, cwd: Path) -> subprocess.CompletedProcess:
    """``command`` by bash in ``cwd``, with this checkout's code and entry point."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    env.pop("RAY_ADDRESS", None)  # the README's commands start their own Ray, never join one
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_readme_commands_are_found_and_every_one_is_sorted():
    commands = readme_commands()
    skipped = [c for c in commands if skip_reason(c)]
    # the README's install, test and cluster lines are there, and only they are skipped
    assert any(c.startswith("pip install torch==") for c in skipped)
    assert "python -m pytest -q" in skipped and 'python -m pytest -q -m "not slow"' in skipped
    assert len(skipped) + len(fast_commands()) + len(ray_commands()) == len(commands)
    assert "hired-batch doctor" in fast_commands()
    runs = [c for c in ray_commands() if c.startswith("hired-batch run")]
    assert ray_commands()[0].startswith("hired-batch demo --workdir demo"), "the runs read the demo's files"
    # the first run plus the three uses: captioning (no question column), VQA, annotation (kept column)
    assert len(runs) >= 4
    assert any("--question-column none" in c for c in runs) and any("--keep-column" in c for c in runs)


def test_comments_and_continuations_are_parsed():
    text = "```bash\nhired-batch run --a 1 \\\n    --b '#x'   # say\n# only a comment\necho ok # c\n```\n"
    assert readme_commands(text) == ["hired-batch run --a 1 --b '#x'", "echo ok"]


@pytest.mark.parametrize("command", fast_commands())
def test_short_command_runs_as_written(command, tmp_path):
    done = run_as_written(command, tmp_path)
    assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"


@pytest.mark.parametrize("command", [c for c in ray_commands() if c.startswith("hired-batch run")])
def test_run_commands_name_real_flags_and_valid_values(command, tmp_path, monkeypatch):
    """The fast loop's check of the slow commands: the flags exist and the values pass
    the job's checks (no Ray, no files read but the demo's --config file, written here as
    the demo writes it)."""
    from hired_batch.demo import ANNOTATE_YAML
    from hired_batch.job import job_from_options, runner

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "annotate.yaml").write_text(ANNOTATE_YAML)

    p = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    runner.add_run_arguments(p)
    args, unknown = p.parse_known_args(shlex.split(command)[2:])
    assert not unknown, f"flags unknown to hired-batch run: {unknown}"
    job_from_options(runner.job_options(runner.merged_options(args)))


@pytest.mark.parametrize("command", [c for c in ray_commands() if c.startswith("hired-batch calibrate")])
def test_calibrate_commands_name_real_flags_and_valid_values(command):
    """As above, for ``calibrate``: its flags exist and its checks without data pass."""
    from hired_batch.bench import calibrate
    from hired_batch.job import runner

    p = argparse.ArgumentParser(allow_abbrev=False, exit_on_error=False)
    calibrate.add_flags(p)
    args, unknown = p.parse_known_args(shlex.split(command)[2:])
    assert not unknown, f"flags unknown to hired-batch calibrate: {unknown}"
    calibrate.plan_from_options(runner.merged_options(args))


def _option(argv: list, flag: str, default=None):
    return argv[argv.index(flag) + 1] if flag in argv else default


@pytest.mark.slow
def test_demo_and_runs_run_as_written_in_order(tmp_path):
    """The demo, then every ``hired-batch plan``, ``run`` and ``calibrate`` on its files: each
    exits 0; a plan counts every input row, a run writes one row per input row, each with an
    answer, ``calibrate`` writes its report."""
    import json

    import pyarrow.parquet as pq

    for command in ray_commands():
        done = run_as_written(command, tmp_path)
        assert done.returncode == 0, f"{command}\nexit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        argv = shlex.split(command)
        if argv[1] == "plan":
            assert f"rows: {DEMO_ROWS} (ok {DEMO_ROWS}, would fail 0" in done.stdout, command
            continue
        if argv[1] == "calibrate":
            report = json.loads((tmp_path / _option(argv, "--report")).read_text())
            assert report["recommendation"]["command"] in done.stdout, command
            continue
        rows = int(_option(argv, "--rows", DEMO_ROWS))
        out = tmp_path / (_option(argv, "--output") or f"{_option(argv, '--workdir')}/output")
        table = pq.read_table(str(out)).to_pydict()
        assert sorted(table["id"]) == sorted(set(table["id"])) and len(table["id"]) == rows, command
        asked = [k for k in table if k.startswith("answer_") and not k.startswith("answer_struct")]
        for k in asked or ["answer"]:  # --ask (the annotation example): one answer_NAME per question
            assert all(e is None for e in table["error"]) and all(isinstance(a, str) for a in table[k]), command
        for k in (k for k in table if k.startswith("answer_struct_")):  # a schema question's typed answer
            assert all(isinstance(a, dict) for a in table[k]), command


def test_the_annotation_example_is_the_file_the_demo_writes():
    from hired_batch.demo import ANNOTATE_YAML

    assert f"```yaml\n{ANNOTATE_YAML}```" in README


def test_scoring_doc_shows_the_presets_table():
    from hired_batch.eval import score

    assert score.readme_table() in (REPO / "docs" / "scoring.md").read_text()
