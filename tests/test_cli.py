"""Bad configuration fails fast through the CLI: one clear line, exit 2, no Ray started."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.cli import run_before_ray

from hired_batch.cli import main, run_standalone
from hired_batch.engine.inputs import image_to_bytes, make_synthetic_image


@pytest.fixture()
def dataset(tmp_path):
    img = image_to_bytes(make_synthetic_image(64, 48, 0))
    pq.write_table(pa.table({"uid": ["a", "b"], "picture": [img, img], "ask": ["q1", "q2"]}), tmp_path / "in.parquet")
    return tmp_path


def run(capsys, *argv):
    return run_before_ray(capsys, *argv)


def base(d, model):
    return [
        "--input",
        str(d / "in.parquet"),
        "--output",
        str(d / "out"),
        "--model",
        str(model),
        "--image-column",
        "picture",
        "--question-column",
        "ask",
        "--id-column",
        "uid",
    ]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--image-column", "img"], "column(s) ['img'] not found in"),
        (["--budget", "1.5"], "budget must be a fraction in (0, 1]"),
        (["--budget", "0"], "budget must be a fraction in (0, 1]"),
        (["--alpha", "-0.1"], "alpha must be in [0, 1]"),
        (["--selector", "oracle"], "selector must be one of"),
        (["--mode", "paper"], "mode must be one of"),
        (["--batch-size", "0"], "batch size must be a positive integer or 'auto'"),
        (["--keep-column", "nope"], "available columns: ['ask', 'picture', 'uid']"),
        (["--generate-memory", "lots"], "memory size must look like 8GB"),
        (["--batch-size", "auto", "--memory-limit", "lots"], "memory size must look like 8GB"),
        (["--vision-chunk", "0"], "vision_chunk must be >= 1 crop"),
        (["--image-timeout", "0"], "image_timeout must be a number of seconds > 0, got 0.0"),
        (["--seed", "-1"], "seed must be an integer >= 0, got -1"),
        # the tiny LLaVA-NeXT: 1 + 2x2 crops of 576 patches at most
        (["--budget-tokens", "2881"], "--budget-tokens 2881 is more than any image has with"),
        (
            ["--budget-tokens", "2881"],
            "at most 2880 visual tokens (1 + 2x2 crops, its largest anyres grid, x 576 patches)",
        ),
    ],
)
def test_bad_options_fail_with_one_line(capsys, dataset, tiny_next, extra, message):
    code, err = run(capsys, *base(dataset, tiny_next), *extra)
    assert code == 2
    assert message in err and len(err.splitlines()) == 1


def test_output_inside_input_is_refused(capsys, dataset, tiny_next):
    code, err = run(capsys, "--input", str(dataset), "--output", str(dataset / "answers"), "--model", str(tiny_next))
    assert code == 2 and "is inside input" in err


def test_unreadable_model_directory(capsys, dataset, tmp_path):
    (tmp_path / "empty-model").mkdir()
    for model in (tmp_path / "missing-model", tmp_path / "empty-model"):
        code, err = run(capsys, *base(dataset, model))
        assert code == 2 and "model" in err and str(model) in err


def test_duplicate_ids_are_refused(capsys, tmp_path, tiny_next):
    img = image_to_bytes(make_synthetic_image(64, 48, 0))
    pq.write_table(
        pa.table({"id": ["a", "a", "b"], "image": [img] * 3, "question": ["q"] * 3}), tmp_path / "in.parquet"
    )
    code, err = run(
        capsys, "--input", str(tmp_path / "in.parquet"), "--output", str(tmp_path / "o"), "--model", str(tiny_next)
    )
    assert code == 2 and "1 duplicate id(s)" in err and "'a'" in err


def test_missing_input_and_unknown_yaml_key(capsys, tmp_path, tiny_next):
    code, err = run(
        capsys, "--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o"), "--model", str(tiny_next)
    )
    assert code == 2 and "no Parquet files found" in err
    (tmp_path / "job.yaml").write_text("budgett: 0.2\n")
    code, err = run(capsys, "--config", str(tmp_path / "job.yaml"))
    assert code == 2 and "unknown option(s) ['budgett']" in err


def test_one_input_of_several_that_matches_nothing_is_refused(capsys, dataset, tiny_next):
    """A typo in one of several --input values would silently drop that data."""
    code, err = run(capsys, *base(dataset, tiny_next), "--input", str(dataset / "typo.parquet"))
    assert (
        code == 2 and "no Parquet files found at [" in err and "typo.parquet" in err and "(of 2 --input values)" in err
    )
    assert "in.parquet'" not in err


@pytest.mark.parametrize(
    "text, message",
    [
        ("input: [unclosed\n", "is not valid YAML (line 2, column 1)"),
        (
            "max-new-tokens: 16\nmax_new_tokens: 8\n",
            "one option under two spellings: ['max-new-tokens', 'max_new_tokens']",
        ),
    ],
)
def test_yaml_mistakes_are_one_line(capsys, tmp_path, text, message):
    (tmp_path / "job.yaml").write_text(text)
    code, err = run(capsys, "--config", str(tmp_path / "job.yaml"))
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--top-k", "2.5"], "argument --top-k: invalid int value: '2.5'"),
        (["run", "--top_k", "5"], "unrecognized arguments: --top_k 5"),
    ],
)
def test_flag_mistakes_argparse_finds_are_one_line_too(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("where", ["--input", "--output"])
def test_s3_secrets_never_reach_error_text(capsys, tmp_path, tiny_next, where):
    secret = "s3://AKIAEXAMPLE:hunter2@bucket/data?X-Amz-Signature=abc"
    paths = {"--input": str(tmp_path / "in.parquet"), "--output": str(tmp_path / "out")}
    paths[where] = secret
    code, err = run(capsys, "--input", paths["--input"], "--output", paths["--output"], "--model", str(tiny_next))
    assert code == 2 and "credentials inside a URL are not accepted" in err
    assert "hunter2" not in err and "X-Amz-Signature" not in err and "AKIAEXAMPLE" not in err


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("tiny-model", "run", "demo", "bench", "score", "visualize"):
        assert cmd in out


def test_used_output_directory_is_refused_without_overwrite_or_checkpoint(capsys, dataset, tiny_next):
    out = dataset / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": ["old"]}), out / "part-0.parquet")
    code, err = run(capsys, *base(dataset, tiny_next))
    assert code == 2 and "already holds 1 Parquet file(s)" in err


def test_more_than_one_gpu_per_actor_is_refused(capsys, dataset, tiny_next):
    from hired_batch.config import Resources

    code, err = run(capsys, *base(dataset, tiny_next), "--gpus-per-actor", "2")
    assert code == 2 and len(err.splitlines()) == 1
    assert "--gpus-per-actor 2" in err and "one GPU" in err and "--num-actors" in err
    assert Resources(gpus_per_actor=0.5).check().gpus_per_actor == 0.5  # a fraction shares one GPU


def test_unreachable_hf_dataset_fails_before_ray(capsys, tmp_path, tiny_next, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub here; a name not in the local cache
    code, err = run(
        capsys,
        "--input",
        "hf:no-such-org/no-such-dataset:validation",
        "--output",
        str(tmp_path / "o"),
        "--model",
        str(tiny_next),
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert "cannot read Hugging Face dataset 'hf:no-such-org/no-such-dataset:validation'" in err


def test_checkpoint_with_hf_input_fails_before_ray(capsys, tmp_path, tiny_next):
    code, err = run(
        capsys,
        "--input",
        "hf:some-org/some-dataset",
        "--output",
        str(tmp_path / "o"),
        "--model",
        str(tiny_next),
        "--checkpoint",
        str(tmp_path / "ck"),
    )
    assert code == 2 and len(err.splitlines()) == 1
    assert "--checkpoint needs Parquet input" in err


def ray_output_files(out, ckpt, stems, committed=True):
    """Output and checkpoint files named as Ray Data 2.60 names them: a write task's data
    files are STEM-N.parquet, its checkpoint STEM.parquet (STEM.pending.parquet until committed)."""
    out.mkdir(exist_ok=True)
    ckpt.mkdir(exist_ok=True)
    for i, stem in enumerate(stems):
        pq.write_table(pa.table({"id": [f"r{i}"]}), out / f"{stem}-0.parquet")
        pq.write_table(pa.table({"id": [f"r{i}"]}), ckpt / f"{stem}{'' if committed else '.pending'}.parquet")


def test_resume_refuses_output_files_its_checkpoint_does_not_account_for(capsys, dataset, tiny_next):
    out, ckpt = dataset / "out", dataset / "ckpt"
    out.mkdir()
    pq.write_table(pa.table({"id": ["a"]}), out / "run-without-checkpoint_000000-0.parquet")
    code, err = run(capsys, *base(dataset, tiny_next))  # that run had no --checkpoint: no advice to add one
    assert code == 2 and len(err.splitlines()) == 1
    assert "already holds 1 Parquet file(s) that no checkpoint accounts for" in err and "--checkpoint" not in err
    code, err = run(capsys, *base(dataset, tiny_next), "--checkpoint", str(ckpt))  # a new checkpoint: refused
    assert code == 2 and len(err.splitlines()) == 1
    assert f"holds 1 Parquet file(s) that checkpoint '{ckpt}' does not account for" in err
    assert "run-without-checkpoint_000000-0.parquet" in err and "--overwrite" in err
    ray_output_files(out, ckpt, ["u_000001", "u_000002"])  # a checkpointed run's files next to the stray one
    code, err = run(capsys, *base(dataset, tiny_next), "--checkpoint", str(ckpt))
    assert code == 2 and "holds 1 Parquet file(s) that checkpoint" in err


def test_resume_refuses_a_checkpoint_whose_output_files_are_gone(capsys, dataset, tiny_next):
    out, ckpt = dataset / "out", dataset / "ckpt"
    ray_output_files(out, ckpt, ["u_000001", "u_000002"])
    (out / "u_000002-0.parquet").unlink()  # rows the checkpoint calls done, missing from the output
    code, err = run(capsys, *base(dataset, tiny_next), "--checkpoint", str(ckpt))
    assert code == 2 and len(err.splitlines()) == 1
    assert "records 1 row(s) as written that no file in output" in err and "e.g. id 'r1'" in err


def _handler_raising(exc):
    def handler(args):
        raise exc

    return handler


def test_only_config_errors_become_exit_2_and_bugs_keep_their_traceback(capsys, monkeypatch):
    """A ValueError raised deep inside (a bug, or a library's own check) is not a user
    mistake: it must reach the caller with its traceback, not be printed as one line."""
    from hired_batch import cli
    from hired_batch.config import ConfigError

    monkeypatch.setattr(cli, "_tiny_model", _handler_raising(ValueError("deep inside transformers")))
    with pytest.raises(ValueError, match="deep inside transformers"):
        cli.main(["tiny-model", "unused"])
    assert capsys.readouterr().err == ""

    monkeypatch.setattr(cli, "_tiny_model", _handler_raising(ConfigError("--thing must be >= 1, got 0")))
    assert cli.main(["tiny-model", "unused"]) == 2
    assert capsys.readouterr().err.strip() == "hired-batch tiny-model: error: --thing must be >= 1, got 0"


def test_run_standalone_keeps_the_same_error_contract(capsys):
    from hired_batch.config import ConfigError

    def no_flags(parser):
        pass

    with pytest.raises(ValueError, match="a bug"):
        run_standalone("job.py", "d", no_flags, _handler_raising(ValueError("a bug")), argv=[])
    assert run_standalone("job.py", "d", no_flags, _handler_raising(ConfigError("bad flag")), argv=[]) == 2
    assert capsys.readouterr().err.strip() == "job.py: error: bad flag"


def test_tiny_model_with_vllm_widths(tmp_path, capsys):
    """``tiny-model --vllm``: the same tiny checkpoint with a language-model head size vLLM's
    CPU attention takes (32), for trying ``--engine vllm``; without it, the test default (16)."""
    import json

    for flag, head_dim in (["--vllm"], 32), ([], 16):
        out = tmp_path / f"tiny{len(flag)}"
        assert main(["tiny-model", str(out), *flag]) == 0
        text = json.loads((out / "config.json").read_text())["text_config"]
        assert text["hidden_size"] // text["num_attention_heads"] == head_dim
    assert "(vLLM widths)" in capsys.readouterr().out


STARTUP_TIMEOUT = (
    "The current node timed out during startup. This could happen because some of the raylet "
    "failed to startup or the GCS has become overloaded."
)  # ray/_private/node.py's words


@pytest.mark.parametrize(
    "ray_address, expected",
    [
        (None, "the embedded Ray did not start: Exception: The current node timed out during startup."),
        ("10.0.0.1:6379", "could not join the Ray cluster at 10.0.0.1:6379 (from RAY_ADDRESS): Exception: The current"),
    ],
)
def test_ray_that_does_not_start_is_one_line(capsys, dataset, tiny_next, monkeypatch, ray_address, expected):
    import ray

    def init(*args, **kwargs):
        raise Exception(STARTUP_TIMEOUT)

    monkeypatch.setattr(ray, "init", init)
    if ray_address:
        monkeypatch.setenv("RAY_ADDRESS", ray_address)
    else:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code, err = run(capsys, *base(dataset, tiny_next))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert expected in err and "check" in err, err
    assert not (dataset / "out").exists()


@pytest.mark.slow
def test_unreachable_ray_address_is_one_line(dataset, tiny_next):
    """A real ray.init failure (Ray Client gives up after ~30 s), in a child process as a user runs it."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run(
        [sys.executable, "-m", "hired_batch", "run", *base(dataset, tiny_next), "--address", f"ray://127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert last.startswith(
        f"hired-batch run: error: could not join the Ray cluster at ray://127.0.0.1:{port} "
        "(from --address): ConnectionError"
    ), last
    assert not (dataset / "out").exists()
