"""Entrypoint for ``ray job submit``: the same flags as ``hired-batch bench``.

    ray job submit --address http://HEAD:8265 --entrypoint-num-gpus 1 \
        --runtime-env cluster/runtime_env.yaml -- \
        python jobs/benchmark.py --preset llava-next-7b --batch-sizes 1,4,16,auto --json bench.json

The bench is one process on one accelerator, not a Ray Data pipeline:
``--entrypoint-num-gpus 1`` makes Ray run this driver on a node with a GPU (without it,
the driver runs on the head node, which may have none). Results print to the job log;
``--json``/``--plot`` paths are on that node.

This file does nothing else: flags, measurement and output live in hired_batch.bench.engine_bench.
"""

from _importable import ensure_importable

if __name__ == "__main__":
    ensure_importable()
    from hired_batch.cli import benchmark_main

    raise SystemExit(benchmark_main())
