"""Shared fixtures: tiny random-weight checkpoints built once per session; a check that
every test starting Ray in this process is marked slow."""

import functools
import importlib.abc
import importlib.util
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub on our machines; fail fast if touched
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every test starts its own Ray: a RAY_ADDRESS from the caller's shell would make the CLI
# join that cluster. Tests about RAY_ADDRESS set it themselves (monkeypatch).
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def tiny_next(tmp_path_factory):
    from hired_batch.engine.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava-next", "llava_next")


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    from hired_batch.engine.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", "llava")


# --------------------------------------------------------------------------- Ray needs `slow`
# `pytest -m "not slow"` is the inner loop: a Ray start costs it 10-60 s. A test (or the
# fixtures it sets up) that calls ray.init in this process without the mark fails. Ray
# started in a child process (a subprocess CLI) is not seen here; --durations finds those.

_ray_inits = 0


def _count_ray_inits():
    """Wrap ray.init once ray is imported, so a test that starts and stops Ray is seen too."""
    ray = sys.modules.get("ray")
    if ray is None or getattr(ray.init, "_counted", False):
        return
    init = ray.init

    @functools.wraps(init)
    def counted(*args, **kwargs):
        global _ray_inits
        _ray_inits += 1
        return init(*args, **kwargs)

    counted._counted = True
    ray.init = counted


class _PatchRayOnImport(importlib.abc.MetaPathFinder):
    """Wraps ray.init the moment ray is first imported, wherever that happens."""

    def find_spec(self, name, path=None, target=None):
        if name != "ray":
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _count_ray_inits()

        spec.loader.exec_module = exec_and_patch
        return spec


if "ray" in sys.modules:
    _count_ray_inits()
else:
    sys.meta_path.insert(0, _PatchRayOnImport())


def _ray_up():
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item):
    item._ray_before = (_ray_inits, _ray_up())
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when != "call" or not report.passed or item.get_closest_marker("slow"):
        return
    inits, was_up = getattr(item, "_ray_before", (_ray_inits, True))
    if _ray_inits > inits or (_ray_up() and not was_up):
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} starts Ray but is not marked @pytest.mark.slow: "
            "mark it, or keep it off Ray (tests/conftest.py)"
        )
