"""Running ``hired-batch run`` in this process to check a configuration mistake."""

from __future__ import annotations


def run_before_ray(capsys, *argv) -> tuple[int, str]:
    """(exit code, stderr) of ``hired-batch run ARGV``; fails the test if Ray started:
    configuration errors must be found before it does."""
    import ray

    from hired_batch.cli import main

    code = main(["run", *argv])
    err = capsys.readouterr().err.strip()
    assert not ray.is_initialized(), "configuration errors must be found before Ray starts"
    return code, err
