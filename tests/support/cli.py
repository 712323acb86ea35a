"""Running ``hired-batch run`` in this process to check a configuration mistake."""

from __future__ import annotations


def run_before_ray(capsys, *argv, command: str = "run") -> tuple[int, str]:
    """(exit code, stderr) of ``hired-batch COMMAND ARGV`` (``run`` unless said); fails
    the test if Ray started: configuration errors must be found before it does."""
    import ray

    from hired_batch.cli import main

    code = main([command, *argv])
    err = capsys.readouterr().err.strip()
    assert not ray.is_initialized(), "configuration errors must be found before Ray starts"
    return code, err
