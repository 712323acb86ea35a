"""Bounded engine restarts: a generation engine that fails the same way twice ends the job.

Ray restarts a generation actor whose process died (kill -9, a lost node, vLLM's dead
engine) and retries its batches on it; exactly-once relies on that. A failure that
comes back on every restart (a checkpoint the engine cannot run, a model too large for
the card) would restart forever, so each actor reports its engine's failures to one
small ``FailureLog`` actor per job, keyed by the actor's id (a restarted actor keeps it):

- start-up: a failed start restarts the actor (a fresh process) once more; the same
  error twice in a row, or ``START_TRIES`` failed starts, end the job. A process that
  dies while its engine starts counts as a failed start too.
- while serving (vLLM's engine died): the actor restarts; the same error twice in a
  row, with no batch served in between, ends the job.

The job ends with ``EngineFailed``: its message is the one line the CLI prints. Ray
reports an exception raised in an actor's constructor only as text
(``ActorDiedError``), so ``engine_failure`` finds ours in an exception or its text.
"""

from __future__ import annotations

import os
import re
import sys
import traceback

START_TRIES = 3  # starts of one generation actor in a row that may fail (with different errors)


class EngineFailed(RuntimeError):
    """The generation engine failed the same way again: a restart would not help."""


class FailureLog:
    """A job's record of its generation engines' failures, per (actor, phase). A Ray actor
    (``start_log``); the stages reach it through their handle."""

    def __init__(self):
        self.tries: dict[str, int] = {}  # starts begun since the last good one
        self.causes: dict[str, str] = {}  # the last failure's first line

    def begin(self, key: str) -> tuple[int, str | None]:
        """Count a start; (starts begun in a row, the last failure's cause)."""
        self.tries[key] = self.tries.get(key, 0) + 1
        return self.tries[key], self.causes.get(key)

    def failed(self, key: str, cause: str) -> bool:
        """Record a failure; True when the previous one of ``key`` had the same cause."""
        same = self.causes.get(key) == cause
        self.causes[key] = cause
        return same

    def ok(self, key: str) -> None:
        """A start or a batch went well: the failures before it are no longer in a row."""
        self.tries.pop(key, None)
        self.causes.pop(key, None)


def start_log():
    """A ``FailureLog`` actor for one job (no CPU reserved; it lives as long as its handles)."""
    import ray

    return ray.remote(num_cpus=0)(FailureLog).remote()


def cause_of(exc: BaseException) -> str:
    """An exception as one line: its type and first line."""
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def start_engine(start, log):
    """``start()`` in a generation actor, bounded by ``log`` (None: no bound, e.g. no Ray).

    A start that fails for the first time ends this process so that Ray restarts the
    actor and its constructor runs again in a fresh one; one that fails as the last did,
    or after ``START_TRIES`` tries, raises ``EngineFailed`` (Ray Data then ends the job).
    """
    if log is None:
        return start()
    import ray

    key = _actor_key("start")
    tries, last = ray.get(log.begin.remote(key))
    if tries > START_TRIES:  # the earlier tries died without reporting (the process was killed)
        raise EngineFailed(
            f"generation engine failed to start {tries - 1} times in a row; last error: "
            f"{last or 'its process died while starting (see the log above)'}"
        )
    try:
        engine = start()
    except Exception as e:  # noqa: BLE001 - any start-up failure counts
        cause = cause_of(e)
        if ray.get(log.failed.remote(key, cause)):
            raise EngineFailed(f"generation engine failed to start twice with the same error: {cause}") from e
        if tries >= START_TRIES:
            raise EngineFailed(f"generation engine failed to start {tries} times in a row; last error: {cause}") from e
        _restart_process(f"generation engine failed to start ({cause}); restarting the actor")
    ray.get(log.ok.remote(key))
    return engine


def engine_died(log, exc: BaseException) -> None:
    """A generation actor's engine died while serving: end this process so that Ray
    restarts the actor and retries its batches, or raise ``EngineFailed`` when the
    actor's engine died of the same error last time, with no batch served since."""
    cause = cause_of(exc)
    if log is not None:
        import ray

        if ray.get(log.failed.remote(_actor_key("run"), cause)):
            raise EngineFailed(f"generation engine died twice in a row with the same error: {cause}") from exc
    _restart_process(f"generation engine died ({cause}); restarting the actor")


def served(log) -> None:
    """A batch was served: this actor's earlier engine deaths are no longer in a row."""
    if log is not None:
        log.ok.remote(_actor_key("run"))


def engine_failure(exc: BaseException) -> EngineFailed | None:
    """The ``EngineFailed`` behind ``exc`` (Ray's wrapper of a failed task or actor), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, EngineFailed):
            return EngineFailed(str(exc))
        found = re.search(r"EngineFailed: (.+)", str(exc))
        if found:
            return EngineFailed(found.group(1).strip())
        exc = exc.__cause__ or exc.__context__
    return None


def _actor_key(phase: str) -> str:
    import ray

    return f"{ray.get_runtime_context().get_actor_id()}/{phase}"


def _restart_process(message: str) -> None:
    """Print why, then end this process at once: Ray restarts the actor (its batches are retried)."""
    traceback.print_exc()
    print(message, file=sys.stderr, flush=True)
    os._exit(1)
