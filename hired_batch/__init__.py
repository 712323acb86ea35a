"""hired_batch: HiRED-pruned LLaVA batch inference on Ray Data.

Layers, imported one way only (tests/test_layers.py): entry (cli, demo) -> tooling
(bench/, eval/) -> job/ (the Ray Data job) -> engine/ (the model in one process: HF and
vLLM backends, the token plan, the selection math) -> config; docs/architecture.md
lists every module.
"""

__version__ = "0.1.0"
