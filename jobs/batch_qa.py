"""Entrypoint for ``ray job submit``: the same flags as ``hired-batch run``.

    ray job submit --address http://127.0.0.1:8265 \
        --runtime-env cluster/runtime_env.yaml -- python jobs/batch_qa.py --input ... --output ...

Under ``ray job submit`` the driver runs on the head node inside the uploaded copy of
the working dir, with RAY_ADDRESS set, so ``hired_batch.job.runner`` joins that cluster
instead of starting an embedded Ray. If the package is not installed there, the
uploaded repo root (the parent of jobs/) is put on sys.path; Ray puts the same
working dir on the workers' PYTHONPATH, so actors import the same code.

This file does nothing else: flags, validation and the pipeline live in hired_batch.
"""

import sys

from _importable import ensure_importable

if __name__ == "__main__":
    ensure_importable()
    from hired_batch.cli import batch_qa_main

    sys.exit(batch_qa_main(sys.argv[1:]))
