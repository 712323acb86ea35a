"""Every Ray resource knob of the job's stages: actor CPUs, GPUs and host memory,
torch threads of CPU-only actors, preprocessing batch rows. Reads the live cluster
(``ray.nodes()``) where a default or a check depends on it.
"""

from __future__ import annotations

from dataclasses import replace

from hired_batch.config import ConfigError, Resources, parse_bytes

# CPUs each read task reserves: reading is I/O bound, and with 0.25 a read task, a
# preprocessing and a generation actor and Ray's checkpoint filter fit on 2 CPUs
# (``pipeline.read_input``); a setting, not a knob: nothing measured says another value helps.
READ_CPUS = 0.25


def with_cluster_gpus(r: Resources) -> Resources:
    """``r`` with its GPU default settled: ``gpus_per_actor`` None becomes
    ``tensor_parallel_size`` (1 unless vLLM shards the model) when the running Ray
    cluster has GPUs, else 0 (a GPU actor on a CPU-only cluster would wait forever)."""
    if r.gpus_per_actor is not None:
        return r
    import ray

    gpus = float(r.tensor_parallel_size) if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    return replace(r, gpus_per_actor=gpus)


def generation_on_cpu(r: Resources) -> bool:
    """True when the generation actors surely run on CPU, as known before Ray starts:
    ``--gpus-per-actor 0``, or an embedded Ray (no RAY_ADDRESS, none joined yet) on a
    machine without CUDA and no GPU asked for. A job that joins a cluster is not known
    here (``with_cluster_gpus`` settles it once Ray runs)."""
    import os

    if r.gpus_per_actor is not None:
        return r.gpus_per_actor == 0
    import ray
    import torch

    return not os.environ.get("RAY_ADDRESS") and not ray.is_initialized() and not torch.cuda.is_available()


def preprocess_batch(r: Resources) -> int:
    """Rows per preprocessing call: one generate batch (at most 16), so the first
    generate call waits for its own rows only, not for a larger preprocessed block."""
    return min(16, r.batch_size) if isinstance(r.batch_size, int) else 16


def generate_remote_args(r: Resources) -> dict:
    """Ray resources of a generation actor: GPUs, CPUs, host memory if asked, threads."""
    args = dict(num_gpus=r.gpus_per_actor, num_cpus=r.generate_cpus)
    if r.generate_memory is not None:
        args["memory"] = parse_bytes(r.generate_memory)
        _check_schedulable_memory(args["memory"])
    return {**args, **_cpu_threads(r)}


def _check_schedulable_memory(want: int) -> None:
    """Refuse a host-memory reservation no node can give (the actor would wait forever)."""
    import ray

    if not ray.is_initialized():
        return
    most = _largest_node("memory", 0)
    if want > most:
        raise ConfigError(
            f"--generate-memory {want / 1e9:.1f} GB is more than any node can reserve "
            f"(largest: {most / 1e9:.1f} GB of Ray 'memory')"
        )


def _cpu_threads(r: Resources) -> dict:
    """CPU-only generation actors: torch threads = the largest node's CPUs (Ray remote args).

    Ray sets OMP_NUM_THREADS to floor(num_cpus), at least 1, in a worker that has none,
    so a 0.25-CPU actor would run torch on one thread; without a GPU it does all the
    model's work and is the bottleneck. GPU actors keep Ray's default (they wait on the GPU).
    """
    if r.gpus_per_actor:
        return {}
    cpus = int(_largest_node("CPU", 1))
    return dict(runtime_env={"env_vars": {"OMP_NUM_THREADS": str(max(cpus, 1))}})


def _largest_node(resource: str, missing: float) -> float:
    """The most of a Ray resource one live node has (``missing`` where a node lists none)."""
    import ray

    return max((n["Resources"].get(resource, missing) for n in ray.nodes() if n["Alive"]), default=missing)
