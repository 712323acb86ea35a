"""The ``hired-batch`` command: one subcommand per user task.

Each subcommand lives in the module that does the work; this file only wires argparse
to them and turns user mistakes (``ConfigError``, and ``FileNotFoundError`` for a path
the user gave) into one clear line and exit code 2; any other exception is a bug and
keeps its traceback. torch and transformers are imported inside the handlers; building
the parser imports each subcommand's module, and ``run``'s imports Ray Data, so
``--help`` is not instant.
"""

from __future__ import annotations

import argparse
import sys

from hired_batch.config import SUPPORTED_MODEL_TYPES, ConfigError

# What the CLI reports as one line + exit 2: a user mistake. FileNotFoundError is here
# because a missing --config, input, IMAGE or OUTPUT path reaches us as one, raised by
# open() or pyarrow at the boundary where the user's path is first read.
USER_ERRORS = (ConfigError, FileNotFoundError)


def _tiny_model(args) -> int:
    try:
        from hired_batch.engine.tiny import VLLM_WIDTHS, build_tiny_checkpoint
    except (
        ImportError
    ) as e:  # transformers' lazy classes: where a torchvision/torchaudio built for another torch shows first
        from hired_batch.engine.environment import explain_import_error

        raise ConfigError(
            f"transformers cannot import the LLaVA classes here: {explain_import_error(e)} "
            "(hired-batch doctor checks the whole install)"
        ) from e

    path = build_tiny_checkpoint(args.path, args.kind, seed=args.seed, widths=VLLM_WIDTHS if args.vllm else None)
    print(f"wrote tiny {args.kind} checkpoint{' (vLLM widths)' if args.vllm else ''} to {path}")
    return 0


def _add_tiny(sub) -> None:
    p = sub.add_parser("tiny-model", help="write a tiny random-weight LLaVA checkpoint (tests, demo)")
    p.add_argument("path", help="directory to write")
    p.add_argument("--kind", choices=SUPPORTED_MODEL_TYPES, default="llava_next")
    p.add_argument("--seed", type=int, default=0, help="weight seed")
    p.add_argument(
        "--vllm",
        action="store_true",
        help="language-model heads vLLM's CPU attention takes (head_dim 32), for --engine vllm",
    )
    p.set_defaults(func=_tiny_model)


SUBCOMMAND_MODULES = (
    "job.runner",
    "demo",
    "bench.engine_bench",
    "bench.plan",
    "bench.calibrate",
    "eval.score_cli",
    "eval.visualize",
    "doctor",
)  # each has add_parser(sub)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a flag mistake (an unknown flag, a value of the wrong type) is one
    line and exit 2, like every other user mistake; ``--help`` still shows the usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = OneLineParser(
        prog="hired-batch",
        description="Batch visual QA / captioning with HiRED-pruned LLaVA on Ray Data.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_tiny(sub)
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(f"hired_batch.{module}").add_parser(sub)
    return parser


def run_standalone(prog: str, description: str, add_flags, handler, argv=None) -> int:
    """A ``jobs/`` entrypoint: one subcommand's flags and handler, same error contract."""
    parser = OneLineParser(prog=prog, description=description)
    add_flags(parser)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = _invocation([prog]) + argv
    try:
        return int(handler(args) or 0)
    except USER_ERRORS as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


def batch_qa_main(argv=None) -> int:
    """Standalone entry of jobs/batch_qa.py: same flags as ``hired-batch run``."""
    from hired_batch.job import runner

    return run_standalone("batch_qa", "HiRED batch QA job", runner.add_run_arguments, runner.run_main, argv)


def benchmark_main(argv=None) -> int:
    """Standalone entry of jobs/benchmark.py: same flags as ``hired-batch bench``."""
    from hired_batch.bench import engine_bench

    return run_standalone(
        "benchmark",
        engine_bench.__doc__.split("\n\n")[0] + "\n\n" + engine_bench.CPU_STALL_HELP,
        engine_bench.add_flags,
        engine_bench.run_bench,
        argv,
    )


def _invocation(default: list[str]) -> list[str]:
    """How this process was started, as words a user can type again."""
    script = sys.argv[0] if sys.argv else ""
    if script.endswith("__main__.py"):
        return ["python", "-m", "hired_batch"]
    if script.endswith(".py") and "pytest" not in script:
        return ["python", script]  # e.g. jobs/batch_qa.py
    return default


def main(argv=None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = _invocation(["hired-batch"]) + argv  # what to print to rerun it
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as e:
        print(f"hired-batch {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
