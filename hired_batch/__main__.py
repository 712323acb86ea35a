"""`python -m hired_batch ...` is the same as the `hired-batch` command."""

from hired_batch.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
