"""Shared by the jobs/ entrypoints: make ``import hired_batch`` work from a bare checkout.

Run as ``python jobs/NAME.py`` (also under ``ray job submit``), this folder is first on
sys.path, so the scripts import this module before ``hired_batch`` can be imported.
"""

import os
import sys


def ensure_importable() -> None:
    """Put the repo root (the parent of jobs/) on sys.path if the package is not installed."""
    try:
        import hired_batch  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
